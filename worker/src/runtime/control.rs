//! Cancel requests: the worker's watch on the control bucket.
//!
//! The coordinator writes a [`CancelRecord`] under `<run_id>` before it acts
//! on a cancel. A worker claiming a run reads the key once (cancelled while
//! waiting, or while its last worker held it), and one watch per worker
//! delivers every later request to the runs it is claiming or running, so a
//! running run stops within moments of the request, not at its next step. A
//! run registers its interest ([`Cancels::register`]) *before* it reads the
//! key, so a request is either seen by that read or delivered by the watch.
//!
//! A submission's first claim reads no key and creates no lease: it
//! registers and runs. A cancel that came earlier wrote `run.cancelled` (the
//! claim's first append is refused); one that finds the run started (or its
//! lease held) writes its record again, after the registration, and the
//! watch delivers that one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use futures::StreamExt;
use runfleet_protocol::control::CancelRecord;
use runfleet_protocol::{codec, Names, RunId};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long the watch waits before re-subscribing after it ended.
const REWATCH_DELAY: Duration = Duration::from_millis(500);

/// One claim's interest in cancel requests for its run.
#[derive(Debug, Default)]
pub(crate) struct CancelSlot {
    token: CancellationToken,
    record: Mutex<Option<CancelRecord>>,
}

impl CancelSlot {
    fn deliver(&self, record: CancelRecord) {
        self.record.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(record);
        self.token.cancel();
    }

    /// The request, once one arrived.
    pub fn request(&self) -> Option<CancelRecord> {
        self.record.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Completes when a request arrives. Cancellation safe.
    pub async fn requested(&self) {
        self.token.cancelled().await;
    }

    pub fn is_requested(&self) -> bool {
        self.token.is_cancelled()
    }
}

/// The runs this worker claims or runs, by run id, for the watch to notify.
#[derive(Debug, Default)]
pub(crate) struct Cancels {
    slots: Mutex<HashMap<u64, (RunId, Arc<CancelSlot>)>>,
    next: AtomicU64,
}

impl Cancels {
    /// Registers interest in `run`'s cancel requests until the guard drops.
    pub fn register(self: &Arc<Self>, run: RunId) -> CancelGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(CancelSlot::default());
        self.slots.lock().unwrap_or_else(PoisonError::into_inner).insert(id, (run, slot.clone()));
        CancelGuard { cancels: self.clone(), id, slot }
    }

    fn deliver(&self, run: RunId, record: &CancelRecord) -> usize {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let mut delivered = 0;
        for (slot_run, slot) in slots.values() {
            if *slot_run == run {
                slot.deliver(record.clone());
                delivered += 1;
            }
        }
        delivered
    }

    fn runs(&self) -> Vec<RunId> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner).values().map(|(run, _)| *run).collect()
    }
}

/// Keeps a run's [`CancelSlot`] registered.
#[derive(Debug)]
pub(crate) struct CancelGuard {
    cancels: Arc<Cancels>,
    id: u64,
    slot: Arc<CancelSlot>,
}

impl CancelGuard {
    pub fn slot(&self) -> &Arc<CancelSlot> {
        &self.slot
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.cancels.slots.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.id);
    }
}

/// Reads `run`'s cancel request, if any. A read failure is reported as
/// `Err`; the caller decides whether to go on.
pub(crate) async fn read(
    control: &kv::Store,
    names: &Names,
    run: RunId,
) -> Result<Option<CancelRecord>, String> {
    let entry = control.get(names.control_key(run)).await.map_err(|e| e.to_string())?;
    match entry {
        None => Ok(None),
        Some(bytes) => codec::decode(&bytes).map(Some).map_err(|e| e.to_string()),
    }
}

/// Watches the control bucket until `shutdown`, delivering each cancel
/// request to the registered runs. When the watch ends (a server restart),
/// it subscribes again and re-reads the key of every registered run, so a
/// request made while it was not watching is not missed. `watching` is
/// cancelled once the first subscription is in place and checked: the
/// worker claims nothing before (a claim's cancel then always comes from
/// its own read or from this watch, never from the start-up re-read).
pub(crate) async fn watch(
    control: kv::Store,
    names: Names,
    cancels: Arc<Cancels>,
    watching: CancellationToken,
    shutdown: CancellationToken,
) {
    let mut first = true;
    loop {
        let watch = tokio::select! {
            () = shutdown.cancelled() => return,
            watch = control.watch_all() => watch,
        };
        let mut entries = match watch {
            Ok(entries) => entries,
            Err(e) => {
                warn!(error = %e, "could not watch the control bucket; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(REWATCH_DELAY) => continue,
                }
            }
        };
        // A request written before the subscription was in place reached
        // neither the watch nor (if it read before the write) a claim that
        // registered meanwhile: re-read every registered run's key.
        recheck(&control, &names, &cancels).await;
        watching.cancel();
        if !first {
            debug!("watching the control bucket again");
        }
        first = false;
        loop {
            let entry = tokio::select! {
                () = shutdown.cancelled() => return,
                entry = entries.next() => entry,
            };
            match entry {
                Some(Ok(entry)) if entry.operation == Operation::Put => {
                    let Some(run) = names.parse_control_key(&entry.key) else { continue };
                    match codec::decode::<CancelRecord>(&entry.value) {
                        Ok(record) => {
                            let delivered = cancels.deliver(run, &record);
                            if delivered > 0 {
                                info!(run_id = %run, "cancel requested for a run of this worker");
                            }
                        }
                        Err(e) => warn!(key = %entry.key, error = %e, "undecodable cancel request ignored"),
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    warn!(error = %e, "control watch failed; watching again");
                    break;
                }
                None => {
                    debug!("control watch ended; watching again");
                    break;
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(REWATCH_DELAY) => {}
        }
    }
}

/// Re-reads the cancel key of every registered run.
async fn recheck(control: &kv::Store, names: &Names, cancels: &Cancels) {
    for run in cancels.runs() {
        match read(control, names, run).await {
            Ok(Some(record)) => {
                cancels.deliver(run, &record);
            }
            Ok(None) => {}
            Err(e) => warn!(run_id = %run, error = %e, "could not re-read cancel request"),
        }
    }
}
