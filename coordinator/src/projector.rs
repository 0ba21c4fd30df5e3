//! The projector: copies the events stream into the SQL registry.
//!
//! A durable pull consumer ([`Names::projector_consumer`]) on the events stream
//! delivers every event; the projector writes each batch with one
//! [`Registry::apply`] transaction and then acknowledges it. Replicas share the
//! consumer, so each event is projected by one of them (explicit acks, so one
//! replica never acknowledges another's messages). A crash before the ack
//! only causes a redelivery, which `apply` ignores.
//!
//! A message that does not decode (or whose content does not match its
//! subject), or an event the registry refuses for good (see
//! [`registry::Error::is_retryable`](crate::registry::Error::is_retryable)),
//! is logged and skipped: it can never stall projection.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use runfleet_protocol::event::Event;
use runfleet_protocol::names::parse_run_events_subject;
use runfleet_protocol::{codec, Names};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::registry::Registry;

/// How long JetStream waits for an ack before redelivering a projected event.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Delay before a batch whose write failed is retried.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// The projector could not start or lost its consumer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not create the projector consumer {consumer}: {source}")]
    Consumer {
        consumer: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("could not read the projector consumer's state: {0}")]
    Info(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Projects run events into the registry until cancelled.
pub struct Projector {
    consumer: jetstream::consumer::PullConsumer,
    registry: Registry,
    names: Names,
    batch: usize,
}

impl std::fmt::Debug for Projector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projector").field("batch", &self.batch).finish_non_exhaustive()
    }
}

impl Projector {
    /// Creates (or finds) the durable projector consumer on `events`.
    /// `batch` is the most events written in one transaction.
    pub async fn new(
        events: &jetstream::stream::Stream,
        names: Names,
        registry: Registry,
        batch: usize,
    ) -> Result<Self, Error> {
        let name = names.projector_consumer();
        let config = pull::Config {
            durable_name: Some(name.clone()),
            description: Some("runfleet projector: events into the SQL registry".to_owned()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            max_ack_pending: i64::try_from(batch.saturating_mul(4)).unwrap_or(i64::MAX),
            ..Default::default()
        };
        let consumer = events
            .get_or_create_consumer(&name, config)
            .await
            .map_err(|e| Error::Consumer { consumer: name.clone(), source: Box::new(e) })?;
        Ok(Self { consumer, registry, names, batch: batch.max(1) })
    }

    /// Events in the stream not yet projected (pending delivery plus
    /// delivered but unacknowledged), across all replicas.
    pub async fn lag(&self) -> Result<u64, Error> {
        let info = self.consumer.get_info().await.map_err(|e| Error::Info(Box::new(e)))?;
        Ok(info.num_pending + u64::try_from(info.num_ack_pending).unwrap_or(u64::MAX))
    }

    /// Projects until `shutdown` is cancelled. A batch already fetched is
    /// written and acknowledged before returning. Registry failures are
    /// logged and retried (the batch is redelivered), never fatal.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        info!(consumer = %self.names.projector_consumer(), batch = self.batch, "projector started");
        while !shutdown.is_cancelled() {
            let messages = tokio::select! {
                () = shutdown.cancelled() => break,
                messages = self.consumer.stream().max_messages_per_batch(self.batch).messages() => messages,
            };
            let messages = match messages {
                Ok(messages) => messages,
                Err(error) => {
                    warn!(error = %error, "projector could not pull events, retrying");
                    sleep_or_cancel(&shutdown, RETRY_DELAY).await;
                    continue;
                }
            };
            self.drain(messages, &shutdown).await;
        }
        info!("projector stopped");
        Ok(())
    }

    /// Handles batches from one pull stream until it ends or `shutdown`.
    async fn drain(&self, messages: pull::Stream, shutdown: &CancellationToken) {
        let mut chunks = messages.ready_chunks(self.batch);
        loop {
            let chunk = tokio::select! {
                () = shutdown.cancelled() => return,
                chunk = chunks.next() => chunk,
            };
            let Some(chunk) = chunk else {
                debug!("projector pull stream ended, reopening");
                return;
            };
            let mut batch = Vec::with_capacity(chunk.len());
            for message in chunk {
                match message {
                    Ok(message) => batch.push(message),
                    Err(error) => warn!(error = %error, "projector pull failed"),
                }
            }
            self.project(batch, shutdown).await;
        }
    }

    /// Writes one batch and acknowledges it. On a retryable registry failure
    /// (the database is unreachable or busy) the batch is negatively
    /// acknowledged with a delay and redelivered. On a permanent one (an
    /// event the registry refuses, e.g. a seq 1 that is not `run.created`)
    /// retrying the batch would fail forever and hold back every event
    /// fetched with it, so the batch is written again event by event and
    /// only the refused events are skipped.
    async fn project(&self, messages: Vec<jetstream::Message>, shutdown: &CancellationToken) {
        if messages.is_empty() {
            return;
        }
        let events: Vec<Event> = messages.iter().filter_map(|m| self.decode(m)).collect();
        match self.registry.apply(&events).await {
            Ok(()) => {
                debug!(events = events.len(), messages = messages.len(), "projected batch");
                acknowledge(&messages, AckKind::Ack).await;
            }
            Err(error) if !error.is_retryable() => {
                warn!(error = %error, events = events.len(), "registry refused a batch, projecting it event by event");
                drop(events);
                self.project_one_by_one(messages, shutdown).await;
            }
            Err(error) => {
                warn!(error = %error, events = events.len(), "projector could not write batch, will retry");
                acknowledge(&messages, AckKind::Nak(Some(RETRY_DELAY))).await;
                sleep_or_cancel(shutdown, RETRY_DELAY).await;
            }
        }
    }

    /// Writes each message's event in its own transaction, acknowledging it
    /// once written or once refused for good (logged and skipped). A
    /// retryable failure negatively acknowledges the rest for redelivery.
    async fn project_one_by_one(&self, messages: Vec<jetstream::Message>, shutdown: &CancellationToken) {
        let mut messages = messages.into_iter();
        while let Some(message) = messages.next() {
            let result = match self.decode(&message) {
                Some(event) => {
                    self.registry.apply(std::slice::from_ref(&event)).await.map_err(|e| (event, e))
                }
                None => Ok(()),
            };
            match result {
                Ok(()) => {}
                Err((event, error)) if !error.is_retryable() => {
                    let stream_seq = message.info().map(|info| info.stream_sequence).unwrap_or_default();
                    warn!(
                        run_id = %event.run_id, seq = event.seq, stream_seq, error = %error,
                        "skipping event the registry refuses"
                    );
                }
                Err((_, error)) => {
                    warn!(error = %error, "projector could not write an event, will retry");
                    let rest: Vec<_> = std::iter::once(message).chain(messages).collect();
                    acknowledge(&rest, AckKind::Nak(Some(RETRY_DELAY))).await;
                    sleep_or_cancel(shutdown, RETRY_DELAY).await;
                    return;
                }
            }
            acknowledge(std::slice::from_ref(&message), AckKind::Ack).await;
        }
    }

    /// The event in `message`, or `None` (logged) if it is not a valid event
    /// of the run its subject names.
    fn decode(&self, message: &jetstream::Message) -> Option<Event> {
        let subject = message.subject.as_str();
        let stream_seq = message.info().map(|info| info.stream_sequence).unwrap_or_default();
        let Some((tenant, run)) = parse_run_events_subject(&self.names, subject) else {
            warn!(subject, stream_seq, "skipping message on a subject that is not a run's event log");
            return None;
        };
        match codec::decode::<Event>(&message.payload) {
            Ok(event) if event.tenant == tenant && event.run_id == run => Some(event),
            Ok(event) => {
                warn!(
                    subject, stream_seq, event_run_id = %event.run_id, event_tenant = %event.tenant,
                    "skipping event whose run or tenant does not match its subject"
                );
                None
            }
            Err(error) => {
                warn!(subject, stream_seq, error = %error, "skipping event that does not decode");
                None
            }
        }
    }
}

async fn acknowledge(messages: &[jetstream::Message], kind: AckKind) {
    for message in messages {
        if let Err(error) = message.ack_with(kind).await {
            // An unacknowledged event is redelivered after the ack wait and
            // projected again, which is harmless.
            debug!(error = %error, "could not acknowledge projected event");
        }
    }
}

async fn sleep_or_cancel(shutdown: &CancellationToken, delay: Duration) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(delay) => {}
    }
}
