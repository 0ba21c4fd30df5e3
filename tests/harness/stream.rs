//! Reading the truth straight from JetStream: every event of a tenant in
//! stream order, and per-run invariant checks on it.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use futures::StreamExt;
use runfleet_protocol::event::{Event, EventBody};
use runfleet_protocol::{codec, Names, RunId, TenantId};

/// Every event of `tenant` currently in the events stream, in stream order,
/// with its stream sequence.
pub async fn tenant_events(client: &async_nats::Client, tenant: &TenantId) -> Vec<(u64, Event)> {
    let names = Names::default();
    let js = jetstream::new(client.clone());
    let mut stream =
        js.get_stream(names.events_stream()).await.unwrap_or_else(|e| panic!("events stream: {e}"));
    let filter = names.tenant_events(tenant);
    let info = stream.info().await.unwrap_or_else(|e| panic!("stream info: {e}"));
    if info.state.messages == 0 {
        return Vec::new();
    }
    let last = info.state.last_sequence;
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: filter,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("ordered consumer: {e}"));
    let mut messages = consumer.messages().await.unwrap_or_else(|e| panic!("messages: {e}"));
    let mut out = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(2), messages.next()).await;
        let Ok(Some(Ok(message))) = next else { break };
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        if let Ok(events) = runfleet_protocol::event::decode_log_message(&message.payload) {
            out.extend(events.into_iter().map(|event| (seq, event)));
        }
        if seq >= last {
            break;
        }
    }
    out
}

/// Groups events by run, keeping stream order within each run.
pub fn by_run(events: &[(u64, Event)]) -> BTreeMap<RunId, Vec<Event>> {
    let mut runs: BTreeMap<RunId, Vec<Event>> = BTreeMap::new();
    for (_, event) in events {
        runs.entry(event.run_id).or_default().push(event.clone());
    }
    runs
}

/// Checks a run's log: seq 1..n in order without gap or duplicate, starting
/// with `run.created`, and exactly one terminal event, which is last.
pub fn check_run_log(run: RunId, events: &[Event]) -> Result<(), String> {
    for (i, event) in events.iter().enumerate() {
        let expected = i as u64 + 1;
        if event.seq != expected {
            return Err(format!("run {run}: event #{i} has seq {}, expected {expected}", event.seq));
        }
    }
    if !matches!(events.first().map(|e| &e.body), Some(EventBody::Created(_))) {
        return Err(format!("run {run}: first event is not run.created"));
    }
    let terminals = events.iter().filter(|e| e.body.is_terminal()).count();
    if terminals != 1 {
        return Err(format!("run {run}: {terminals} terminal events"));
    }
    if !events.last().is_some_and(|e| e.body.is_terminal()) {
        return Err(format!("run {run}: terminal event is not last"));
    }
    Ok(())
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
