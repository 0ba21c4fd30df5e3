//! The projector: copies the events stream into the SQL registry, once per
//! stream sequence, without acknowledging a single message.
//!
//! **Position.** The registry stores how far the projection got: the last
//! events-stream sequence projected, in a row of `projector_positions`
//! named after the events stream. Every batch's events and the new position
//! are written in one transaction ([`Registry::apply_at`]), and the position
//! moves by compare-and-set: only if it is still where this projector started
//! the batch and this projector still owns the projection. If not, the
//! transaction rolls back, and the projector reads the position again and
//! restarts its consumer from there. A crash at any point leaves the rows
//! and the position consistent, so a restart resumes exactly where the last
//! commit ended, and two projectors running at once cannot both commit a
//! stream sequence.
//!
//! **Consumer.** An ordered pull consumer (ephemeral, one replica, in
//! memory, no acks; async-nats recreates it on a gap or a missed heartbeat)
//! starting at the stored position + 1 delivers the stream in order. The
//! projector writes what is ready, up to `batch` events per transaction.
//! Compared with a durable consumer with explicit acks this saves the server
//! one ack per event and the consumer's persisted state.
//!
//! **One active projector per fleet.** Coordinator replicas share the
//! database, so the row also names an owner with a lease ([`LEASE`]). A
//! projector consumes only while it owns the projection: it takes over a
//! row without owner or whose lease expired, renews the lease with every
//! batch and, when idle, every [`HEARTBEAT`]; the others stand by and try
//! to take over every [`HEARTBEAT`], without consuming. Graceful shutdown
//! releases the row, so a standby takes over at its next poll rather than
//! after the lease. Correctness never depends on the lease (clocks of
//! replicas may disagree, an owner may pause past it): the compare-and-set
//! on the position does. A lease row rather than a PostgreSQL advisory lock:
//! the same SQL serves SQLite; an advisory lock belongs to one session, so
//! the owner would hold a connection outside the pool for as long as it
//! projects and lose the lock silently with that connection; and the row
//! tells an operator who projects and since when.
//!
//! **A thread of its own.** A coordinator runs its projector on a thread of
//! its own with a single-threaded tokio runtime and a registry pool of its
//! own ([`Projector::spawn_thread`]), not among the API's tasks. Every batch
//! awaits the database a few times (the position, the inserts, the updates,
//! the commit); on the shared runtime each wake-up queued behind every task
//! ready at that moment, and under load that is hundreds of API requests
//! and run tasks: the projection fell behind the runs by about a second per
//! 20,000 (`docs/performance.md`). On its own thread the operating system
//! schedules it alongside the runtime's threads, so it keeps up.
//!
//! **Failures.** A retryable registry failure (the database is down or
//! busy) keeps the batch in memory and retries it every [`RETRY_DELAY`]:
//! nothing is skipped. A message that does not decode (or whose content
//! does not match its subject), or an event the registry refuses for good
//! (see [`registry::Error::is_retryable`](crate::registry::Error::is_retryable)),
//! is logged and skipped and the position moves past it: it never stalls
//! projection, nor the events fetched with it.
//!
//! **Upgrade.** Releases before the position was stored projected through a
//! durable consumer ([`Names::projector_consumer`]) with explicit acks. When
//! the registry has no position yet and that consumer exists, the position
//! starts at its ack floor (the few events between the floor and what was
//! projected are replayed, which `apply` makes harmless) and the consumer is
//! deleted. Without either the projection starts at the beginning of the
//! stream.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use futures::StreamExt;
use runfleet_protocol::event::Event;
use runfleet_protocol::names::parse_run_events_subject;
use runfleet_protocol::{time, Names};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::registry::{self, Lease, Registry, Takeover};

/// How long a projector owns the projection after its last write or
/// renewal. Ten seconds: three renewals ([`HEARTBEAT`]) fit in it, so a
/// busy database (SQLite's busy timeout is 5 s) or a slow renewal does not
/// hand the projection over; and a crashed owner's successor starts within
/// `LEASE + HEARTBEAT` (about 13 s), during which lists lag, but no run
/// does (the registry is off the runs' path).
pub const LEASE: Duration = Duration::from_secs(10);
/// How often an idle owner renews its lease, and a standby tries to take
/// over: a third of [`LEASE`].
pub const HEARTBEAT: Duration = Duration::from_millis(LEASE.as_millis() as u64 / 3);
/// The projector's registry pool on its own thread: it writes one batch at
/// a time, and renews its lease or reads its position between batches.
const THREAD_CONNECTIONS: u32 = 2;
/// The name of the projector's thread (in `top -H`, `perf`, core dumps;
/// Linux keeps 15 bytes of it).
const THREAD_NAME: &str = "rf-projector";
/// After a small batch (fewer than [`LINGER_BELOW`] messages) the projector
/// lets events gather until this long after that batch arrived before it
/// reads the next: under a light steady flow it commits every 5 ms rather
/// than once per message, each of which cost the database a commit and the
/// machine a wake-up of this thread. An event after a quiet spell is
/// written at once; lists lag by at most this more. Under load batches are
/// larger and follow each other without a pause.
const LINGER: Duration = Duration::from_millis(5);
/// Batches of fewer messages than this are followed by [`LINGER`]: about
/// 13,000 messages/s, above which the projector never pauses.
const LINGER_BELOW: usize = 64;
/// Delay before a failed write, pull or takeover is tried again.
pub const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Idle heartbeats in a row with events in the stream past the position
/// after which the consumer is recreated (about [`LEASE`]).
const STALLED_HEARTBEATS: u32 = 3;
/// How long shutdown waits to release the projection (the database may be
/// down; then a standby waits for the lease instead).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// The projector could not read what it needs to start or to report lag.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The events stream's state could not be read from JetStream.
    #[error("could not read the events stream {stream}: {source}")]
    StreamInfo {
        stream: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The durable consumer of older releases could not be read (seeding
    /// the position waits for it: starting from the beginning instead
    /// would replay the whole stream).
    #[error("could not read the legacy projector consumer {consumer}: {source}")]
    LegacyConsumer {
        consumer: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Registry(#[from] registry::Error),
    /// The projector's thread or its runtime could not be started, or the
    /// thread ended without a result (it panicked: a bug).
    #[error("the projector thread: {0}")]
    Thread(String),
}

/// Projects run events into the registry until cancelled.
pub struct Projector {
    events: jetstream::stream::Stream,
    registry: Registry,
    names: Names,
    /// The projection's name in `projector_positions`: the events stream's.
    projection: String,
    /// This projector's identity as the projection's owner.
    owner: String,
    batch: usize,
}

impl std::fmt::Debug for Projector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projector")
            .field("projection", &self.projection)
            .field("owner", &self.owner)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

/// Why projecting from one position stopped.
enum Stop {
    /// Shutdown was requested.
    Shutdown,
    /// The position moved under this projector, or it lost the ownership:
    /// read the row again.
    Superseded,
    /// The consumer ended or went back before the position: start again
    /// from the stored position.
    Restart,
}

/// How writing one batch ended.
enum Write {
    Done,
    /// Refused for good (not retryable); nothing was written.
    Refused(registry::Error),
    Superseded,
    Shutdown,
}

/// What one delivery chunk holds beyond the position.
struct Batch {
    events: Vec<Event>,
    /// The stream sequence of each of `events` (the same for the events of
    /// one message).
    stream_seqs: Vec<u64>,
    /// The last stream sequence the chunk covers.
    to: u64,
}

impl Projector {
    /// A projector of `events` into `registry`, writing at most `batch`
    /// events per transaction. Touches neither NATS nor the database:
    /// [`run`](Self::run) takes over or stands by.
    pub fn new(events: jetstream::stream::Stream, names: Names, registry: Registry, batch: usize) -> Self {
        let projection = names.events_stream();
        Self { events, registry, names, projection, owner: owner_id(), batch: batch.max(1) }
    }

    /// This projector's owner id, as stored in the position row while it
    /// owns the projection: `<HOSTNAME>/<pid>/<uuid>`.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Events in the stream not projected yet, fleet-wide: the stream's last
    /// sequence minus the stored position.
    pub async fn lag(&self) -> Result<u64, Error> {
        lag(&self.events, &self.registry, &self.names).await
    }

    /// Runs [`run`](Self::run) on a thread of its own, named
    /// `rf-projector`, with a single-threaded tokio runtime and a
    /// registry pool of its own ([`Registry::reopen`]), closed when it ends.
    /// The handle yields `run`'s result. Must be called within a tokio
    /// runtime; the NATS connection stays on that one.
    ///
    /// The handle's task stands for the projector on the calling runtime:
    /// if it is dropped without finishing (aborted, or its runtime dropped)
    /// the projector stops where it is, without releasing the projection,
    /// as a task of that runtime would.
    pub fn spawn_thread(self, shutdown: CancellationToken) -> tokio::task::JoinHandle<Result<(), Error>> {
        let (done, result) = tokio::sync::oneshot::channel();
        let abandoned = CancellationToken::new();
        let guard = abandoned.clone().drop_guard();
        let thread = std::thread::Builder::new().name(THREAD_NAME.to_owned()).spawn(move || {
            let _ = done.send(self.run_on_own_runtime(shutdown, abandoned));
        });
        tokio::spawn(async move {
            let _guard = guard;
            thread.map_err(|e| Error::Thread(format!("could not start it: {e}")))?;
            result.await.unwrap_or_else(|_| Err(Error::Thread("it ended without a result".to_owned())))
        })
    }

    fn run_on_own_runtime(
        self,
        shutdown: CancellationToken,
        abandoned: CancellationToken,
    ) -> Result<(), Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Thread(format!("could not build its runtime: {e}")))?;
        runtime.block_on(async move {
            let registry = self.registry.reopen(THREAD_CONNECTIONS)?;
            let projector = Self { registry: registry.clone(), ..self };
            let result = tokio::select! {
                result = projector.run(shutdown) => result,
                () = abandoned.cancelled() => {
                    debug!("projector abandoned: its handle's task was dropped");
                    Ok(())
                }
            };
            registry.close().await;
            result
        })
    }

    /// Projects (while it owns the projection) or stands by until `shutdown`
    /// is cancelled, then releases the projection. A batch being written is
    /// finished first unless it waits for the database. Registry and NATS
    /// failures are logged and retried, never fatal.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        info!(projection = %self.projection, owner = %self.owner, batch = self.batch, "projector started");
        // Only changes of role are logged at info.
        let mut owner: Option<bool> = None;
        while !shutdown.is_cancelled() {
            match self.take_over().await {
                Ok(Some(position)) => {
                    if owner != Some(true) {
                        info!(position, owner = %self.owner, "projector took over the projection");
                        owner = Some(true);
                    }
                    match self.project_from(position, &shutdown).await {
                        Stop::Shutdown => break,
                        Stop::Superseded => {
                            debug!("projector position moved or ownership lost, reading it again")
                        }
                        Stop::Restart => debug!("projector restarting its consumer from the stored position"),
                    }
                }
                Ok(None) => {
                    if owner != Some(false) {
                        info!(owner = %self.owner, "projector standing by: another one owns the projection");
                        owner = Some(false);
                    }
                    sleep_or_cancel(&shutdown, HEARTBEAT).await;
                }
                Err(error) => {
                    warn!(error = %error, "projector could not take over or read its position, retrying");
                    sleep_or_cancel(&shutdown, RETRY_DELAY).await;
                }
            }
        }
        if owner == Some(true) {
            self.release().await;
        }
        info!("projector stopped");
        Ok(())
    }

    /// A lease for this projector from now.
    fn lease(&self) -> Lease {
        let now_ms = time::now_ms();
        Lease {
            projection: self.projection.clone(),
            owner: self.owner.clone(),
            now_ms,
            until_ms: now_ms.saturating_add(i64::try_from(LEASE.as_millis()).unwrap_or(i64::MAX)),
        }
    }

    /// Takes over (or keeps) the projection and returns its position, or
    /// `None` while another projector owns it. Creates the row when there
    /// is none, seeded from the legacy consumer's ack floor.
    async fn take_over(&self) -> Result<Option<u64>, Error> {
        let lease = self.lease();
        let mut position = match self.registry.take_projection(&lease).await? {
            Takeover::Taken { position } => position,
            Takeover::Held { owner, until_ms } => {
                debug!(%owner, until_ms, "projection held by another projector, standing by");
                return Ok(None);
            }
            Takeover::Missing => {
                let floor = self.legacy_ack_floor().await?;
                let seed = floor.unwrap_or(0);
                if !self.registry.create_projection(&lease, seed).await? {
                    // Another projector created it at the same moment.
                    return Ok(None);
                }
                match floor {
                    Some(floor) => info!(
                        position = floor, consumer = %self.names.projector_consumer(),
                        "projector position seeded from the legacy consumer's ack floor"
                    ),
                    None => info!("projector position created: projecting from the start of the stream"),
                }
                seed
            }
        };
        self.delete_legacy_consumer().await;
        // A stream that ends before the position was recreated (or lost
        // data): its sequences start again, and the position would skip
        // them. Projecting it again from the start is always right.
        let last = self.last_sequence().await?;
        if position > last {
            warn!(
                position, last_sequence = last, stream = %self.projection,
                "the events stream ends before the projector's position (recreated or restored?); projecting it again from the start"
            );
            self.registry.apply_at(&[], &self.lease(), position, 0).await?;
            position = 0;
        }
        Ok(Some(position))
    }

    /// The ack floor of the durable consumer older releases projected
    /// through, or `None` if it does not exist.
    async fn legacy_ack_floor(&self) -> Result<Option<u64>, Error> {
        let consumer = self.names.projector_consumer();
        match self.events.consumer_info(&consumer).await {
            Ok(info) => Ok(Some(info.ack_floor.stream_sequence)),
            Err(error) if error.kind() == ConsumerInfoErrorKind::NotFound => Ok(None),
            Err(error) => Err(Error::LegacyConsumer { consumer, source: Box::new(error) }),
        }
    }

    /// Deletes the durable consumer of older releases if it exists: once
    /// the position is stored it only costs the server, and an old replica
    /// starting again would recreate it, so every takeover checks. Best
    /// effort: a failure is logged and tried again at the next takeover,
    /// and never holds projection back.
    async fn delete_legacy_consumer(&self) {
        let consumer = self.names.projector_consumer();
        match self.legacy_ack_floor().await {
            Ok(None) => {}
            Ok(Some(_)) => match self.events.delete_consumer(&consumer).await {
                Ok(_) => info!(consumer = %consumer, "deleted the legacy projector consumer"),
                Err(error) => {
                    warn!(consumer = %consumer, error = %error, "could not delete the legacy projector consumer")
                }
            },
            Err(error) => warn!(error = %error, "could not look for the legacy projector consumer"),
        }
    }

    async fn last_sequence(&self) -> Result<u64, Error> {
        last_sequence(&self.events).await
    }

    /// Consumes from `position` + 1 and writes batch after batch while this
    /// projector owns the projection.
    async fn project_from(&self, mut position: u64, shutdown: &CancellationToken) -> Stop {
        let deliver_policy = match position {
            0 => DeliverPolicy::All,
            position => DeliverPolicy::ByStartSequence { start_sequence: position + 1 },
        };
        let config = pull::OrderedConfig {
            description: Some("runfleet projector: events into the SQL registry".to_owned()),
            deliver_policy,
            ..Default::default()
        };
        let messages = match self.events.create_consumer(config).await {
            Ok(consumer) => consumer.messages().await.map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        let messages = match messages {
            Ok(messages) => messages,
            Err(error) => {
                warn!(error = %error, position, "projector could not create its consumer, retrying");
                return match sleep_or_cancel(shutdown, RETRY_DELAY).await {
                    true => Stop::Restart,
                    false => Stop::Shutdown,
                };
            }
        };
        debug!(position, "projector consuming");
        let mut chunks = messages.ready_chunks(self.batch);
        let mut renew_at = Instant::now() + HEARTBEAT;
        // Idle heartbeats in a row at which the stream held events past the
        // position: the consumer delivers nothing although there is work.
        let mut stalled = 0;
        loop {
            let chunk = tokio::select! {
                biased;
                () = shutdown.cancelled() => return Stop::Shutdown,
                () = tokio::time::sleep_until(renew_at) => {
                    match self.registry.renew_projection(&self.lease()).await {
                        Ok(true) => renew_at = Instant::now() + HEARTBEAT,
                        Ok(false) => return Stop::Superseded,
                        Err(error) => {
                            // The compare-and-set of the next batch still
                            // decides: the lease only keeps standbys idle.
                            warn!(error = %error, "projector could not renew its lease, retrying");
                            renew_at = Instant::now() + RETRY_DELAY;
                        }
                    }
                    if self.last_sequence().await.is_ok_and(|last| last > position) {
                        stalled += 1;
                    } else {
                        stalled = 0;
                    }
                    if stalled >= STALLED_HEARTBEATS {
                        // async-nats retries recreating an ordered consumer
                        // forever and says nothing meanwhile (a permission
                        // it lacks, a server that refuses): start afresh.
                        warn!(position, "projector consumer delivers nothing although the stream has more, recreating it");
                        return Stop::Restart;
                    }
                    continue;
                }
                chunk = chunks.next() => chunk,
            };
            stalled = 0;
            let Some(chunk) = chunk else {
                debug!("projector consumer ended");
                return Stop::Restart;
            };
            let received = Instant::now();
            let small = chunk.len() < LINGER_BELOW;
            let (batch, went_back) = self.collect(chunk, position);
            if let Some(batch) = batch {
                let to = batch.to;
                match self.project(batch, position, shutdown).await {
                    // `project` skips what the registry refuses, so a
                    // refusal also leaves the position at `to`.
                    Write::Done | Write::Refused(_) => position = to,
                    Write::Superseded => return Stop::Superseded,
                    Write::Shutdown => return Stop::Shutdown,
                }
                renew_at = Instant::now() + HEARTBEAT;
            }
            if went_back {
                // The consumer was recreated from the start of the stream
                // (async-nats does so when it must recreate an ordered
                // consumer that has delivered nothing yet): start again
                // from the position rather than read the stream through.
                return Stop::Restart;
            }
            if small {
                tokio::select! {
                    () = shutdown.cancelled() => return Stop::Shutdown,
                    () = tokio::time::sleep_until(received + LINGER) => {}
                }
            }
        }
    }

    /// The chunk's messages past `position`, decoded, and whether the
    /// consumer delivered anything at or before `position`.
    fn collect(
        &self,
        chunk: Vec<Result<jetstream::Message, pull::OrderedError>>,
        position: u64,
    ) -> (Option<Batch>, bool) {
        let mut events = Vec::with_capacity(chunk.len());
        let mut stream_seqs = Vec::with_capacity(chunk.len());
        let mut to = position;
        let mut went_back = false;
        for message in chunk {
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    warn!(error = %error, "projector pull failed");
                    continue;
                }
            };
            let stream_seq = match message.info() {
                Ok(info) => info.stream_sequence,
                Err(error) => {
                    warn!(subject = %message.subject, error = %error, "skipping a message without stream metadata");
                    continue;
                }
            };
            if stream_seq <= to {
                went_back = true;
                continue;
            }
            to = stream_seq;
            for event in self.decode(&message, stream_seq) {
                events.push(event);
                stream_seqs.push(stream_seq);
            }
        }
        ((to > position).then_some(Batch { events, stream_seqs, to }), went_back)
    }

    /// Writes one batch and moves the position from `from` to `batch.to`.
    /// A retryable failure is retried (the batch stays in memory) until it
    /// succeeds, the position moves under it, or shutdown. A permanent one
    /// (an event the registry refuses, e.g. a seq 1 that is not
    /// `run.created`) would fail forever and hold back every event fetched
    /// with it, so the batch is written again event by event and only the
    /// refused events are skipped.
    async fn project(&self, batch: Batch, from: u64, shutdown: &CancellationToken) -> Write {
        match self.write(&batch.events, from, batch.to, shutdown).await {
            Write::Done => {
                debug!(events = batch.events.len(), from, to = batch.to, "projected batch");
                Write::Done
            }
            Write::Refused(error) => {
                warn!(error = %error, events = batch.events.len(), "registry refused a batch, projecting it event by event");
                self.project_one_by_one(batch, from, shutdown).await
            }
            other => other,
        }
    }

    /// Writes the events of each message in their own transaction, each
    /// moving the position to the message's stream sequence (the position
    /// counts messages, so a message's events are written together);
    /// refused messages are logged and skipped (the next write moves the
    /// position past them).
    async fn project_one_by_one(&self, batch: Batch, from: u64, shutdown: &CancellationToken) -> Write {
        let mut position = from;
        let mut start = 0;
        while let Some(&stream_seq) = batch.stream_seqs.get(start) {
            let end = start + batch.stream_seqs[start..].iter().take_while(|&&s| s == stream_seq).count();
            let message = &batch.events[start..end];
            start = end;
            match self.write(message, position, stream_seq, shutdown).await {
                Write::Done => position = stream_seq,
                Write::Refused(error) => warn!(
                    run_id = %message[0].run_id, seq = message[0].seq, events = message.len(), stream_seq, error = %error,
                    "skipping a message the registry refuses"
                ),
                other => return other,
            }
        }
        if position == batch.to {
            return Write::Done;
        }
        match self.write(&[], position, batch.to, shutdown).await {
            // Moving the position alone is never refused but by the
            // compare-and-set.
            Write::Refused(error) => {
                warn!(error = %error, "projector could not move its position past refused events");
                Write::Superseded
            }
            other => other,
        }
    }

    /// One [`Registry::apply_at`], retried while the failure is retryable.
    async fn write(&self, events: &[Event], from: u64, to: u64, shutdown: &CancellationToken) -> Write {
        loop {
            match self.registry.apply_at(events, &self.lease(), from, to).await {
                Ok(()) => return Write::Done,
                Err(registry::Error::Superseded { .. }) => return Write::Superseded,
                Err(error) if !error.is_retryable() => return Write::Refused(error),
                Err(error) => {
                    warn!(error = %error, events = events.len(), from, to, "projector could not write batch, will retry");
                    if !sleep_or_cancel(shutdown, RETRY_DELAY).await {
                        return Write::Shutdown;
                    }
                }
            }
        }
    }

    /// Gives the projection up so a standby takes over at once.
    async fn release(&self) {
        let release = self.registry.release_projection(&self.projection, &self.owner, time::now_ms());
        match tokio::time::timeout(RELEASE_TIMEOUT, release).await {
            Ok(Ok(true)) => info!(owner = %self.owner, "projector released the projection"),
            Ok(Ok(false)) => debug!("projector no longer owned the projection"),
            Ok(Err(error)) => {
                warn!(error = %error, "projector could not release the projection; a standby takes over after the lease")
            }
            Err(_) => {
                warn!("projector timed out releasing the projection; a standby takes over after the lease")
            }
        }
    }

    /// The events in `message` (one, or a step's `step.completed` and the
    /// event after it), without those (logged) that are not valid events of
    /// the run its subject names.
    fn decode(&self, message: &jetstream::Message, stream_seq: u64) -> Vec<Event> {
        let subject = message.subject.as_str();
        let Some((tenant, run)) = parse_run_events_subject(&self.names, subject) else {
            warn!(subject, stream_seq, "skipping message on a subject that is not a run's event log");
            return Vec::new();
        };
        let mut events = match runfleet_protocol::event::decode_log_message(&message.payload) {
            Ok(events) => events,
            Err(error) => {
                warn!(subject, stream_seq, error = %error, "skipping event that does not decode");
                return Vec::new();
            }
        };
        events.retain(|event| {
            let ours = event.tenant == tenant && event.run_id == run;
            if !ours {
                warn!(
                    subject, stream_seq, event_run_id = %event.run_id, event_tenant = %event.tenant,
                    "skipping event whose run or tenant does not match its subject"
                );
            }
            ours
        });
        events
    }
}

/// Events in `events` not projected into `registry` yet, whichever replica
/// projects: the stream's last sequence minus the stored position (0 when
/// there is no position yet and the stream is empty).
pub async fn lag(
    events: &jetstream::stream::Stream,
    registry: &Registry,
    names: &Names,
) -> Result<u64, Error> {
    let position = registry.projection(&names.events_stream()).await?.map_or(0, |p| p.position);
    Ok(last_sequence(events).await?.saturating_sub(position))
}

async fn last_sequence(events: &jetstream::stream::Stream) -> Result<u64, Error> {
    let info = events.get_info().await.map_err(|e| Error::StreamInfo {
        stream: events.cached_info().config.name.clone(),
        source: Box::new(e),
    })?;
    Ok(info.state.last_sequence)
}

/// A unique owner id that also tells an operator where the projector runs:
/// `<HOSTNAME>/<pid>/<uuid>` (the pod name on Kubernetes).
fn owner_id() -> String {
    let host = std::env::var("HOSTNAME").ok().filter(|host| !host.is_empty());
    format!(
        "{}/{}/{}",
        host.as_deref().unwrap_or("coordinator"),
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    )
}

/// Sleeps `delay`; `false` if `shutdown` came first.
async fn sleep_or_cancel(shutdown: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}
