//! Dispatch through real processes: strict priority bands, and many runs over
//! several worker processes completing exactly once.

mod harness;

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use harness::stream::{by_run, check_run_log, eventually, tenant_events};
use harness::{Fleet, TestDb};
use runfleet_protocol::api::{ListRequest, SubmitRequest};
use runfleet_protocol::event::EventBody;
use runfleet_protocol::{RunId, TenantId};
use serde_json::json;

fn request(agent: &str, input: serde_json::Value, priority: u8) -> SubmitRequest {
    SubmitRequest {
        agent: agent.into(),
        input,
        queue: None,
        priority: Some(priority),
        idempotency_key: None,
        max_attempts: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn higher_bands_start_first() {
    harness::init_tracing();
    let fleet = Fleet::start(TestDb::sqlite(), 1, 1).await;
    let client = fleet.client("default").await;

    // Occupy the only slot, and wait until the run holds it. It sleeps far
    // longer than the test and is cancelled once everything is queued: a
    // fixed sleep could end under load before the last submit, and its
    // freed slot would then take a band-2 run.
    let blocker = client
        .submit(request("sleep", json!({"steps": 1, "ms": 600_000}), 2))
        .await
        .unwrap_or_else(|e| panic!("submit: {e}"));
    let mut watch = Box::pin(client.watch(blocker.run_id).await.unwrap_or_else(|e| panic!("{e}")));
    while let Some(event) = watch.next().await {
        if matches!(event.unwrap_or_else(|e| panic!("{e}")).body, EventBody::Started(_)) {
            break;
        }
    }

    let mut band_of: HashMap<RunId, u8> = HashMap::new();
    for i in 0..50 {
        let reply =
            client.submit(request("echo", json!({"low": i}), 2)).await.unwrap_or_else(|e| panic!("{e}"));
        band_of.insert(reply.run_id, 2);
    }
    for i in 0..5 {
        let reply =
            client.submit(request("echo", json!({"high": i}), 0)).await.unwrap_or_else(|e| panic!("{e}"));
        band_of.insert(reply.run_id, 0);
    }
    // Every run is queued: free the slot.
    client.cancel(blocker.run_id, None).await.unwrap_or_else(|e| panic!("cancel: {e}"));
    let cancelled = client.wait(blocker.run_id).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(cancelled.body, EventBody::Cancelled(_)), "blocker: {cancelled:?}");
    for run in band_of.keys() {
        let last = client.wait(*run).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(last.body, EventBody::Completed(_)));
    }

    // The start order, read from the stream (one writer, one slot: stream order is start order).
    let nats = fleet.nats.client().await;
    let events = tenant_events(&nats, &TenantId::default_tenant()).await;
    let start_order: Vec<u8> = events
        .iter()
        .filter(|(_, e)| matches!(e.body, EventBody::Started(_)))
        .filter_map(|(_, e)| band_of.get(&e.run_id).copied())
        .collect();
    assert_eq!(start_order.len(), 55);
    assert_eq!(
        &start_order[..5],
        &[0, 0, 0, 0, 0],
        "band-0 runs must start before any further band-2 run: {start_order:?}"
    );
    assert!(start_order[5..].iter().all(|b| *b == 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn many_runs_over_three_worker_processes_complete_exactly_once() {
    harness::init_tracing();
    let fleet = Fleet::start(TestDb::postgres().await, 3, 8).await;
    let client = fleet.client("default").await;

    let runs: Vec<RunId> = futures::stream::iter(0..500)
        .map(|i| {
            let client = client.clone();
            async move {
                let agent = if i % 5 == 0 { "sleep" } else { "echo" };
                let input = if agent == "sleep" { json!({"steps": 2, "ms": 5}) } else { json!({"i": i}) };
                client
                    .submit(request(agent, input, (i % 5) as u8))
                    .await
                    .unwrap_or_else(|e| panic!("submit {i}: {e}"))
                    .run_id
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for run in &runs {
        let last = tokio::time::timeout(Duration::from_secs(120), client.wait(*run))
            .await
            .unwrap_or_else(|_| panic!("run {run} did not finish"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(last.body, EventBody::Completed(_)), "{run}: {last:?}");
    }

    let nats = fleet.nats.client().await;
    let logs = by_run(&tenant_events(&nats, &TenantId::default_tenant()).await);
    assert_eq!(logs.len(), 500);
    let mut workers_used = std::collections::HashSet::new();
    for (run, events) in &logs {
        check_run_log(*run, events).unwrap_or_else(|e| panic!("{e}"));
        let completed = events.iter().filter(|e| matches!(e.body, EventBody::Completed(_))).count();
        assert_eq!(completed, 1, "run {run} has {completed} run.completed events");
        let started = events.iter().filter(|e| matches!(e.body, EventBody::Started(_))).count();
        assert_eq!(started, 1, "run {run} started {started} times");
        workers_used.extend(events.iter().filter_map(|e| e.worker_id.clone()));
    }
    assert_eq!(workers_used.len(), 3, "all three workers should have taken runs");

    // The registry catches up with all 500, paged with the cursor.
    eventually(Duration::from_secs(60), "registry to list 500 completed runs", || {
        let client = client.clone();
        async move {
            let mut seen = 0;
            let mut cursor = None;
            loop {
                let page = client
                    .list(ListRequest {
                        state: Some("completed".into()),
                        limit: Some(200),
                        cursor,
                        ..Default::default()
                    })
                    .await
                    .ok()?;
                seen += page.runs.len();
                cursor = page.next_cursor;
                if cursor.is_none() {
                    break;
                }
            }
            (seen == 500).then_some(())
        }
    })
    .await;
}
