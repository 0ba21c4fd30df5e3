//! The worker's entry in the workers KV bucket: who it is, what it serves and
//! how busy it is, refreshed every bucket `max_age`/3 so the entry ages out
//! when the worker dies, and deleted on a clean shutdown.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use runfleet_protocol::worker::WorkerInfo;
use runfleet_protocol::{codec, time};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Shared;

/// Why the worker could not register.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("worker info could not be encoded: {0}")]
    Encode(#[from] codec::Error),
    #[error("worker info could not be written to the workers bucket: {0}")]
    Put(#[from] kv::PutError),
}

/// The refresh period for a bucket whose entries live `ttl`.
pub(crate) fn period(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(10))
}

/// Writes the worker's current info.
pub(crate) async fn put(shared: &Shared) -> Result<(), Error> {
    let info = WorkerInfo {
        worker_id: shared.id.clone(),
        queues: shared.config.queues.clone(),
        agents: shared.agents.names().map(|n| n.as_str().to_owned()).collect(),
        slots: shared.config.slots,
        running: u32::try_from(shared.held_count()).unwrap_or(u32::MAX),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        hostname: hostname(),
        pid: std::process::id(),
        started_ms: shared.started_ms,
        heartbeat_ms: time::now_ms(),
    };
    let value = codec::encode(&info)?;
    shared.workers.put(shared.names.worker_key(&shared.id), value.into()).await?;
    Ok(())
}

/// Refreshes the entry until `shutdown`, then deletes it.
pub(crate) async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(period(shared.workers_ttl));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Err(e) = put(&shared).await {
            warn!(worker_id = %shared.id, error = %e, "worker registry refresh failed");
        }
    }
    match shared.workers.delete(shared.names.worker_key(&shared.id)).await {
        Ok(()) => info!(worker_id = %shared.id, "worker deregistered"),
        Err(e) => warn!(worker_id = %shared.id, error = %e, "could not deregister; the entry will age out"),
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}
