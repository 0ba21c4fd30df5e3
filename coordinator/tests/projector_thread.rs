//! The coordinator's projector runs on a thread of its own
//! (`Projector::spawn_thread`): it projects from there on SQLite and on
//! PostgreSQL (whose connections belong to the runtime that opens them),
//! the thread ends with a graceful stop (which releases the projection),
//! and it ends when the coordinator's runtime is dropped, stopping where it
//! is (no release), as a task of that runtime would.
//!
//! One test in its own binary: it counts the process's threads by name.
//! The PostgreSQL half needs `RUNFLEET_TEST_POSTGRES_URL` (see
//! `scripts/postgres.sh`).

#[allow(dead_code)]
#[path = "../../tests/harness/db.rs"]
mod db;
#[allow(dead_code)]
#[path = "../../tests/harness/nats.rs"]
mod nats;

use std::time::Duration;

use async_nats::jetstream;
use db::TestDb;
use nats::NatsServer;
use runfleet_coordinator::registry::Registry;
use runfleet_coordinator::{Coordinator, CoordinatorConfig};
use runfleet_protocol::event::{Event, EventBody, RunCreated};
use runfleet_protocol::{codec, AgentName, Names, QueueName, RunId, TenantId};
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn ok<T, E: std::fmt::Display>(result: Result<T, E>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}

/// Threads of this process named `rf-projector`.
fn projector_threads() -> usize {
    let tasks = ok(std::fs::read_dir("/proc/self/task"));
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == "rf-projector")
        .count()
}

/// Polls `probe` every 50 ms until it holds, for at most 30 s.
async fn eventually(what: &str, mut probe: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !probe().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn owner(registry: &Registry) -> Option<String> {
    ok(registry.projection(&Names::default().events_stream()).await).and_then(|p| p.owner)
}

/// Publishes a new run's `run.created` as the coordinator's submit would
/// and waits until the registry holds the run.
async fn projects_a_run(js: &jetstream::Context, registry: &Registry) {
    let tenant = ok(TenantId::new("acme"));
    let run_id = RunId::generate();
    let event = Event {
        run_id,
        tenant: tenant.clone(),
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
    };
    let subject = Names::default().run_events(&tenant, run_id);
    ok(ok(js.publish(subject, ok(codec::encode(&event)).into()).await).await);
    eventually("the run to be projected", async || ok(registry.get(&tenant, run_id).await).is_some()).await;
}

async fn on(db: TestDb) {
    let server = NatsServer::start();
    let js = jetstream::new(server.client().await);
    let config =
        CoordinatorConfig { nats_url: server.url(), database_url: db.url.clone(), ..Default::default() };
    let registry = ok(Registry::connect(&db.url).await);
    assert_eq!(projector_threads(), 0);

    // A graceful stop ends the thread and releases the projection.
    let coordinator = ok(Coordinator::start(config.clone()).await);
    let first = coordinator.projector_owner().to_owned();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(coordinator.run(shutdown.clone()));
    eventually("the projector thread", async || projector_threads() == 1).await;
    projects_a_run(&js, &registry).await;
    assert_eq!(owner(&registry).await, Some(first));
    shutdown.cancel();
    ok(ok(ok(tokio::time::timeout(Duration::from_secs(20), running).await)));
    // The thread hands its result over just before it exits, so it may
    // still be listed for a moment after `run` returns; one that outlives
    // its coordinator never leaves.
    eventually("the projector thread to end with its coordinator", async || projector_threads() == 0).await;
    assert_eq!(owner(&registry).await, None, "a graceful stop releases the projection");

    // Dropping the coordinator's runtime ends the thread too, without a
    // release: the next owner waits for the lease, as after a crash.
    let runtime = ok(tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build());
    let coordinator = ok(Coordinator::start(config).await);
    let second = coordinator.projector_owner().to_owned();
    runtime.spawn(coordinator.run(CancellationToken::new()));
    eventually("the projector thread", async || projector_threads() == 1).await;
    projects_a_run(&js, &registry).await;
    runtime.shutdown_background();
    eventually("the abandoned projector thread to end", async || projector_threads() == 0).await;
    assert_eq!(owner(&registry).await, Some(second), "an abandoned projector releases nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projector_runs_on_a_thread_of_its_own_and_ends_with_its_coordinator() {
    if std::env::var_os("RUNFLEET_NATS_SERVER").is_none() {
        let local = concat!(env!("CARGO_MANIFEST_DIR"), "/../.tools/venv/bin/nats-server");
        std::env::set_var("RUNFLEET_NATS_SERVER", local);
    }
    on(TestDb::sqlite()).await;
    on(TestDb::postgres().await).await;
}
