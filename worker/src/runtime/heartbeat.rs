//! The worker's one heartbeat task: renews every held lease and keeps every
//! running job's message alive.
//!
//! Every period it CAS-updates each held lease on the revision this worker
//! last wrote (or creates the lease of a run claimed without one, see
//! `lease::Held::beat`) and sends an in-progress ack for the run's job. A
//! failed CAS means the lease is lost: the run is stopped at once (its agent
//! future is dropped) and writes nothing more. The cost is O(running runs)
//! KV updates per period.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::lease::{self, Held, RunLog};
use super::Shared;

/// The heartbeat period: a third of the shorter of the lease TTL and the
/// job ack wait, so a lease survives two missed beats and a job's ack wait
/// never runs out while its run is alive.
pub(crate) fn period(lease_ttl: Duration, ack_wait: Duration) -> Duration {
    (lease_ttl.min(ack_wait) / 3).max(Duration::from_millis(10))
}

/// Runs until `shutdown` is cancelled. Cancel it only after every run ended,
/// so draining runs stay leased.
pub(crate) async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let period = shared.heartbeat_interval;
    debug!(period_ms = period.as_millis() as u64, "heartbeat started");
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first tick completes at once: a run claimed just now needs no beat.
    tick.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let held = shared.held_runs();
        futures::future::join_all(held.iter().map(|h| beat(&shared, h))).await;
    }
}

async fn beat(shared: &Shared, held: &Arc<Held>) {
    let metrics = runfleet_ops::metrics::get();
    let log = RunLog { events: &shared.events, names: &shared.names };
    match held.beat(&shared.leases, &log).await {
        Ok(true) => metrics.lease_renewals.inc(),
        Ok(false) => {}
        // Counted in `mark_lost`, once per lease, however the loss was found.
        Err(lease::Error::Lost { .. }) => {
            warn!(run_id = %held.run_id, "lease lost (changed by someone else); run stopped");
        }
        Err(e) => warn!(run_id = %held.run_id, error = %e, "lease renewal failed; retrying next beat"),
    }
}
