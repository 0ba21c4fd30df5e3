//! One run's state in JetStream, read and written the way the API verbs and
//! the recovery loop both need it: its first and last events, its job, its
//! timer, its lease, its signals and its cancel request.
//!
//! JetStream is the truth for a run (see DESIGN.md, "Where truth lives"), so
//! every decision that moves a run reads here, never the registry. Writes
//! that extend a run's log carry `Nats-Expected-Last-Subject-Sequence`, so
//! the coordinator can never write over a worker (or a second terminal
//! event), whatever it races with.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv::{self, CreateErrorKind};
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{self, DirectGetErrorKind, LastRawMessageErrorKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use runfleet_protocol::control::CancelRecord;
use runfleet_protocol::event::{Event, EventBody, RunCancelled};
use runfleet_protocol::job::Job;
use runfleet_protocol::lease::Lease;
use runfleet_protocol::names::{
    HEADER_CONTENT_TYPE, HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE, HEADER_MSG_ID, HEADER_SCHEDULE,
    HEADER_SCHEDULE_TARGET,
};
use runfleet_protocol::signal::SignalRecord;
use runfleet_protocol::{codec, time, Names, RunId, RunState, SignalKey, TenantId, WorkerId};
use tracing::{debug, info, warn};

use crate::setup::Topology;

/// The worker id the coordinator writes into a lease it takes to cancel a
/// run, so a worker that finds the lease held (and an operator reading the
/// bucket) can tell it from a worker's.
pub const COORDINATOR_LEASE_HOLDER: &str = "coordinator";

/// Rounds of "read the last event, append after it" before a cancel gives
/// up because the run's log keeps moving (it cannot while the coordinator
/// holds the lease, except for a zombie writer that is then refused).
const CANCEL_ROUNDS: u32 = 5;

/// A run's JetStream state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// JetStream did not answer or refused; retrying later may succeed.
    #[error("could not {action} ({target}): {reason}")]
    JetStream { action: &'static str, target: String, reason: String },
    /// A stored record does not decode: a bug or a foreign writer.
    #[error("stored {what} ({target}) does not decode: {source}")]
    Corrupt {
        what: &'static str,
        target: String,
        #[source]
        source: codec::Error,
    },
    /// A record could not be encoded: a bug.
    #[error("could not encode the {what} of run {run_id}: {source}")]
    Encode {
        what: &'static str,
        run_id: RunId,
        #[source]
        source: codec::Error,
    },
    /// The run's first event is not `run.created`, so its job cannot be
    /// rebuilt: a bug or a foreign writer.
    #[error("the first event of run {run_id} is {found}, not run.created")]
    NotCreated { run_id: RunId, found: &'static str },
    /// The run's log vanished while the coordinator acted on it (the events
    /// stream's `max_age` removed it).
    #[error("the event log of run {run_id} vanished")]
    Vanished { run_id: RunId },
    /// The run's log kept moving while the coordinator tried to append.
    #[error("the event log of run {run_id} kept moving; retry")]
    Contended { run_id: RunId },
}

impl Error {
    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::JetStream { .. } | Self::Contended { .. } | Self::Vanished { .. } => true,
            Self::Corrupt { .. } | Self::Encode { .. } | Self::NotCreated { .. } => false,
        }
    }
}

fn jetstream_error(action: &'static str, target: impl Into<String>) -> impl FnOnce(String) -> Error {
    let target = target.into();
    move |reason| Error::JetStream { action, target, reason }
}

/// An event with the stream sequence it is stored at (what the next append
/// must name as the expected last subject sequence).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub event: Event,
    pub stream_seq: u64,
}

/// What the coordinator needs to act on a run: its job (rebuilt from
/// `run.created`, so a re-dispatch carries exactly what submit dispatched)
/// and its last event.
#[derive(Debug, Clone)]
pub struct RunFacts {
    pub job: Job,
    pub last: StoredEvent,
}

/// How a cancel that reached the lease step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// The coordinator took the lease and wrote `run.cancelled`.
    Written,
    /// The run had ended meanwhile, in this state; nothing was written.
    AlreadyTerminal(RunState),
    /// Someone holds the run's lease (a worker, or another coordinator
    /// cancelling it), or a worker started the run and holds it without a
    /// lease yet ([`StartedRun::AskTheWorker`]); the holder or the next
    /// claimant writes `run.cancelled`, prompted by the control record.
    LeaseHeld { holder: Option<WorkerId> },
}

/// What a cancel that took the lease does with a run a worker has started
/// (its last event is the worker's and leaves it running).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartedRun {
    /// Ask the worker (write the cancel record again, release the lease): a
    /// submission's first attempt runs without a lease until its first
    /// heartbeat, so a live worker may be running it. The API's cancel.
    AskTheWorker,
    /// Write `run.cancelled`: the run is known to be let go of (the recovery
    /// loop found it stale, with no lease).
    Cancel,
}

/// Where a lookup in a run's event subject starts.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Lookup {
    Last,
    /// The first message for the subject at or after this stream sequence.
    NextFrom(u64),
}

/// Reads and writes one run's state in JetStream. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Runs {
    js: jetstream::Context,
    names: Names,
    events: stream::Stream,
    jobs: stream::Stream,
    leases: kv::Store,
    signals: kv::Store,
    control: kv::Store,
    inputs: kv::Store,
}

impl Runs {
    pub fn new(js: jetstream::Context, names: Names, topology: &Topology) -> Self {
        Self {
            js,
            names,
            events: topology.events.clone(),
            jobs: topology.jobs.clone(),
            leases: topology.leases.clone(),
            signals: topology.signals.clone(),
            control: topology.control.clone(),
            inputs: topology.inputs.clone(),
        }
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    // ---- events ----

    /// A message of a run's event subject, or `None` if there is none.
    pub(crate) async fn direct_get(
        &self,
        subject: &str,
        lookup: Lookup,
    ) -> Result<Option<StreamMessage>, Error> {
        let result = match lookup {
            Lookup::Last => self.events.direct_get_last_for_subject(subject).await,
            Lookup::NextFrom(0) => self.events.direct_get_first_for_subject(subject).await,
            Lookup::NextFrom(seq) => self.events.direct_get_next_for_subject(subject, Some(seq)).await,
        };
        match result {
            Ok(message) => Ok(Some(message)),
            Err(error) if error.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(error) => Err(jetstream_error("read the run's events", subject)(error.to_string())),
        }
    }

    /// The newest event stored on `subject` (a run's event subject), if any.
    pub async fn last_event_on(&self, subject: &str) -> Result<Option<StoredEvent>, Error> {
        Ok(self.direct_get(subject, Lookup::Last).await?.as_ref().and_then(stored_event))
    }

    /// The run's newest event, if the run exists for `tenant`.
    pub async fn last_event(&self, tenant: &TenantId, run: RunId) -> Result<Option<StoredEvent>, Error> {
        self.last_event_on(&self.names.run_events(tenant, run)).await
    }

    /// The first event stored on `subject` (normally `run.created`).
    pub async fn first_event_on(&self, subject: &str) -> Result<Option<Event>, Error> {
        let first = self.direct_get(subject, Lookup::NextFrom(0)).await?;
        Ok(first.as_ref().and_then(|message| stored_events(message).into_iter().next()))
    }

    /// The run's job and last event, or `None` if the run does not exist
    /// for `tenant` (tenants are isolated by subject).
    pub async fn facts(&self, tenant: &TenantId, run: RunId) -> Result<Option<RunFacts>, Error> {
        let subject = self.names.run_events(tenant, run);
        let Some(last) = self.last_event_on(&subject).await? else {
            return Ok(None);
        };
        let Some(first) = self.first_event_on(&subject).await? else {
            return Ok(None);
        };
        let mut job =
            job_of(&first).ok_or(Error::NotCreated { run_id: run, found: first.body.type_name() })?;
        if runfleet_ops::redact::contains_redacted(&job.input) {
            // The event's input was redacted at submit; the real job is kept
            // aside so the agent never gets "[REDACTED]".
            let stored = self.inputs.get(run.to_string()).await.map_err(|e| {
                jetstream_error("read the run's input", self.names.inputs_bucket())(e.to_string())
            })?;
            if let Some(bytes) = stored {
                job = codec::decode(&bytes).map_err(|source| Error::Corrupt {
                    what: "job",
                    target: format!("{}/{run}", self.names.inputs_bucket()),
                    source,
                })?;
            }
        }
        Ok(Some(RunFacts { job, last }))
    }

    /// Appends `event` to its run's log if the log's last message is still
    /// at `expected_stream_seq`. Returns `Ok(false)` when the log moved.
    async fn append(&self, event: &Event, expected_stream_seq: u64) -> Result<bool, Error> {
        let run_id = event.run_id;
        let payload =
            codec::encode(event).map_err(|source| Error::Encode { what: "event", run_id, source })?;
        let headers = event_headers(expected_stream_seq);
        let subject = self.names.run_events(&event.tenant, run_id);
        let published = match self.js.publish_with_headers(subject.clone(), headers, payload.into()).await {
            Ok(ack) => ack.await,
            Err(error) => Err(error),
        };
        match published {
            Ok(_) => Ok(true),
            Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => Ok(false),
            Err(error) => Err(jetstream_error("append to the run's log", subject)(error.to_string())),
        }
    }

    // ---- jobs and timers ----

    /// Publishes `job` on the run's job subject under `msg_id` and awaits
    /// the acknowledgement. Returns whether the job was stored (`false`:
    /// JetStream dropped it as a duplicate of a recent publish with the same
    /// id, which means that job is already there or was consumed).
    pub async fn publish_job(&self, job: &Job, msg_id: &str) -> Result<bool, Error> {
        let payload =
            codec::encode(job).map_err(|source| Error::Encode { what: "job", run_id: job.run_id, source })?;
        let subject = self.job_subject(job);
        let ack = match self
            .js
            .publish_with_headers(subject.clone(), content_headers(msg_id), payload.into())
            .await
        {
            Ok(ack) => ack.await,
            Err(error) => Err(error),
        };
        let ack = ack.map_err(|e| jetstream_error("publish the run's job", subject)(e.to_string()))?;
        Ok(!ack.duplicate)
    }

    /// Whether a job message for the run is stored (queued or being worked on).
    pub async fn job_present(&self, job: &Job) -> Result<bool, Error> {
        self.jobs_subject_present("read the run's job", &self.job_subject(job)).await
    }

    /// Whether the run's stored job is one its consumer will never deliver
    /// again: at or below the consumer's ack floor, so the consumer counts
    /// it as acknowledged while the work queue still holds it. Returns the
    /// message's stream sequence if so. Seen after NAK'd messages lost
    /// their pending state on the server; recovery re-dispatches such runs.
    pub async fn orphaned_job(&self, job: &Job) -> Result<Option<u64>, Error> {
        let subject = self.job_subject(job);
        let seq = match self.jobs.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => message.sequence,
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(error) => return Err(jetstream_error("read the run's job", subject)(error.to_string())),
        };
        let name = self.names.job_consumer(&job.queue, job.priority);
        let mut consumer: jetstream::consumer::PullConsumer = match self.jobs.get_consumer(&name).await {
            Ok(consumer) => consumer,
            // No worker has served this queue and band yet: nothing delivered.
            Err(_) => return Ok(None),
        };
        let info = consumer
            .info()
            .await
            .map_err(|e| jetstream_error("read the job consumer", name.clone())(e.to_string()))?;
        Ok((info.ack_floor.stream_sequence >= seq).then_some(seq))
    }

    /// Whether the run has a pending timer.
    pub async fn timer_present(&self, run: RunId) -> Result<bool, Error> {
        self.jobs_subject_present("read the run's timer", &self.names.run_timer(run)).await
    }

    async fn jobs_subject_present(&self, action: &'static str, subject: &str) -> Result<bool, Error> {
        match self.jobs.get_last_raw_message_by_subject(subject).await {
            Ok(_) => Ok(true),
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
            Err(error) => Err(jetstream_error(action, subject)(error.to_string())),
        }
    }

    /// (Re)arms the run's timer: at `at_ms` JetStream stores `job` on the
    /// run's job subject. Replaces any timer the run had.
    pub async fn schedule(&self, job: &Job, at_ms: i64) -> Result<(), Error> {
        let payload = codec::encode(job).map_err(|source| Error::Encode {
            what: "timer",
            run_id: job.run_id,
            source,
        })?;
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_CONTENT_TYPE, codec::CONTENT_TYPE);
        headers.insert(HEADER_SCHEDULE, format!("@at {}", time::rfc3339_ms(at_ms)).as_str());
        headers.insert(HEADER_SCHEDULE_TARGET, self.job_subject(job).as_str());
        let subject = self.names.run_timer(job.run_id);
        let ack = match self.js.publish_with_headers(subject.clone(), headers, payload.into()).await {
            Ok(ack) => ack.await,
            Err(error) => Err(error),
        };
        ack.map(|_| ()).map_err(|e| jetstream_error("schedule the run's timer", subject)(e.to_string()))
    }

    /// Removes the run's job messages and its timer from the jobs stream.
    async fn purge_dispatch(&self, job: &Job) -> Result<(), Error> {
        for subject in [self.job_subject(job), self.names.run_timer(job.run_id)] {
            self.jobs
                .purge()
                .filter(subject.clone())
                .await
                .map_err(|e| jetstream_error("purge the run's jobs", subject)(e.to_string()))?;
        }
        Ok(())
    }

    /// The message of the jobs stream at `stream_seq`, if still stored.
    pub async fn job_message(&self, stream_seq: u64) -> Result<Option<StreamMessage>, Error> {
        match self.jobs.get_raw_message(stream_seq).await {
            Ok(message) => Ok(Some(message)),
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(error) => Err(jetstream_error("read a job message", format!("stream seq {stream_seq}"))(
                error.to_string(),
            )),
        }
    }

    /// Deletes the message of the jobs stream at `stream_seq`.
    pub async fn delete_job_message(&self, stream_seq: u64) -> Result<(), Error> {
        self.jobs.delete_message(stream_seq).await.map(|_| ()).map_err(|e| {
            jetstream_error("delete a job message", format!("stream seq {stream_seq}"))(e.to_string())
        })
    }

    fn job_subject(&self, job: &Job) -> String {
        self.names.job(&job.queue, job.priority, job.run_id)
    }

    // ---- leases, signals, control ----

    /// Whether someone (a worker, or a coordinator cancelling) holds the
    /// run's lease.
    pub async fn lease_present(&self, run: RunId) -> Result<bool, Error> {
        let key = self.names.lease_key(run);
        let value = self
            .leases
            .get(&key)
            .await
            .map_err(|e| jetstream_error("read the run's lease", key)(e.to_string()))?;
        Ok(value.is_some())
    }

    /// The signal stored for the run under `key`.
    pub async fn signal(&self, run: RunId, key: &SignalKey) -> Result<Option<SignalRecord>, Error> {
        let kv_key = self.names.signal_key(run, key);
        let value = self
            .signals
            .get(&kv_key)
            .await
            .map_err(|e| jetstream_error("read a signal", kv_key.clone())(e.to_string()))?;
        value
            .map(|bytes| {
                codec::decode(&bytes).map_err(|source| Error::Corrupt {
                    what: "signal",
                    target: kv_key.clone(),
                    source,
                })
            })
            .transpose()
    }

    /// Stores a signal unless one is already stored under the key; returns
    /// `Ok(None)` if it was stored, or the record that was there first.
    pub async fn create_signal(
        &self,
        run: RunId,
        key: &SignalKey,
        record: &SignalRecord,
    ) -> Result<Option<SignalRecord>, Error> {
        let kv_key = self.names.signal_key(run, key);
        let value =
            codec::encode(record).map_err(|source| Error::Encode { what: "signal", run_id: run, source })?;
        // A key can vanish between a refused create and the read only if it
        // is deleted by hand; the loop then stores this signal after all.
        for _ in 0..3 {
            match self.signals.create(&kv_key, Bytes::from(value.clone())).await {
                Ok(_) => return Ok(None),
                Err(error) if error.kind() == CreateErrorKind::AlreadyExists => {
                    if let Some(existing) = self.signal(run, key).await? {
                        return Ok(Some(existing));
                    }
                }
                Err(error) => return Err(jetstream_error("store a signal", kv_key)(error.to_string())),
            }
        }
        Err(Error::JetStream {
            action: "store a signal",
            target: kv_key,
            reason: "the key kept changing".to_owned(),
        })
    }

    /// The run's pending cancel request, if any.
    pub async fn cancel_request(&self, run: RunId) -> Result<Option<CancelRecord>, Error> {
        let key = self.names.control_key(run);
        let value = self
            .control
            .get(&key)
            .await
            .map_err(|e| jetstream_error("read the run's control record", key.clone())(e.to_string()))?;
        value
            .map(|bytes| {
                codec::decode(&bytes).map_err(|source| Error::Corrupt {
                    what: "control record",
                    target: key.clone(),
                    source,
                })
            })
            .transpose()
    }

    /// Records a cancel request for every worker to see (they watch the
    /// control bucket, and check it when claiming). Repeating it is harmless.
    pub async fn request_cancel(&self, run: RunId, record: &CancelRecord) -> Result<(), Error> {
        let key = self.names.control_key(run);
        let value = codec::encode(record).map_err(|source| Error::Encode {
            what: "control record",
            run_id: run,
            source,
        })?;
        self.control
            .put(&key, value.into())
            .await
            .map(|_| ())
            .map_err(|e| jetstream_error("store the cancel request", key)(e.to_string()))
    }

    /// Ends a run with `run.cancelled` unless someone holds its lease.
    ///
    /// Takes the run's lease (KV create, so never while a worker holds it),
    /// appends `run.cancelled` after the run's last event (expected last
    /// subject sequence, so never a second terminal event, even against a
    /// zombie), removes its queued job and its timer so no worker is
    /// bothered with it, and releases the lease. `job` and `attempt` come
    /// from the run's facts; `request` is the cancel record already stored
    /// (see [`Runs::request_cancel`]).
    ///
    /// If the lease is held, the record is written again. A worker
    /// registers a run with its control watch before it claims it, and a
    /// fresh run's first claim does not read the control bucket, so a
    /// record stored before that registration may have passed it by; this
    /// write, made after the lease was found held, reaches it. The same
    /// goes for a run found started by a worker when `started` says to ask
    /// it: a submission's first attempt holds no lease until its first
    /// heartbeat, and its `run.started` follows the registration.
    pub async fn cancel_unowned(
        &self,
        tenant: &TenantId,
        job: &Job,
        attempt: u32,
        request: &CancelRecord,
        started: StartedRun,
    ) -> Result<Cancelled, Error> {
        let run_id = job.run_id;
        let key = self.names.lease_key(run_id);
        let now = time::now_ms();
        let holder = WorkerId::new(COORDINATOR_LEASE_HOLDER).map_err(|e| Error::JetStream {
            action: "build the coordinator's lease",
            target: key.clone(),
            reason: e.to_string(),
        })?;
        let lease = Lease { run_id, worker_id: holder, attempt, acquired_ms: now, renewed_ms: now };
        let value =
            codec::encode(&lease).map_err(|source| Error::Encode { what: "lease", run_id, source })?;
        let revision = match self.leases.create(&key, value.into()).await {
            Ok(revision) => revision,
            Err(error) if error.kind() == CreateErrorKind::AlreadyExists => {
                // Who holds it is read before the record is written again:
                // the holder may end the run and release the lease as soon
                // as the record reaches it.
                let holder = self.lease_holder(&key).await;
                self.request_cancel(run_id, request).await?;
                return Ok(Cancelled::LeaseHeld { holder });
            }
            Err(error) => return Err(jetstream_error("take the run's lease", key)(error.to_string())),
        };
        let written = self.append_cancelled(tenant, run_id, request.reason.clone(), started).await;
        if let Ok(Cancelled::LeaseHeld { .. }) = &written {
            // Released before the record is written again, so the worker's
            // heartbeat does not find our lease in place of its own.
            if let Err(error) = self.leases.delete_expect_revision(&key, Some(revision)).await {
                warn!(run_id = %run_id, error = %error, "could not release the coordinator's lease; it expires after the lease TTL");
            }
            self.request_cancel(run_id, request).await?;
            return written;
        }
        if matches!(written, Ok(Cancelled::Written)) {
            runfleet_ops::metrics::get()
                .runs_cancelled
                .with_label_values(&[job.queue.as_str(), job.agent.as_str()])
                .inc();
            // The run is terminal: a job or timer left behind would only
            // make a worker claim it to find that out.
            if let Err(error) = self.purge_dispatch(job).await {
                warn!(run_id = %run_id, error = %error, "run cancelled but its job or timer could not be removed; a worker will find it terminal and drop it");
            }
        }
        if let Err(error) = self.leases.delete_expect_revision(&key, Some(revision)).await {
            warn!(run_id = %run_id, error = %error, "could not release the coordinator's lease; it expires after the lease TTL");
        }
        written
    }

    async fn append_cancelled(
        &self,
        tenant: &TenantId,
        run_id: RunId,
        reason: Option<String>,
        started: StartedRun,
    ) -> Result<Cancelled, Error> {
        for _ in 0..CANCEL_ROUNDS {
            let last = self.last_event(tenant, run_id).await?.ok_or(Error::Vanished { run_id })?;
            let state = last.event.state_after();
            if state.is_terminal() {
                return Ok(Cancelled::AlreadyTerminal(state));
            }
            if started == StartedRun::AskTheWorker
                && state == RunState::Running
                && last.event.worker_id.is_some()
            {
                return Ok(Cancelled::LeaseHeld { holder: last.event.worker_id });
            }
            let event = Event {
                run_id,
                tenant: tenant.clone(),
                seq: last.event.seq + 1,
                ts_ms: time::now_ms(),
                attempt: last.event.attempt,
                worker_id: None,
                trace_id: last.event.trace_id.clone(),
                body: EventBody::Cancelled(RunCancelled { reason: reason.clone() }),
            };
            if self.append(&event, last.stream_seq).await? {
                info!(run_id = %run_id, seq = event.seq, from = %state, "run cancelled");
                return Ok(Cancelled::Written);
            }
            debug!(run_id = %run_id, "run's log moved while cancelling, reading it again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(Error::Contended { run_id })
    }

    /// Who holds a lease, for the reply and the logs; `None` if it cannot
    /// be read (it may have been released meanwhile).
    async fn lease_holder(&self, key: &str) -> Option<WorkerId> {
        let value = self.leases.get(key).await.ok()??;
        codec::decode::<Lease>(&value).ok().map(|lease| lease.worker_id)
    }
}

/// The job a run's `run.created` event describes, or `None` if `created` is
/// another event.
pub fn job_of(created: &Event) -> Option<Job> {
    let EventBody::Created(body) = &created.body else {
        return None;
    };
    Some(Job {
        run_id: created.run_id,
        tenant: created.tenant.clone(),
        agent: body.agent.clone(),
        queue: body.queue.clone(),
        priority: body.priority,
        input: body.input.clone(),
        max_attempts: body.max_attempts,
        created_us: created.ts_ms.saturating_mul(1000),
        traceparent: body.traceparent.clone(),
        // A later dispatch: its claimant reads the log.
        created_seq: None,
    })
}

/// The last event in a stored message of a run's log, or `None` (logged)
/// if it does not decode.
pub(crate) fn stored_event(message: &StreamMessage) -> Option<StoredEvent> {
    let event = stored_events(message).pop()?;
    Some(StoredEvent { event, stream_seq: message.sequence })
}

/// The events in a stored message of a run's log (one, or a step's
/// `step.completed` and the event after it), none (logged) if it does not
/// decode.
pub(crate) fn stored_events(message: &StreamMessage) -> Vec<Event> {
    match runfleet_protocol::event::decode_log_message(&message.payload) {
        Ok(events) => events,
        Err(error) => {
            warn!(subject = %message.subject, stream_seq = message.sequence, error = %error, "stored event does not decode");
            Vec::new()
        }
    }
}

/// Headers of a runfleet message published under a de-duplication id.
pub(crate) fn content_headers(msg_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_CONTENT_TYPE, codec::CONTENT_TYPE);
    headers.insert(HEADER_MSG_ID, msg_id);
    headers
}

/// Headers of an append to a run's log whose previous message is at
/// stream sequence `expected_last` (0: the log must be empty). No msg id:
/// the expected sequence already refuses a second copy of an append (any
/// message on the subject after `expected_last` fails it), so a msg id
/// would only cost the server a de-duplication entry per event for the
/// whole duplicate window (see `docs/protocol.md`, Headers).
pub(crate) fn event_headers(expected_last: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_CONTENT_TYPE, codec::CONTENT_TYPE);
    headers.insert(HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE, expected_last.to_string().as_str());
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use runfleet_protocol::event::{RunCreated, RunStarted};
    use runfleet_protocol::{AgentName, QueueName};

    #[test]
    fn job_is_rebuilt_from_run_created() {
        let run_id = RunId::generate();
        let created = Event {
            run_id,
            tenant: TenantId::default_tenant(),
            seq: 1,
            ts_ms: 1_700_000_000_123,
            attempt: 0,
            worker_id: None,
            trace_id: None,
            body: EventBody::Created(RunCreated {
                agent: AgentName::new("echo").unwrap_or_else(|e| panic!("{e}")),
                queue: QueueName::new("gpu").unwrap_or_else(|e| panic!("{e}")),
                priority: 1,
                input: serde_json::json!({"x": 1}),
                max_attempts: 4,
                idempotency_key: None,
                traceparent: None,
            }),
        };
        let job = job_of(&created).unwrap_or_else(|| panic!("no job"));
        assert_eq!((job.run_id, job.priority, job.max_attempts), (run_id, 1, 4));
        assert_eq!(job.created_us, 1_700_000_000_123_000);
        assert_eq!(job.queue.as_str(), "gpu");
        let started = Event { body: EventBody::Started(RunStarted { delivery: 1 }), ..created };
        assert!(job_of(&started).is_none());
    }

    #[test]
    fn coordinator_lease_holder_is_a_valid_worker_id() {
        assert!(WorkerId::new(COORDINATOR_LEASE_HOLDER).is_ok());
    }
}
