//! Run leases in the leases KV bucket and the table of runs this worker holds.
//!
//! A lease is created with KV `create` (refused if another worker holds it),
//! renewed by CAS `update` on the revision this worker last wrote, and
//! released with a revision-checked delete. The bucket's `max_age` is the
//! lease TTL: a lease that is not renewed ages out, which is how a crashed
//! worker's runs become claimable again.
//!
//! A submission's first claim takes no lease ([`NO_LEASE`]): its first
//! append, fenced on the `run.created` the job names, decides the claim, and
//! the heartbeat creates the lease if the run is still going a period later.
//! A run that ends within a heartbeat period never writes a lease. Creating
//! the lease late is checked against the run's log: an attempt paused past
//! the job's ack wait may find the key free only because a newer attempt
//! already claimed the run and let go of it ([`Held::beat`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use async_nats::jetstream::message::{AckKind, Acker};
use async_nats::jetstream::stream;
use runfleet_protocol::event::{Event, EventBody};
use runfleet_protocol::lease::Lease;
use runfleet_protocol::{codec, time, Names, RunId, TenantId};

use super::events;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Why a lease operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another worker holds the run's lease.
    #[error("run {run_id} is leased by another worker")]
    Held { run_id: RunId },
    /// The lease changed under us (renewed, stolen or expired and re-created
    /// by someone else): this worker no longer owns the run.
    #[error("lease of run {run_id} was lost")]
    Lost { run_id: RunId },
    /// The lease record could not be encoded.
    #[error("lease of run {run_id} could not be encoded: {source}")]
    Encode { run_id: RunId, source: codec::Error },
    /// The KV operation failed for another reason (timeout, connection);
    /// retrying may succeed.
    #[error("lease operation on run {run_id} failed: {message}")]
    Kv { run_id: RunId, message: String },
}

/// Where the heartbeat reads a run's log (see [`Held::create`]).
pub(crate) struct RunLog<'a> {
    pub events: &'a stream::Stream,
    pub names: &'a Names,
}

/// Whether `last`, a run's last event, leaves the run to the attempt that
/// holds `lease` and claimed it without one: the `run.created` its claim
/// was fenced on, or an event of that attempt. Another attempt's event, or
/// the coordinator's `run.cancelled`, means the run moved on without it.
fn written_by_claim(last: &Event, lease: &Lease) -> bool {
    match &last.body {
        EventBody::Created(_) => true,
        _ => last.attempt == lease.attempt && last.worker_id.as_ref() == Some(&lease.worker_id),
    }
}

/// The revision of a run held without a lease: KV revisions start at 1.
/// A submission's first claim holds its run so until the heartbeat creates
/// the lease ([`Held::beat`]); nothing releases a lease it never wrote.
pub const NO_LEASE: u64 = 0;

/// Creates the lease of `lease.run_id`; returns its revision.
pub async fn acquire(leases: &kv::Store, key: &str, lease: &Lease) -> Result<u64, Error> {
    let run_id = lease.run_id;
    let value = codec::encode(lease).map_err(|source| Error::Encode { run_id, source })?;
    match leases.create(key, value.into()).await {
        Ok(revision) => Ok(revision),
        Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Err(Error::Held { run_id }),
        Err(e) => Err(Error::Kv { run_id, message: e.to_string() }),
    }
}

/// CAS-updates the lease from `revision`; returns the new revision.
pub async fn update(leases: &kv::Store, key: &str, lease: &Lease, revision: u64) -> Result<u64, Error> {
    let run_id = lease.run_id;
    let value = codec::encode(lease).map_err(|source| Error::Encode { run_id, source })?;
    match leases.update(key, value.into(), revision).await {
        Ok(revision) => Ok(revision),
        Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Err(Error::Lost { run_id }),
        Err(e) => Err(Error::Kv { run_id, message: e.to_string() }),
    }
}

/// Deletes the lease if it is still at `revision`.
pub async fn release(leases: &kv::Store, key: &str, run_id: RunId, revision: u64) -> Result<(), Error> {
    leases
        .delete_expect_revision(key, Some(revision))
        .await
        .map_err(|e| Error::Kv { run_id, message: e.to_string() })
}

/// Deletes the lease if it is still at `revision`, without asking the server
/// to answer: for a run whose terminal event is stored, where a delete that
/// is lost (or refused) only leaves a lease that ages out after its TTL, and
/// a later claimant of the run finds it terminal. One message fewer, and no
/// wait, than [`release`]. A bucket reached through a JetStream domain or
/// API prefix falls back to [`release`].
pub async fn release_unconfirmed(
    leases: &kv::Store,
    client: &async_nats::Client,
    key: &str,
    run_id: RunId,
    revision: u64,
) -> Result<(), Error> {
    if leases.use_jetstream_prefix {
        return release(leases, key, run_id, revision).await;
    }
    let subject = format!("{}{key}", leases.put_prefix.as_deref().unwrap_or(&leases.prefix));
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("KV-Operation", "DEL");
    headers.insert(
        async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        async_nats::HeaderValue::from(revision),
    );
    client
        .publish_with_headers(subject, headers, bytes::Bytes::new())
        .await
        .map_err(|e| Error::Kv { run_id, message: e.to_string() })
}

/// The lease state of a held run, guarded so the heartbeat and the run's own
/// release never race on the revision.
#[derive(Debug)]
pub(crate) struct LeaseState {
    pub lease: Lease,
    pub revision: u64,
    /// Set once the run released (or gave up) the lease; the heartbeat skips it.
    pub done: bool,
}

/// One run this worker holds: small on purpose, the heartbeat walks all of them.
pub(crate) struct Held {
    pub run_id: RunId,
    /// The run's tenant: where its log is, read when the lease is created
    /// late.
    pub tenant: TenantId,
    pub key: String,
    pub state: tokio::sync::Mutex<LeaseState>,
    /// Acks the run's job message (in-progress acks from the heartbeat, the
    /// final ack or NAK from the run).
    pub acker: Acker,
    /// Cancelled when the run must stop (lease lost, or handed off at shutdown).
    pub stop: CancellationToken,
    lost: AtomicBool,
}

impl Held {
    pub fn new(
        run_id: RunId,
        tenant: TenantId,
        key: String,
        lease: Lease,
        revision: u64,
        acker: Acker,
        stop: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            run_id,
            tenant,
            key,
            state: tokio::sync::Mutex::new(LeaseState { lease, revision, done: false }),
            acker,
            stop,
            lost: AtomicBool::new(false),
        })
    }

    /// Marks the lease lost and stops the run at once.
    pub fn mark_lost(&self) {
        if !self.lost.swap(true, Ordering::SeqCst) {
            runfleet_ops::metrics::get().lease_losses.inc();
        }
        self.stop.cancel();
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Renews the lease (CAS on the last revision; a run held without a
    /// lease gets it created, see [`Held::create`]) and, unless the lease
    /// was lost, sends the job an in-progress ack. Both happen under the
    /// state lock, so neither can follow the run's [`Held::finish`]: no
    /// renewal races the release, and no in-progress ack follows the final
    /// ack or NAK (which would reset a delayed NAK's redelivery to the full
    /// ack wait). A failed CAS, or a create that finds the run claimed by
    /// someone else, marks the lease lost (stopping the run) before the lock
    /// is released. `Ok(false)` if the run is already done with its lease.
    pub async fn beat(&self, leases: &kv::Store, log: &RunLog<'_>) -> Result<bool, Error> {
        let mut state = self.state.lock().await;
        if state.done || self.is_lost() {
            return Ok(false);
        }
        let mut lease = state.lease.clone();
        lease.renewed_ms = time::now_ms();
        let written = if state.revision == NO_LEASE {
            self.create(leases, log, &lease).await
        } else {
            update(leases, &self.key, &lease, state.revision).await
        };
        let renewed = match written {
            Ok(revision) => {
                state.lease = lease;
                state.revision = revision;
                Ok(true)
            }
            // Marked under the lock, so a run that finishes after this
            // beat sees the loss and neither releases nor NAKs.
            Err(e @ Error::Lost { .. }) => {
                self.mark_lost();
                return Err(e);
            }
            // A transient failure: the lease survives until its TTL and the
            // next beat retries. Keep the job alive meanwhile.
            Err(e) => Err(e),
        };
        if let Err(e) = self.acker.ack_with(AckKind::Progress).await {
            warn!(run_id = %self.run_id, error = %e, "in-progress ack failed");
        }
        renewed
    }

    /// Creates the lease of a run claimed without one, then reads the run's
    /// last event: the lease is ours only if nobody but this attempt wrote
    /// to the log since the claim. A held key means another claimant (or a
    /// cancel) has the run. A free key proves less: an attempt paused past
    /// the job's ack wait may find it free because the job was redelivered
    /// and a newer attempt claimed the run, wrote to it and let go of the
    /// lease (parked, retried, handed off, or ended); its events are then
    /// the last ones, and the lease just created is deleted again, so the
    /// run's next claimant does not wait behind a lease nobody will use.
    async fn create(&self, leases: &kv::Store, log: &RunLog<'_>, lease: &Lease) -> Result<u64, Error> {
        let run_id = self.run_id;
        let revision = acquire(leases, &self.key, lease).await.map_err(|e| match e {
            Error::Held { run_id } => Error::Lost { run_id },
            e => e,
        })?;
        let last = events::read_last(log.events, log.names, &self.tenant, run_id).await;
        if matches!(&last, Ok(Some(last)) if written_by_claim(&last.event, lease)) {
            return Ok(revision);
        }
        if let Err(e) = release(leases, &self.key, run_id, revision).await {
            warn!(run_id = %run_id, error = %e, "could not delete a lease created too late; it will age out");
        }
        match last {
            Err(e) => Err(Error::Kv { run_id, message: format!("could not read the run's log: {e}") }),
            Ok(_) => Err(Error::Lost { run_id }),
        }
    }

    /// Ends the heartbeat's interest in this run and returns the revision to
    /// release the lease with, or `None` if that already happened or no
    /// lease was ever written. Call it before the run's final ack or NAK.
    pub async fn finish(&self) -> Option<u64> {
        let mut state = self.state.lock().await;
        if state.done {
            return None;
        }
        state.done = true;
        Some(state.revision).filter(|revision| *revision != NO_LEASE)
    }
}
