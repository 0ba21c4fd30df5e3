//! Durable steps against a real nats-server: checkpoints and step events,
//! the checkpoint chain's fencing, large outputs through the object store,
//! step retries and timeouts, divergence, recorded `now`/`uuid`/`random`,
//! and run attempts bounded by `max_attempts`. Process-level crash tests
//! (SIGKILL, SIGSTOP, server restarts) are in the root crate's
//! `tests/crash.rs`.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use common::{assert_gapless, types, wait_until, Env, DEADLINE};
use runfleet_protocol::checkpoint::StepOutput;
use runfleet_protocol::event::{Event, EventBody};
use runfleet_protocol::{AgentName, ErrorCode, RunId, WorkerId};
use runfleet_worker::runtime::checkpoints::{self, CheckpointLog, Writer};
use runfleet_worker::sdk::{Agent, AgentError, Agents, RunContext, StepError, StepOptions};
use runfleet_worker::{agents, WorkerConfig};
use serde_json::{json, Value};

const LEASE_TTL: Duration = Duration::from_secs(15);

fn agents_with(name: &str, agent: impl Agent) -> Agents {
    let mut agents = agents::builtin();
    agents.register(AgentName::new(name).unwrap_or_else(|e| panic!("{e}")), agent);
    agents
}

fn failed(events: &[Event]) -> (ErrorCode, String) {
    match events.last().map(|e| &e.body) {
        Some(EventBody::Failed(f)) => (f.error.code, f.error.message.clone()),
        other => panic!("expected run.failed, got {other:?}"),
    }
}

#[tokio::test]
async fn steps_are_checkpointed_and_logged_in_order() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let worker = env.worker(env.config(2), agents::builtin()).await?;
    let run = env.submit("steps", json!({"steps": 4}), 2).await?;

    let events = env.wait_terminal(run).await?;
    assert_gapless(&events);
    let mut expected = vec!["run.created", "run.started"];
    for _ in 0..4 {
        expected.extend(["step.started", "step.completed"]);
    }
    expected.push("run.completed");
    assert_eq!(types(&events), expected);
    // `run.started` and each `step.completed` are held for the run's next
    // event, so each goes out in one message with it.
    let mut messages: Vec<(u64, Vec<&str>)> = Vec::new();
    let stored = env.events(run).await?;
    for (stream_seq, event) in &stored {
        match messages.last_mut() {
            Some((seq, types)) if seq == stream_seq => types.push(event.body.type_name()),
            _ => messages.push((*stream_seq, vec![event.body.type_name()])),
        }
    }
    let mut expected = vec![vec!["run.created"], vec!["run.started", "step.started"]];
    for _ in 0..3 {
        expected.push(vec!["step.completed", "step.started"]);
    }
    expected.push(vec!["step.completed", "run.completed"]);
    assert_eq!(messages.into_iter().map(|(_, types)| types).collect::<Vec<_>>(), expected);
    for (i, pair) in events[2..10].chunks(2).enumerate() {
        let index = u32::try_from(i)?;
        assert!(matches!(&pair[0].body, EventBody::StepStarted(s) if s.index == index && s.attempt == 1));
        assert!(
            matches!(&pair[1].body, EventBody::StepCompleted(s) if s.index == index && s.name == format!("step-{i}") && !s.blob)
        );
    }

    let checkpoints = env.checkpoints(run).await?;
    assert_eq!(checkpoints.keys().copied().collect::<Vec<_>>(), [0, 1, 2, 3]);
    for (index, checkpoint) in &checkpoints {
        assert_eq!((checkpoint.attempt, &checkpoint.worker_id), (1, &worker.id));
        assert_eq!(checkpoint.name, format!("step-{index}"));
        assert!(matches!(&checkpoint.output, StepOutput::Inline { value } if value["index"] == json!(index)));
    }
    worker.stop().await
}

/// The server, not the worker's good behaviour, refuses a stale attempt's
/// checkpoint: a resuming attempt fences the run's chain, after which the
/// old attempt's next write fails, and a step can be written only once.
#[tokio::test]
async fn checkpoint_chain_refuses_stale_writers() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let stores = env.checkpoint_stores(64 * 1024).await?;
    let run = RunId::generate();
    let writer = |worker: &str, attempt, fencing_token| Writer {
        worker_id: WorkerId::new(worker).unwrap_or_else(|e| panic!("{e}")),
        attempt,
        fencing_token,
    };
    let ms = Duration::from_millis(1);

    let mut old = CheckpointLog::fresh(stores.clone(), run, writer("old", 1, 10));
    old.write(0, "a", json!("from old"), ms).await?;

    let mut new = CheckpointLog::resume(stores.clone(), run, writer("new", 2, 20)).await?;
    assert_eq!(new.recorded_count(), 1);
    assert_eq!(new.recorded(0).map(|c| c.attempt), Some(1));

    let refused = old.write(1, "b", json!("from old"), ms).await;
    assert!(matches!(refused, Err(checkpoints::Error::Fenced { .. })), "{refused:?}");
    assert!(old.is_lost());
    // Once refused, the stale log never writes again.
    assert!(matches!(old.write(2, "c", json!(0), ms).await, Err(checkpoints::Error::Fenced { .. })));

    new.write(1, "b", json!("from new"), ms).await?;
    // A second writer of a recorded step fails, like a KV create.
    let mut stale = CheckpointLog::fresh(stores.clone(), run, writer("stale", 1, 5));
    assert!(matches!(stale.write(1, "b", json!("again"), ms).await, Err(checkpoints::Error::Fenced { .. })));

    let stored = env.checkpoints(run).await?;
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[&0].worker_id.as_str(), "old");
    assert_eq!(stored[&1].worker_id.as_str(), "new");
    assert_eq!(stored[&1].output, StepOutput::Inline { value: json!("from new") });

    // A later attempt sees both and fences the new one out in turn.
    let third = CheckpointLog::resume(stores, run, writer("third", 3, 30)).await?;
    assert_eq!(third.recorded_count(), 2);
    assert!(matches!(new.write(2, "c", json!(0), ms).await, Err(checkpoints::Error::Fenced { .. })));
    Ok(())
}

/// Outputs over the inline limit go to the object store; a later attempt
/// reads them back, and a tampered object is reported as corrupt rather
/// than replayed.
#[tokio::test]
async fn large_outputs_round_trip_through_the_object_store() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let stores = env.checkpoint_stores(64 * 1024).await?;
    let run = RunId::generate();
    let big = json!({ "text": "x".repeat(3 * 1024 * 1024) });
    let writer = |attempt, fencing_token| Writer {
        worker_id: WorkerId::new("w").unwrap_or_else(|e| panic!("{e}")),
        attempt,
        fencing_token,
    };

    let mut first = CheckpointLog::fresh(stores.clone(), run, writer(1, 1));
    assert!(
        first.write(0, "big", big.clone(), Duration::ZERO).await?,
        "a 3 MB output must go to the object store"
    );
    first.write(1, "small", json!(1), Duration::ZERO).await?;

    let second = CheckpointLog::resume(stores.clone(), run, writer(2, 2)).await?;
    let recorded = second.recorded(0).context("step 0 not recorded")?.clone();
    let StepOutput::Blob { object, size, .. } = &recorded.output else { panic!("expected a blob reference") };
    assert!(*size > 3 * 1024 * 1024);
    assert_eq!(second.output(&recorded).await?, big);
    assert_eq!(second.output(second.recorded(1).context("step 1")?).await?, json!(1));

    stores.blobs.put(object.as_str(), &mut b"tampered".as_slice()).await?;
    let corrupt = second.output(&recorded).await;
    assert!(matches!(corrupt, Err(checkpoints::Error::Corrupt { .. })), "{corrupt:?}");
    Ok(())
}

/// A step that fails twice with a retryable error and then succeeds; a
/// step that fails fatally; a step that times out.
struct Flaky {
    tries: Arc<AtomicU32>,
}

#[async_trait]
impl Agent for Flaky {
    async fn run(&self, ctx: &mut RunContext, input: Value) -> Result<Value, AgentError> {
        let options =
            StepOptions::new().retries(3).backoff(Duration::from_millis(10), Duration::from_millis(50));
        let tries = self.tries.clone();
        let value: u32 = ctx
            .step_with("flaky", options, |step| {
                let tries = tries.clone();
                async move {
                    tries.fetch_add(1, Ordering::SeqCst);
                    assert_eq!(step.idempotency_key(), format!("{}:0", step.run_id()));
                    if step.attempt() < 3 {
                        Err(StepError::retryable(format!("503 on try {}", step.attempt())))
                    } else {
                        Ok(step.attempt())
                    }
                }
            })
            .await?;
        match input["then"].as_str() {
            Some("fatal") => {
                ctx.step("refused", |_| async { Err::<u32, _>(StepError::fatal("400 bad request")) }).await?;
            }
            Some("timeout") => {
                let options = StepOptions::new().timeout(Duration::from_millis(50)).retries(1).jitter(false);
                ctx.step_with("slow", options, |_| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Ok(0u32)
                })
                .await?;
            }
            _ => {}
        }
        Ok(json!({ "value": value }))
    }
}

#[tokio::test]
async fn steps_retry_retryable_errors_and_fail_on_fatal_ones_and_timeouts() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let tries = Arc::new(AtomicU32::new(0));
    let worker = env.worker(env.config(3), agents_with("flaky", Flaky { tries: tries.clone() })).await?;

    let ok = env.submit("flaky", json!({}), 2).await?;
    let events = env.wait_terminal(ok).await?;
    assert_gapless(&events);
    assert_eq!(
        types(&events),
        [
            "run.created",
            "run.started",
            "step.started",
            "step.failed",
            "step.started",
            "step.failed",
            "step.started",
            "step.completed",
            "run.completed"
        ]
    );
    for event in &events {
        if let EventBody::StepFailed(f) = &event.body {
            assert!(f.retryable && f.retry_in_ms.is_some() && f.error.starts_with("503"), "{f:?}");
        }
    }
    assert!(matches!(&events[7].body, EventBody::StepCompleted(c) if c.attempt == 3));
    assert!(matches!(&events[8].body, EventBody::Completed(c) if c.output == json!({"value": 3})));
    assert_eq!(tries.load(Ordering::SeqCst), 3);

    let fatal = env.submit("flaky", json!({"then": "fatal"}), 2).await?;
    let events = env.wait_terminal(fatal).await?;
    let (code, message) = failed(&events);
    assert_eq!(code, ErrorCode::StepFailed);
    assert!(message.contains("refused") && message.contains("400 bad request"), "{message}");
    let last_step_failed = events.iter().rev().find_map(|e| match &e.body {
        EventBody::StepFailed(f) => Some(f.clone()),
        _ => None,
    });
    assert!(last_step_failed.is_some_and(|f| !f.retryable && f.retry_in_ms.is_none()));

    let timeout = env.submit("flaky", json!({"then": "timeout"}), 2).await?;
    let events = env.wait_terminal(timeout).await?;
    let (code, message) = failed(&events);
    assert_eq!(code, ErrorCode::StepFailed);
    assert!(message.contains("timed out"), "{message}");
    let slow_failures = events
        .iter()
        .filter(|e| matches!(&e.body, EventBody::StepFailed(f) if f.name == "slow" && f.retryable))
        .count();
    assert_eq!(slow_failures, 2, "one try and one retry");
    worker.stop().await
}

/// Version 1 of an agent: one step, then waits (until handed off).
struct FlowV1;

#[async_trait]
impl Agent for FlowV1 {
    async fn run(&self, ctx: &mut RunContext, _input: Value) -> Result<Value, AgentError> {
        ctx.step("fetch", |_| async { Ok(1u32) }).await?;
        ctx.cancelled().await;
        Err(AgentError::failed("stopped"))
    }
}

/// Version 2 renamed the step, and swallows the error it gets.
struct FlowV2;

#[async_trait]
impl Agent for FlowV2 {
    async fn run(&self, ctx: &mut RunContext, _input: Value) -> Result<Value, AgentError> {
        let _ignored = ctx.step("download", |_| async { Ok(2u32) }).await;
        Ok(json!("finished anyway"))
    }
}

#[tokio::test]
async fn changed_step_names_fail_the_run_with_a_divergence_naming_both() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let config = WorkerConfig { shutdown_grace: Duration::from_millis(200), ..env.config(1) };
    let first = env.worker(config.clone(), agents_with("flow", FlowV1)).await?;
    let run = env.submit("flow", json!({}), 2).await?;
    wait_until(DEADLINE, || async {
        Ok(env
            .events(run)
            .await?
            .iter()
            .any(|(_, e)| matches!(e.body, EventBody::StepCompleted(_)))
            .then_some(()))
    })
    .await?;
    // Hand the run off (shutdown), then resume it on the new code.
    first.stop().await?;
    let second = env.worker(config, agents_with("flow", FlowV2)).await?;

    let events = env.wait_terminal(run).await?;
    assert_gapless(&events);
    assert!(events.iter().any(|e| matches!(&e.body, EventBody::Resumed(r) if r.steps_replayed == 1)));
    let (code, message) = failed(&events);
    assert_eq!(code, ErrorCode::Divergence);
    assert!(message.contains("\"fetch\"") && message.contains("\"download\""), "{message}");
    // The renamed step never ran.
    assert!(!events.iter().any(|e| matches!(&e.body, EventBody::StepStarted(s) if s.name == "download")));
    second.stop().await
}

/// Records a time, a UUID and a random number, then (on its first attempt)
/// waits to be handed off; later attempts output what they replayed.
struct Recorder;

#[async_trait]
impl Agent for Recorder {
    async fn run(&self, ctx: &mut RunContext, _input: Value) -> Result<Value, AgentError> {
        let now = ctx.now().await?;
        let uuid = ctx.uuid().await?;
        let random = ctx.random().await?;
        if ctx.attempt() == 1 {
            ctx.cancelled().await;
        }
        let ms = now.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        Ok(json!({ "now_ms": u64::try_from(ms).unwrap_or(0), "uuid": uuid, "random": random }))
    }
}

#[tokio::test]
async fn now_uuid_and_random_replay_their_recorded_values() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let config = WorkerConfig { shutdown_grace: Duration::from_millis(200), ..env.config(1) };
    let first = env.worker(config.clone(), agents_with("recorder", Recorder)).await?;
    let run = env.submit("recorder", json!({}), 2).await?;
    wait_until(DEADLINE, || async { Ok((env.checkpoints(run).await?.len() == 3).then_some(())) }).await?;
    first.stop().await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = env.worker(config, agents_with("recorder", Recorder)).await?;

    let events = env.wait_terminal(run).await?;
    let Some(EventBody::Completed(done)) = events.last().map(|e| &e.body) else {
        panic!("expected completion")
    };
    assert_eq!(events.last().map(|e| e.attempt), Some(2));
    let recorded = env.checkpoints(run).await?;
    let value = |i: u32| match &recorded[&i].output {
        StepOutput::Inline { value } => value.clone(),
        StepOutput::Blob { .. } => panic!("small outputs are inline"),
    };
    assert_eq!(recorded[&0].name, "runfleet.now");
    assert_eq!(done.output["now_ms"], value(0));
    assert_eq!(done.output["uuid"], value(1));
    assert_eq!(done.output["random"], value(2));
    assert!(recorded.values().all(|c| c.attempt == 1), "replayed, not recorded again");
    second.stop().await
}

/// Fails its attempt with a retryable error until attempt `succeed_on`.
struct Stubborn;

#[async_trait]
impl Agent for Stubborn {
    async fn run(&self, ctx: &mut RunContext, input: Value) -> Result<Value, AgentError> {
        let attempt = ctx.attempt();
        let seen: u32 = ctx.step("first", move |_| async move { Ok(attempt) }).await?;
        let succeed_on = input["succeed_on"].as_u64().unwrap_or(u64::MAX);
        if u64::from(attempt) < succeed_on {
            return Err(AgentError::retryable(format!("upstream down on attempt {attempt}")));
        }
        Ok(json!({ "first_step_ran_on_attempt": seen, "attempt": attempt }))
    }
}

#[tokio::test]
async fn retryable_agent_errors_retry_the_run_until_max_attempts() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let config = WorkerConfig { retry_backoff_min: Duration::from_millis(50), ..env.config(2) };
    let worker = env.worker(config, agents_with("stubborn", Stubborn)).await?;

    let recovers = env.submit_with("stubborn", json!({"succeed_on": 3}), 3).await?;
    let gives_up = env.submit_with("stubborn", json!({}), 2).await?;

    let events = env.wait_terminal(recovers).await?;
    assert_gapless(&events);
    assert_eq!(events.iter().filter(|e| matches!(e.body, EventBody::Retrying(_))).count(), 2);
    assert_eq!(events.iter().filter(|e| matches!(e.body, EventBody::Resumed(_))).count(), 2);
    let Some(EventBody::Completed(done)) = events.last().map(|e| &e.body) else {
        panic!("expected completion")
    };
    // The step is replayed on later attempts, not run again.
    assert_eq!(done.output, json!({ "first_step_ran_on_attempt": 1, "attempt": 3 }));

    let events = env.wait_terminal(gives_up).await?;
    assert_gapless(&events);
    let (code, message) = failed(&events);
    assert_eq!(code, ErrorCode::MaxAttemptsExceeded);
    assert!(
        message.contains("max_attempts 2") && message.contains("upstream down on attempt 2"),
        "{message}"
    );
    worker.stop().await
}
