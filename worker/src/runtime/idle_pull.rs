//! The idle worker's waiting pull request (`idle_pull`).
//!
//! A worker whose fetch round found nothing would otherwise wait for a
//! wake-up, then fetch: the job's path to the worker is the stream storing
//! it, the wake-up's delivery, the fetch request and the job's delivery. A
//! pull request that waits at the server is delivered the job as soon as the
//! consumer counts it, as a bare JetStream consumer is (the bench's floor
//! waits that way). So an idle worker keeps one such request on one
//! consumer, its first queue's default band, where most jobs land; every
//! other consumer is still found by wake-ups and fetched as before.
//!
//! **Slots.** A waiting request cannot be taken back: whatever it asked for
//! may still be delivered until it expires. So the request asks for one job
//! fewer than the free slots, and the pull loop counts what it may still
//! deliver ([`IdlePull::reserved`]) as taken: fetches of other consumers
//! get only the rest (at least one slot when the request starts), and the
//! worker never holds more jobs than slots. A worker with one free slot
//! makes no request and waits for wake-ups alone. Once the rest is taken
//! too, the worker leaves the wake-up group as a busy worker does: it could
//! not act on a wake-up of another band before its request ends.
//!
//! **Its consumer's marks.** While the request waits, the loop does not
//! fetch its consumer: the request covers it. A wake-up for it still marks
//! it, so when the request expires with a wake-up marked (the job may have
//! come just as the request expired at the server) the next round fetches
//! it once; a request that got all it asked for marks it too (there may be
//! more). A request the server refuses (say, the consumer's `max_waiting`
//! reached) is not followed by another before the next `idle_poll`.
//!
//! **Shutdown.** The request is read to its end and what it still delivers
//! is NAKed, so no job waits for its ack wait behind a worker that has
//! stopped. The NAK is delayed by the request's expiry: nats-server would
//! otherwise deliver the job straight back to the same waiting request, once
//! per job it asked for.

use std::time::Duration;

use async_nats::jetstream::consumer::pull::Batch;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use tracing::{debug, warn};

/// What the waiting request produced.
pub(super) enum Pulled {
    /// A job: it takes one of the reserved slots.
    Job(Box<jetstream::Message>),
    /// The request ended (expired, got all it asked for, or failed); the
    /// loop marks its consumer when [`IdlePull::ended`] says so.
    Ended,
}

/// One pull request waiting at the server for up to `asked` jobs.
pub(super) struct IdlePull {
    /// The consumer's position in the loop's bands: (band, index).
    pub consumer: (usize, usize),
    batch: Batch,
    /// How long the request waits at the server.
    expires: Duration,
    /// Jobs it may still deliver.
    remaining: usize,
    /// It got all it asked for, or failed: its consumer is marked.
    mark_after: bool,
    /// The server answered with an error (say, too many requests waiting):
    /// the loop makes no new request until its next `idle_poll`.
    failed: bool,
}

impl IdlePull {
    /// Sends a request for `free - 1` jobs that waits up to `expires`; none
    /// with fewer than two free slots or when the request cannot be sent.
    pub async fn start(
        consumer: &PullConsumer,
        position: (usize, usize),
        free: usize,
        expires: Duration,
    ) -> Option<Self> {
        let asked = free.checked_sub(1).filter(|asked| *asked > 0)?;
        match consumer.batch().max_messages(asked).expires(expires).messages().await {
            Ok(batch) => Some(Self {
                consumer: position,
                batch,
                expires,
                remaining: asked,
                mark_after: false,
                failed: false,
            }),
            Err(e) => {
                warn!(error = %e, "idle pull request could not be sent; waiting for wake-ups");
                None
            }
        }
    }

    /// Slots the request may still fill.
    pub fn reserved(&self) -> usize {
        self.remaining
    }

    /// Whether the consumer should be fetched once the request has ended.
    pub fn ended(&self) -> bool {
        self.mark_after
    }

    /// Whether the request ended on an error from the server.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// The request's next job, or its end.
    pub async fn next(&mut self) -> Pulled {
        match self.batch.next().await {
            Some(Ok(message)) => {
                self.remaining = self.remaining.saturating_sub(1);
                if self.remaining == 0 {
                    self.mark_after = true;
                }
                Pulled::Job(Box::new(message))
            }
            Some(Err(e)) => {
                warn!(error = %e, "idle pull request failed; the next waits for the idle poll");
                self.mark_after = true;
                self.failed = true;
                Pulled::Ended
            }
            None => Pulled::Ended,
        }
    }

    /// At shutdown: reads the request to its end (its expiry at the latest)
    /// and NAKs every job it still delivers, for another worker once the
    /// request can no longer take it back.
    pub async fn finish(mut self) {
        while let Pulled::Job(message) = self.next().await {
            debug!(subject = %message.subject, "job delivered to a stopping worker's idle pull; nak'd");
            if let Err(e) = message.ack_with(AckKind::Nak(Some(self.expires))).await {
                warn!(error = %e, "could not nak a job delivered while stopping; it is redelivered after its ack wait");
            }
        }
    }
}

/// The waiting request's next event, or never when there is none.
pub(super) async fn next(pull: &mut Option<IdlePull>) -> Pulled {
    match pull {
        Some(pull) => pull.next().await,
        None => std::future::pending().await,
    }
}
