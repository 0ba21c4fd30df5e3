//! The worker against a real nats-server: the run path, priorities, leases,
//! heartbeats and hand-off.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::PullConsumer;
use futures::TryStreamExt as _;
use runfleet_protocol::control::CancelRecord;
use runfleet_protocol::event::{Event, EventBody, RunCancelled, RunCompleted};
use runfleet_protocol::job::Job;
use runfleet_protocol::lease::Lease;
use runfleet_protocol::worker::WorkerInfo;
use runfleet_protocol::{codec, time, AgentName, ErrorCode, QueueName, RunId, WorkerId};
use runfleet_worker::agents;
use runfleet_worker::sdk::{async_trait, Agent, AgentError, RunContext};
use serde_json::{json, Value};
use tokio::sync::Notify;

use common::{assert_gapless, types, wait_until, Env, DEADLINE};

const LEASE_TTL: Duration = Duration::from_secs(15);

fn failed_code(event: &Event) -> Option<ErrorCode> {
    match &event.body {
        EventBody::Failed(f) => Some(f.error.code),
        _ => None,
    }
}

#[tokio::test]
async fn echo_completes_with_gapless_events() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let worker = env.worker(env.config(2), agents::builtin()).await?;
    let run = env.submit("echo", json!({"hello": "world"}), 2).await?;

    let events = env.wait_terminal(run).await?;
    assert_eq!(types(&events), ["run.created", "run.started", "run.completed"]);
    assert_gapless(&events);
    assert_eq!(events[2].body, EventBody::Completed(RunCompleted { output: json!({"hello": "world"}) }));
    for event in &events[1..] {
        assert_eq!(event.attempt, 1);
        assert_eq!(event.worker_id.as_ref(), Some(&worker.id));
    }
    assert!(matches!(&events[1].body, EventBody::Started(s) if s.delivery == 1));
    // `run.started` is held for the run's next event: one message for both.
    let stored = env.events(run).await?;
    assert_eq!(stored[1].0, stored[2].0, "run.started and run.completed are one message");
    assert_eq!(stored[1].0, stored[0].0 + 1);

    // The job is acked (gone from the work queue) and the lease released.
    wait_until(DEADLINE, || async { Ok((env.jobs_in_stream().await? == 0).then_some(())) }).await?;
    wait_until(DEADLINE, || async {
        Ok(env.leases.get(env.names.lease_key(run)).await?.is_none().then_some(()))
    })
    .await?;
    worker.stop().await
}

/// A terminal run's lease is deleted without waiting for the server's
/// answer; the delete still carries the revision it expects, so it never
/// removes a lease someone renewed or re-created since.
#[tokio::test]
async fn unconfirmed_release_deletes_only_the_expected_revision() -> anyhow::Result<()> {
    use runfleet_worker::runtime::lease;

    let env = Env::start(LEASE_TTL).await?;
    let run = RunId::generate();
    let key = env.names.lease_key(run);
    let held = Lease {
        run_id: run,
        worker_id: WorkerId::new("w-release")?,
        attempt: 1,
        acquired_ms: time::now_ms(),
        renewed_ms: time::now_ms(),
    };
    let first = lease::acquire(&env.leases, &key, &held).await?;
    let renewed = lease::update(&env.leases, &key, &held, first).await?;

    // A stale revision: refused by the server, silently; the lease stays.
    lease::release_unconfirmed(&env.leases, &env.client, &key, run, first).await?;
    env.client.flush().await?;
    // The confirmed path, on the same connection after the stale delete:
    // once it is answered, the stale delete has been processed too.
    let stale = lease::update(&env.leases, &key, &held, renewed).await?;
    let entry = env.leases.get(&key).await?.context("a stale unconfirmed delete removed the lease")?;
    assert_eq!(codec::decode::<Lease>(&entry)?.run_id, run);

    // The current revision: deleted.
    lease::release_unconfirmed(&env.leases, &env.client, &key, run, stale).await?;
    wait_until(DEADLINE, || async { Ok(env.leases.get(&key).await?.is_none().then_some(())) }).await?;
    Ok(())
}

#[tokio::test]
async fn sleep_emits_progress_events() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let worker = env.worker(env.config(2), agents::builtin()).await?;
    let run = env.submit("sleep", json!({"steps": 3, "ms": 50}), 2).await?;

    let events = env.wait_terminal(run).await?;
    assert_eq!(
        types(&events),
        ["run.created", "run.started", "agent.event", "agent.event", "agent.event", "run.completed"]
    );
    assert_gapless(&events);
    for (i, event) in events[2..5].iter().enumerate() {
        match &event.body {
            EventBody::Agent(a) => {
                assert_eq!(a.name, "progress");
                assert_eq!(a.data, json!({"step": i + 1, "steps": 3}));
            }
            other => panic!("expected agent.event, got {other:?}"),
        }
    }
    assert_eq!(events[5].body, EventBody::Completed(RunCompleted { output: json!({"steps": 3}) }));
    worker.stop().await
}

#[tokio::test]
async fn failing_agents_fail_the_run_with_typed_codes() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let worker = env.worker(env.config(4), agents::builtin()).await?;
    let failed = env.submit("fail", json!({"message": "boom"}), 2).await?;
    let bad_sleep = env.submit("sleep", json!({"steps": "many"}), 2).await?;
    let bad_fail = env.submit("fail", json!(42), 2).await?;

    let events = env.wait_terminal(failed).await?;
    assert_eq!(types(&events), ["run.created", "run.started", "run.failed"]);
    assert_eq!(failed_code(&events[2]), Some(ErrorCode::AgentFailed));
    match &events[2].body {
        EventBody::Failed(f) => assert_eq!(f.error.message, "boom"),
        other => panic!("expected run.failed, got {other:?}"),
    }
    for run in [bad_sleep, bad_fail] {
        let events = env.wait_terminal(run).await?;
        assert_gapless(&events);
        assert_eq!(failed_code(events.last().context("no events")?), Some(ErrorCode::InvalidInput));
    }
    wait_until(DEADLINE, || async { Ok((env.jobs_in_stream().await? == 0).then_some(())) }).await?;
    worker.stop().await
}

#[tokio::test]
async fn unknown_agent_fails_naming_agent_and_worker() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let worker = env.worker(env.config(1), agents::builtin()).await?;
    let run = env.submit("no_such_agent", json!({}), 2).await?;

    let events = env.wait_terminal(run).await?;
    assert_eq!(types(&events), ["run.created", "run.failed"]);
    assert_gapless(&events);
    let EventBody::Failed(failed) = &events[1].body else { panic!("expected run.failed") };
    assert_eq!(failed.error.code, ErrorCode::UnknownAgent);
    assert!(failed.error.message.contains("no_such_agent"));
    assert!(failed.error.message.contains(worker.id.as_str()));
    assert!(failed.error.message.contains("echo"));
    wait_until(DEADLINE, || async { Ok((env.jobs_in_stream().await? == 0).then_some(())) }).await?;
    worker.stop().await
}

struct Panics;

#[async_trait]
impl Agent for Panics {
    async fn run(&self, _ctx: &mut RunContext, _input: Value) -> Result<Value, AgentError> {
        panic!("agent bug");
    }
}

#[tokio::test]
async fn panicking_agent_fails_the_run_and_the_worker_survives() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let mut agents = agents::builtin();
    agents.register(AgentName::new("panics")?, Panics);
    let worker = env.worker(env.config(1), agents).await?;
    let run = env.submit("panics", json!({}), 2).await?;

    let events = env.wait_terminal(run).await?;
    assert_eq!(types(&events), ["run.created", "run.started", "run.failed"]);
    assert_eq!(failed_code(&events[2]), Some(ErrorCode::AgentPanicked));

    // The worker still serves jobs.
    let next = env.submit("echo", json!(1), 2).await?;
    let events = env.wait_terminal(next).await?;
    assert_eq!(types(&events), ["run.created", "run.started", "run.completed"]);
    worker.stop().await
}

/// Holds its slot until the test opens the gate.
struct Gate(Arc<Notify>);

#[async_trait]
impl Agent for Gate {
    async fn run(&self, _ctx: &mut RunContext, _input: Value) -> Result<Value, AgentError> {
        self.0.notified().await;
        Ok(Value::Null)
    }
}

#[tokio::test]
async fn highest_band_is_served_first() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let gate = Arc::new(Notify::new());
    let mut agents = agents::builtin();
    agents.register(AgentName::new("gate")?, Gate(gate.clone()));
    let worker = env.worker(env.config(1), agents).await?;

    let blocker = env.submit("gate", json!({}), 2).await?;
    wait_until(DEADLINE, || async { Ok((env.events(blocker).await?.len() >= 2).then_some(())) }).await?;

    let mut low = Vec::new();
    for i in 0..5 {
        low.push(env.submit("echo", json!(i), 2).await?);
    }
    let mut high = Vec::new();
    for i in 0..2 {
        high.push(env.submit("echo", json!(i), 0).await?);
    }
    gate.notify_one();

    let started = |events: Vec<(u64, Event)>| -> anyhow::Result<u64> {
        events
            .into_iter()
            .find(|(_, e)| matches!(e.body, EventBody::Started(_)))
            .map(|(seq, _)| seq)
            .context("no run.started")
    };
    let mut high_started = Vec::new();
    for run in &high {
        env.wait_terminal(*run).await?;
        high_started.push(started(env.events(*run).await?)?);
    }
    let mut low_started = Vec::new();
    for run in &low {
        env.wait_terminal(*run).await?;
        low_started.push(started(env.events(*run).await?)?);
    }
    let last_high = high_started.iter().max().context("no high")?;
    let first_low = low_started.iter().min().context("no low")?;
    assert!(
        last_high < first_low,
        "band-0 runs must start before band-2 runs: band 0 started at {high_started:?}, band 2 at {low_started:?}"
    );
    worker.stop().await
}

fn foreign_lease(run_id: RunId) -> anyhow::Result<Vec<u8>> {
    let lease = Lease {
        run_id,
        worker_id: WorkerId::new("w-other")?,
        attempt: 1,
        acquired_ms: time::now_ms(),
        renewed_ms: time::now_ms(),
    };
    Ok(codec::encode(&lease)?)
}

/// A claim that reads the log (any job but a submission's first delivery)
/// takes the lease first, and leaves a run leased elsewhere alone.
#[tokio::test]
async fn job_of_a_run_leased_elsewhere_is_left_alone() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let worker = env.worker(env.config(2), agents::builtin()).await?;

    // Another worker holds the lease when the job, a later dispatch (no
    // `run.created` sequence), arrives.
    let mut job = env.create_run("echo", json!("x"), 2).await?;
    job.created_seq = None;
    let run = job.run_id;
    env.leases.create(env.names.lease_key(run), foreign_lease(run)?.into()).await?;
    env.publish_job(&job).await?;

    tokio::time::sleep(Duration::from_secs(3)).await;
    let events = env.events(run).await?;
    assert_eq!(events.len(), 1, "the run must not be started while leased elsewhere: {events:?}");
    assert_eq!(env.jobs_in_stream().await?, 1, "the job must stay in the queue");
    let consumer_name = env.names.job_consumer(&QueueName::default_queue(), 2);
    let mut consumer: PullConsumer =
        env.jobs.get_consumer(&consumer_name).await.map_err(|e| anyhow::anyhow!(e))?;
    let deliveries = consumer.info().await?.delivered.consumer_sequence;
    // NAKs carry a delay (500ms in this config): a handful of deliveries in
    // 3s, not a hot loop.
    assert!((1..50).contains(&deliveries), "deliveries: {deliveries}");

    // Once the other worker lets go, the run proceeds.
    env.leases.delete(env.names.lease_key(run)).await?;
    let events = env.wait_terminal(run).await?;
    assert_eq!(types(&events), ["run.created", "run.started", "run.completed"]);
    assert_gapless(&events);
    worker.stop().await
}

/// A submission's first claim takes no lease: a run that ends within a
/// heartbeat period never writes one, and a longer run gets its lease from
/// the first heartbeat and releases it when it ends.
#[tokio::test]
async fn fast_claim_leases_only_runs_that_outlive_a_heartbeat() -> anyhow::Result<()> {
    async fn lease_messages(env: &Env, run: RunId) -> anyhow::Result<usize> {
        let bucket = env.names.leases_bucket();
        let stream = env.js.get_stream(format!("KV_{bucket}")).await?;
        let mut subjects =
            stream.info_with_subjects(format!("$KV.{bucket}.{}", env.names.lease_key(run))).await?;
        Ok(subjects.try_next().await?.map_or(0, |(_, count)| count))
    }

    // A 60 s TTL (a beat every 20 s): a run of a few milliseconds misses the
    // beat all but once in thousands of times.
    let env = Env::start(Duration::from_secs(60)).await?;
    let worker = env.worker(env.config(2), agents::builtin()).await?;
    let short = env.submit("echo", json!("quick"), 2).await?;
    let events = env.wait_terminal(short).await?;
    assert_eq!(types(&events), ["run.created", "run.started", "run.completed"]);
    assert_eq!(lease_messages(&env, short).await?, 0, "a run shorter than a heartbeat wrote a lease");
    worker.stop().await?;

    // A 3 s TTL (a beat every second) and a 4 s run.
    let env = Env::start(Duration::from_secs(3)).await?;
    let worker = env.worker(env.config(2), agents::builtin()).await?;
    let long = env.submit("sleep", json!({ "steps": 40, "ms": 100 }), 2).await?;
    let lease = wait_until(DEADLINE, || async {
        let entry = env.leases.get(env.names.lease_key(long)).await?;
        Ok(entry.map(|value| codec::decode::<Lease>(&value)).transpose()?)
    })
    .await?;
    assert_eq!((&lease.worker_id, lease.attempt), (&worker.id, 1), "the heartbeat leased the run");
    let events = env.wait_terminal(long).await?;
    assert_eq!(events.last().map(|e| e.body.type_name()), Some("run.completed"));
    assert_gapless(&events);
    wait_until(DEADLINE, || async {
        Ok(env.leases.get(env.names.lease_key(long)).await?.is_none().then_some(()))
    })
    .await?;
    assert!(lease_messages(&env, long).await? >= 1, "the lease was written");
    worker.stop().await
}

/// A submission's job names its `run.created`, so the claim skips reading
/// the log; if the log moved on meanwhile (here an attempt that crashed after
/// `run.started`), the claim's first append is refused and the run is
/// resumed as the next attempt from what the log says, not started afresh.
#[tokio::test]
async fn fast_claim_of_a_run_that_moved_on_resumes_it() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let worker = env.worker(env.config(2), agents::builtin()).await?;
    let job = env.create_run("echo", json!("again"), 2).await?;
    let run = job.run_id;
    let created_seq = job.created_seq.context("a submitted job names its run.created")?;
    let started = Event {
        run_id: run,
        tenant: env.tenant.clone(),
        seq: 2,
        ts_ms: time::now_ms(),
        attempt: 1,
        worker_id: Some(WorkerId::new("w-crashed")?),
        trace_id: None,
        body: EventBody::Started(runfleet_protocol::event::RunStarted { delivery: 1 }),
    };
    env.append_event(&started, created_seq).await?;
    env.publish_job(&job).await?;

    let events = env.wait_terminal(run).await?;
    assert_eq!(types(&events), ["run.created", "run.started", "run.resumed", "run.completed"]);
    assert_gapless(&events);
    assert!(matches!(&events[2].body, EventBody::Resumed(r) if r.failures == 1), "{:?}", events[2]);
    assert_eq!((events[2].attempt, events[2].worker_id.as_ref()), (2, Some(&worker.id)));
    wait_until(DEADLINE, || async { Ok((env.jobs_in_stream().await? == 0).then_some(())) }).await?;
    worker.stop().await
}

/// Counts the executions of its one step.
struct CountedStep(Arc<AtomicU32>);

#[async_trait]
impl Agent for CountedStep {
    async fn run(&self, ctx: &mut RunContext, _input: Value) -> Result<Value, AgentError> {
        ctx.step("counted", |_| {
            let executions = self.0.clone();
            async move { Ok(executions.fetch_add(1, Ordering::SeqCst)) }
        })
        .await?;
        Ok(json!("done"))
    }
}

/// A cancel the fast claim does not see (here `run.cancelled` is written
/// after `run.created` with no cancel request to read, as when a coordinator
/// cancels the queued run just before the claim) refuses the attempt's first
/// append, the step's `step.started` carrying the held `run.started`: the
/// step never runs, nothing of the attempt is stored, and the worker lets go
/// of the lease and the job at once rather than leave them to expire, so a
/// claim reading the log acks the job.
#[tokio::test]
async fn fast_claim_refused_by_a_racing_cancel_runs_and_stores_nothing() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let executions = Arc::new(AtomicU32::new(0));
    let mut agents = agents::builtin();
    agents.register(AgentName::new("counted")?, CountedStep(executions.clone()));
    let worker = env.worker(env.config(2), agents).await?;
    let job = env.create_run("counted", json!({}), 2).await?;
    let run = job.run_id;
    let created_seq = job.created_seq.context("a submitted job names its run.created")?;
    let cancelled = Event {
        run_id: run,
        tenant: env.tenant.clone(),
        seq: 2,
        ts_ms: time::now_ms(),
        attempt: 0,
        worker_id: None,
        trace_id: None,
        body: EventBody::Cancelled(RunCancelled { reason: Some("raced".to_owned()) }),
    };
    env.append_event(&cancelled, created_seq).await?;
    env.publish_job(&job).await?;

    // Let go of, not left to expire: well within the lease TTL (which is
    // also the jobs' ack wait).
    wait_until(LEASE_TTL / 2, || async {
        let lease_gone = env.leases.get(env.names.lease_key(run)).await?.is_none();
        Ok((lease_gone && env.jobs_in_stream().await? == 0).then_some(()))
    })
    .await
    .context("the refused attempt left its lease or its job behind")?;
    let events = env.events(run).await?;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[1].1, cancelled);
    assert_eq!(executions.load(Ordering::SeqCst), 0, "the step ran");
    assert!(env.checkpoints(run).await?.is_empty());
    worker.stop().await
}

/// A submission's first claim reads no control record. A cancel stored
/// before the claimant registered the run reaches it the way the
/// coordinator makes sure of: on finding the lease held, it writes the
/// record again, and the claimant's control watch (registered before the
/// lease was created) delivers that write. The run ends cancelled by the
/// worker, well before it would have completed (60 s).
#[tokio::test]
async fn fast_claim_is_cancelled_by_a_record_written_after_its_lease() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let job = env.create_run("sleep", json!({ "steps": 600, "ms": 100 }), 2).await?;
    let run = job.run_id;
    assert!(job.created_seq.is_some());
    let control = env.js.get_key_value(env.names.control_bucket()).await?;
    let record = CancelRecord { reason: Some("changed my mind".to_owned()), requested_ms: time::now_ms() };
    control.put(env.names.control_key(run), codec::encode(&record)?.into()).await?;
    let worker = env.worker(env.config(2), agents::builtin()).await?;
    env.publish_job(&job).await?;

    // The claim took the run despite the record stored before it.
    wait_until(DEADLINE, || async { Ok(env.leases.get(env.names.lease_key(run)).await?.map(|_| ())) })
        .await?;
    // The coordinator's second write, after finding the lease held.
    control.put(env.names.control_key(run), codec::encode(&record)?.into()).await?;

    let events = env.wait_terminal(run).await?;
    let last = events.last().map(|e| &e.body);
    assert!(
        matches!(last, Some(EventBody::Cancelled(c)) if c.reason.as_deref() == Some("changed my mind")),
        "{:?}",
        types(&events)
    );
    assert!(events.last().is_some_and(|e| e.worker_id.is_some()), "the worker wrote run.cancelled");
    wait_until(DEADLINE, || async { Ok((env.jobs_in_stream().await? == 0).then_some(())) }).await?;
    worker.stop().await
}

/// A job that does not name its `run.created` (a re-dispatch, or one from an
/// older coordinator) is claimed by reading the log first.
#[tokio::test]
async fn job_without_created_seq_reads_the_log_first() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let worker = env.worker(env.config(2), agents::builtin()).await?;
    let mut job = env.create_run("echo", json!("slow path"), 2).await?;
    job.created_seq = None;
    env.publish_job(&job).await?;

    let events = env.wait_terminal(job.run_id).await?;
    assert_eq!(types(&events), ["run.created", "run.started", "run.completed"]);
    assert_gapless(&events);
    assert_eq!(events[2].body, EventBody::Completed(RunCompleted { output: json!("slow path") }));
    worker.stop().await
}

#[tokio::test]
async fn redelivered_job_of_a_terminal_run_is_only_acked() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let worker = env.worker(env.config(2), agents::builtin()).await?;

    // A previous worker completed the run but crashed before acking the job.
    let job = env.create_run("echo", json!("x"), 2).await?;
    let run = job.run_id;
    let created_seq = env.events(run).await?.first().map(|(s, _)| *s).context("no run.created")?;
    let completed = Event {
        run_id: run,
        tenant: env.tenant.clone(),
        seq: 2,
        ts_ms: time::now_ms(),
        attempt: 1,
        worker_id: Some(WorkerId::new("w-crashed")?),
        trace_id: None,
        body: EventBody::Completed(RunCompleted { output: json!("done") }),
    };
    env.append_event(&completed, created_seq).await?;
    env.publish_job(&job).await?;

    // The worker acks the job and deletes the lease without waiting for
    // either: the server may apply them in any order, so wait for both.
    wait_until(DEADLINE, || async {
        let acked = env.jobs_in_stream().await? == 0;
        let released = env.leases.get(env.names.lease_key(run)).await?.is_none();
        Ok((acked && released).then_some(()))
    })
    .await?;
    let events: Vec<Event> = env.events(run).await?.into_iter().map(|(_, e)| e).collect();
    assert_eq!(types(&events), ["run.created", "run.completed"]);
    assert_eq!(events[1], completed);
    worker.stop().await
}

#[tokio::test]
async fn long_run_outlives_ack_wait_and_completes_once() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    // The run (6 s) outlives the ack wait (3 s) twice over. Beats every
    // 250 ms leave the worker 2.75 s of stall before a redelivery, which a
    // loaded CI machine does not reach; the default (a third of the ack
    // wait) left 1 s.
    let config = runfleet_worker::WorkerConfig {
        ack_wait: Some(Duration::from_secs(3)),
        heartbeat_interval: Some(Duration::from_millis(250)),
        ..env.config(2)
    };
    let worker = env.worker(config, agents::builtin()).await?;
    let run = env.submit("sleep", json!({"steps": 6, "ms": 1000}), 2).await?;

    let events = env.wait_terminal(run).await?;
    assert_gapless(&events);
    let started: Vec<&Event> = events.iter().filter(|e| matches!(e.body, EventBody::Started(_))).collect();
    assert_eq!(started.len(), 1, "exactly one attempt: {:?}", types(&events));
    assert!(matches!(&started[0].body, EventBody::Started(s) if s.delivery == 1));
    assert_eq!(events.iter().filter(|e| e.body.is_terminal()).count(), 1);
    assert!(matches!(events.last().map(|e| &e.body), Some(EventBody::Completed(_))));
    assert!(events[1..].iter().all(|e| e.attempt == 1));
    wait_until(DEADLINE, || async { Ok((env.jobs_in_stream().await? == 0).then_some(())) }).await?;
    // In-progress acks kept the job from being redelivered at all.
    let consumer_name = env.names.job_consumer(&QueueName::default_queue(), 2);
    let mut consumer: PullConsumer =
        env.jobs.get_consumer(&consumer_name).await.map_err(|e| anyhow::anyhow!(e))?;
    assert_eq!(consumer.info().await?.delivered.consumer_sequence, 1, "the job was redelivered");

    // No redelivery follows: the log stays as it is.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.events(run).await?.len(), events.len());
    worker.stop().await
}

#[tokio::test]
async fn stolen_lease_stops_the_run_without_further_writes() -> anyhow::Result<()> {
    // Short TTLs so the heartbeat notices quickly and the thief's lease
    // ages out, after which the run is resumed by a new attempt.
    let env = Env::start(Duration::from_secs(3)).await?;
    let config = runfleet_worker::WorkerConfig { ack_wait: Some(Duration::from_secs(2)), ..env.config(1) };
    let worker = env.worker(config, agents::builtin()).await?;
    let steps = 20;
    let run = env.submit("sleep", json!({"steps": steps, "ms": 500}), 2).await?;

    // Steal the lease once the run is under way.
    wait_until(DEADLINE, || async { Ok((env.events(run).await?.len() >= 3).then_some(())) }).await?;
    env.leases.put(env.names.lease_key(run), foreign_lease(run)?.into()).await?;

    // The thief never writes; its lease ages out, the job is redelivered and
    // a second attempt finishes the run.
    let events = env.wait_terminal(run).await?;
    assert_gapless(&events);
    let first: Vec<&Event> = events.iter().filter(|e| e.attempt == 1).collect();
    assert!(
        first.iter().all(|e| !e.body.is_terminal()),
        "attempt 1 must not finish after losing its lease: {:?}",
        types(&events)
    );
    let first_progress = first.iter().filter(|e| matches!(e.body, EventBody::Agent(_))).count();
    assert!(first_progress < steps, "attempt 1 must stop early, wrote {first_progress} progress events");
    let last = events.last().context("no events")?;
    assert!(last.attempt >= 2, "a later attempt completes the run");
    assert!(matches!(last.body, EventBody::Completed(_)));
    // Attempts never interleave.
    let attempts: Vec<u32> = events.iter().map(|e| e.attempt).collect();
    let mut sorted = attempts.clone();
    sorted.sort_unstable();
    assert_eq!(attempts, sorted);
    worker.stop().await
}

#[tokio::test]
async fn shutdown_hands_unfinished_runs_to_another_worker() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    // `sleep` has no steps, so it reaches no step boundary: it is stopped
    // where it is once the hand-off timeout is over.
    let config = runfleet_worker::WorkerConfig {
        shutdown_grace: Duration::from_millis(500),
        handoff_timeout: Duration::from_millis(500),
        ..env.config(1)
    };
    let first = env.worker(config.clone(), agents::builtin()).await?;
    let first_id = first.id.clone();

    // The worker is registered while it runs.
    let info = env.workers.get(env.names.worker_key(&first_id)).await?.context("not registered")?;
    let info: WorkerInfo = codec::decode(&info)?;
    assert_eq!(info.worker_id, first_id);
    assert_eq!(info.slots, 1);
    assert!(info.agents.iter().any(|a| a == "sleep"));

    let run = env.submit("sleep", json!({"steps": 10, "ms": 500}), 2).await?;
    wait_until(DEADLINE, || async { Ok((env.events(run).await?.len() >= 3).then_some(())) }).await?;
    first.stop().await?;

    // Handed off: lease released, job back in the queue, registry entry gone.
    assert!(env.leases.get(env.names.lease_key(run)).await?.is_none());
    assert!(env.workers.get(env.names.worker_key(&first_id)).await?.is_none());
    let before = env.events(run).await?;
    assert!(before.iter().all(|(_, e)| !e.body.is_terminal()));
    assert!(
        matches!(before.last().map(|(_, e)| &e.body), Some(EventBody::Handoff(_))),
        "the hand-off is in the log"
    );

    let second = env.worker(config, agents::builtin()).await?;
    let events = env.wait_terminal(run).await?;
    assert_gapless(&events);
    let last = events.last().context("no events")?;
    assert!(matches!(last.body, EventBody::Completed(_)));
    assert_eq!(last.attempt, 2);
    assert_eq!(last.worker_id.as_ref(), Some(&second.id));
    assert!(events.iter().filter(|e| e.attempt == 1).all(|e| e.worker_id.as_ref() != Some(&second.id)));
    second.stop().await
}

/// Emits a tick every 100ms for up to 10s and completes as soon as an emit
/// fails: agent code that does not return the error its run context gave it.
struct IgnoresErrors;

#[async_trait]
impl Agent for IgnoresErrors {
    async fn run(&self, ctx: &mut RunContext, _input: Value) -> Result<Value, AgentError> {
        for tick in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if ctx.emit("tick", json!(tick)).await.is_err() {
                break;
            }
        }
        Ok(json!("done"))
    }
}

/// Appends an event to `run`'s log as another worker would, retrying while
/// the running attempt keeps moving the log on. Returns the foreign seq.
async fn append_foreign_event(env: &Env, run: RunId) -> anyhow::Result<u64> {
    for _ in 0..100 {
        let (stream_seq, last) = env.events(run).await?.pop().context("no events")?;
        let foreign = Event {
            run_id: run,
            tenant: env.tenant.clone(),
            seq: last.seq + 1,
            ts_ms: time::now_ms(),
            attempt: last.attempt + 1,
            worker_id: Some(WorkerId::new("w-other")?),
            trace_id: None,
            body: EventBody::Agent(runfleet_protocol::event::AgentEvent {
                name: "foreign".to_owned(),
                data: Value::Null,
            }),
        };
        if env.append_event(&foreign, stream_seq).await.is_ok() {
            return Ok(foreign.seq);
        }
    }
    anyhow::bail!("could not append a foreign event to run {run}")
}

#[tokio::test]
async fn refused_append_stops_the_run_even_if_the_agent_ignores_it() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let mut agents = agents::builtin();
    agents.register(AgentName::new("ignores_errors")?, IgnoresErrors);
    let worker = env.worker(env.config(1), agents).await?;
    let run = env.submit("ignores_errors", json!({}), 2).await?;
    wait_until(DEADLINE, || async { Ok((env.events(run).await?.len() >= 3).then_some(())) }).await?;
    // A submission's first attempt is leased by its first heartbeat.
    wait_until(DEADLINE, || async { Ok(env.leases.get(env.names.lease_key(run)).await?.map(drop)) }).await?;

    // Another writer moves the log on while the lease still names this
    // worker: the next emit is refused by the server.
    let foreign_seq = append_foreign_event(&env, run).await?;

    // The attempt must stop without writing, releasing or NAKing anything:
    // no terminal event, no second attempt from a redelivered job, and the
    // lease left to age out.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events: Vec<Event> = env.events(run).await?.into_iter().map(|(_, e)| e).collect();
    assert_eq!(
        events.last().map(|e| e.seq),
        Some(foreign_seq),
        "nothing may follow the foreign event: {:?}",
        types(&events)
    );
    let lease = env.leases.get(env.names.lease_key(run)).await?.context("the lease was released")?;
    let lease: Lease = codec::decode(&lease)?;
    assert_eq!(lease.worker_id, worker.id);
    let consumer_name = env.names.job_consumer(&QueueName::default_queue(), 2);
    let mut consumer: PullConsumer =
        env.jobs.get_consumer(&consumer_name).await.map_err(|e| anyhow::anyhow!(e))?;
    assert_eq!(consumer.info().await?.delivered.consumer_sequence, 1, "the job was nak'd and redelivered");
    worker.stop().await
}

#[tokio::test]
async fn reclaiming_a_run_keeps_the_new_attempt_heartbeating() -> anyhow::Result<()> {
    // Leases live 3s (heartbeat every 1s), so an attempt that is not
    // heartbeated loses its lease well before it ends.
    let env = Env::start(Duration::from_secs(3)).await?;
    let worker = env.worker(env.config(2), agents::builtin()).await?;
    let job = env.create_run("sleep", json!({"steps": 16, "ms": 500}), 2).await?;
    let run = job.run_id;
    env.publish_job(&job).await?;
    wait_until(DEADLINE, || async { Ok((env.events(run).await?.len() >= 3).then_some(())) }).await?;
    // A submission's first attempt is leased by its first heartbeat.
    wait_until(DEADLINE, || async { Ok(env.leases.get(env.names.lease_key(run)).await?.map(drop)) }).await?;

    // The lease vanishes (as when it expired during a partition) and the run
    // is dispatched again, as the recovery loop does (a job that names no
    // `run.created`): this worker claims it a second time while the first
    // attempt still runs.
    env.leases.delete(env.names.lease_key(run)).await?;
    env.dispatch_job(&Job { created_seq: None, ..job.clone() }, 1).await?;
    wait_until(DEADLINE, || async {
        let events = env.events(run).await?;
        Ok(events
            .iter()
            .any(|(_, e)| e.attempt == 2 && matches!(e.body, EventBody::Resumed(_)))
            .then_some(()))
    })
    .await?;

    // The stale attempt stops; the new one must stay leased while it runs.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let events = env.events(run).await?;
    assert!(
        !events.last().is_some_and(|(_, e)| e.body.is_terminal()),
        "the test needs the second attempt still running"
    );
    let lease = env
        .leases
        .get(env.names.lease_key(run))
        .await?
        .context("the running attempt's lease aged out: it was not heartbeated")?;
    let lease: Lease = codec::decode(&lease)?;
    assert_eq!((lease.attempt, &lease.worker_id), (2, &worker.id));

    let events = env.wait_terminal(run).await?;
    assert_gapless(&events);
    let last = events.last().context("no events")?;
    assert!(matches!(last.body, EventBody::Completed(_)));
    assert_eq!(last.attempt, 2);
    worker.stop().await
}

/// An idle worker learns of a new job from the stream's headers-only
/// republish, not from its `idle_poll` timer: with the timer at two minutes,
/// a job published to an idle worker still runs long before it fires.
#[tokio::test]
async fn idle_worker_is_woken_by_new_jobs_not_by_polling() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let mut config = env.config(1);
    config.idle_poll = Duration::from_secs(120);
    let worker = env.worker(config, agents::builtin()).await?;
    // Let the worker finish its first (empty) fetch round and go idle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    let run = env.submit("echo", json!({"wake": true}), 3).await?;
    let events = env.wait_terminal(run).await?;
    assert_eq!(types(&events), ["run.created", "run.started", "run.completed"]);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the run waited for the idle poll instead of being woken"
    );
    worker.stop().await
}

/// A worker with every slot busy leaves the queue's wake-up group to idle
/// workers: with both idle polls at two minutes, every job published while
/// one worker is busy is woken on the idle one. If the busy worker stayed
/// in the group it would take about half of the wake-ups, and those jobs
/// would wait for a slot there or for the idle poll.
#[tokio::test]
async fn a_busy_worker_leaves_wake_ups_to_idle_workers() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let gate = Arc::new(Notify::new());
    let mut agents = agents::builtin();
    agents.register(AgentName::new("gate")?, Gate(gate.clone()));
    let mut config = env.config(1);
    config.idle_poll = Duration::from_secs(120);
    let busy = env.worker(config.clone(), agents).await?;
    let blocker = env.submit("gate", json!({}), 2).await?;
    wait_until(DEADLINE, || async { Ok((env.events(blocker).await?.len() >= 2).then_some(())) }).await?;

    config.slots = 4;
    let idle = env.worker(config, agents::builtin()).await?;
    // Let the idle worker finish its first (empty) fetch round.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..8 {
        let run = env.submit("echo", json!(i), 2).await?;
        let events = env.wait_terminal(run).await.with_context(|| format!("echo run {i}"))?;
        assert_eq!(events[1].worker_id.as_ref(), Some(&idle.id), "run {i} ran on the busy worker");
    }
    gate.notify_one();
    env.wait_terminal(blocker).await?;
    idle.stop().await?;
    busy.stop().await
}

/// An idle worker subscribes to its queue's wake-ups in the queue's group,
/// so each wake-up reaches one member: here the worker and the test share
/// the group, and the test receives only some of the jobs' wake-ups (a
/// plain subscription in the worker would leave the test all of them).
/// The jobs whose wake-up went to the test still run, at the idle poll.
#[tokio::test]
async fn idle_workers_share_each_wake_up() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let queue = QueueName::default_queue();
    let mut member = env
        .client
        .queue_subscribe(env.names.job_wakeup_filter(&queue), env.names.job_wakeup_group(&queue))
        .await?;
    env.client.flush().await?;
    let worker = env.worker(env.config(32), agents::builtin()).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    const JOBS: usize = 24;
    let mut runs = Vec::new();
    for i in 0..JOBS {
        runs.push(env.submit("echo", json!(i), 2).await?);
    }
    for run in &runs {
        env.wait_terminal(*run).await?;
    }
    let mut received = 0;
    while tokio::time::timeout(Duration::from_millis(200), futures::StreamExt::next(&mut member))
        .await
        .is_ok_and(|message| message.is_some())
    {
        received += 1;
    }
    assert!(
        received < JOBS,
        "the test's member of the group got all {JOBS} wake-ups: the worker is not in the group"
    );
    worker.stop().await
}

/// A worker that was busy when jobs arrived fetches them when a slot frees,
/// and, once the queue is empty, is woken again by the next job (it
/// rejoined the wake-up group): both with the idle poll at two minutes.
#[tokio::test]
async fn a_worker_back_from_busy_takes_what_queued_and_is_woken_again() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let gate = Arc::new(Notify::new());
    let mut agents = agents::builtin();
    agents.register(AgentName::new("gate")?, Gate(gate.clone()));
    let mut config = env.config(1);
    config.idle_poll = Duration::from_secs(120);
    let worker = env.worker(config, agents).await?;
    let blocker = env.submit("gate", json!({}), 2).await?;
    wait_until(DEADLINE, || async { Ok((env.events(blocker).await?.len() >= 2).then_some(())) }).await?;

    let queued =
        [env.submit("echo", json!("queued"), 0).await?, env.submit("echo", json!("queued"), 2).await?];
    gate.notify_one();
    env.wait_terminal(blocker).await?;
    for run in queued {
        env.wait_terminal(run).await?;
    }
    // Back to idle: the next jobs are woken, not polled.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..3 {
        let run = env.submit("echo", json!(i), 2).await?;
        env.wait_terminal(run).await.with_context(|| format!("echo run {i} after the busy spell"))?;
    }
    worker.stop().await
}

/// The default band's consumer, whose pull requests an idle worker leaves
/// waiting at the server (`idle_pull`).
async fn default_band_consumer(env: &Env) -> anyhow::Result<PullConsumer> {
    let name =
        env.names.job_consumer(&QueueName::default_queue(), runfleet_protocol::limits::DEFAULT_PRIORITY);
    env.jobs.get_consumer(&name).await.map_err(|e| anyhow::anyhow!(e))
}

/// Pull requests waiting at the server on `consumer`.
async fn waiting_pulls(consumer: &mut PullConsumer) -> anyhow::Result<usize> {
    Ok(consumer.info().await?.num_waiting)
}

/// An idle worker leaves a pull request waiting on its default band, as a
/// plain JetStream consumer does (asking again as each one expires), and
/// runs a job published meanwhile. No such request waits with
/// `idle_pull = 0s`: the worker then only fetches without waiting.
#[tokio::test]
async fn an_idle_worker_waits_at_the_server_for_its_default_band() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let mut config = env.config(4);
    config.idle_poll = Duration::from_secs(120);
    config.idle_pull = Duration::ZERO;
    let without = env.worker(config.clone(), agents::builtin()).await?;
    let mut consumer = default_band_consumer(&env).await?;
    let run = env.submit("echo", json!("no pull"), 2).await?;
    env.wait_terminal(run).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(waiting_pulls(&mut consumer).await?, 0, "idle_pull = 0s left a request waiting");
    without.stop().await?;

    config.idle_pull = Duration::from_secs(2);
    let worker = env.worker(config, agents::builtin()).await?;
    wait_until(DEADLINE, || async {
        Ok((waiting_pulls(&mut default_band_consumer(&env).await?).await? == 1).then_some(()))
    })
    .await
    .context("the idle worker left no pull request waiting")?;
    let run = env.submit("echo", json!("pulled"), 2).await?;
    let events = env.wait_terminal(run).await?;
    assert_eq!(events[1].worker_id.as_ref(), Some(&worker.id));
    wait_until(DEADLINE, || async {
        Ok((waiting_pulls(&mut default_band_consumer(&env).await?).await? == 1).then_some(()))
    })
    .await
    .context("no pull request waits after the run")?;
    worker.stop().await
}

/// A waiting pull request reserves one slot fewer than are free: a worker
/// with two slots whose request waits on band 2 still takes a band-0 job
/// (woken and fetched; the idle poll is at two minutes), then the band-2 job
/// published while the band-0 run holds the other slot, and no third job
/// while both run: it never holds more leases than slots.
#[tokio::test]
async fn a_waiting_pull_keeps_a_slot_for_other_bands() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let gate = Arc::new(Notify::new());
    let mut agents = agents::builtin();
    agents.register(AgentName::new("gate")?, Gate(gate.clone()));
    let mut config = env.config(2);
    config.idle_poll = Duration::from_secs(120);
    config.idle_pull = Duration::from_secs(2);
    let worker = env.worker(config, agents).await?;
    wait_until(DEADLINE, || async {
        Ok((waiting_pulls(&mut default_band_consumer(&env).await?).await? == 1).then_some(()))
    })
    .await?;

    let high = env.submit("gate", json!({}), 0).await?;
    wait_until(DEADLINE, || async { Ok((env.events(high).await?.len() >= 2).then_some(())) })
        .await
        .context("the band-0 run did not start while the pull request waited on band 2")?;
    let low = env.submit("gate", json!({}), 2).await?;
    wait_until(DEADLINE, || async { Ok((env.events(low).await?.len() >= 2).then_some(())) })
        .await
        .context("the band-2 job did not start beside the band-0 run")?;
    // Both slots are taken; a third job waits in the stream.
    let third = env.submit("echo", json!("third"), 2).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(env.events(third).await?.len(), 1, "a third run started on a worker with two slots");
    // Leased by the first heartbeat (a submission's first attempt runs
    // without a lease until then): two, never three.
    let held = || async {
        let mut leases = env.leases.keys().await?;
        let mut held = 0;
        while let Some(key) = leases.try_next().await? {
            drop(key);
            held += 1;
        }
        anyhow::Ok(held)
    };
    wait_until(DEADLINE, || async { Ok((held().await? == 2).then_some(())) })
        .await
        .context("leases held by a two-slot worker")?;
    assert_eq!(env.events(third).await?.len(), 1, "a third run started on a worker with two slots");
    assert_eq!(held().await?, 2, "leases held by a two-slot worker");

    gate.notify_one();
    gate.notify_one();
    for run in [high, low, third] {
        env.wait_terminal(run).await?;
    }
    worker.stop().await
}

/// A worker stopping while its pull request waits reads the request to its
/// end and NAKs what it still delivers, delayed past the request's expiry:
/// the job published then reaches another worker long before its ack wait
/// (two minutes here), as its second delivery (not bounced back into the
/// same waiting request first).
#[tokio::test]
async fn a_stopping_worker_naks_what_its_waiting_pull_delivers() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let mut config = env.config(4);
    config.ack_wait = Some(Duration::from_secs(120));
    config.idle_poll = Duration::from_secs(120);
    config.idle_pull = Duration::from_secs(3);
    let stopping = env.worker(config.clone(), agents::builtin()).await?;
    let stopping_id = stopping.id.clone();
    wait_until(DEADLINE, || async {
        Ok((waiting_pulls(&mut default_band_consumer(&env).await?).await? == 1).then_some(()))
    })
    .await?;
    let stop = tokio::spawn(stopping.stop());
    // The pull loop has ended; its request waits out its 3 s.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let run = env.submit("echo", json!("during shutdown"), 2).await?;
    stop.await??;
    let info = default_band_consumer(&env).await?.info().await?.clone();
    assert_eq!(info.delivered.consumer_sequence, 1, "the job went to the stopping worker once: {info:?}");

    config.idle_pull = Duration::ZERO;
    config.idle_poll = Duration::from_millis(200);
    let other = env.worker(config, agents::builtin()).await?;
    let events = env.wait_terminal(run).await?;
    assert_ne!(events[1].worker_id.as_ref(), Some(&stopping_id));
    assert!(
        matches!(&events[1].body, EventBody::Started(s) if s.delivery == 2),
        "the job should reach the second worker as its second delivery: {:?}",
        events[1]
    );
    other.stop().await
}

/// A pull request the server refuses (here: the consumer already has its
/// `max_waiting` of 512 requests waiting, all the test's) is not sent again
/// at once: the worker waits for its next idle poll (1 s here) before it
/// asks again, instead of looping request, refusal, fetch as fast as the
/// server answers.
#[tokio::test]
async fn a_refused_idle_pull_waits_for_the_idle_poll() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let mut config = env.config(4);
    config.idle_poll = Duration::from_secs(1);
    // The worker creates the consumers; start it with no idle pull first.
    config.idle_pull = Duration::ZERO;
    env.worker(config.clone(), agents::builtin()).await?.stop().await?;

    let consumer =
        env.names.job_consumer(&QueueName::default_queue(), runfleet_protocol::limits::DEFAULT_PRIORITY);
    let next = format!("$JS.API.CONSUMER.MSG.NEXT.{}.{consumer}", env.names.jobs_stream());
    let inbox = env.client.new_inbox();
    let _replies = env.client.subscribe(format!("{inbox}.*")).await?;
    for i in 0..512 {
        let request = json!({"batch": 1, "expires": 120_000_000_000u64}).to_string();
        env.client.publish_with_reply(next.clone(), format!("{inbox}.{i}"), request.into()).await?;
    }
    env.client.flush().await?;
    wait_until(DEADLINE, || async {
        Ok((waiting_pulls(&mut default_band_consumer(&env).await?).await? >= 512).then_some(()))
    })
    .await?;

    let mut requests = env.client.subscribe(next).await?;
    env.client.flush().await?;
    config.idle_pull = Duration::from_millis(100);
    let worker = env.worker(config, agents::builtin()).await?;
    let window = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut from_worker = 0;
    while let Ok(Some(request)) =
        tokio::time::timeout_at(window, futures::StreamExt::next(&mut requests)).await
    {
        if !request.reply.as_ref().is_some_and(|reply| reply.starts_with(inbox.as_str())) {
            from_worker += 1;
        }
    }
    // About one refused request and one fetch per idle poll; looping, the
    // worker sent hundreds.
    assert!(from_worker <= 20, "the worker sent {from_worker} pull requests in 3 s while they were refused");
    worker.stop().await
}

/// A worker whose free slots are all its waiting pull request's cannot take
/// a job of another band, so it leaves the wake-up group as a busy worker
/// does: here its one other slot holds a band-0 run, and every band-0 job
/// published next is woken on the idle worker beside it (both idle polls at
/// two minutes, pull requests waiting 5 s). In the group it would take about
/// half of those wake-ups and run them only once its request expired.
#[tokio::test]
async fn a_worker_whose_free_slots_are_its_pull_requests_leaves_the_group() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let gate = Arc::new(Notify::new());
    let mut agents = agents::builtin();
    agents.register(AgentName::new("gate")?, Gate(gate.clone()));
    let mut config = env.config(2);
    config.idle_poll = Duration::from_secs(120);
    config.idle_pull = Duration::from_secs(5);
    let reserved = env.worker(config.clone(), agents).await?;
    wait_until(DEADLINE, || async {
        Ok((waiting_pulls(&mut default_band_consumer(&env).await?).await? == 1).then_some(()))
    })
    .await?;
    let blocker = env.submit("gate", json!({}), 0).await?;
    wait_until(DEADLINE, || async { Ok((env.events(blocker).await?.len() >= 2).then_some(())) }).await?;

    let idle = env.worker(config, agents::builtin()).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..8 {
        let run = env.submit("echo", json!(i), 0).await?;
        let events = env.wait_terminal(run).await.with_context(|| format!("echo run {i}"))?;
        assert_eq!(
            events[1].worker_id.as_ref(),
            Some(&idle.id),
            "band-0 run {i} ran on the worker whose free slot its pull request held"
        );
    }
    gate.notify_one();
    env.wait_terminal(blocker).await?;
    idle.stop().await?;
    reserved.stop().await
}

/// A submission's first claim keeps its job only through the heartbeat's
/// in-progress acks until the heartbeat leases it, so a heartbeat no faster
/// than the job's ack wait is refused at start, naming both settings.
#[tokio::test]
async fn a_heartbeat_slower_than_the_ack_wait_is_refused() -> anyhow::Result<()> {
    let env = Env::start(LEASE_TTL).await?;
    let mut config = env.config(1);
    config.ack_wait = Some(Duration::from_secs(2));
    config.heartbeat_interval = Some(Duration::from_secs(3));
    let error = match runfleet_worker::Worker::start(config, agents::builtin()).await {
        Ok(_) => anyhow::bail!("a worker started with a heartbeat slower than its ack wait"),
        Err(error) => error,
    };
    assert!(matches!(error, runfleet_worker::Error::HeartbeatSlowerThanAckWait { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains("worker.heartbeat_interval") && message.contains("worker.ack_wait"),
        "{message}"
    );
    Ok(())
}
