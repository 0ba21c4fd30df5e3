//! `signal` and `cancel`: the verbs that move a run from outside.
//!
//! `signal` stores a value under a key for a run (KV `create`: the first
//! signal for a key wins and never changes, so every attempt of the run reads
//! the same value) and, if the run is parked waiting on that key, publishes
//! its wake job. The worker that parked the run publishes the same job under
//! the same message id when it finds the signal already there, so a wake is
//! dispatched once however the two race.
//!
//! `cancel` records the request in the control bucket (every worker watches
//! it, and checks it when claiming), then tries to take the run's lease. With
//! the lease, the coordinator writes `run.cancelled` itself and removes the
//! run's job and timer; without it, the worker holding the run writes it.
//! Either way the run gets exactly one terminal event: appends carry the
//! expected last subject sequence.

use runfleet_protocol::api::{CancelRequest, CancelResponse, SignalRequest, SignalResponse};
use runfleet_protocol::control::CancelRecord;
use runfleet_protocol::event::EventBody;
use runfleet_protocol::signal::SignalRecord;
use runfleet_protocol::{time, ApiError, ErrorCode, RunState, TenantId};
use tracing::{info, instrument};

use super::read::not_found;
use super::{runs_error, Api};
use crate::runs::{Cancelled, RunFacts, StartedRun};

impl Api {
    #[instrument(skip_all, fields(tenant = %tenant))]
    pub(super) async fn signal(
        &self,
        tenant: TenantId,
        request: SignalRequest,
    ) -> Result<SignalResponse, ApiError> {
        let (run, key, payload) = request.validate(self.inner.limits.max_signal_bytes)?;
        let runs = &self.inner.runs;
        let facts = runs.facts(&tenant, run).await.map_err(runs_error)?.ok_or_else(|| not_found(run))?;
        let state = facts.last.event.state_after();
        if state.is_terminal() {
            return Err(ApiError::new(
                ErrorCode::RunTerminal,
                format!("run {run} is already terminal ({state}); a signal can no longer reach it"),
            ));
        }
        let record = SignalRecord { payload, received_ms: time::now_ms() };
        let created = match runs.create_signal(run, &key, &record).await.map_err(runs_error)? {
            None => true,
            Some(existing) if existing.payload == record.payload => false,
            Some(_) => {
                return Err(ApiError {
                    code: ErrorCode::Conflict,
                    message: format!(
                        "signal {key} of run {run} was already sent with a different payload; \
                         the first signal for a key wins, use another key for another value"
                    ),
                    field: Some("payload".to_owned()),
                });
            }
        };
        // Read the log again: the run may have parked on the key since the
        // first read (then its worker saw no signal, and the wake is ours).
        let last = runs.last_event(&tenant, run).await.map_err(runs_error)?.ok_or_else(|| not_found(run))?;
        let state = last.event.state_after();
        let waiting_on_key =
            matches!(&last.event.body, EventBody::Waiting(w) if w.key.as_ref() == Some(&key));
        let mut woke = false;
        if waiting_on_key {
            let facts = RunFacts { job: facts.job, last };
            woke = self.wake(&facts).await?;
        }
        info!(run_id = %run, key = %key, created, woke, "signal stored");
        Ok(SignalResponse { run_id: run, key, created, woke, state })
    }

    /// Dispatches the wake job of a run parked by its last event, under the
    /// wake message id the worker uses too. Published even when a job for
    /// the run is already queued: that job may be an early one a worker is
    /// about to drop (it read the signal before it was stored), and a
    /// duplicate wake is harmless (its claimant finds the run running or
    /// terminal, or the wait over and the run already resumed).
    async fn wake(&self, facts: &RunFacts) -> Result<bool, ApiError> {
        let msg_id = self.inner.names.wake_msg_id(facts.job.run_id, facts.last.event.seq);
        self.inner.runs.publish_job(&facts.job, &msg_id).await.map_err(runs_error)?;
        Ok(true)
    }

    #[instrument(skip_all, fields(tenant = %tenant))]
    pub(super) async fn cancel(
        &self,
        tenant: TenantId,
        request: CancelRequest,
    ) -> Result<CancelResponse, ApiError> {
        let (run, reason) = request.validate()?;
        let runs = &self.inner.runs;
        let facts = runs.facts(&tenant, run).await.map_err(runs_error)?.ok_or_else(|| not_found(run))?;
        let state = facts.last.event.state_after();
        if state.is_terminal() {
            return Ok(CancelResponse { run_id: run, state, cancelled: false });
        }
        let record = CancelRecord { reason, requested_ms: time::now_ms() };
        runs.request_cancel(run, &record).await.map_err(runs_error)?;
        let outcome = runs
            .cancel_unowned(&tenant, &facts.job, facts.last.event.attempt, &record, StartedRun::AskTheWorker)
            .await
            .map_err(runs_error)?;
        let reply = match outcome {
            Cancelled::Written => CancelResponse { run_id: run, state: RunState::Cancelled, cancelled: true },
            Cancelled::AlreadyTerminal(state) => CancelResponse { run_id: run, state, cancelled: false },
            Cancelled::LeaseHeld { holder } => {
                info!(run_id = %run, holder = ?holder.as_ref().map(ToString::to_string), "cancel requested from the run's lease holder");
                CancelResponse { run_id: run, state: RunState::Running, cancelled: true }
            }
        };
        Ok(reply)
    }
}
