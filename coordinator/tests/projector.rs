//! The projector against a real nats-server and real SQLite and PostgreSQL
//! registries: resuming from the stored position, one active projector
//! among replicas and takeover when it stops or dies, a database that
//! fails while events flow, and the upgrade from the durable consumer of
//! older releases.
//!
//! The PostgreSQL variants need `RUNFLEET_TEST_POSTGRES_URL` (see
//! `scripts/postgres.sh`).

#[allow(dead_code)]
#[path = "../../tests/harness/db.rs"]
mod db;
#[allow(dead_code)]
#[path = "../../tests/harness/nats.rs"]
mod nats;

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use db::TestDb;
use futures::StreamExt;
use nats::NatsServer;
use runfleet_coordinator::registry::{Projection, Registry};
use runfleet_coordinator::{projector, Coordinator, CoordinatorConfig};
use runfleet_protocol::event::{Event, EventBody, RunCreated};
use runfleet_protocol::{codec, AgentName, Names, QueueName, RunId, RunState, TenantId};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Generates `<name>::sqlite` and `<name>::postgres` for each test function
/// taking a fresh [`TestDb`].
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name(super::TestDb::sqlite()).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name(super::TestDb::postgres().await).await;
                }
            }
        )*
    };
}

on_both_backends!(
    restart_resumes_from_the_stored_position,
    one_replica_projects_and_another_takes_over,
    upgrade_seeds_the_position_from_the_legacy_consumer,
);

fn ok<T, E: std::fmt::Display>(result: Result<T, E>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}

fn start_nats() -> NatsServer {
    if std::env::var_os("RUNFLEET_NATS_SERVER").is_none() {
        let local = concat!(env!("CARGO_MANIFEST_DIR"), "/../.tools/venv/bin/nats-server");
        std::env::set_var("RUNFLEET_NATS_SERVER", local);
    }
    NatsServer::start()
}

fn config(server: &NatsServer, db: &TestDb) -> CoordinatorConfig {
    CoordinatorConfig { nats_url: server.url(), database_url: db.url.clone(), ..Default::default() }
}

fn tenant() -> TenantId {
    ok(TenantId::new("acme"))
}

fn created(run_id: RunId) -> Event {
    Event {
        run_id,
        tenant: tenant(),
        seq: 1,
        ts_ms: 1,
        attempt: 0,
        worker_id: None,
        trace_id: None,
        body: EventBody::Created(RunCreated {
            agent: ok(AgentName::new("echo")),
            queue: QueueName::default_queue(),
            priority: 2,
            input: json!({"n": 1}),
            max_attempts: 3,
            idempotency_key: None,
            traceparent: None,
        }),
    }
}

/// Publishes `run.created` of `n` new runs straight onto their subjects, as
/// the coordinator's submit would, and returns their ids in stream order.
async fn publish_runs(js: &jetstream::Context, n: usize) -> Vec<RunId> {
    let names = Names::default();
    let mut runs = Vec::with_capacity(n);
    for _ in 0..n {
        let event = created(RunId::generate());
        let payload = ok(codec::encode(&event));
        ok(ok(js.publish(names.run_events(&tenant(), event.run_id), payload.into()).await).await);
        runs.push(event.run_id);
    }
    runs
}

/// Polls `probe` every 50 ms until it returns `Some`, for at most `secs`.
async fn eventually<T, F, Fut>(what: &str, secs: u64, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn projection(registry: &Registry) -> Option<Projection> {
    ok(registry.projection(&Names::default().events_stream()).await)
}

async fn projected(registry: &Registry, run: RunId) -> bool {
    ok(registry.get(&tenant(), run).await).is_some()
}

/// Waits until the stored position is the stream's last sequence and
/// returns the position.
async fn caught_up(js: &jetstream::Context, registry: &Registry) -> u64 {
    let names = Names::default();
    let events = ok(js.get_stream(names.events_stream()).await);
    eventually("the projector to catch up", 60, || async {
        let lag = ok(projector::lag(&events, registry, &names).await);
        (lag == 0).then_some(())
    })
    .await;
    projection(registry).await.map_or(0, |p| p.position)
}

/// Waits until `owner` owns the projection.
async fn owned_by(registry: &Registry, owner: &str, secs: u64) {
    eventually(&format!("{owner} to own the projection"), secs, || async {
        (projection(registry).await.and_then(|p| p.owner).as_deref() == Some(owner)).then_some(())
    })
    .await;
}

/// A coordinator running on the test's runtime, stopped gracefully.
struct Running {
    owner: String,
    registry: Registry,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), runfleet_coordinator::Error>>,
}

impl Running {
    async fn start(config: CoordinatorConfig) -> Self {
        let coordinator = ok(Coordinator::start(config).await);
        let owner = coordinator.projector_owner().to_owned();
        let registry = coordinator.registry().clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(coordinator.run(shutdown.clone()));
        Self { owner, registry, shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(20), self.task).await;
        ok(ok(stopped.unwrap_or_else(|_| panic!("coordinator did not stop"))));
    }
}

/// A coordinator on a runtime of its own, so that the test can end it
/// without any shutdown code running (no release of the projection): as
/// if its process had been killed.
struct Killable {
    runtime: Option<tokio::runtime::Runtime>,
    owner: String,
}

impl Killable {
    async fn start(config: CoordinatorConfig) -> Self {
        let runtime = ok(tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build());
        let coordinator = ok(Coordinator::start(config).await);
        let owner = coordinator.projector_owner().to_owned();
        // Everything the coordinator owns moves into the task, so it all
        // goes when the runtime drops the task.
        runtime.spawn(coordinator.run(CancellationToken::new()));
        Self { runtime: Some(runtime), owner }
    }

    /// Drops every task of the coordinator where it stands.
    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A restarted coordinator resumes from the stored position: nothing
/// before it is projected again (a row deleted while it was down stays
/// deleted) and what was appended while it was down is projected.
async fn restart_resumes_from_the_stored_position(db: TestDb) {
    let server = start_nats();
    let client = server.client().await;
    let js = jetstream::new(client);

    let first = Running::start(config(&server, &db)).await;
    // The test's own connection: a coordinator closes its pool when it stops.
    let registry = ok(Registry::connect(&db.url).await);
    let before = publish_runs(&js, 20).await;
    let position = caught_up(&js, &registry).await;
    assert_eq!(position, 20);
    for run in &before {
        assert!(projected(&registry, *run).await, "{run} was not projected");
    }
    first.stop().await;
    let stored = projection(&registry).await.unwrap_or_else(|| panic!("no position stored"));
    assert_eq!((stored.position, stored.owner), (20, None), "graceful stop releases the projection");

    // While it is down: a row disappears from the registry (a projector
    // starting from the beginning would bring it back), and more runs come.
    let admin = registry;
    let gone = before[0];
    delete_run(&db, gone).await;
    assert!(!projected(&admin, gone).await);
    let after = publish_runs(&js, 5).await;

    let second = Running::start(config(&server, &db)).await;
    // The new projector may already have projected some of the 5 new runs,
    // but it never starts below the stored position.
    let resumed = projection(&admin).await.map(|p| p.position);
    assert!(resumed.is_some_and(|p| (20..=25).contains(&p)), "the position went back: {resumed:?}");
    assert_eq!(caught_up(&js, &admin).await, 25);
    for run in &after {
        assert!(projected(&admin, *run).await, "{run}, appended while down, was not projected");
    }
    assert!(!projected(&admin, gone).await, "events before the stored position were projected again");
    assert_eq!(projection(&admin).await.and_then(|p| p.owner), Some(second.owner.clone()));
    second.stop().await;
}

/// Removes a run's rows behind the registry's back.
async fn delete_run(db: &TestDb, run: RunId) {
    sqlx::any::install_default_drivers();
    let pool = ok(sqlx::AnyPool::connect(&db.url).await);
    for table in ["run_events", "runs"] {
        let sql = format!("DELETE FROM {table} WHERE run_id = $1");
        ok(sqlx::query(&sql).bind(run.to_string()).execute(&pool).await);
    }
    pool.close().await;
}

/// Replicas on one database: exactly one owns the projection and consumes;
/// when it dies without a word another takes over after the lease, and when
/// that one stops gracefully (releasing it) a third takes over; every run
/// reaches the registry throughout.
async fn one_replica_projects_and_another_takes_over(db: TestDb) {
    let server = start_nats();
    let client = server.client().await;
    let js = jetstream::new(client);
    let names = Names::default();

    let mut first = Killable::start(config(&server, &db)).await;
    let second = Running::start(config(&server, &db)).await;
    let registry = ok(Registry::connect(&db.url).await);
    owned_by(&registry, &first.owner, 20).await;

    let runs = publish_runs(&js, 30).await;
    assert_eq!(caught_up(&js, &registry).await, 30);
    for run in &runs {
        assert!(projected(&registry, *run).await, "{run} was not projected");
    }
    // The standby never took over and consumes nothing: the events stream
    // has exactly one consumer, the owner's.
    assert_eq!(projection(&registry).await.and_then(|p| p.owner), Some(first.owner.clone()));
    let stream = ok(js.get_stream(names.events_stream()).await);
    let consumers: Vec<String> = stream.consumer_names().map(ok).collect().await;
    assert_eq!(consumers.len(), 1, "only the owner consumes: {consumers:?}");

    // The owner dies: the standby takes over once its lease ran out.
    first.kill();
    let runs = publish_runs(&js, 10).await;
    let takeover = projector::LEASE + projector::HEARTBEAT * 3 + Duration::from_secs(10);
    owned_by(&registry, &second.owner, takeover.as_secs()).await;
    assert_eq!(caught_up(&js, &registry).await, 40);
    for run in &runs {
        assert!(projected(&registry, *run).await, "{run} was not projected after the takeover");
    }

    // The new owner stops gracefully: it releases the projection, and the
    // next replica takes it without waiting for the lease.
    let third = Running::start(config(&server, &db)).await;
    second.stop().await;
    let released = projection(&registry).await.and_then(|p| p.owner);
    assert!(released.is_none() || released.as_deref() == Some(third.owner.as_str()), "{released:?}");
    owned_by(&registry, &third.owner, 30).await;
    let runs = publish_runs(&js, 10).await;
    assert_eq!(caught_up(&js, &registry).await, 50);
    for run in &runs {
        assert!(projected(&registry, *run).await, "{run} was not projected by the third replica");
    }
    assert_eq!(ok(registry.count(&tenant(), RunState::Queued).await), 50);
    third.stop().await;
}

/// A registry migrated from a release that projected through the durable
/// consumer `projector`: the position starts at that consumer's ack floor
/// (what it had projected is not projected again) and the consumer is
/// deleted.
async fn upgrade_seeds_the_position_from_the_legacy_consumer(db: TestDb) {
    let server = start_nats();
    let client = server.client().await;
    let js = jetstream::new(client);
    let names = Names::default();
    // Started (topology and schema in place) but not running yet.
    let coordinator = ok(Coordinator::start(config(&server, &db)).await);
    let registry = coordinator.registry().clone();
    let runs = publish_runs(&js, 10).await;

    // The old projector's consumer, as older releases created it, having
    // acknowledged the first six events.
    let stream = ok(js.get_stream(names.events_stream()).await);
    let legacy: consumer::PullConsumer = ok(stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(names.projector_consumer()),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await);
    let mut batch = ok(legacy.fetch().max_messages(6).messages().await);
    while let Some(message) = batch.next().await {
        ok(ok(message).double_ack().await);
    }
    let floor = ok(stream.consumer_info(names.projector_consumer()).await).ack_floor.stream_sequence;
    assert_eq!(floor, 6);
    assert_eq!(projection(&registry).await, None, "no position before the first run");

    let shutdown = CancellationToken::new();
    let running = tokio::spawn(coordinator.run(shutdown.clone()));
    assert_eq!(caught_up(&js, &registry).await, 10);
    for (i, run) in runs.iter().enumerate() {
        // Only what the old consumer had not acknowledged is projected.
        assert_eq!(projected(&registry, *run).await, i >= 6, "run {i} ({run})");
    }
    let gone = stream.consumer_info(names.projector_consumer()).await;
    assert!(gone.is_err(), "the legacy consumer was not deleted: {gone:?}");
    shutdown.cancel();
    ok(ok(ok(tokio::time::timeout(Duration::from_secs(20), running).await)));
}

/// SQLite locked by another connection's write transaction for longer than
/// the busy timeout while events flow: the failed batches are kept and
/// retried, and every run reaches the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_sqlite_database_delays_projection_but_loses_nothing() {
    use sqlx::{Connection, Executor};
    let db = TestDb::sqlite();
    let server = start_nats();
    let js = jetstream::new(server.client().await);
    let running = Running::start(config(&server, &db)).await;
    let registry = running.registry.clone();
    publish_runs(&js, 5).await;
    assert_eq!(caught_up(&js, &registry).await, 5);

    let mut locker = ok(sqlx::SqliteConnection::connect(&db.url).await);
    ok(locker.execute("BEGIN IMMEDIATE").await);
    let runs = publish_runs(&js, 20).await;
    // Longer than the registry's 5 s busy timeout: writes fail, not wait.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(!projected(&registry, runs[0]).await, "the lock did not hold the projector back");
    ok(locker.execute("COMMIT").await);

    assert_eq!(caught_up(&js, &registry).await, 25);
    for run in &runs {
        assert!(projected(&registry, *run).await, "{run} was lost while the database was locked");
    }
    running.stop().await;
}

/// PostgreSQL refusing connections (and dropping the open ones) while
/// events flow: the failed batches are kept and retried, and every run
/// reaches the registry once it accepts connections again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_delays_projection_but_loses_nothing() {
    use sqlx::Connection;
    let db = TestDb::postgres().await;
    let name = db.url.rsplit('/').next().unwrap_or_else(|| panic!("no database in {}", db.url)).to_owned();
    let admin_url = std::env::var(db::POSTGRES_ENV).unwrap_or_else(|e| panic!("{e}"));
    let mut admin = ok(sqlx::PgConnection::connect(&admin_url).await);
    let server = start_nats();
    let js = jetstream::new(server.client().await);
    let running = Running::start(config(&server, &db)).await;
    let registry = running.registry.clone();
    publish_runs(&js, 5).await;
    assert_eq!(caught_up(&js, &registry).await, 5);

    ok(sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false")).execute(&mut admin).await);
    ok(sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&name)
        .execute(&mut admin)
        .await);
    let runs = publish_runs(&js, 20).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(registry.projection("any").await.is_err(), "the database was still reachable");
    ok(sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true")).execute(&mut admin).await);

    assert_eq!(caught_up(&js, &registry).await, 25);
    for run in &runs {
        assert!(projected(&registry, *run).await, "{run} was lost during the outage");
    }
    running.stop().await;
}

/// The projector as the `coordinator` user of the shipped
/// `deploy/nats/tenants.conf`: taking over (with a legacy consumer to find
/// and delete), consuming, and recreating its ordered consumer after the
/// server lost it, without a single permission violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_needs_nothing_beyond_the_shipped_permissions() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/nats/tenants.conf");
    let text = ok(std::fs::read_to_string(shipped));
    // The server's own command line sets the address and store; an admin
    // user without restrictions stands in for the operator.
    let coordinator_user =
        "      { user: coordinator, password: $RUNFLEET_COORDINATOR_PASSWORD, permissions: $COORDINATOR_PERMISSIONS }";
    assert!(text.contains(coordinator_user), "tenants.conf no longer declares the coordinator user");
    let text: Vec<String> = text
        .lines()
        .filter(|line| !["http:", "store_dir:"].iter().any(|key| line.trim_start().starts_with(key)))
        .map(|line| match line == coordinator_user {
            true => format!("{line}\n      {{ user: admin, password: admin-pw }}"),
            false => line.to_owned(),
        })
        .collect();
    let dir = ok(tempfile::tempdir());
    let conf = dir.path().join("tenants.conf");
    ok(std::fs::write(&conf, text.join("\n")));
    if std::env::var_os("RUNFLEET_NATS_SERVER").is_none() {
        let local = concat!(env!("CARGO_MANIFEST_DIR"), "/../.tools/venv/bin/nats-server");
        std::env::set_var("RUNFLEET_NATS_SERVER", local);
    }
    let secrets = [
        ("RUNFLEET_COORDINATOR_PASSWORD", "coord-pw"),
        ("RUNFLEET_WORKER_PASSWORD", "worker-pw"),
        ("RUNFLEET_ACME_PASSWORD", "acme-pw"),
        ("RUNFLEET_GLOBEX_PASSWORD", "globex-pw"),
    ];
    let server = NatsServer::start_with_config(&conf, &secrets);
    let admin = ok(async_nats::ConnectOptions::with_user_and_password("admin".into(), "admin-pw".into())
        .connect(server.url())
        .await);
    let js = jetstream::new(admin);
    let names = Names::default();
    let db = TestDb::sqlite();
    let config = CoordinatorConfig {
        nats: runfleet_ops::nats::NatsConfig {
            user: Some("coordinator".into()),
            password: Some("coord-pw".into()),
            ..Default::default()
        },
        ..config(&server, &db)
    };

    // An upgraded fleet: events, and the durable consumer of older releases.
    let coordinator = ok(Coordinator::start(config).await);
    let registry = coordinator.registry().clone();
    publish_runs(&js, 3).await;
    let stream = ok(js.get_stream(names.events_stream()).await);
    ok(stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(names.projector_consumer()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await);
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(coordinator.run(shutdown.clone()));
    assert_eq!(caught_up(&js, &registry).await, 3);
    let consumers = eventually("the legacy consumer to be deleted", 20, || async {
        let names: Vec<String> = stream.consumer_names().map(ok).collect().await;
        (names.len() == 1).then_some(names)
    })
    .await;
    assert_ne!(consumers[0], names.projector_consumer());

    // The server loses the ordered consumer: the projector recreates it and
    // goes on.
    ok(stream.delete_consumer(&consumers[0]).await);
    let runs = publish_runs(&js, 5).await;
    assert_eq!(caught_up(&js, &registry).await, 8);
    for run in &runs {
        assert!(projected(&registry, *run).await, "{run} was not projected after the consumer was lost");
    }
    let recreated: Vec<String> = stream.consumer_names().map(ok).collect().await;
    assert!(!recreated.contains(&consumers[0]), "{recreated:?}");
    shutdown.cancel();
    ok(ok(ok(tokio::time::timeout(Duration::from_secs(20), running).await)));

    let violations: Vec<String> =
        server.log().into_iter().filter(|line| line.contains("Violation")).collect();
    assert!(violations.is_empty(), "the coordinator hit permission violations:\n{}", violations.join("\n"));
}
