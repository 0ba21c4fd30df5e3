//! The retention sweep through real processes: once a run has been over for
//! `ended_run_retention`, its checkpoints (and their large outputs), its
//! signals and its cancel request are gone from JetStream, its events and
//! registry row stay, and a run still waiting keeps everything.

mod harness;

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use futures::TryStreamExt;
use harness::stream::{by_run, eventually, tenant_events};
use harness::{Fleet, FleetOptions, TestDb};
use runfleet_coordinator::registry::Registry;
use runfleet_protocol::checkpoint::{Checkpoint, StepOutput};
use runfleet_protocol::event::{Event, EventBody};
use runfleet_protocol::names::KV_SUBJECT_PREFIX;
use runfleet_protocol::signal::ApprovalDecision;
use runfleet_protocol::{codec, Names, RunId, RunState, TenantId};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(120);
/// Long enough to see each ended run's leftovers before the sweep takes them.
const RETENTION: &str = "5s";

async fn fleet(db: TestDb) -> Fleet {
    harness::init_tracing();
    let options = FleetOptions {
        workers: 1,
        slots: 4,
        test_agents: true,
        coordinator_env: vec![
            ("RUNFLEET_COORDINATOR__ENDED_RUN_RETENTION".into(), RETENTION.into()),
            ("RUNFLEET_COORDINATOR__RECOVERY_INTERVAL".into(), "300ms".into()),
        ],
        ..Default::default()
    };
    Fleet::start_with(db, options).await
}

async fn events(fleet: &Fleet, run: RunId) -> Vec<Event> {
    let client = fleet.nats.client().await;
    let mut runs: BTreeMap<RunId, Vec<Event>> =
        by_run(&tenant_events(&client, &TenantId::default_tenant()).await);
    runs.remove(&run).unwrap_or_default()
}

async fn wait_state(fleet: &Fleet, run: RunId, state: RunState) -> Vec<Event> {
    eventually(DEADLINE, &format!("run {run} to be {state}"), || async {
        let events = events(fleet, run).await;
        (events.last().map(Event::state_after) == Some(state)).then_some(events)
    })
    .await
}

/// Approves a run parked on its approval request (the key its wait names).
async fn approve(fleet: &Fleet, run: RunId) {
    let log = wait_state(fleet, run, RunState::Waiting).await;
    let key = log
        .iter()
        .rev()
        .find_map(|event| match &event.body {
            EventBody::Waiting(wait) => wait.key.clone(),
            _ => None,
        })
        .unwrap_or_else(|| panic!("run {run} waits on no key"));
    let decision = serde_json::to_value(ApprovalDecision::Approve).unwrap_or_else(|e| panic!("{e}"));
    let client = fleet.client("default").await;
    client.signal(run, key.as_str(), decision).await.unwrap_or_else(|e| panic!("approve {run}: {e}"));
}

/// Messages stored under `filter` in `stream`.
async fn stored(js: &jetstream::Context, stream: &str, filter: &str) -> u64 {
    let stream = js.get_stream(stream).await.unwrap_or_else(|e| panic!("stream {stream}: {e}"));
    let mut subjects = stream.info_with_subjects(filter).await.unwrap_or_else(|e| panic!("subjects: {e}"));
    let mut total = 0;
    while let Some((_, count)) = subjects.try_next().await.unwrap_or_else(|e| panic!("subjects: {e}")) {
        total += count as u64;
    }
    total
}

/// What JetStream holds for one run outside its event log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Leftovers {
    checkpoints: u64,
    signals: u64,
    control: u64,
}

async fn leftovers(js: &jetstream::Context, names: &Names, run: RunId) -> Leftovers {
    let kv = |bucket: String, rest: String| {
        (format!("KV_{bucket}"), format!("{KV_SUBJECT_PREFIX}.{bucket}.{rest}"))
    };
    let (stream, filter) = kv(names.checkpoints_bucket(), format!("{run}.>"));
    let checkpoints = stored(js, &stream, &filter).await;
    let (stream, filter) = kv(names.signals_bucket(), format!("{run}.>"));
    let signals = stored(js, &stream, &filter).await;
    let (stream, filter) = kv(names.control_bucket(), names.control_key(run));
    let control = stored(js, &stream, &filter).await;
    Leftovers { checkpoints, signals, control }
}

/// The objects holding `run`'s large step outputs, named in its checkpoints.
async fn blob_objects(js: &jetstream::Context, names: &Names, run: RunId, steps: u32) -> Vec<String> {
    let checkpoints =
        js.get_key_value(names.checkpoints_bucket()).await.unwrap_or_else(|e| panic!("checkpoints: {e}"));
    let mut objects = Vec::new();
    for step in 0..steps {
        let bytes = checkpoints
            .get(names.checkpoint_key(run, step))
            .await
            .unwrap_or_else(|e| panic!("checkpoint: {e}"))
            .unwrap_or_else(|| panic!("run {run} has no checkpoint for step {step}"));
        let checkpoint: Checkpoint = codec::decode(&bytes).unwrap_or_else(|e| panic!("checkpoint: {e}"));
        match checkpoint.output {
            StepOutput::Blob { object, .. } => objects.push(object),
            StepOutput::Inline { .. } => panic!("step {step} of run {run} kept its large output inline"),
        }
    }
    objects
}

/// Ends three runs (one with large outputs, one approved, one cancelled),
/// leaves one waiting, and checks what the sweep removes and keeps. With
/// `restart`, the coordinator is killed (SIGKILL) once the runs have ended
/// and a new one, which must first take the projection over, sweeps. With
/// `corrupt`, one large output's checkpoint is overwritten with bytes that do
/// not decode: its object stays, and everything else still goes.
async fn sweep(db: TestDb, restart: bool, corrupt: bool) {
    let mut fleet = fleet(db).await;
    let names = Names::default();
    let client = fleet.client("default").await;
    let js = jetstream::new(fleet.nats.client().await);

    let large = fleet.submit("steps", json!({ "steps": 2, "ms": 0, "output_bytes": 100_000 })).await;
    let approved = fleet.submit("approval", json!({ "action": "deploy" })).await;
    let cancelled = fleet.submit("approval", json!({ "action": "drop the table" })).await;
    let live = fleet.submit("approval", json!({ "action": "wait for it" })).await;
    for run in [approved, cancelled, live] {
        wait_state(&fleet, run, RunState::Waiting).await;
    }
    approve(&fleet, approved).await;
    client.cancel(cancelled, None).await.unwrap_or_else(|e| panic!("cancel: {e}"));
    let mut ended = Vec::new();
    for (run, state) in
        [(large, RunState::Completed), (approved, RunState::Completed), (cancelled, RunState::Cancelled)]
    {
        ended.push((run, wait_state(&fleet, run, state).await));
    }

    // Before the retention: everything is there.
    let objects = blob_objects(&js, &names, large, 2).await;
    let blobs = js.get_object_store(names.blobs_bucket()).await.unwrap_or_else(|e| panic!("blobs: {e}"));
    for object in &objects {
        blobs.info(object).await.unwrap_or_else(|e| panic!("object {object} before the retention: {e}"));
    }
    if corrupt {
        // Step 1's checkpoint no longer decodes: the sweep cannot learn its
        // object's name, and must still purge everything else.
        let checkpoints =
            js.get_key_value(names.checkpoints_bucket()).await.unwrap_or_else(|e| panic!("{e}"));
        checkpoints
            .put(names.checkpoint_key(large, 1), "not a checkpoint".into())
            .await
            .unwrap_or_else(|e| panic!("overwrite the checkpoint: {e}"));
    }
    let before = leftovers(&js, &names, large).await;
    assert!(before.checkpoints >= 2, "the large run's checkpoints: {before:?}");
    let before = leftovers(&js, &names, approved).await;
    assert!(before.checkpoints >= 1 && before.signals == 1, "the approved run: {before:?}");
    let before = leftovers(&js, &names, cancelled).await;
    assert_eq!(before.control, 1, "the cancelled run's cancel request: {before:?}");
    let live_before = leftovers(&js, &names, live).await;
    assert!(live_before.checkpoints >= 1, "the waiting run's checkpoints: {live_before:?}");

    if restart {
        fleet.restart_coordinator();
    }

    // After it: the ended runs' leftovers are gone, and the registry says so.
    for (run, _) in &ended {
        eventually(DEADLINE, &format!("run {run}'s leftovers to be purged"), || async {
            let left = leftovers(&js, &names, *run).await;
            (left == Leftovers { checkpoints: 0, signals: 0, control: 0 }).then_some(())
        })
        .await;
    }
    let registry = Registry::connect(&fleet.db.url).await.unwrap_or_else(|e| panic!("registry: {e}"));
    for (run, _) in &ended {
        let purged = eventually(DEADLINE, &format!("run {run} to be marked purged"), || async {
            registry.purged_ms(*run).await.unwrap_or_else(|e| panic!("registry: {e}"))
        })
        .await;
        assert!(purged > 0, "run {run} purged at {purged}");
    }
    // With `corrupt`, the last object (step 1's) is the unreadable one.
    let (swept, unreadable) = objects.split_at(objects.len() - usize::from(corrupt));
    for object in swept {
        let gone = blobs.info(object).await;
        assert!(gone.is_err(), "object {object} outlived its run's retention: {gone:?}");
    }
    for object in unreadable {
        blobs
            .info(object)
            .await
            .unwrap_or_else(|e| panic!("object {object} of an unreadable checkpoint: {e}"));
    }
    if !corrupt {
        let blobs_left = stored(&js, &format!("OBJ_{}", names.blobs_bucket()), ">").await;
        assert_eq!(blobs_left, 0, "the object store still holds chunks or metadata");
    }

    // The history stays: the log, the registry row, `get`.
    for (run, log) in &ended {
        assert_eq!(&events(&fleet, *run).await, log, "run {run}'s events changed");
        let view = client.get(*run).await.unwrap_or_else(|e| panic!("get {run}: {e}"));
        assert!(view.state.is_terminal(), "run {run} is {}", view.state);
    }

    // The waiting run kept everything, and resumes from it.
    assert_eq!(leftovers(&js, &names, live).await, live_before, "the waiting run lost its leftovers");
    assert_eq!(registry.purged_ms(live).await.unwrap_or_else(|e| panic!("registry: {e}")), None);
    approve(&fleet, live).await;
    let log = wait_state(&fleet, live, RunState::Completed).await;
    let output = log.iter().find_map(|event| match &event.body {
        EventBody::Completed(done) => Some(done.output.clone()),
        _ => None,
    });
    assert_eq!(output, Some(json!({ "decision": "approve", "action": "wait for it" })));
    registry.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_runs_leave_only_their_history() {
    sweep(TestDb::sqlite(), false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_checkpoint_keeps_only_its_object() {
    sweep(TestDb::sqlite(), false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_sweeps_on_postgres() {
    sweep(TestDb::postgres().await, true, false).await;
}
