//! What the bench sees of a fleet, stamped on arrival: every event of the
//! tenant (a core-NATS subscription to the events subjects, as an external
//! subscriber sees them) and every write and removal in the leases bucket
//! (a KV watch).

use std::time::Instant;

use anyhow::Context as _;
use futures::StreamExt;
use runfleet_protocol::event::Event;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::client::Client;

/// Something the bench saw, stamped when it arrived.
pub(super) enum Observation {
    Event(Instant, Box<Event>),
    /// A lease was created or renewed (the key is the run id).
    LeaseWritten(Instant, String),
    /// A lease was removed: expired (`MaxAge` marker) or released.
    LeaseRemoved(Instant, String),
}

/// Subscribes to the tenant's events and watches the leases bucket; each
/// observation is stamped on arrival by a task of its own (so a busy bench
/// loop cannot delay the stamp) and sent down the returned channel. The
/// tasks end when `stop` is cancelled or the channel is dropped.
pub(super) async fn observe(
    client: &Client,
    stop: CancellationToken,
) -> anyhow::Result<mpsc::UnboundedReceiver<Observation>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut events = client
        .nats()
        .subscribe(client.names().tenant_events(client.tenant()))
        .await
        .context("could not subscribe to the run events")?;
    let js = async_nats::jetstream::new(client.nats().clone());
    let leases =
        js.get_key_value(client.names().leases_bucket()).await.context("could not open the leases bucket")?;
    let mut lease_updates = leases.watch_all().await.context("could not watch the leases bucket")?;

    let (events_tx, events_stop) = (tx.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                () = events_stop.cancelled() => return,
                message = events.next() => message,
            };
            let Some(message) = message else { return };
            let at = Instant::now();
            let Ok(events) = runfleet_protocol::event::decode_log_message(&message.payload) else { continue };
            for event in events {
                if events_tx.send(Observation::Event(at, Box::new(event))).is_err() {
                    return;
                }
            }
        }
    });
    tokio::spawn(async move {
        loop {
            let entry = tokio::select! {
                () = stop.cancelled() => return,
                entry = lease_updates.next() => entry,
            };
            let Some(Ok(entry)) = entry else { return };
            let at = Instant::now();
            let observation = match entry.operation {
                async_nats::jetstream::kv::Operation::Put => Observation::LeaseWritten(at, entry.key),
                _ => Observation::LeaseRemoved(at, entry.key),
            };
            if tx.send(observation).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}
