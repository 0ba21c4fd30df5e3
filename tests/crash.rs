//! Crash safety through real processes: workers are SIGKILLed and SIGSTOPped
//! mid-run and nats-server is restarted under load, and each test checks the
//! invariants of DESIGN.md on what JetStream stored: gapless logs with one
//! terminal event, every step checkpointed once, completed steps never
//! executed again (the `steps` test agent journals every execution), and
//! nothing written by a worker after it lost its lease.

mod harness;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use harness::stream::{by_run, check_run_log, eventually, tenant_events};
use harness::{Fleet, FleetOptions, TestDb};
use runfleet_protocol::api::SubmitRequest;
use runfleet_protocol::checkpoint::{Checkpoint, StepOutput};
use runfleet_protocol::event::{Event, EventBody};
use runfleet_protocol::{codec, ErrorCode, Names, RunId, TenantId};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(120);

/// A fleet with 2 s leases and the test agents journaling to `journal`.
async fn fleet(workers: usize, slots: u32, journal: &Path) -> Fleet {
    harness::init_tracing();
    let options = FleetOptions {
        workers,
        slots,
        lease_ttl: Some("2s".to_owned()),
        test_agents: true,
        journal: Some(journal.to_owned()),
        ..Default::default()
    };
    Fleet::start_with(TestDb::sqlite(), options).await
}

async fn submit(fleet: &Fleet, agent: &str, input: Value, max_attempts: Option<u32>) -> RunId {
    let request = SubmitRequest {
        agent: agent.to_owned(),
        input,
        queue: None,
        priority: None,
        idempotency_key: None,
        max_attempts,
    };
    fleet.client("default").await.submit(request).await.unwrap_or_else(|e| panic!("submit: {e}")).run_id
}

async fn events(fleet: &Fleet, run: RunId) -> Vec<Event> {
    let client = fleet.nats.client().await;
    let all = tenant_events(&client, &TenantId::default_tenant()).await;
    by_run(&all).remove(&run).unwrap_or_default()
}

async fn wait_for(fleet: &Fleet, run: RunId, what: &str, check: impl Fn(&[Event]) -> bool) -> Vec<Event> {
    eventually(DEADLINE, what, || async {
        let events = events(fleet, run).await;
        check(&events).then_some(events)
    })
    .await
}

fn terminal(events: &[Event]) -> bool {
    events.last().is_some_and(|e| e.body.is_terminal())
}

fn completed_steps(events: &[Event]) -> usize {
    events.iter().filter(|e| matches!(e.body, EventBody::StepCompleted(_))).count()
}

async fn checkpoints(fleet: &Fleet, run: RunId) -> BTreeMap<u32, Checkpoint> {
    let names = Names::default();
    let js = async_nats::jetstream::new(fleet.nats.client().await);
    let bucket = js.get_key_value(names.checkpoints_bucket()).await.unwrap_or_else(|e| panic!("bucket: {e}"));
    let mut keys = bucket.keys().await.unwrap_or_else(|e| panic!("keys: {e}"));
    let mut out = BTreeMap::new();
    while let Some(key) = keys.next().await {
        let key = key.unwrap_or_else(|e| panic!("key: {e}"));
        if let Some(index) = names.parse_checkpoint_step(run, &key) {
            let value = bucket.get(&key).await.ok().flatten().unwrap_or_else(|| panic!("checkpoint {key}"));
            out.insert(index, codec::decode(&value).unwrap_or_else(|e| panic!("checkpoint {key}: {e}")));
        }
    }
    out
}

/// One journal line: a step execution.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Execution {
    index: u32,
    attempt: u32,
    worker: String,
}

fn executions(journal: &Path, run: RunId) -> Vec<Execution> {
    let text = std::fs::read_to_string(journal).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let parts: Vec<&str> = line.split(' ').collect();
            (parts.len() == 5 && parts[0] == run.to_string()).then(|| Execution {
                index: parts[1].parse().unwrap_or_else(|e| panic!("journal line {line:?}: {e}")),
                attempt: parts[2].parse().unwrap_or_else(|e| panic!("journal line {line:?}: {e}")),
                worker: parts[3].to_owned(),
            })
        })
        .collect()
}

/// The attempt that started or resumed the run and how many steps it found.
fn first_events(events: &[Event]) -> Vec<(u32, u32)> {
    events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Started(_) => Some((e.attempt, 0)),
            EventBody::Resumed(r) => Some((e.attempt, r.steps_replayed)),
            _ => None,
        })
        .collect()
}

/// The invariants every crashed-and-finished `steps` run must satisfy.
fn check_durable_run(
    run: RunId,
    steps: u32,
    events: &[Event],
    stored: &BTreeMap<u32, Checkpoint>,
    journal: &[Execution],
) {
    check_run_log(run, events).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        matches!(events.last().map(|e| &e.body), Some(EventBody::Completed(_))),
        "run {run} did not complete"
    );
    // Every event belongs to the attempt that started or resumed last.
    let mut current = 0;
    for event in &events[1..] {
        if let EventBody::Started(_) | EventBody::Resumed(_) = event.body {
            assert!(event.attempt > current, "run {run}: attempts must increase: {events:#?}");
            current = event.attempt;
        }
        assert_eq!(event.attempt, current, "run {run}: seq {} written by a stale attempt", event.seq);
    }
    // Each step checkpointed once; each resumed attempt owns exactly the
    // steps from its replay point on.
    assert_eq!(stored.keys().copied().collect::<Vec<_>>(), (0..steps).collect::<Vec<_>>(), "run {run}");
    for (attempt, replayed) in first_events(events) {
        for (index, checkpoint) in stored {
            if *index < replayed {
                assert!(checkpoint.attempt < attempt, "run {run}: step {index} replayed by {attempt}");
            } else {
                assert!(checkpoint.attempt >= attempt, "run {run}: step {index} written by a stale attempt");
            }
        }
        // A completed step is never executed again.
        for execution in journal.iter().filter(|x| x.attempt == attempt) {
            assert!(
                execution.index >= replayed,
                "run {run}: attempt {attempt} re-executed step {}",
                execution.index
            );
        }
    }
    // Only an attempt's last (in-flight) step may run again elsewhere.
    for index in 0..steps {
        let writer = stored[&index].attempt;
        for extra in journal.iter().filter(|x| x.index == index && x.attempt != writer) {
            let last = journal.iter().filter(|x| x.attempt == extra.attempt).map(|x| x.index).max();
            assert_eq!(
                last,
                Some(index),
                "run {run}: step {index} executed again by attempt {}",
                extra.attempt
            );
        }
        assert!(
            journal.iter().any(|x| x.index == index && x.attempt == writer),
            "run {run}: step {index} not journaled"
        );
    }
}

#[tokio::test]
async fn sigkill_mid_run_resumes_on_another_worker_without_rerunning_completed_steps() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let journal = dir.path().join("journal");
    let fleet = fleet(2, 2, &journal).await;
    let run = submit(&fleet, "steps", json!({"steps": 10, "ms": 300}), None).await;

    let before = wait_for(&fleet, run, "3 completed steps", |e| completed_steps(e) >= 3).await;
    let victim = before.iter().rev().find_map(|e| e.worker_id.clone()).unwrap_or_else(|| panic!("no worker"));
    let index = fleet.worker_index(&victim).await.unwrap_or_else(|| panic!("worker {victim} not found"));
    fleet.workers[index].signal(nix::sys::signal::Signal::SIGKILL as i32);

    let events = wait_for(&fleet, run, "the run to finish", terminal).await;
    let resumed = events.iter().find_map(|e| match &e.body {
        EventBody::Resumed(r) => Some((e.attempt, r.steps_replayed, e.worker_id.clone())),
        _ => None,
    });
    let (attempt, replayed, worker) = resumed.unwrap_or_else(|| panic!("no run.resumed: {events:#?}"));
    assert_eq!(attempt, 2);
    assert!(replayed >= 3, "the resume must find the completed steps");
    assert_ne!(worker.as_ref(), Some(&victim), "resumed on another worker");
    let journal = executions(&journal, run);
    check_durable_run(run, 10, &events, &checkpoints(&fleet, run).await, &journal);
    for index in 0..replayed {
        assert_eq!(journal.iter().filter(|x| x.index == index).count(), 1, "step {index} ran twice");
    }
}

#[tokio::test]
async fn sigstopped_worker_is_refused_after_takeover_and_abandons_the_run() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let journal = dir.path().join("journal");
    let fleet = fleet(2, 1, &journal).await;
    let run = submit(&fleet, "steps", json!({"steps": 12, "ms": 400}), None).await;

    let before = wait_for(&fleet, run, "2 completed steps", |e| completed_steps(e) >= 2).await;
    let paused_id =
        before.iter().rev().find_map(|e| e.worker_id.clone()).unwrap_or_else(|| panic!("no worker"));
    let index =
        fleet.worker_index(&paused_id).await.unwrap_or_else(|| panic!("worker {paused_id} not found"));
    let paused = &fleet.workers[index];
    paused.signal(nix::sys::signal::Signal::SIGSTOP as i32);

    // Past the lease TTL another worker takes over and makes progress.
    let taken = wait_for(&fleet, run, "the takeover", |e| {
        let resumed = e.iter().position(|e| matches!(e.body, EventBody::Resumed(_)));
        resumed.is_some_and(|at| completed_steps(&e[at..]) >= 2)
    })
    .await;
    paused.signal(nix::sys::signal::Signal::SIGCONT as i32);

    let events = wait_for(&fleet, run, "the run to finish", terminal).await;
    let takeover = taken.iter().position(|e| matches!(e.body, EventBody::Resumed(_))).unwrap_or(0);
    assert!(
        events[takeover..].iter().all(|e| e.worker_id.as_ref() != Some(&paused_id)),
        "the paused worker wrote after the takeover: {events:#?}"
    );
    check_durable_run(run, 12, &events, &checkpoints(&fleet, run).await, &executions(&journal, run));

    // The paused worker noticed and let go, and is still serving.
    eventually(DEADLINE, "the paused worker to report the lost lease", || async {
        paused.logs().contains("lease lost").then_some(())
    })
    .await;
    let again = submit(&fleet, "steps", json!({"steps": 2}), None).await;
    wait_for(&fleet, again, "a new run to finish", terminal).await;
}

#[tokio::test]
async fn nats_server_restart_during_runs_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let journal = dir.path().join("journal");
    let mut fleet = fleet(2, 4, &journal).await;
    let mut runs = Vec::new();
    for _ in 0..12 {
        runs.push(submit(&fleet, "steps", json!({"steps": 6, "ms": 250}), None).await);
    }
    wait_for(&fleet, runs[0], "progress", |e| completed_steps(e) >= 2).await;
    fleet.nats.restart();

    for run in &runs {
        let events = wait_for(&fleet, *run, "the run to finish", terminal).await;
        check_durable_run(*run, 6, &events, &checkpoints(&fleet, *run).await, &executions(&journal, *run));
    }
}

#[tokio::test]
async fn a_run_that_crashes_its_worker_every_time_fails_after_max_attempts() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let journal = dir.path().join("journal");
    let mut fleet = fleet(1, 1, &journal).await;
    let run = submit(&fleet, "crash", json!({}), Some(2)).await;

    // Each attempt aborts its worker; keep one worker alive.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut crashes = 0;
    let events = loop {
        let events = events(&fleet, run).await;
        if terminal(&events) {
            break events;
        }
        assert!(tokio::time::Instant::now() < deadline, "run never failed: {events:#?}");
        if fleet.workers.last_mut().is_some_and(|w| w.has_exited()) {
            crashes += 1;
            fleet.add_worker(&["default"], 1);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    check_run_log(run, &events).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(crashes, 2, "two attempts, each crashing its worker");
    let EventBody::Failed(failed) = &events[events.len() - 1].body else { panic!("expected run.failed") };
    assert_eq!(failed.error.code, ErrorCode::MaxAttemptsExceeded);
    assert!(failed.error.message.contains("max_attempts 2"), "{}", failed.error.message);
    assert_eq!(first_events(&events).iter().map(|(a, _)| *a).collect::<Vec<_>>(), [1, 2]);
    // The step before the crash ran once and was replayed by attempt 2.
    assert_eq!(checkpoints(&fleet, run).await.len(), 1);
    assert!(events.iter().any(|e| matches!(&e.body, EventBody::Resumed(r) if r.steps_replayed == 1)));
}

/// An agent that crashes its worker before it writes anything. The first
/// delivery holds `run.started` for the agent's first event, so that attempt
/// leaves no trace; every later delivery writes `run.started` (or
/// `run.resumed`) before the agent runs, so the crashes still use up the
/// attempts: one uncounted crash, then `max_attempts`, then `run.failed`.
#[tokio::test]
async fn a_run_that_crashes_its_worker_before_its_first_event_still_fails_after_max_attempts() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let journal = dir.path().join("journal");
    let mut fleet = fleet(1, 1, &journal).await;
    let run = submit(&fleet, "crash", json!({"before_first_step": true}), Some(2)).await;

    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut crashes = 0;
    let events = loop {
        let events = events(&fleet, run).await;
        if terminal(&events) {
            break events;
        }
        assert!(tokio::time::Instant::now() < deadline, "run never failed ({crashes} crashes): {events:#?}");
        if fleet.workers.last_mut().is_some_and(|w| w.has_exited()) {
            crashes += 1;
            fleet.add_worker(&["default"], 1);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    check_run_log(run, &events).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(crashes, 3, "the held first attempt, then two counted ones");
    let types: Vec<&str> = events.iter().map(|e| e.body.type_name()).collect();
    assert_eq!(types, ["run.created", "run.started", "run.resumed", "run.failed"]);
    assert!(matches!(&events[1].body, EventBody::Started(s) if s.delivery >= 2), "{:?}", events[1]);
    let EventBody::Failed(failed) = &events[3].body else { panic!("expected run.failed") };
    assert_eq!(failed.error.code, ErrorCode::MaxAttemptsExceeded);
    assert_eq!(first_events(&events).iter().map(|(a, _)| *a).collect::<Vec<_>>(), [1, 2]);
}

#[tokio::test]
async fn multi_megabyte_step_outputs_survive_a_resume() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let journal = dir.path().join("journal");
    let fleet = fleet(2, 1, &journal).await;
    let bytes = 3 * 1024 * 1024;
    let run = submit(&fleet, "steps", json!({"steps": 4, "ms": 700, "output_bytes": bytes}), None).await;

    let before = wait_for(&fleet, run, "2 completed steps", |e| completed_steps(e) >= 2).await;
    let victim = before.iter().rev().find_map(|e| e.worker_id.clone()).unwrap_or_else(|| panic!("no worker"));
    let index = fleet.worker_index(&victim).await.unwrap_or_else(|| panic!("worker {victim} not found"));
    fleet.workers[index].signal(nix::sys::signal::Signal::SIGKILL as i32);

    let events = wait_for(&fleet, run, "the run to finish", terminal).await;
    // The agent compares every replayed output with what it produced, so
    // completing means the blobs came back intact.
    assert!(
        matches!(events.last().map(|e| &e.body), Some(EventBody::Completed(c)) if c.output == json!({"steps": 4, "bytes": 4 * bytes})),
        "{:?}",
        events.last()
    );
    assert!(events.iter().any(|e| matches!(&e.body, EventBody::Resumed(r) if r.steps_replayed >= 2)));
    let stored = checkpoints(&fleet, run).await;
    assert!(stored
        .values()
        .all(|c| matches!(c.output, StepOutput::Blob { size, .. } if size > 3 * 1024 * 1024)));
    check_durable_run(run, 4, &events, &stored, &executions(&journal, run));
}

/// A step that panics ends the run at once with `agent_panicked`, written by
/// the attempt that ran it: the step ran once, although `step.started` was
/// still travelling when the step began (see `sdk::step`), and attempts were
/// left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_step_fails_the_run_once() {
    let journal = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("{e}"));
    let fleet = fleet(1, 2, journal.path()).await;
    let run = submit(&fleet, "steps", json!({ "steps": 3, "panic_at": 1 }), Some(3)).await;
    let events =
        wait_for(&fleet, run, "run to end", |events| events.last().is_some_and(|e| e.body.is_terminal()))
            .await;
    check_run_log(run, &events).unwrap_or_else(|e| panic!("{e}"));
    match &events.last().map(|e| &e.body) {
        Some(EventBody::Failed(failed)) => {
            assert_eq!(failed.error.code, ErrorCode::AgentPanicked, "{failed:?}")
        }
        other => panic!("expected run.failed, got {other:?}"),
    }
    let ran: Vec<(u32, u32)> = executions(journal.path(), run).iter().map(|e| (e.index, e.attempt)).collect();
    assert_eq!(ran, vec![(0, 1), (1, 1)], "each step ran once, in the first attempt");
}

/// A worker stopped while a step is in flight (grace and hand-off timeout
/// both shorter than the step) hands the run off: `run.handoff` is written
/// and another worker completes it, without using up the run's only attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_hand_off_mid_step_is_not_a_failure() {
    harness::init_tracing();
    let journal = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("{e}"));
    let options = FleetOptions {
        workers: 1,
        slots: 2,
        lease_ttl: Some("30s".to_owned()),
        test_agents: true,
        journal: Some(journal.path().to_owned()),
        worker_args: ["--shutdown-grace", "1s", "--handoff-timeout", "1s"].map(str::to_owned).to_vec(),
        ..Default::default()
    };
    let mut fleet = Fleet::start_with(TestDb::sqlite(), options).await;
    let run = submit(&fleet, "steps", json!({ "steps": 2, "ms": 6000 }), Some(1)).await;
    wait_for(&fleet, run, "step 0 to start", |events| {
        events.iter().any(|e| matches!(e.body, EventBody::StepStarted(_)))
    })
    .await;
    fleet.add_worker(&["default"], 2);
    fleet.wait_ready().await;
    fleet.workers[0].signal(libc_sigterm());
    let events =
        wait_for(&fleet, run, "run to end", |events| events.last().is_some_and(|e| e.body.is_terminal()))
            .await;
    check_run_log(run, &events).unwrap_or_else(|e| panic!("{e}"));
    assert!(events.iter().any(|e| matches!(e.body, EventBody::Handoff(_))), "no run.handoff in {events:#?}");
    assert!(matches!(events.last().map(|e| &e.body), Some(EventBody::Completed(_))), "{events:#?}");
}

fn libc_sigterm() -> i32 {
    nix::sys::signal::Signal::SIGTERM as i32
}

/// A submission's first claim takes no lease until its worker's first
/// heartbeat. A worker paused (SIGSTOP) before that beat, and past its
/// job's ack wait, loses the job to another worker, which takes the run over
/// and hands it off (SIGTERM). When the paused worker is let go on, its
/// heartbeat finds the lease key free: it must not lease a run that moved
/// on (the run's next claimant would then wait for as long as its agent
/// runs, ten minutes here). It reads the run's log, finds the newer
/// attempt's events, lets go and stops; the run resumes as attempt 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_claim_paused_past_its_ack_wait_lets_go_of_a_run_that_moved_on() {
    harness::init_tracing();
    let env = [("RUNFLEET_WORKER__ACK_WAIT", "3s"), ("RUNFLEET_WORKER__HEARTBEAT_INTERVAL", "2900ms")];
    let options = FleetOptions {
        workers: 1,
        slots: 2,
        lease_ttl: Some("4s".to_owned()),
        test_agents: true,
        worker_args: ["--shutdown-grace", "500ms", "--handoff-timeout", "500ms"].map(str::to_owned).to_vec(),
        worker_env: env.map(|(k, v)| (k.to_owned(), v.to_owned())).to_vec(),
        ..Default::default()
    };
    let mut fleet = Fleet::start_with(TestDb::sqlite(), options).await;
    let names = Names::default();
    let nats = fleet.nats.client().await;
    let mut live = nats
        .subscribe(names.tenant_events(&TenantId::default_tenant()))
        .await
        .unwrap_or_else(|e| panic!("subscribe: {e}"));
    let run = submit(&fleet, "sleep", json!({ "steps": 1, "ms": 600_000 }), None).await;

    // Pause the worker as soon as its `run.started` is out: long before its
    // first beat (2.9 s), so the run holds no lease.
    tokio::time::timeout(DEADLINE, async {
        while let Some(message) = live.next().await {
            let events = runfleet_protocol::event::decode_log_message(&message.payload).unwrap_or_default();
            if events.iter().any(|e| e.run_id == run && matches!(e.body, EventBody::Started(_))) {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no run.started"));
    fleet.workers[0].signal(nix::sys::signal::Signal::SIGSTOP as i32);
    let paused_id = wait_for(&fleet, run, "run.started", |e| e.len() >= 2)
        .await
        .iter()
        .find_map(|e| matches!(e.body, EventBody::Started(_)).then(|| e.worker_id.clone()).flatten())
        .unwrap_or_else(|| panic!("run.started names no worker"));

    // Past the ack wait the job goes to a second worker, which resumes the
    // run and then, stopped, hands it off.
    fleet.add_worker(&["default"], 2);
    wait_for(&fleet, run, "the takeover", |e| e.iter().any(|e| matches!(e.body, EventBody::Resumed(_))))
        .await;
    fleet.workers[1].signal(libc_sigterm());
    let handed =
        wait_for(&fleet, run, "the hand-off", |e| e.iter().any(|e| matches!(e.body, EventBody::Handoff(_))))
            .await
            .len();
    fleet.workers[1].wait_exit(DEADLINE).unwrap_or_else(|| panic!("the second worker did not exit"));

    // A third worker, then the paused one goes on: the run resumes (on
    // either), and the paused attempt writes nothing more.
    fleet.add_worker(&["default"], 2);
    fleet.workers[0].signal(nix::sys::signal::Signal::SIGCONT as i32);
    let resumed = |e: &Event| matches!(e.body, EventBody::Resumed(_)) && e.attempt >= 3;
    let events = wait_for(&fleet, run, "attempt 3 to resume the run", |e| e.iter().any(resumed)).await;
    assert!(events[handed..].iter().all(|e| e.attempt != 1), "the paused attempt wrote again: {events:#?}");
    eventually(DEADLINE, "the paused worker to let go of the run", || async {
        fleet.workers[0].logs().contains("lease lost").then_some(())
    })
    .await;
    assert!(
        events
            .iter()
            .filter(|e| e.attempt == 1)
            .all(|e| e.worker_id.as_ref() == Some(&paused_id) || e.worker_id.is_none()),
        "{events:#?}"
    );

    fleet.client("default").await.cancel(run, None).await.unwrap_or_else(|e| panic!("cancel: {e}"));
    let events = wait_for(&fleet, run, "the run to end", terminal).await;
    assert!(matches!(events.last().map(|e| &e.body), Some(EventBody::Cancelled(_))), "{events:#?}");
    check_run_log(run, &events).unwrap_or_else(|e| panic!("{e}"));
}
