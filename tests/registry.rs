//! The registry behavioural suite, written once and run against SQLite and
//! PostgreSQL (`RUNFLEET_TEST_POSTGRES_URL` must name a cluster).

mod harness;

use runfleet_coordinator::registry::{Error, Lease, Registry, Takeover};
use runfleet_protocol::api::{ListFilter, RunView};
use runfleet_protocol::event::{
    AgentEvent, Event, EventBody, RunCancelled, RunCompleted, RunCreated, RunError, RunFailed, RunStarted,
    RunWaiting,
};
use runfleet_protocol::{AgentName, ErrorCode, QueueName, RunId, RunState, TenantId, WorkerId};
use serde_json::json;

use harness::TestDb;

/// Generates `<name>::sqlite` and `<name>::postgres` for each suite function.
macro_rules! registry_suite {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn sqlite() {
                    let db = super::TestDb::sqlite();
                    let registry = super::connect(&db).await;
                    super::$name(&registry).await;
                }

                #[tokio::test]
                async fn postgres() {
                    let db = super::TestDb::postgres().await;
                    let registry = super::connect(&db).await;
                    super::$name(&registry).await;
                }
            }
        )*
    };
}

registry_suite!(
    apply_then_get,
    run_follows_its_latest_event,
    completed_and_failed_runs_keep_output_and_error,
    list_filters,
    list_pagination,
    events_paging,
    replay_is_idempotent,
    out_of_order_delivery_converges,
    tenants_are_isolated,
    stale_runs_pages_non_terminal_rows_older_than_the_cut,
    large_shuffled_batches_converge,
    seq_one_must_be_run_created,
    projector_position_moves_by_compare_and_set,
    a_whole_life_in_one_batch_matches_event_by_event,
);

async fn connect(db: &TestDb) -> Registry {
    harness::init_tracing();
    Registry::connect(&db.url).await.unwrap_or_else(|e| panic!("connect {}: {e}", db.url))
}

fn tenant(name: &str) -> TenantId {
    TenantId::new(name).unwrap_or_else(|e| panic!("{e}"))
}

fn worker() -> WorkerId {
    WorkerId::new("w-1").unwrap_or_else(|e| panic!("{e}"))
}

fn created(tenant: &TenantId, run: RunId, agent: &str, queue: &str) -> Event {
    Event {
        run_id: run,
        tenant: tenant.clone(),
        seq: 1,
        ts_ms: 1_000,
        attempt: 0,
        worker_id: None,
        trace_id: None,
        body: EventBody::Created(RunCreated {
            agent: AgentName::new(agent).unwrap_or_else(|e| panic!("{e}")),
            queue: QueueName::new(queue).unwrap_or_else(|e| panic!("{e}")),
            priority: 2,
            input: json!({"prompt": "hi", "n": 3}),
            max_attempts: 3,
            idempotency_key: Some("key-1".into()),
            traceparent: None,
        }),
    }
}

fn next(prev: &Event, body: EventBody) -> Event {
    Event {
        run_id: prev.run_id,
        tenant: prev.tenant.clone(),
        seq: prev.seq + 1,
        ts_ms: prev.ts_ms + 10,
        attempt: 1,
        worker_id: Some(worker()),
        trace_id: None,
        body,
    }
}

/// created → started → agent event → completed.
fn full_log(tenant: &TenantId, run: RunId) -> Vec<Event> {
    let e1 = created(tenant, run, "echo", "default");
    let e2 = next(&e1, EventBody::Started(RunStarted { delivery: 1 }));
    let e3 = next(&e2, EventBody::Agent(AgentEvent { name: "progress".into(), data: json!(0.5) }));
    let e4 = next(&e3, EventBody::Completed(RunCompleted { output: json!({"answer": 42}) }));
    vec![e1, e2, e3, e4]
}

async fn apply(registry: &Registry, events: &[Event]) {
    registry.apply(events).await.unwrap_or_else(|e| panic!("apply: {e}"));
}

async fn get(registry: &Registry, tenant: &TenantId, run: RunId) -> Option<RunView> {
    registry.get(tenant, run).await.unwrap_or_else(|e| panic!("get: {e}"))
}

fn filter(limit: u32) -> ListFilter {
    ListFilter { state: None, queue: None, agent: None, limit, before: None }
}

async fn list_ids(
    registry: &Registry,
    tenant: &TenantId,
    filter: &ListFilter,
) -> (Vec<RunId>, Option<String>) {
    let page = registry.list(tenant, filter).await.unwrap_or_else(|e| panic!("list: {e}"));
    (page.runs.iter().map(|r| r.run_id).collect(), page.next_cursor)
}

async fn apply_then_get(registry: &Registry) {
    let t = tenant("acme");
    let run = RunId::generate();
    assert_eq!(get(registry, &t, run).await, None);
    apply(registry, &[created(&t, run, "echo", "gpu")]).await;
    let view = get(registry, &t, run).await.unwrap_or_else(|| panic!("run should exist"));
    assert_eq!(view.run_id, run);
    assert_eq!(view.tenant, t);
    assert_eq!(view.agent.as_str(), "echo");
    assert_eq!(view.queue.as_str(), "gpu");
    assert_eq!(view.priority, 2);
    assert_eq!(view.state, RunState::Queued);
    assert_eq!(view.attempt, 0);
    assert_eq!(view.max_attempts, 3);
    assert_eq!(view.input, json!({"prompt": "hi", "n": 3}));
    assert_eq!(view.output, None);
    assert_eq!(view.error, None);
    assert_eq!(view.idempotency_key.as_deref(), Some("key-1"));
    assert_eq!(view.worker_id, None);
    assert_eq!((view.created_ms, view.updated_ms, view.last_seq), (1_000, 1_000, 1));
    apply(registry, &[]).await;
}

async fn run_follows_its_latest_event(registry: &Registry) {
    let t = tenant("acme");
    let run = RunId::generate();
    let log = full_log(&t, run);
    apply(registry, &log[..2]).await;
    let view = get(registry, &t, run).await.unwrap_or_else(|| panic!("run should exist"));
    assert_eq!(view.state, RunState::Running);
    assert_eq!(view.attempt, 1);
    assert_eq!(view.worker_id, Some(worker()));
    assert_eq!((view.last_seq, view.updated_ms, view.created_ms), (2, 1_010, 1_000));
    apply(registry, &log[2..3]).await;
    let view = get(registry, &t, run).await.unwrap_or_else(|| panic!("run should exist"));
    assert_eq!((view.state, view.last_seq), (RunState::Running, 3));
}

async fn completed_and_failed_runs_keep_output_and_error(registry: &Registry) {
    let t = tenant("acme");
    let done = RunId::generate();
    apply(registry, &full_log(&t, done)).await;
    let view = get(registry, &t, done).await.unwrap_or_else(|| panic!("run should exist"));
    assert_eq!(view.state, RunState::Completed);
    assert_eq!(view.output, Some(json!({"answer": 42})));
    assert_eq!(view.last_seq, 4);

    let null_output = RunId::generate();
    let e1 = created(&t, null_output, "echo", "default");
    let e2 = next(&e1, EventBody::Completed(RunCompleted { output: json!(null) }));
    apply(registry, &[e1, e2]).await;
    let view = get(registry, &t, null_output).await.unwrap_or_else(|| panic!("run should exist"));
    assert_eq!(view.output, Some(serde_json::Value::Null), "a null output is still an output");

    let failed = RunId::generate();
    let e1 = created(&t, failed, "echo", "default");
    let error = RunError { code: ErrorCode::AgentFailed, message: "boom".into() };
    let e2 = next(&e1, EventBody::Failed(RunFailed { error: error.clone() }));
    apply(registry, &[e1, e2]).await;
    let view = get(registry, &t, failed).await.unwrap_or_else(|| panic!("run should exist"));
    assert_eq!(view.state, RunState::Failed);
    assert_eq!(view.error, Some(error));
    assert_eq!(view.output, None);
}

async fn list_filters(registry: &Registry) {
    let t = tenant("acme");
    let a = RunId::generate();
    let b = RunId::generate();
    let c = RunId::generate();
    let mut events = vec![created(&t, a, "echo", "default"), created(&t, b, "echo", "gpu")];
    events.extend(full_log(&t, c)); // c: agent echo, queue default, completed
    apply(registry, &events).await;
    let d = RunId::generate();
    apply(registry, &[created(&t, d, "summarize", "gpu")]).await;

    let (all, cursor) = list_ids(registry, &t, &filter(50)).await;
    assert_eq!(all, vec![d, c, b, a], "newest first");
    assert_eq!(cursor, None);

    let by_state = ListFilter { state: Some(RunState::Completed), ..filter(50) };
    assert_eq!(list_ids(registry, &t, &by_state).await.0, vec![c]);
    let queued = ListFilter { state: Some(RunState::Queued), ..filter(50) };
    assert_eq!(list_ids(registry, &t, &queued).await.0, vec![d, b, a]);
    let by_queue =
        ListFilter { queue: Some(QueueName::new("gpu").unwrap_or_else(|e| panic!("{e}"))), ..filter(50) };
    assert_eq!(list_ids(registry, &t, &by_queue).await.0, vec![d, b]);
    let by_agent = ListFilter {
        agent: Some(AgentName::new("summarize").unwrap_or_else(|e| panic!("{e}"))),
        ..filter(50)
    };
    assert_eq!(list_ids(registry, &t, &by_agent).await.0, vec![d]);
    let combined = ListFilter {
        queue: Some(QueueName::new("gpu").unwrap_or_else(|e| panic!("{e}"))),
        agent: Some(AgentName::new("echo").unwrap_or_else(|e| panic!("{e}"))),
        ..filter(50)
    };
    assert_eq!(list_ids(registry, &t, &combined).await.0, vec![b]);
    let nothing = ListFilter { state: Some(RunState::Cancelled), ..filter(50) };
    assert_eq!(list_ids(registry, &t, &nothing).await, (vec![], None));
}

async fn list_pagination(registry: &Registry) {
    let t = tenant("acme");
    let runs: Vec<RunId> = (0..7).map(|_| RunId::generate()).collect();
    let events: Vec<Event> = runs.iter().map(|&r| created(&t, r, "echo", "default")).collect();
    apply(registry, &events).await;
    let newest_first: Vec<RunId> = runs.iter().rev().copied().collect();

    let mut seen = Vec::new();
    let mut page_filter = filter(3);
    let mut pages = 0;
    loop {
        let (ids, cursor) = list_ids(registry, &t, &page_filter).await;
        pages += 1;
        seen.extend(ids);
        match cursor {
            Some(cursor) => {
                assert_eq!(cursor, seen.last().map(ToString::to_string).unwrap_or_default());
                page_filter.before = Some(cursor.parse().unwrap_or_else(|e| panic!("{e}")));
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, newest_first);

    // A page that is exactly full has no next cursor.
    let (ids, cursor) = list_ids(registry, &t, &filter(7)).await;
    assert_eq!((ids.len(), cursor), (7, None));
}

async fn events_paging(registry: &Registry) {
    let t = tenant("acme");
    let run = RunId::generate();
    let log = full_log(&t, run);
    apply(registry, &log).await;

    let page = registry.events(&t, run, 0, 10).await.unwrap_or_else(|e| panic!("{e}"));
    let page = page.unwrap_or_else(|| panic!("run should have events"));
    assert_eq!(page.events, log);
    assert!(!page.has_more);

    let first = registry.events(&t, run, 0, 2).await.unwrap_or_else(|e| panic!("{e}"));
    let first = first.unwrap_or_else(|| panic!("run should have events"));
    assert_eq!(first.events, log[..2].to_vec());
    assert!(first.has_more);
    let second = registry.events(&t, run, 2, 2).await.unwrap_or_else(|e| panic!("{e}"));
    let second = second.unwrap_or_else(|| panic!("run should have events"));
    assert_eq!(second.events, log[2..].to_vec());
    assert!(!second.has_more);

    let past_end = registry.events(&t, run, 4, 10).await.unwrap_or_else(|e| panic!("{e}"));
    let past_end = past_end.unwrap_or_else(|| panic!("a known run is never None"));
    assert!(past_end.events.is_empty() && !past_end.has_more);

    let unknown = registry.events(&t, RunId::generate(), 0, 10).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(unknown.is_none());
}

/// A run created in a batch gets its row at the batch's latest event in one
/// insert; that row equals the one built event by event, and a row that
/// already exists (an earlier batch held `run.created`) is still moved by a
/// batch that replays the whole log.
async fn a_whole_life_in_one_batch_matches_event_by_event(registry: &Registry) {
    let t = tenant("acme");
    let (at_once, one_by_one, existing) = (RunId::generate(), RunId::generate(), RunId::generate());
    apply(registry, &full_log(&t, at_once)).await;
    for event in full_log(&t, one_by_one) {
        apply(registry, &[event]).await;
    }
    let existing_log = full_log(&t, existing);
    apply(registry, &existing_log[..1]).await;
    apply(registry, &existing_log).await;

    let reference = get(registry, &t, one_by_one).await.unwrap_or_else(|| panic!("run should exist"));
    assert_eq!(reference.state, RunState::Completed);
    assert_eq!(reference.output, Some(json!({"answer": 42})));
    assert_eq!((reference.last_seq, reference.attempt), (4, 1));
    for run in [at_once, existing] {
        let view = get(registry, &t, run).await.unwrap_or_else(|| panic!("run {run} should exist"));
        assert_eq!(view, RunView { run_id: run, ..reference.clone() });
    }
}

async fn replay_is_idempotent(registry: &Registry) {
    let t = tenant("acme");
    let run = RunId::generate();
    let log = full_log(&t, run);
    apply(registry, &log).await;
    let once = get(registry, &t, run).await;
    let events_once = registry.events(&t, run, 0, 100).await.unwrap_or_else(|e| panic!("{e}"));
    apply(registry, &log).await;
    // Duplicates inside one batch, too.
    let doubled: Vec<Event> = log.iter().chain(log.iter()).cloned().collect();
    apply(registry, &doubled).await;
    assert_eq!(get(registry, &t, run).await, once);
    let events_twice = registry.events(&t, run, 0, 100).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(events_twice, events_once);
    assert_eq!(list_ids(registry, &t, &filter(50)).await.0, vec![run]);
}

async fn out_of_order_delivery_converges(registry: &Registry) {
    let t = tenant("acme");
    let in_order = RunId::generate();
    let shuffled = RunId::generate();
    apply(registry, &full_log(&t, in_order)).await;

    let log = full_log(&t, shuffled);
    // Later events before run.created, a stale duplicate after the terminal one.
    apply(registry, &[log[2].clone()]).await;
    assert_eq!(get(registry, &t, shuffled).await, None, "no row before run.created");
    apply(registry, &[log[3].clone(), log[0].clone()]).await;
    apply(registry, &[log[1].clone(), log[0].clone(), log[2].clone()]).await;

    let expected = get(registry, &t, in_order).await.map(|v| RunView { run_id: shuffled, ..v });
    assert_eq!(get(registry, &t, shuffled).await, expected);
    let events = registry.events(&t, shuffled, 0, 100).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(events.map(|p| p.events), Some(log));
}

/// Batches larger than one multi-row statement, holding many runs' events
/// in any order (some runs' later events a batch ahead of their
/// `run.created`), end with every row at its latest event.
async fn large_shuffled_batches_converge(registry: &Registry) {
    let t = tenant("bulk");
    let runs: Vec<RunId> = (0..700).map(|_| RunId::generate()).collect();
    let logs: Vec<Vec<Event>> = runs.iter().map(|run| full_log(&t, *run)).collect();
    // First batch: the terminal event of every other run, before its creation.
    let early: Vec<Event> = logs.iter().step_by(2).map(|log| log[3].clone()).collect();
    apply(registry, &early).await;
    // Second batch: everything else, runs interleaved, newest events first.
    // The early runs' rows must end at the terminal event stored before.
    let mut rest: Vec<Event> = logs.iter().skip(1).step_by(2).map(|log| log[3].clone()).collect();
    for seq in (0..3).rev() {
        rest.extend(logs.iter().map(|log| log[seq].clone()));
    }
    apply(registry, &rest).await;
    assert_eq!(registry.count(&t, RunState::Completed).await.unwrap_or_else(|e| panic!("{e}")), 700);
    assert_eq!(registry.count(&t, RunState::Queued).await.unwrap_or_else(|e| panic!("{e}")), 0);
    for (run, log) in runs.iter().zip(&logs).step_by(97) {
        let view = get(registry, &t, *run).await.unwrap_or_else(|| panic!("no row for {run}"));
        assert_eq!(
            (view.state, view.last_seq, view.output),
            (RunState::Completed, 4, Some(json!({"answer": 42})))
        );
        let events = registry.events(&t, *run, 0, 100).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(events.map(|p| p.events).as_ref(), Some(log));
    }
}

/// A batch whose seq 1 is not `run.created` is refused whole, naming the
/// run, and stores nothing.
async fn seq_one_must_be_run_created(registry: &Registry) {
    let t = tenant("strict");
    let good = RunId::generate();
    let bad = RunId::generate();
    let mut forged = full_log(&t, bad)[1].clone();
    forged.seq = 1;
    let mut batch = full_log(&t, good);
    batch.push(forged);
    let error = registry.apply(&batch).await.err().unwrap_or_else(|| panic!("a forged seq 1 was accepted"));
    assert!(!error.is_retryable(), "{error}");
    assert!(error.to_string().contains(&bad.to_string()), "{error}");
    assert_eq!(get(registry, &t, good).await, None, "the refused batch stored nothing");
    apply(registry, &full_log(&t, good)).await;
    assert_eq!(get(registry, &t, good).await.map(|v| v.state), Some(RunState::Completed));
}

async fn tenants_are_isolated(registry: &Registry) {
    let a = tenant("tenant-a");
    let b = tenant("tenant-b");
    let run = RunId::generate();
    apply(registry, &full_log(&a, run)).await;
    assert!(get(registry, &a, run).await.is_some());
    assert_eq!(get(registry, &b, run).await, None);
    assert_eq!(list_ids(registry, &b, &filter(50)).await, (vec![], None));
    assert!(registry.events(&b, run, 0, 10).await.unwrap_or_else(|e| panic!("{e}")).is_none());

    // An event claiming the same run for another tenant changes nothing.
    let mut forged = next(&full_log(&a, run)[3], EventBody::Started(RunStarted { delivery: 9 }));
    forged.tenant = b.clone();
    let before = get(registry, &a, run).await;
    apply(registry, &[forged]).await;
    assert_eq!(get(registry, &a, run).await, before);
    assert_eq!(get(registry, &b, run).await, None);

    // Nor does it hide the run's own latest event when they share a batch.
    let other = RunId::generate();
    let log = full_log(&a, other);
    let mut forged = next(&log[3], EventBody::Started(RunStarted { delivery: 9 }));
    forged.tenant = b.clone();
    apply(registry, &log[..3]).await;
    apply(registry, &[log[3].clone(), forged]).await;
    assert_eq!(get(registry, &a, other).await.map(|v| (v.state, v.last_seq)), Some((RunState::Completed, 4)));
}

/// Replicas start together: several registries connecting (and migrating)
/// at once to a fresh database all succeed and share the same rows.
async fn concurrent_connects_migrate_once(db: &TestDb) {
    harness::init_tracing();
    let connects = (0..4).map(|_| Registry::connect(&db.url));
    let registries: Vec<Registry> = futures::future::join_all(connects)
        .await
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("concurrent connect: {e}")))
        .collect();
    let t = tenant("acme");
    let run = RunId::generate();
    apply(&registries[0], &[created(&t, run, "echo", "default")]).await;
    for registry in &registries {
        assert!(get(registry, &t, run).await.is_some());
    }
    let again = connect(db).await;
    assert!(get(&again, &t, run).await.is_some());
}

#[tokio::test]
async fn concurrent_connects_migrate_once_sqlite() {
    concurrent_connects_migrate_once(&TestDb::sqlite()).await;
}

#[tokio::test]
async fn concurrent_connects_migrate_once_postgres() {
    concurrent_connects_migrate_once(&TestDb::postgres().await).await;
}

/// A batch that fails after some of its statements ran (here: a stored
/// event the registry cannot decode, found while the batch's new run looks
/// for events stored before its `run.created`) leaves nothing of itself
/// behind, and the registry writes the next batch normally: on SQLite the
/// native writer rolls its connection back before anyone else uses it.
async fn a_batch_failing_midway_leaves_nothing(db: &TestDb) {
    let registry = connect(db).await;
    let t = tenant("midway");
    let (damaged, bystander) = (RunId::generate(), RunId::generate());
    sqlx::any::install_default_drivers();
    let raw = sqlx::AnyPool::connect(&db.url).await.unwrap_or_else(|e| panic!("raw connect: {e}"));
    sqlx::query(
        "INSERT INTO run_events (run_id, seq, tenant, type, ts_ms, attempt, worker_id, body) \
         VALUES ($1, 3, $2, 'run.completed', 1, 1, NULL, 'not json')",
    )
    .bind(damaged.to_string())
    .bind(t.as_str())
    .execute(&raw)
    .await
    .unwrap_or_else(|e| panic!("hand-damaging the registry: {e}"));
    raw.close().await;

    let mut batch = full_log(&t, bystander);
    batch.push(created(&t, damaged, "echo", "default"));
    let error =
        registry.apply(&batch).await.err().unwrap_or_else(|| panic!("an undecodable stored event passed"));
    assert!(matches!(&error, Error::Corrupt { run_id, .. } if *run_id == damaged.to_string()), "{error}");
    assert_eq!(get(&registry, &t, bystander).await, None, "the failed batch's runs were rolled back");
    assert_eq!(get(&registry, &t, damaged).await, None);
    let events = registry.events(&t, bystander, 0, 10).await.unwrap_or_else(|e| panic!("events: {e}"));
    assert_eq!(events, None, "the failed batch's events were rolled back");

    apply(&registry, &full_log(&t, bystander)).await;
    assert_eq!(get(&registry, &t, bystander).await.map(|v| v.state), Some(RunState::Completed));
}

#[tokio::test]
async fn a_batch_failing_midway_leaves_nothing_sqlite() {
    a_batch_failing_midway_leaves_nothing(&TestDb::sqlite()).await;
}

#[tokio::test]
async fn a_batch_failing_midway_leaves_nothing_postgres() {
    a_batch_failing_midway_leaves_nothing(&TestDb::postgres().await).await;
}

/// `stale_runs` (the recovery loop's query): only non-terminal rows not
/// updated since the cut, across tenants, paged by run id.
async fn stale_runs_pages_non_terminal_rows_older_than_the_cut(registry: &Registry) {
    let acme = tenant("acme");
    let at = |mut event: Event, ts_ms: i64| {
        event.ts_ms = ts_ms;
        event
    };
    let mut runs: Vec<RunId> = (0..5).map(|_| RunId::generate()).collect();
    runs.sort();
    let mut events: Vec<Event> =
        runs.iter().map(|run| at(created(&acme, *run, "echo", "default"), 1_000)).collect();
    // runs[1] waits, runs[2] is cancelled, runs[3] moved after the cut.
    let waiting = EventBody::Waiting(RunWaiting { key: None, deadline_ms: Some(5), failures: 0 });
    events.push(at(next(&events[1], waiting), 1_100));
    events.push(at(next(&events[2], EventBody::Cancelled(RunCancelled { reason: None })), 1_100));
    events.push(at(next(&events[3], EventBody::Started(RunStarted { delivery: 1 })), 9_000));
    apply(registry, &events).await;

    let all = registry.stale_runs(5_000, None, 100).await.unwrap_or_else(|e| panic!("stale_runs: {e}"));
    let ids: Vec<RunId> = all.iter().map(|r| r.run_id).collect();
    assert_eq!(ids, vec![runs[0], runs[1], runs[4]]);
    assert_eq!(all[1].state, RunState::Waiting);
    assert_eq!(all[1].tenant, acme);

    let first = registry.stale_runs(5_000, None, 2).await.unwrap_or_else(|e| panic!("stale_runs: {e}"));
    assert_eq!(first.iter().map(|r| r.run_id).collect::<Vec<_>>(), vec![runs[0], runs[1]]);
    let rest =
        registry.stale_runs(5_000, Some(runs[1]), 2).await.unwrap_or_else(|e| panic!("stale_runs: {e}"));
    assert_eq!(rest.iter().map(|r| r.run_id).collect::<Vec<_>>(), vec![runs[4]]);
}

/// The projector's position (`apply_at`): it moves only from where the
/// writer started and only for the projection's owner (or anyone once the
/// owner's lease ran out), in the same transaction as the events, so a
/// refused batch stores nothing.
async fn projector_position_moves_by_compare_and_set(registry: &Registry) {
    const NAME: &str = "TEST_EVENTS";
    let lease = |owner: &str, now_ms: i64| Lease {
        projection: NAME.to_owned(),
        owner: owner.to_owned(),
        now_ms,
        until_ms: now_ms + 10_000,
    };
    let superseded = |result: Result<(), Error>| match result {
        Err(Error::Superseded { .. }) => {}
        other => panic!("expected a superseded batch, got {other:?}"),
    };
    let position = || async {
        let projection = registry.projection(NAME).await.unwrap_or_else(|e| panic!("{e}"));
        projection.map(|p| (p.position, p.owner))
    };
    let t = tenant("cas");
    let runs: Vec<RunId> = (0..5).map(|_| RunId::generate()).collect();
    let log = |i: usize| full_log(&t, runs[i]);

    // No row: nothing to move, nothing written.
    assert_eq!(registry.take_projection(&lease("a", 1_000)).await.ok(), Some(Takeover::Missing));
    superseded(registry.apply_at(&log(0), &lease("a", 1_000), 0, 4).await);
    assert_eq!(get(registry, &t, runs[0]).await, None);
    assert!(registry.create_projection(&lease("a", 1_000), 0).await.unwrap_or_else(|e| panic!("{e}")));
    assert!(!registry.create_projection(&lease("b", 1_000), 7).await.unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(position().await, Some((0, Some("a".to_owned()))));

    // The owner moves it with a batch.
    registry.apply_at(&log(0), &lease("a", 1_100), 0, 4).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(get(registry, &t, runs[0]).await.map(|v| v.state), Some(RunState::Completed));
    let stored = registry.projection(NAME).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stored.map(|p| (p.position, p.lease_until_ms)), Some((4, 11_100)));

    // A batch from a stale position is refused whole.
    superseded(registry.apply_at(&log(1), &lease("a", 1_200), 0, 8).await);
    assert_eq!(get(registry, &t, runs[1]).await, None, "the refused batch stored nothing");
    assert_eq!(position().await, Some((4, Some("a".to_owned()))));

    // Another projector can neither write nor take over while the lease runs.
    superseded(registry.apply_at(&log(1), &lease("b", 5_000), 4, 8).await);
    assert_eq!(get(registry, &t, runs[1]).await, None);
    assert_eq!(
        registry.take_projection(&lease("b", 5_000)).await.ok(),
        Some(Takeover::Held { owner: "a".to_owned(), until_ms: 11_100 })
    );
    assert!(!registry.renew_projection(&lease("b", 5_000)).await.unwrap_or_else(|e| panic!("{e}")));
    assert!(registry.renew_projection(&lease("a", 6_000)).await.unwrap_or_else(|e| panic!("{e}")));

    // Once it ran out (16 000), it can; the old owner, back from a pause,
    // is refused even from the right position, and cannot renew.
    assert_eq!(
        registry.take_projection(&lease("b", 15_000)).await.ok().map(|t| matches!(t, Takeover::Held { .. })),
        Some(true)
    );
    assert_eq!(
        registry.take_projection(&lease("b", 20_000)).await.ok(),
        Some(Takeover::Taken { position: 4 })
    );
    registry.apply_at(&log(1), &lease("b", 20_100), 4, 8).await.unwrap_or_else(|e| panic!("{e}"));
    superseded(registry.apply_at(&log(2), &lease("a", 20_200), 8, 12).await);
    assert_eq!(get(registry, &t, runs[2]).await, None);
    assert!(!registry.renew_projection(&lease("a", 20_200)).await.unwrap_or_else(|e| panic!("{e}")));

    // Released, it is anyone's at once.
    assert!(registry.release_projection(NAME, "b", 20_300).await.unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(position().await, Some((8, None)));
    assert_eq!(
        registry.take_projection(&lease("a", 20_400)).await.ok(),
        Some(Takeover::Taken { position: 8 })
    );

    // Two batches racing from the same position: exactly one commits.
    let (three, four, racing) = (log(3), log(4), lease("a", 20_500));
    let (x, y) =
        tokio::join!(registry.apply_at(&three, &racing, 8, 12), registry.apply_at(&four, &racing, 8, 13));
    let stored = (get(registry, &t, runs[3]).await.is_some(), get(registry, &t, runs[4]).await.is_some());
    match (x, y) {
        (Ok(()), y) => {
            superseded(y);
            assert_eq!((position().await, stored), (Some((12, Some("a".to_owned()))), (true, false)));
        }
        (x, Ok(())) => {
            superseded(x);
            assert_eq!((position().await, stored), (Some((13, Some("a".to_owned()))), (false, true)));
        }
        other => panic!("neither batch committed: {other:?}"),
    }

    // Moving the position alone (past messages that held no event).
    let at = position().await.map_or(0, |(p, _)| p);
    registry.apply_at(&[], &lease("a", 20_600), at, 20).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(position().await, Some((20, Some("a".to_owned()))));
}
