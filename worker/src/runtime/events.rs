//! Appending to one run's event log.
//!
//! Every append carries `Nats-Expected-Last-Subject-Sequence` set to the
//! stream sequence of the run's previous event, so the server refuses the
//! append if anyone else wrote to the log since this worker read it: at most
//! one worker commits for a run. The same check refuses a second copy of an
//! append (a resend), so appends carry no `Nats-Msg-Id`: it would only cost
//! the server a de-duplication entry per message for its duplicate window.
//!
//! An event may also be *held* ([`EventLog::hold`]): numbered and encoded
//! but sent only with the log's next event, both in one message (a
//! multi-event log message, see [`runfleet_protocol::event`]). One message
//! is stored whole or not at all under the same fence, and the pair costs
//! one round trip instead of two. A step's `step.completed` is held this way
//! and goes out with the next step's `step.started` (or whatever the run
//! writes next); the step's checkpoint, already stored, is what a replay
//! relies on. A fresh run's `run.started` is held too and goes out with the
//! agent's first event: what the agent does before that is not recorded.
//! If nothing follows within [`LogWriter::hold_for`]
//! ([`HOLD_FOR`] in a worker; the agent waits on something else), the held
//! event is sent on its own, so the log never lags a step by more than
//! that.

use std::future::{Future, IntoFuture as _};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use futures::{FutureExt as _, StreamExt};
use runfleet_ops::metrics;
use runfleet_ops::redact::Redactor;
use runfleet_ops::telemetry;
use runfleet_protocol::event::{self as log_message, Event, EventBody, RunCreated};
use runfleet_protocol::job::Job;
use runfleet_protocol::names::{HEADER_CONTENT_TYPE, HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE};
use runfleet_protocol::{codec, time, Names, RunId, TenantId, WorkerId};
use sync_wrapper::SyncFuture;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Why an event could not be appended.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Someone else appended to the run's log (the server refused our expected
    /// last sequence, or our sequence number was already taken): this worker
    /// no longer owns the run and must write nothing more.
    #[error("run {run_id} was written by someone else at seq {seq}: the lease is lost")]
    LeaseLost { run_id: RunId, seq: u64 },
    /// An earlier append failed, so the log's position is unknown; nothing more
    /// may be appended through this log.
    #[error("run {run_id}'s event log is closed after an earlier failure")]
    Closed { run_id: RunId },
    /// The event could not be encoded (a bug or an unserializable output).
    #[error("event for run {run_id} could not be encoded: {source}")]
    Encode { run_id: RunId, source: codec::Error },
    /// The publish failed or was not acknowledged in time. The event may or
    /// may not have been written; the log is closed.
    #[error("event for run {run_id} could not be published: {source}")]
    Publish { run_id: RunId, source: jetstream::context::PublishError },
    /// The run's last event could not be read.
    #[error("last event of run {run_id} could not be read: {source}")]
    Read { run_id: RunId, source: stream::DirectGetError },
    /// The run's log could not be scanned.
    #[error("event log of run {run_id} could not be scanned: {message}")]
    Scan { run_id: RunId, message: String },
    /// The run's last event is not a decodable runfleet event.
    #[error("last event of run {run_id} (stream seq {stream_seq}) is not decodable: {source}")]
    Decode { run_id: RunId, stream_seq: u64, source: codec::Error },
}

impl Error {
    /// Whether this error means the run belongs to someone else now.
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Self::LeaseLost { .. })
    }
}

/// The last event of a run as read from the stream.
#[derive(Debug, Clone)]
pub struct LastEvent {
    pub event: Event,
    /// Its stream sequence: what `Nats-Expected-Last-Subject-Sequence` compares.
    pub stream_seq: u64,
}

impl LastEvent {
    /// The `run.created` a job with [`Job::created_seq`] says its run's log
    /// ends with, without reading it: everything a claim looks at (seq,
    /// attempt 0, trace id, the event's type) follows from the job. The
    /// event's input is not known here (the stored one may be redacted) and
    /// is left `null`; a claim never reads it.
    pub fn created(job: &Job, stream_seq: u64) -> Self {
        let event = Event {
            run_id: job.run_id,
            tenant: job.tenant.clone(),
            seq: 1,
            ts_ms: job.created_us / 1000,
            attempt: 0,
            worker_id: None,
            trace_id: job.traceparent.as_deref().and_then(telemetry::trace_id_of),
            body: EventBody::Created(RunCreated {
                agent: job.agent.clone(),
                queue: job.queue.clone(),
                priority: job.priority,
                input: serde_json::Value::Null,
                max_attempts: job.max_attempts,
                idempotency_key: None,
                traceparent: job.traceparent.clone(),
            }),
        };
        Self { event, stream_seq }
    }
}

/// Reads a run's last event directly from the events stream; `Ok(None)` if
/// the run has no event.
pub async fn read_last(
    events: &stream::Stream,
    names: &Names,
    tenant: &TenantId,
    run_id: RunId,
) -> Result<Option<LastEvent>, Error> {
    let subject = names.run_events(tenant, run_id);
    match events.direct_get_last_for_subject(subject).await {
        Ok(message) => {
            let event = log_message::decode_last_of_log_message(&message.payload)
                .map_err(|source| Error::Decode { run_id, stream_seq: message.sequence, source })?;
            Ok(Some(LastEvent { event, stream_seq: message.sequence }))
        }
        Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Read { run_id, source }),
    }
}

/// The longest [`failures_before`] reads a run's log.
const SCAN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How many attempts of the run had failed before the attempt that wrote
/// `last` started: the `failures` its `run.started` (0) or `run.resumed`
/// recorded. Scans the run's log (short-lived ordered consumer), so it is
/// used only when an attempt ended without saying so (a crash or a lost
/// lease). If the start is not found every earlier attempt counts as failed.
pub async fn failures_before(events: &stream::Stream, names: &Names, last: &LastEvent) -> Result<u32, Error> {
    let run_id = last.event.run_id;
    let attempt = last.event.attempt;
    let scan_error = |e: String| Error::Scan { run_id, message: e };
    let consumer = events
        .create_consumer(pull::OrderedConfig {
            filter_subject: names.run_events(&last.event.tenant, run_id),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| scan_error(e.to_string()))?;
    let mut messages = consumer.messages().await.map_err(|e| scan_error(e.to_string()))?;
    let mut failures = attempt.saturating_sub(1);
    // Bounded: the log may lose its tail to the stream's max age while we
    // read, and a claim must not hang on a message that never comes.
    let deadline = tokio::time::Instant::now() + SCAN_TIMEOUT;
    while let Some(message) = tokio::time::timeout_at(deadline, messages.next())
        .await
        .map_err(|_| scan_error(format!("no end of the log within {SCAN_TIMEOUT:?}")))?
    {
        let message = message.map_err(|e| scan_error(e.to_string()))?;
        let stream_seq = message.info().map_err(|e| scan_error(e.to_string()))?.stream_sequence;
        for event in log_message::decode_log_message(&message.payload).unwrap_or_default() {
            if event.attempt == attempt {
                match &event.body {
                    EventBody::Started(_) => failures = 0,
                    EventBody::Resumed(resumed) => failures = resumed.failures,
                    _ => {}
                }
            }
        }
        if stream_seq >= last.stream_seq {
            break;
        }
    }
    Ok(failures)
}

/// The append side of one run's log, owned by the attempt that holds the
/// run's lease.
///
/// Not cancellation safe in the sense that a dropped [`EventLog::append`] may
/// or may not have written its event, so a dropped append closes the log: the
/// log stays usable only after an append returned `Ok`.
#[derive(Debug)]
pub struct EventLog {
    /// The worker's connection, names, identity and redactor, shared by
    /// every run's log.
    writer: Arc<LogWriter>,
    /// The run's queue and agent, the labels of the run metrics.
    labels: [String; 2],
    created_us: i64,
    /// The run's trace id, carried by every event.
    trace_id: Option<String>,
    subject: String,
    run_id: RunId,
    tenant: TenantId,
    attempt: u32,
    /// The seq the next event gets.
    next_seq: u64,
    /// The stream sequence of the run's last event.
    last_stream_seq: u64,
    /// That of the event the log continues after.
    first_stream_seq: u64,
    closed: bool,
    /// The event held back to go out with the next one, if any.
    held: Option<Held>,
    /// The event sent but not yet acknowledged, if any.
    in_flight: Option<InFlight>,
    /// Set once an append found that someone else wrote to the log; every
    /// later append reports [`Error::LeaseLost`] again, so a caller that
    /// swallowed the first error still cannot mistake the run for its own.
    lost: bool,
}

/// An event numbered and encoded for the log.
struct Encoded {
    event: Event,
    /// Whether the redactor changed its payload.
    redacted: bool,
    payload: bytes::Bytes,
}

/// The longest a worker holds an event back for the log's next append
/// before it is sent on its own ([`LogWriter::hold_for`]). Between two steps
/// an agent usually computes for microseconds; this bounds how late a
/// `step.completed` (or `run.started`) shows when it waits on something
/// else.
pub const HOLD_FOR: std::time::Duration = std::time::Duration::from_millis(20);

/// The largest message a held event and the next one are sent in together;
/// larger pairs (an output near the size limit) go one by one.
const COMBINED_LIMIT: usize = 64 * 1024;

/// An event held back for the log's next append, and its own send, which
/// starts if that append does not come within [`LogWriter::hold_for`].
struct Held {
    encoded: Encoded,
    /// The event on its own, as the timer sends it.
    alone: Outgoing,
    /// Set by whoever sends the event first: the timer, or the next append
    /// (which sends it in its message).
    taken: Arc<AtomicBool>,
    timer: tokio::task::JoinHandle<Answer>,
}

impl Held {
    /// Holds `encoded`, to be sent as `alone` after the writer's
    /// `hold_for` unless taken first. A run being stopped (`stop`: its lease
    /// lost, the worker handing it off) is not written by the timer; whoever
    /// stops it decides.
    fn start(writer: &Arc<LogWriter>, encoded: Encoded, alone: Outgoing, stop: CancellationToken) -> Self {
        let taken = Arc::new(AtomicBool::new(false));
        let timer = tokio::spawn({
            let (writer, taken, alone) = (writer.clone(), taken.clone(), alone.clone());
            async move {
                let not_sent = || Answer::Ack(Err(PublishError::new(PublishErrorKind::Other)));
                tokio::select! {
                    () = tokio::time::sleep(writer.hold_for) => {}
                    // Left to whoever stopped the run: a runtime that still
                    // holds the lease takes it into its next append.
                    () = stop.cancelled() => return not_sent(),
                }
                if stop.is_cancelled() || taken.swap(true, Ordering::AcqRel) {
                    // Stopped, or taken by an append (which aborts this task).
                    return not_sent();
                }
                match alone.publish(&writer.js).await {
                    Ok(ack) => Answer::Ack(ack.await),
                    Err(e) => Answer::Ack(Err(e)),
                }
            }
        });
        Self { encoded, alone, taken, timer }
    }

    /// The held event for the caller to send, or, if the timer already
    /// sends it, the wait for that send's acknowledgement.
    fn take(self) -> Taken {
        if !self.taken.swap(true, Ordering::AcqRel) {
            self.timer.abort();
            return Taken::Event(self.encoded);
        }
        let ack = self.timer.map(|joined| {
            joined.unwrap_or_else(|e| Answer::Ack(Err(PublishError::with_source(PublishErrorKind::Other, e))))
        });
        Taken::Sending(Box::new(InFlight {
            ahead: None,
            last: self.encoded,
            sent: self.alone,
            resent: 0,
            ack: SyncFuture::new(Box::pin(ack)),
        }))
    }

    /// Drops the held event unless its timer already sends it.
    fn discard(self) {
        if !self.taken.swap(true, Ordering::AcqRel) {
            self.timer.abort();
        }
    }
}

/// What taking a held event gives. Moved once, straight from
/// [`Held::take`] to its match: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum Taken {
    /// The event, for the caller to send.
    Event(Encoded),
    /// Its timer already sends it alone: the wait for that send.
    Sending(Box<InFlight>),
}

/// An event [`EventLog::begin`] sent (with the held event ahead of it, if
/// there was one), and the wait for its acknowledgement.
struct InFlight {
    /// The held event sent ahead of `last` in the same message.
    ahead: Option<Encoded>,
    last: Encoded,
    /// What was sent, to send it again if no answer came back.
    sent: Outgoing,
    /// Times it was sent again.
    resent: u32,
    /// `SyncFuture`: only ever polled through `&mut`, so the log (and the
    /// `RunContext` that owns it) stays `Sync` for agents that hold `&ctx`
    /// across an await.
    ack: SyncFuture<AckWait>,
}

/// One append as it goes on the wire: one message with one event, or with
/// a held event and the next one.
#[derive(Clone)]
struct Outgoing {
    subject: String,
    payload: bytes::Bytes,
    /// The stream sequence of the run's last stored message.
    expected_last: u64,
}

impl Outgoing {
    /// Sends the append; the returned future is its acknowledgement.
    async fn publish(
        &self,
        js: &jetstream::Context,
    ) -> Result<jetstream::context::PublishAckFuture, PublishError> {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_CONTENT_TYPE, codec::CONTENT_TYPE);
        headers.insert(HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE, self.expected_last.to_string().as_str());
        js.publish_with_headers(self.subject.clone(), headers, self.payload.clone()).await
    }
}

/// How often an event that got no acknowledgement is sent again before the
/// append fails (each send waits up to the JetStream context's timeout).
const RESENDS: u32 = 3;
/// The pause before the first resend, growing with each.
const RESEND_DELAY: std::time::Duration = std::time::Duration::from_millis(250);

/// Failures after which the event may or may not be stored, so sending it
/// again is the way to find out: no answer in time, a broken connection,
/// or no JetStream answering yet (a server starting).
fn resendable(kind: PublishErrorKind) -> bool {
    matches!(kind, PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe | PublishErrorKind::Other)
}

/// The wait for one publish acknowledgement.
type AckWait = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// How the wait for an event's acknowledgement ended.
enum Answer {
    /// The server's answer to the last send.
    Ack(Result<PublishAck, PublishError>),
    /// A resend was refused (its first send may have been stored), so the
    /// run's last event was read: its stream sequence if it is this
    /// attempt's event, [`Error::LeaseLost`] if someone else's.
    Checked(Result<u64, Error>),
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("ahead", &self.ahead.as_ref().map(|e| e.event.seq))
            .field("seq", &self.last.event.seq)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").field("seq", &self.encoded.event.seq).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Encoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoded").field("seq", &self.event.seq).finish_non_exhaustive()
    }
}

/// What every event of a worker's runs is written with.
#[derive(Debug, Clone)]
pub struct LogWriter {
    pub js: jetstream::Context,
    pub names: Names,
    pub worker_id: WorkerId,
    /// Cleans event payloads before they are published.
    pub redactor: Redactor,
    /// How long a held event waits for the next append before it is sent
    /// on its own ([`HOLD_FOR`]); zero holds nothing (every event is
    /// appended at once).
    pub hold_for: std::time::Duration,
}

/// An append sent again after its acknowledgement did not come.
struct Resend {
    writer: Arc<LogWriter>,
    sent: Outgoing,
    run_id: RunId,
    /// The seq of its (last) event.
    seq: u64,
    attempt: u32,
}

impl Resend {
    /// Sends the append again after `delay`. If the server refuses it for
    /// its expected last sequence, the first send may have been stored: the
    /// run's last event says whether it is this attempt's own.
    async fn send(self, delay: std::time::Duration) -> Answer {
        tokio::time::sleep(delay).await;
        let acked = match self.sent.publish(&self.writer.js).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match acked {
            Ok(ack) => Answer::Ack(Ok(ack)),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                Answer::Checked(self.stored_last().await)
            }
            Err(e) => Answer::Ack(Err(e)),
        }
    }

    /// The stream sequence of the run's last event if it is this event as
    /// this attempt wrote it (the same seq, attempt and worker).
    async fn stored_last(&self) -> Result<u64, Error> {
        let run_id = self.run_id;
        let stream = self
            .writer
            .js
            .get_stream_no_info(self.writer.names.events_stream())
            .await
            .map_err(|e| Error::Scan { run_id, message: e.to_string() })?;
        let last = stream
            .direct_get_last_for_subject(self.sent.subject.as_str())
            .await
            .map_err(|source| Error::Read { run_id, source })?;
        let ours = log_message::decode_last_of_log_message(&last.payload).is_ok_and(|stored| {
            stored.run_id == run_id
                && stored.seq == self.seq
                && stored.attempt == self.attempt
                && stored.worker_id.as_ref() == Some(&self.writer.worker_id)
        });
        if ours {
            Ok(last.sequence)
        } else {
            Err(Error::LeaseLost { run_id, seq: self.seq })
        }
    }
}

impl EventLog {
    /// `job`'s log, continuing after `last`, written by `attempt`. Events
    /// carry the run's trace id: the one its log already has, else the
    /// current span's.
    pub fn new(writer: &Arc<LogWriter>, job: &Job, attempt: u32, last: &LastEvent) -> Self {
        let run_id = last.event.run_id;
        let tenant = last.event.tenant.clone();
        let trace_id = last.event.trace_id.clone().or_else(|| telemetry::trace_id(&tracing::Span::current()));
        Self {
            subject: writer.names.run_events(&tenant, run_id),
            writer: writer.clone(),
            labels: [job.queue.as_str().to_owned(), job.agent.as_str().to_owned()],
            created_us: job.created_us,
            trace_id,
            run_id,
            tenant,
            attempt,
            next_seq: last.event.seq + 1,
            last_stream_seq: last.stream_seq,
            first_stream_seq: last.stream_seq,
            closed: false,
            held: None,
            in_flight: None,
            lost: false,
        }
    }

    pub fn run_id(&self) -> RunId {
        self.run_id
    }

    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    pub fn worker_id(&self) -> &WorkerId {
        &self.writer.worker_id
    }

    /// The seq of the last event appended (or read).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Whether nothing was stored through this log (so far as any
    /// acknowledgement said).
    pub fn wrote_nothing(&self) -> bool {
        self.last_stream_seq == self.first_stream_seq
    }

    /// Whether an earlier failure closed the log.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Whether an append found that someone else wrote to the log: the run
    /// belongs to someone else now.
    pub fn is_lost(&self) -> bool {
        self.lost
    }

    /// Closes the log so nothing more is appended (used when the lease is
    /// lost); a held event is dropped unless already on its way.
    pub fn close(&mut self) {
        self.closed = true;
        if let Some(held) = self.held.take() {
            held.discard();
        }
    }

    /// Appends one event and waits for JetStream to acknowledge it (and for
    /// an event [`EventLog::begin`] sent before it, and the held event, which
    /// goes out with it). Returns the event's seq. Any error closes the log,
    /// and so does dropping the returned future while the event is being
    /// sent (it may have been written); dropped while only waiting for the
    /// acknowledgement, the wait resumes at the next call.
    pub async fn append(&mut self, body: EventBody) -> Result<u64, Error> {
        self.begin(body).await?;
        self.confirm().await
    }

    /// Numbers and encodes one event but sends it only with the log's next
    /// event, in one message: one round trip for both (see the module
    /// docs); sent on its own if no append follows within
    /// [`LogWriter::hold_for`]. An event held when the attempt ends without
    /// writing anything more (a crash, a lost lease) may never be written,
    /// so hold only events a replay does without. With a zero `hold_for`
    /// this is [`EventLog::append`].
    ///
    /// `stop` is the run's stop token: once it is cancelled (the lease lost,
    /// the run handed off) the timer no longer sends the event.
    pub async fn hold(&mut self, body: EventBody, stop: &CancellationToken) -> Result<(), Error> {
        if self.writer.hold_for.is_zero() {
            return self.append(body).await.map(drop);
        }
        self.flush().await?;
        self.check_open()?;
        let encoded = self.encode(body, self.next_seq).inspect_err(|_| self.closed = true)?;
        let alone = self.outgoing(None, &encoded)?;
        self.held = Some(Held::start(&self.writer, encoded, alone, stop.clone()));
        Ok(())
    }

    /// Writes the held event, if there is one, on its own and waits for it.
    pub async fn flush(&mut self) -> Result<(), Error> {
        self.confirm().await?;
        match self.held.take().map(Held::take) {
            None => Ok(()),
            Some(Taken::Event(encoded)) => {
                self.check_open()?;
                self.send(None, encoded).await?;
                self.confirm().await.map(drop)
            }
            Some(Taken::Sending(sending)) => {
                self.in_flight = Some(*sending);
                self.confirm().await.map(drop)
            }
        }
    }

    /// Sends one event (after the held one, if any) without waiting for its
    /// acknowledgement, so the caller can work while it travels;
    /// [`EventLog::confirm`] (or the next `begin` / `append`) waits for it.
    /// The wait is kept in the log, so a caller that stops waiting (a dropped
    /// step future) loses nothing: the next append settles it first.
    pub async fn begin(&mut self, body: EventBody) -> Result<(), Error> {
        self.confirm().await?;
        let ahead = match self.held.take().map(Held::take) {
            None => None,
            Some(Taken::Event(encoded)) => Some(encoded),
            // Already on its way alone: this event follows it.
            Some(Taken::Sending(sending)) => {
                self.in_flight = Some(*sending);
                self.confirm().await?;
                None
            }
        };
        self.check_open()?;
        let seq = ahead.as_ref().map_or(self.next_seq, |held| held.event.seq + 1);
        let last = self.encode(body, seq).inspect_err(|_| self.closed = true)?;
        match ahead {
            // Too large together (an output near the size limit): the held
            // event first, on its own.
            Some(held) if held.payload.len() + last.payload.len() > COMBINED_LIMIT => {
                self.send(None, held).await?;
                self.confirm().await?;
                self.send(None, last).await
            }
            ahead => self.send(ahead, last).await,
        }
    }

    /// Refuses to write to a lost or closed log.
    fn check_open(&self) -> Result<(), Error> {
        if self.lost {
            return Err(Error::LeaseLost { run_id: self.run_id, seq: self.next_seq });
        }
        if self.closed {
            return Err(Error::Closed { run_id: self.run_id });
        }
        Ok(())
    }

    /// The event `body` as the log's `seq`, redacted and encoded.
    fn encode(&self, body: EventBody, seq: u64) -> Result<Encoded, Error> {
        let run_id = self.run_id;
        let mut event = Event {
            run_id,
            tenant: self.tenant.clone(),
            seq,
            ts_ms: time::now_ms(),
            attempt: self.attempt,
            worker_id: Some(self.writer.worker_id.clone()),
            trace_id: self.trace_id.clone(),
            body,
        };
        let redacted = event.payload_mut().is_some_and(|payload| self.writer.redactor.redact(payload));
        let payload = codec::encode(&event).map_err(|source| Error::Encode { run_id, source })?;
        Ok(Encoded { event, redacted, payload: bytes::Bytes::from(payload) })
    }

    /// Publishes `last` (after `ahead`, in one message) fenced on the log's
    /// last stored event, and keeps the wait for its acknowledgement.
    async fn send(&mut self, ahead: Option<Encoded>, last: Encoded) -> Result<(), Error> {
        // Closed while the event is being sent: if the caller stops there
        // the log's position is unknown.
        self.closed = true;
        let sent = self.outgoing(ahead.as_ref(), &last)?;
        let ack = sent
            .publish(&self.writer.js)
            .await
            .map_err(|source| Error::Publish { run_id: self.run_id, source })?;
        self.in_flight = Some(InFlight {
            ahead,
            last,
            sent,
            resent: 0,
            ack: SyncFuture::new(Box::pin(ack.into_future().map(Answer::Ack))),
        });
        self.closed = false;
        Ok(())
    }

    /// `last` (after `ahead`, in one message) as it goes on the wire, fenced
    /// on the log's last stored message.
    fn outgoing(&self, ahead: Option<&Encoded>, last: &Encoded) -> Result<Outgoing, Error> {
        let payload = match ahead {
            None => last.payload.clone(),
            Some(held) => log_message::encode_log_message(&[&held.event, &last.event])
                .map(bytes::Bytes::from)
                .map_err(|source| Error::Encode { run_id: self.run_id, source })?,
        };
        Ok(Outgoing { subject: self.subject.clone(), payload, expected_last: self.last_stream_seq })
    }

    /// Waits for the acknowledgement of the event [`EventLog::begin`] sent,
    /// if one is in flight; returns the seq of the log's last event. Cancel
    /// safe. A refusal (someone else wrote to the log) marks the log lost;
    /// any other failure closes it.
    pub async fn confirm(&mut self) -> Result<u64, Error> {
        let answer = loop {
            let Some(in_flight) = self.in_flight.as_mut() else {
                return Ok(self.last_seq());
            };
            match (&mut in_flight.ack).await {
                // No answer (a server restarting, a connection re-made): the
                // event may or may not be stored. Send the same append again
                // (same expected last sequence): stored already, it is
                // refused and the run's last event shows it ours; else it is
                // stored now. So an
                // event whose step already started work is not lost to a
                // restart of the server. The resend replaces the wait in the
                // log, so a dropped `confirm` resumes it.
                Answer::Ack(Err(e)) if resendable(e.kind()) && in_flight.resent < RESENDS => {
                    in_flight.resent += 1;
                    let delay = RESEND_DELAY * in_flight.resent;
                    debug!(run_id = %self.run_id, seq = in_flight.last.event.seq, resent = in_flight.resent, error = %e, "event not acknowledged; sending it again");
                    let resend = Resend {
                        writer: self.writer.clone(),
                        sent: in_flight.sent.clone(),
                        run_id: self.run_id,
                        seq: in_flight.last.event.seq,
                        attempt: in_flight.last.event.attempt,
                    };
                    in_flight.ack = SyncFuture::new(Box::pin(resend.send(delay)));
                }
                answer => break answer,
            }
        };
        let Some(InFlight { ahead, last, .. }) = self.in_flight.take() else {
            return Ok(self.last_seq());
        };
        let (run_id, seq) = (last.event.run_id, last.event.seq);
        let stored = match answer {
            Answer::Checked(checked) => checked,
            Answer::Ack(Ok(ack)) => Ok(ack.sequence),
            Answer::Ack(Err(e)) if e.kind() == PublishErrorKind::WrongLastSequence => {
                Err(Error::LeaseLost { run_id, seq })
            }
            Answer::Ack(Err(source)) => Err(Error::Publish { run_id, source }),
        };
        let result = stored.map(|stream_seq| {
            self.next_seq = seq + 1;
            self.last_stream_seq = stream_seq;
            for stored in ahead.iter().chain(std::iter::once(&last)) {
                self.count(&stored.event.body);
                if stored.redacted {
                    metrics::get().events_redacted.inc();
                }
            }
            seq
        });
        match &result {
            Ok(_) => {}
            Err(e) if e.is_lease_lost() => self.lost = true,
            Err(_) => self.closed = true,
        }
        result
    }

    /// Moves the run metrics for an event that is now stored.
    fn count(&self, body: &EventBody) {
        let m = metrics::get();
        let labels = [self.labels[0].as_str(), self.labels[1].as_str()];
        match body {
            EventBody::Started(_) => {
                m.runs_started.with_label_values(&labels).inc();
                let waited_us = time::now_us().saturating_sub(self.created_us).max(0);
                #[allow(clippy::cast_precision_loss)]
                m.submit_to_start.with_label_values(&labels).observe(waited_us as f64 / 1e6);
            }
            EventBody::Resumed(_) => m.runs_resumed.with_label_values(&labels).inc(),
            EventBody::Completed(_) => m.runs_completed.with_label_values(&labels).inc(),
            EventBody::Failed(_) => m.runs_failed.with_label_values(&labels).inc(),
            EventBody::Cancelled(_) => m.runs_cancelled.with_label_values(&labels).inc(),
            _ => {}
        }
    }
}

impl Drop for EventLog {
    /// A log dropped with an event held (the attempt ended without writing
    /// more) does not write it later.
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            held.discard();
        }
    }
}
