//! What the bench sees of a fleet, stamped on arrival: every event of the
//! tenant (a core-NATS subscription to the events subjects, as an external
//! subscriber sees them), every write and removal in the leases bucket (a
//! KV watch) and every job ack (a core-NATS subscription to the jobs
//! stream's ack subjects, where the workers' acks go to the server).

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
    /// A worker acked a job (settled it for good: parked or ended the run;
    /// naks and in-progress acks are not reported). The ack names the job
    /// by its stream sequence only, not by run.
    JobAcked(Instant),
}

/// Whether an ack's payload settles the job: `+ACK`, or the empty payload
/// the server takes for one (not `-NAK`, `+WPI`, `+NXT` or `+TERM`).
fn is_positive_ack(payload: &[u8]) -> bool {
    payload.is_empty() || payload.starts_with(b"+ACK")
}

/// Subscribes to the tenant's events and the jobs' acks and watches the
/// leases bucket; each
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
    // `$JS.ACK.<stream>.<consumer>.…`: every band's consumer of the jobs
    // stream.
    let mut acks = client
        .nats()
        .subscribe(format!("$JS.ACK.{}.>", client.names().jobs_stream()))
        .await
        .context("could not subscribe to the jobs' acks")?;
    let js = async_nats::jetstream::new(client.nats().clone());
    let leases =
        js.get_key_value(client.names().leases_bucket()).await.context("could not open the leases bucket")?;
    let mut lease_updates = leases.watch_all().await.context("could not watch the leases bucket")?;

    let (acks_tx, acks_stop) = (tx.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                () = acks_stop.cancelled() => return,
                message = acks.next() => message,
            };
            let Some(message) = message else { return };
            let at = Instant::now();
            if is_positive_ack(&message.payload) && acks_tx.send(Observation::JobAcked(at)).is_err() {
                return;
            }
        }
    });
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

#[cfg(test)]
mod tests {
    use super::is_positive_ack;

    #[test]
    fn only_acks_that_settle_the_job_count() {
        for settles in [&b""[..], b"+ACK", b"+ACK ", b"+ACK {}"] {
            assert!(is_positive_ack(settles), "{}", String::from_utf8_lossy(settles));
        }
        for keeps in [&b"-NAK"[..], b"-NAK {\"delay\": 5}", b"+WPI", b"+NXT", b"+TERM"] {
            assert!(!is_positive_ack(keeps), "{}", String::from_utf8_lossy(keeps));
        }
    }
}
