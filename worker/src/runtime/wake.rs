//! Waking parked runs: timers (JetStream message schedules) and wake jobs.
//!
//! A run has at most one timer, a schedule message on `<prefix>.timers.<run>`
//! in the jobs stream whose body is the run's job and whose target is the
//! run's job subject: when it is due the server stores the job, which wakes
//! an idle worker like any new job. A new schedule on the subject replaces
//! the old one, so arming is idempotent. Nothing about a timer lives in a
//! worker's memory; it survives restarts of every process and of the server.

use async_nats::HeaderMap;
use bytes::Bytes;
use runfleet_protocol::job::Job;
use runfleet_protocol::names::{HEADER_CONTENT_TYPE, HEADER_MSG_ID, HEADER_SCHEDULE, HEADER_SCHEDULE_TARGET};
use runfleet_protocol::{codec, time, RunId, SignalKey};

use super::Shared;

/// A timer or wake job could not be written or a signal not read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("job of run {run_id} could not be encoded: {source}")]
    Encode { run_id: RunId, source: codec::Error },
    #[error("{what} for run {run_id} could not be published: {message}")]
    Publish { run_id: RunId, what: &'static str, message: String },
    #[error("signal {key} of run {run_id} could not be read: {message}")]
    Signal { run_id: RunId, key: SignalKey, message: String },
}

/// Arms the run's timer: at `due_ms` the server publishes `job` (as a later
/// dispatch, see [`Job::redispatch`]) on the run's job subject. Replaces any
/// earlier timer of the run.
pub(crate) async fn arm(shared: &Shared, job: &Job, due_ms: i64) -> Result<(), Error> {
    let run_id = job.run_id;
    let payload = codec::encode(&job.redispatch()).map_err(|source| Error::Encode { run_id, source })?;
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_CONTENT_TYPE, codec::CONTENT_TYPE);
    headers.insert(HEADER_SCHEDULE, format!("@at {}", time::rfc3339_ms(due_ms)).as_str());
    headers.insert(HEADER_SCHEDULE_TARGET, shared.names.job(&job.queue, job.priority, run_id).as_str());
    publish(shared, shared.names.run_timer(run_id), headers, payload, run_id, "timer").await
}

/// Disarms the run's timer, if it has one.
pub(crate) async fn disarm(shared: &Shared, run_id: RunId) -> Result<(), Error> {
    shared.jobs.purge().filter(shared.names.run_timer(run_id)).await.map(|_| ()).map_err(|e| Error::Publish {
        run_id,
        what: "timer purge",
        message: e.to_string(),
    })
}

/// Publishes the job that wakes the run parked by the `run.waiting` at
/// `waiting_seq`. The coordinator publishes the same message id when the
/// signal arrives, so the wake is stored once.
pub(crate) async fn dispatch(shared: &Shared, job: &Job, waiting_seq: u64) -> Result<(), Error> {
    let run_id = job.run_id;
    let payload = codec::encode(&job.redispatch()).map_err(|source| Error::Encode { run_id, source })?;
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_CONTENT_TYPE, codec::CONTENT_TYPE);
    headers.insert(HEADER_MSG_ID, shared.names.wake_msg_id(run_id, waiting_seq).as_str());
    let subject = shared.names.job(&job.queue, job.priority, run_id);
    publish(shared, subject, headers, payload, run_id, "wake job").await
}

/// Whether the signal `key` of `run_id` has arrived.
pub(crate) async fn signal_arrived(shared: &Shared, run_id: RunId, key: &SignalKey) -> Result<bool, Error> {
    shared
        .signals
        .get(shared.names.signal_key(run_id, key))
        .await
        .map(|entry| entry.is_some())
        .map_err(|e| Error::Signal { run_id, key: key.clone(), message: e.to_string() })
}

async fn publish(
    shared: &Shared,
    subject: String,
    headers: HeaderMap,
    payload: Vec<u8>,
    run_id: RunId,
    what: &'static str,
) -> Result<(), Error> {
    let error = |e: String| Error::Publish { run_id, what, message: e };
    let ack = shared
        .js
        .publish_with_headers(subject, headers, Bytes::from(payload))
        .await
        .map_err(|e| error(e.to_string()))?;
    ack.await.map(|_| ()).map_err(|e| error(e.to_string()))
}
