//! Run leases in the leases KV bucket and the table of runs this worker holds.
//!
//! A lease is created with KV `create` (refused if another worker holds it),
//! renewed by CAS `update` on the revision this worker last wrote, and
//! released with a revision-checked delete. The bucket's `max_age` is the
//! lease TTL: a lease that is not renewed ages out, which is how a crashed
//! worker's runs become claimable again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use async_nats::jetstream::message::Acker;
use runfleet_protocol::lease::Lease;
use runfleet_protocol::{codec, time, RunId};
use tokio_util::sync::CancellationToken;

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
        key: String,
        lease: Lease,
        revision: u64,
        acker: Acker,
        stop: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            run_id,
            key,
            state: tokio::sync::Mutex::new(LeaseState { lease, revision, done: false }),
            acker,
            stop,
            lost: AtomicBool::new(false),
        })
    }

    /// Marks the lease lost and stops the run at once.
    pub fn mark_lost(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.stop.cancel();
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Renews the lease (CAS on the last revision). `Ok(false)` if the run
    /// already released it.
    pub async fn renew(&self, leases: &kv::Store) -> Result<bool, Error> {
        let mut state = self.state.lock().await;
        if state.done || self.is_lost() {
            return Ok(false);
        }
        let mut lease = state.lease.clone();
        lease.renewed_ms = time::now_ms();
        let revision = update(leases, &self.key, &lease, state.revision).await?;
        state.lease = lease;
        state.revision = revision;
        Ok(true)
    }

    /// Releases the lease with a revision-checked delete; the heartbeat stops
    /// renewing it either way.
    pub async fn release(&self, leases: &kv::Store) -> Result<(), Error> {
        let mut state = self.state.lock().await;
        if state.done {
            return Ok(());
        }
        state.done = true;
        release(leases, &self.key, self.run_id, state.revision).await
    }

    /// Stops renewing without touching the lease (it was lost).
    pub async fn abandon(&self) {
        self.state.lock().await.done = true;
    }
}
