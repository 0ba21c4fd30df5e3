//! Waiting, signals, approvals, durable sleep, cancellation, recovery and
//! drain through real processes (nats-server, coordinator, workers, CLI).
//! Each test checks what JetStream stored: gapless logs with exactly one
//! terminal event, waits that hold no slot, and no step executed twice.

mod harness;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use harness::stream::{by_run, check_run_log, eventually, tenant_events};
use harness::{Fleet, FleetOptions, TestDb};
use runfleet_coordinator::runs::{Cancelled, Runs, StartedRun};
use runfleet_coordinator::setup::Topology;
use runfleet_protocol::api::SubmitRequest;
use runfleet_protocol::control::CancelRecord;
use runfleet_protocol::event::{Event, EventBody};
use runfleet_protocol::{time, Names, RunId, RunState, TenantId};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(120);

async fn fleet(options: FleetOptions) -> Fleet {
    harness::init_tracing();
    Fleet::start_with(TestDb::sqlite(), options).await
}

async fn submit_to(fleet: &Fleet, agent: &str, input: Value, queue: Option<&str>) -> RunId {
    let request = SubmitRequest {
        agent: agent.to_owned(),
        input,
        queue: queue.map(str::to_owned),
        priority: None,
        idempotency_key: None,
        max_attempts: None,
    };
    fleet.client("default").await.submit(request).await.unwrap_or_else(|e| panic!("submit: {e}")).run_id
}

async fn submit(fleet: &Fleet, agent: &str, input: Value) -> RunId {
    submit_to(fleet, agent, input, None).await
}

async fn all_events(fleet: &Fleet) -> BTreeMap<RunId, Vec<Event>> {
    let client = fleet.nats.client().await;
    by_run(&tenant_events(&client, &TenantId::default_tenant()).await)
}

async fn events(fleet: &Fleet, run: RunId) -> Vec<Event> {
    all_events(fleet).await.remove(&run).unwrap_or_default()
}

async fn wait_for(fleet: &Fleet, run: RunId, what: &str, check: impl Fn(&[Event]) -> bool) -> Vec<Event> {
    eventually(DEADLINE, what, || async {
        let events = events(fleet, run).await;
        check(&events).then_some(events)
    })
    .await
}

fn last_state(events: &[Event]) -> Option<RunState> {
    events.last().map(Event::state_after)
}

fn is_waiting(events: &[Event]) -> bool {
    last_state(events) == Some(RunState::Waiting)
}

fn is_terminal(events: &[Event]) -> bool {
    events.last().is_some_and(|e| e.body.is_terminal())
}

fn output(events: &[Event]) -> Option<Value> {
    events.iter().find_map(|e| match &e.body {
        EventBody::Completed(done) => Some(done.output.clone()),
        _ => None,
    })
}

fn count(events: &[Event], type_name: &str) -> usize {
    events.iter().filter(|e| e.body.type_name() == type_name).count()
}

/// Runs a CLI command against the fleet and asserts it succeeded.
fn cli_ok(fleet: &Fleet, args: &[&str]) -> String {
    let out = fleet.cli(args);
    assert!(
        out.status.success(),
        "runfleet {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Checks the invariants every run log must keep and that it ended in `state`.
fn assert_ended(run: RunId, events: &[Event], state: RunState) {
    if let Err(violation) = check_run_log(run, events) {
        panic!("run {run}: {violation}\n{events:#?}");
    }
    assert_eq!(last_state(events), Some(state), "run {run} ended wrong: {events:#?}");
    let terminals = events.iter().filter(|e| e.body.is_terminal()).count();
    assert_eq!(terminals, 1, "run {run} has {terminals} terminal events: {events:#?}");
}

/// A run asks for approval; every worker and the coordinator are killed and
/// replaced; the decisions (approve, reject, edit) sent through the CLI
/// resume each run on the fresh worker, which completes it with the
/// decided path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_survive_a_full_restart() {
    let mut fleet = fleet(FleetOptions { workers: 1, slots: 4, ..Default::default() }).await;
    let approve = submit(&fleet, "approval", json!({ "action": "deploy" })).await;
    let reject = submit(&fleet, "approval", json!({ "action": "drop the table" })).await;
    let edit = submit(&fleet, "approval", json!({ "action": "deploy v1" })).await;
    let mut first_worker = None;
    for run in [approve, reject, edit] {
        let events = wait_for(&fleet, run, "the run to wait for approval", is_waiting).await;
        let requested = events
            .iter()
            .find_map(|e| match &e.body {
                EventBody::ApprovalRequested(request) => Some(request.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no approval.requested in {events:#?}"));
        assert_eq!(requested.tool, "action");
        assert!(requested.arguments["action"].is_string(), "{requested:?}");
        first_worker = events.iter().find_map(|e| e.worker_id.clone());
    }

    for worker in &mut fleet.workers {
        worker.signal(9);
        worker.wait_exit(Duration::from_secs(10));
    }
    fleet.restart_coordinator();
    fleet.add_worker(&["default"], 4);
    fleet.wait_ready().await;

    let run = approve.to_string();
    cli_ok(&fleet, &["approve", &run]);
    let run = reject.to_string();
    cli_ok(&fleet, &["reject", &run, "--reason", "too risky"]);
    let run = edit.to_string();
    cli_ok(&fleet, &["approve", &run, "--edit", r#"{"action": "deploy v2"}"#]);

    let expected = [
        (approve, json!({ "decision": "approve", "action": "deploy" })),
        (reject, json!({ "decision": "reject", "action": null, "reason": "too risky" })),
        (edit, json!({ "decision": "edit", "action": "deploy v2" })),
    ];
    for (run, want) in expected {
        let events = wait_for(&fleet, run, "the run to finish after the decision", is_terminal).await;
        assert_ended(run, &events, RunState::Completed);
        assert_eq!(output(&events), Some(want), "run {run}: {events:#?}");
        let resumed_by: Vec<_> = events
            .iter()
            .filter(|e| matches!(e.body, EventBody::Resumed(_)))
            .map(|e| e.worker_id.clone())
            .collect();
        assert_eq!(resumed_by.len(), 1, "one resume per decision: {events:#?}");
        assert_ne!(resumed_by[0], first_worker, "resumed on the fresh worker");
        assert_eq!(count(&events, "approval.requested"), 1, "{events:#?}");
    }
}

/// One worker with one slot serves 20 runs that all wait for approval at
/// once: waiting holds no slot. Then all 20 complete after their approvals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_runs_hold_no_slot() {
    let fleet = fleet(FleetOptions { workers: 1, slots: 1, ..Default::default() }).await;
    let mut runs = Vec::new();
    for i in 0..20 {
        runs.push(submit(&fleet, "approval", json!({ "action": format!("task {i}") })).await);
    }
    eventually(DEADLINE, "all 20 runs to be waiting at once", || async {
        let all = all_events(&fleet).await;
        runs.iter().all(|run| all.get(run).is_some_and(|events| is_waiting(events))).then_some(())
    })
    .await;
    for run in &runs {
        cli_ok(&fleet, &["approve", &run.to_string()]);
    }
    for (i, run) in runs.iter().enumerate() {
        let events = wait_for(&fleet, *run, "the run to complete", is_terminal).await;
        assert_ended(*run, &events, RunState::Completed);
        assert_eq!(output(&events), Some(json!({ "decision": "approve", "action": format!("task {i}") })));
    }
}

/// A durable sleep of 30 s with the coordinator and nats-server restarted
/// during it wakes after it is due, once. The sleep is long so that both
/// restarts fit in it even under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_sleep_survives_coordinator_and_server_restarts() {
    let mut fleet = fleet(FleetOptions { workers: 1, slots: 2, ..Default::default() }).await;
    let run = submit(&fleet, "timer", json!({ "sleep_ms": 30_000 })).await;
    let events = wait_for(&fleet, run, "the run to sleep", is_waiting).await;
    let due = events
        .iter()
        .find_map(|e| match &e.body {
            EventBody::Waiting(w) => w.deadline_ms,
            _ => None,
        })
        .unwrap_or_else(|| panic!("run.waiting without a deadline: {events:#?}"));

    fleet.restart_coordinator();
    fleet.wait_ready().await;
    fleet.nats.restart();
    fleet.wait_ready().await;
    assert!(time::now_ms() < due, "the restarts happened while the run slept");

    let events = wait_for(&fleet, run, "the run to wake and finish", is_terminal).await;
    assert_ended(run, &events, RunState::Completed);
    assert_eq!(output(&events), Some(json!({ "slept_ms": 30_000 })));
    let resumes: Vec<&Event> = events.iter().filter(|e| matches!(e.body, EventBody::Resumed(_))).collect();
    assert_eq!(resumes.len(), 1, "woke once: {events:#?}");
    let late = resumes[0].ts_ms - due;
    eprintln!("durable sleep woke {late} ms after it was due");
    assert!(late >= 0, "woke {} ms early: {events:#?}", -late);
    // Generous: the measured figure (within a second) is in the benchmark.
    assert!(late < 10_000, "woke {late} ms late");
    assert_eq!(count(&events, "run.waiting"), 1, "{events:#?}");
}

/// The timer a worker arms when it parks a run is a later dispatch: its job
/// names no `run.created` sequence, so the claimant that gets it when it
/// fires reads the run's log (and its cancel request) rather than take the
/// run for fresh. A timer that copied the submission's job would have its
/// claimant run the agent against a log that moved on long ago, and miss a
/// cancel stored while the run slept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_runs_timer_is_a_later_dispatch() {
    let fleet = fleet(FleetOptions { workers: 1, slots: 2, ..Default::default() }).await;
    let run = submit(&fleet, "timer", json!({ "sleep_ms": 600_000 })).await;
    wait_for(&fleet, run, "the run to sleep", is_waiting).await;

    let names = Names::default();
    let js = async_nats::jetstream::new(fleet.nats.client().await);
    let jobs = js.get_stream(names.jobs_stream()).await.unwrap_or_else(|e| panic!("jobs stream: {e}"));
    // The worker arms the timer after it stores run.waiting: wait for it.
    let timer = eventually(DEADLINE, "the run's timer", || async {
        jobs.get_last_raw_message_by_subject(&names.run_timer(run)).await.ok()
    })
    .await;
    let job: runfleet_protocol::job::Job =
        runfleet_protocol::codec::decode(&timer.payload).unwrap_or_else(|e| panic!("the timer's job: {e}"));
    assert_eq!(job.run_id, run);
    assert_eq!(job.created_seq, None, "the timer carries the submission's fast-claim hint: {job:?}");
}

/// `await_signal` with a deadline takes the timeout path when no signal
/// comes, and returns the payload when one does, whether it arrived
/// before or after the run got to the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_deadline_and_delivery() {
    let fleet = fleet(FleetOptions { workers: 1, slots: 4, test_agents: true, ..Default::default() }).await;
    let silent = submit(&fleet, "await", json!({ "key": "go", "timeout_ms": 1500 })).await;
    let answered = submit(&fleet, "await", json!({ "key": "go", "timeout_ms": 600_000 })).await;
    // Parked on a queue nobody serves yet, so the signal is stored first.
    let early = submit_to(&fleet, "await", json!({ "key": "go" }), Some("later")).await;

    wait_for(&fleet, answered, "the run to wait", is_waiting).await;
    cli_ok(&fleet, &["signal", &answered.to_string(), "go", "--payload", r#"{"n": 1}"#]);
    cli_ok(&fleet, &["signal", &early.to_string(), "go", "--payload", r#""first""#]);
    let conflict = fleet.cli(&["signal", &early.to_string(), "go", "--payload", r#""second""#]);
    assert!(!conflict.status.success(), "a different second signal must be refused");

    let events = wait_for(&fleet, silent, "the timeout path", is_terminal).await;
    assert_ended(silent, &events, RunState::Completed);
    assert_eq!(output(&events), Some(json!({ "timed_out": true })));

    let events = wait_for(&fleet, answered, "the signalled run", is_terminal).await;
    assert_ended(answered, &events, RunState::Completed);
    assert_eq!(output(&events), Some(json!({ "signal": { "n": 1 } })));

    let mut fleet = fleet;
    fleet.add_worker(&["later"], 1);
    let events = wait_for(&fleet, early, "the run whose signal came first", is_terminal).await;
    assert_ended(early, &events, RunState::Completed);
    assert_eq!(output(&events), Some(json!({ "signal": "first" })));
    assert_eq!(count(&events, "run.waiting"), 0, "the stored signal is consumed without parking");
}

/// Cancel works in every state: queued (no worker), running (the worker
/// stops it), waiting (parked) and terminal (a no-op).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_in_every_state() {
    let fleet = fleet(FleetOptions { workers: 1, slots: 4, ..Default::default() }).await;
    let names = Names::default();

    let queued = submit_to(&fleet, "echo", json!("never runs"), Some("nobody")).await;
    cli_ok(&fleet, &["cancel", &queued.to_string(), "--reason", "not needed"]);
    let log = wait_for(&fleet, queued, "the queued run to be cancelled", is_terminal).await;
    assert_ended(queued, &log, RunState::Cancelled);
    assert_eq!(log.len(), 2, "created, cancelled: {log:#?}");
    let js = async_nats::jetstream::new(fleet.nats.client().await);
    let jobs = js.get_stream(names.jobs_stream()).await.unwrap_or_else(|e| panic!("jobs stream: {e}"));
    let queue = runfleet_protocol::QueueName::new("nobody").unwrap_or_else(|e| panic!("{e}"));
    let job = jobs.get_last_raw_message_by_subject(&names.job(&queue, 2, queued)).await;
    assert!(job.is_err(), "the cancelled run's job is removed");

    let running = submit(&fleet, "sleep", json!({ "steps": 600, "ms": 100 })).await;
    wait_for(&fleet, running, "the run to start", |e| count(e, "agent.event") > 0).await;
    let asked = Instant::now();
    cli_ok(&fleet, &["cancel", &running.to_string()]);
    let log = wait_for(&fleet, running, "the worker to stop the run", is_terminal).await;
    eprintln!("running run cancelled {} ms after the request", asked.elapsed().as_millis());
    assert_ended(running, &log, RunState::Cancelled);
    assert!(log.last().is_some_and(|e| e.worker_id.is_some()), "the worker wrote run.cancelled");

    let waiting = submit(&fleet, "approval", json!({ "action": "x" })).await;
    wait_for(&fleet, waiting, "the run to wait", is_waiting).await;
    cli_ok(&fleet, &["cancel", &waiting.to_string()]);
    let log = wait_for(&fleet, waiting, "the waiting run to be cancelled", is_terminal).await;
    assert_ended(waiting, &log, RunState::Cancelled);
    // A late approval is refused: the run is over.
    let late = fleet.cli(&["approve", &waiting.to_string()]);
    assert!(!late.status.success(), "approving a cancelled run must fail");

    let done = submit(&fleet, "echo", json!(1)).await;
    let before = wait_for(&fleet, done, "the run to complete", is_terminal).await;
    cli_ok(&fleet, &["cancel", &done.to_string()]);
    let after = events(&fleet, done).await;
    assert_eq!(before, after, "cancelling a terminal run changes nothing");
    assert_ended(done, &after, RunState::Completed);
}

/// Cancels racing claims and starts, many times: every run ends with
/// exactly one terminal event, cancelled or completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_racing_claims_ends_each_run_once() {
    let fleet = fleet(FleetOptions { workers: 2, slots: 4, test_agents: true, ..Default::default() }).await;
    let client = fleet.client("default").await;
    let mut runs = Vec::new();
    for i in 0..40u64 {
        let run = submit(&fleet, "steps", json!({ "steps": 3, "ms": 20 })).await;
        // Vary the gap so the cancel lands before, during and after claims.
        tokio::time::sleep(Duration::from_millis(i % 8 * 5)).await;
        client.cancel(run, Some("race".to_owned())).await.unwrap_or_else(|e| panic!("cancel {run}: {e}"));
        runs.push(run);
    }
    let mut cancelled = 0;
    for run in runs {
        let events = wait_for(&fleet, run, "the run to end", is_terminal).await;
        let state = last_state(&events).unwrap_or(RunState::Queued);
        assert!(matches!(state, RunState::Cancelled | RunState::Completed), "{events:#?}");
        assert_ended(run, &events, state);
        cancelled += usize::from(state == RunState::Cancelled);
    }
    assert!(cancelled > 0, "some cancels must have won");
}

/// SIGTERM a worker with 10 long runs in flight and a grace shorter than
/// they need: it hands them off at step boundaries (`run.handoff`) and the
/// other worker resumes all 10 at once, far sooner than the 30 s lease TTL,
/// with no step executed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_hands_runs_off_at_step_boundaries() {
    let journal = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("{e}"));
    let options = FleetOptions {
        workers: 1,
        slots: 10,
        lease_ttl: Some("30s".to_owned()),
        test_agents: true,
        journal: Some(journal.path().to_owned()),
        worker_args: vec!["--shutdown-grace".into(), "1s".into()],
        ..Default::default()
    };
    let mut fleet = fleet(options).await;
    // 20 s a run: long enough that the setup before SIGTERM, slow under
    // load, ends before any run does.
    let mut runs = Vec::new();
    for _ in 0..10 {
        runs.push(submit(&fleet, "steps", json!({ "steps": DRAIN_STEPS, "ms": 500 })).await);
    }
    for run in &runs {
        wait_for(&fleet, *run, "the run to start", |e| count(e, "step.completed") >= 1).await;
    }
    fleet.add_worker(&["default"], 10);
    fleet.wait_ready().await;
    let sigterm = time::now_ms();
    fleet.workers[0].signal(15);

    let mut slowest = 0;
    for run in &runs {
        let events = wait_for(&fleet, *run, "the handed-off run to finish", is_terminal).await;
        assert_ended(*run, &events, RunState::Completed);
        assert_eq!(count(&events, "run.handoff"), 1, "{events:#?}");
        let resumed = events
            .iter()
            .find(|e| matches!(e.body, EventBody::Resumed(_)))
            .unwrap_or_else(|| panic!("no run.resumed: {events:#?}"));
        slowest = slowest.max(resumed.ts_ms - sigterm);
        assert_no_step_twice(journal.path(), *run);
    }
    eprintln!("slowest hand-off: {slowest} ms after SIGTERM (grace 1 s, lease TTL 30 s)");
    assert!(slowest < 30_000, "hand-off took {slowest} ms, no better than the lease TTL");
    let status = fleet.workers[0].wait_exit(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "the drained worker exits cleanly");
}

/// Steps of each run in `drain_hands_runs_off_at_step_boundaries`.
const DRAIN_STEPS: usize = 40;

fn assert_no_step_twice(journal: &Path, run: RunId) {
    let text = std::fs::read_to_string(journal).unwrap_or_default();
    let mut seen = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with(&run.to_string())) {
        let index: u32 = line.split(' ').nth(1).and_then(|i| i.parse().ok()).unwrap_or(u32::MAX);
        *seen.entry(index).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), DRAIN_STEPS, "run {run}: every step executed: {seen:?}");
    assert!(seen.values().all(|n| *n == 1), "run {run}: a step executed twice: {seen:?}");
}

/// A run whose job message was purged by hand is found by the recovery
/// loop, re-dispatched and completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_redispatches_a_purged_job() {
    let options = FleetOptions {
        workers: 0,
        coordinator_env: vec![
            ("RUNFLEET_COORDINATOR__RECOVERY_INTERVAL".into(), "500ms".into()),
            ("RUNFLEET_COORDINATOR__RECOVERY_MIN_AGE".into(), "1s".into()),
        ],
        ..Default::default()
    };
    let mut fleet = fleet(options).await;
    let names = Names::default();
    let run = submit(&fleet, "echo", json!({ "recovered": true })).await;
    let js = async_nats::jetstream::new(fleet.nats.client().await);
    let jobs = js.get_stream(names.jobs_stream()).await.unwrap_or_else(|e| panic!("jobs stream: {e}"));
    let subject = names.job(&runfleet_protocol::QueueName::default_queue(), 2, run);
    let purged = jobs.purge().filter(&subject).await.unwrap_or_else(|e| panic!("purge: {e}"));
    assert_eq!(purged.purged, 1, "the job was there to purge");

    eventually(DEADLINE, "the recovery loop to re-dispatch the run", || async {
        jobs.get_last_raw_message_by_subject(&subject).await.ok()
    })
    .await;
    fleet.add_worker(&["default"], 1);
    let events = wait_for(&fleet, run, "the recovered run to complete", is_terminal).await;
    assert_ended(run, &events, RunState::Completed);
    assert_eq!(output(&events), Some(json!({ "recovered": true })));
}

/// Bad signals and decisions are refused with an error naming the problem,
/// and a decision the agent cannot read fails the run with `invalid_input`
/// instead of being taken as some decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signals_and_decisions_get_clear_errors() {
    let fleet = fleet(FleetOptions { workers: 1, slots: 2, ..Default::default() }).await;
    let run = submit(&fleet, "approval", json!({ "action": "deploy" })).await;
    wait_for(&fleet, run, "the run to wait for approval", is_waiting).await;
    let id = run.to_string();

    let stderr = |out: std::process::Output| {
        assert!(!out.status.success(), "must fail: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let bad_key = stderr(fleet.cli(&["signal", &id, "no spaces", "--payload", "1"]));
    assert!(bad_key.contains("key"), "{bad_key}");
    let bad_json = stderr(fleet.cli(&["signal", &id, "approval-0", "--payload", "{not json"]));
    assert!(bad_json.contains("payload") || bad_json.contains("JSON"), "{bad_json}");
    let unknown = stderr(fleet.cli(&["signal", &RunId::generate().to_string(), "k", "--payload", "1"]));
    assert!(unknown.contains("not_found") || unknown.contains("not found"), "{unknown}");
    let done = submit(&fleet, "echo", json!(1)).await;
    wait_for(&fleet, done, "the echo run to complete", is_terminal).await;
    let no_request = stderr(fleet.cli(&["approve", &done.to_string()]));
    assert!(no_request.contains("approval"), "{no_request}");

    // Nothing above touched the waiting run.
    assert!(is_waiting(&events(&fleet, run).await));
    cli_ok(&fleet, &["signal", &id, "approval-0", "--payload", r#"{"decision": "maybe"}"#]);
    let log = wait_for(&fleet, run, "the run to fail on the unreadable decision", is_terminal).await;
    assert_ended(run, &log, RunState::Failed);
    let error = log
        .iter()
        .find_map(|e| match &e.body {
            EventBody::Failed(failed) => Some(failed.error.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no run.failed: {log:#?}"));
    assert_eq!(error.code, runfleet_protocol::ErrorCode::InvalidInput, "{error:?}");
    assert!(error.message.contains("decision"), "{error:?}");
}

/// Cancels racing a run as it parks on an approval without timeout: each run
/// ends cancelled well before the recovery loop (60 s minimum age) could
/// have stepped in, so no cancel is dropped between the agent stopping and
/// the lease being released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_racing_parking_is_never_dropped() {
    let fleet = fleet(FleetOptions { workers: 2, slots: 4, ..Default::default() }).await;
    let client = fleet.client("default").await;
    let mut runs = Vec::new();
    for i in 0..30u64 {
        let run = submit(&fleet, "approval", json!({ "action": format!("race {i}") })).await;
        tokio::time::sleep(Duration::from_millis(i % 6 * 2)).await;
        client.cancel(run, None).await.unwrap_or_else(|e| panic!("cancel {run}: {e}"));
        runs.push(run);
    }
    for run in runs {
        let deadline = Instant::now() + Duration::from_secs(20);
        let events = loop {
            let events = events(&fleet, run).await;
            if is_terminal(&events) {
                break events;
            }
            if Instant::now() >= deadline {
                let names = Names::default();
                let js = async_nats::jetstream::new(fleet.nats.client().await);
                let jobs = js.get_stream(names.jobs_stream()).await.unwrap_or_else(|e| panic!("{e}"));
                let subject = names.job(&runfleet_protocol::QueueName::default_queue(), 2, run);
                let job = jobs.get_last_raw_message_by_subject(&subject).await.map(|m| m.sequence);
                let mut consumer: async_nats::jetstream::consumer::PullConsumer =
                    jobs.get_consumer("jobs-default-p2").await.unwrap_or_else(|e| panic!("{e}"));
                let info = consumer.info().await.map(|i| format!("{i:?}"));
                panic!("run {run} did not end: job {job:?}; consumer {info:?}; {events:#?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_ended(run, &events, RunState::Cancelled);
    }
}

/// A cancel record stored before a worker takes a fresh run (as a
/// coordinator does first thing) does not stop the run by itself: a
/// submission's first claim reads no control record (and takes no lease
/// until its first heartbeat). When the coordinator then finds the run
/// started by a worker, or its lease held, it writes the record again, and
/// the worker's control watch, registered before the claim, delivers it:
/// the worker ends the run with `run.cancelled` long before the run would
/// have completed on its own (60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_finding_a_fresh_claim_reaches_its_worker() {
    let mut fleet = fleet(FleetOptions { workers: 0, slots: 4, ..Default::default() }).await;
    let names = Names::default();
    let js = async_nats::jetstream::new(fleet.nats.client().await);
    let run = submit(&fleet, "sleep", json!({ "steps": 600, "ms": 100 })).await;

    // The coordinator's first move: the record, before any worker runs.
    let request = CancelRecord { reason: Some("stored first".to_owned()), requested_ms: time::now_ms() };
    let control =
        js.get_key_value(names.control_bucket()).await.unwrap_or_else(|e| panic!("control bucket: {e}"));
    let record = runfleet_protocol::codec::encode(&request).unwrap_or_else(|e| panic!("{e}"));
    control
        .put(names.control_key(run), record.into())
        .await
        .unwrap_or_else(|e| panic!("store the record: {e}"));

    fleet.add_worker(&["default"], 4);
    wait_for(&fleet, run, "the worker to run the run", |e| count(e, "agent.event") > 0).await;

    // Its second: the lease step, which finds the run started by the worker.
    let stream = |name: String| {
        let js = js.clone();
        async move { js.get_stream(name).await.unwrap_or_else(|e| panic!("stream: {e}")) }
    };
    let bucket = |name: String| {
        let js = js.clone();
        async move { js.get_key_value(name).await.unwrap_or_else(|e| panic!("bucket: {e}")) }
    };
    let topology = Topology {
        events: stream(names.events_stream()).await,
        jobs: stream(names.jobs_stream()).await,
        idempotency: bucket(names.idempotency_bucket()).await,
        leases: bucket(names.leases_bucket()).await,
        signals: bucket(names.signals_bucket()).await,
        control,
        inputs: bucket(names.inputs_bucket()).await,
    };
    let runs = Runs::new(js.clone(), names.clone(), &topology);
    let facts = runs
        .facts(&TenantId::default_tenant(), run)
        .await
        .unwrap_or_else(|e| panic!("facts: {e}"))
        .unwrap_or_else(|| panic!("run {run} has no facts"));
    let outcome = runs
        .cancel_unowned(
            &TenantId::default_tenant(),
            &facts.job,
            facts.last.event.attempt,
            &request,
            StartedRun::AskTheWorker,
        )
        .await
        .unwrap_or_else(|e| panic!("cancel: {e}"));
    assert!(
        matches!(outcome, Cancelled::LeaseHeld { holder: Some(_) }),
        "the worker holds the run: {outcome:?}"
    );

    let log = wait_for(&fleet, run, "the worker to cancel the run", is_terminal).await;
    assert_ended(run, &log, RunState::Cancelled);
    assert!(log.last().is_some_and(|e| e.worker_id.is_some()), "the worker wrote run.cancelled: {log:#?}");
}
