//! Claiming and executing one job: the run path of DESIGN.md, steps 2–5.
//!
//! Claim: decode the job, create the lease, read the run's last event. Run:
//! append `run.started`, execute the agent under the run's stop token. Finish:
//! append the terminal event, ack the job, release the lease. Whatever
//! happens between those steps is repaired by the next claimant, which sees
//! the terminal event and only acks.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::message::{AckKind, Acker};
use async_nats::jetstream::Message;
use futures::FutureExt;
use runfleet_protocol::event::{EventBody, RunCompleted, RunError, RunFailed, RunStarted};
use runfleet_protocol::job::Job;
use runfleet_protocol::lease::Lease;
use runfleet_protocol::{codec, time, ErrorCode, RunId};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::events::{self, EventLog, LastEvent};
use super::lease::{self, Held};
use super::Shared;
use crate::sdk::{AgentError, RunContext};

/// Handles one fetched job message to the end. Never panics on run-time
/// failures; every outcome is logged. `handoff` is cancelled when the worker
/// stops waiting for runs at shutdown.
pub(crate) async fn handle(shared: Arc<Shared>, message: Message, handoff: CancellationToken) {
    let (stream_seq, delivered) = match message.info() {
        Ok(info) => (info.stream_sequence, u64::try_from(info.delivered).unwrap_or(0)),
        Err(e) => {
            warn!(subject = %message.subject, error = %e, "job message has no JetStream metadata; ignored");
            return;
        }
    };
    let (message, acker) = message.split();
    let job: Job = match codec::decode(&message.payload) {
        Ok(job) => job,
        Err(e) => {
            error!(stream_seq, subject = %message.subject, error = %e, "undecodable job terminated");
            if let Err(e) = acker.ack_with(AckKind::Term).await {
                warn!(stream_seq, error = %e, "could not terminate undecodable job");
            }
            return;
        }
    };
    let Some(claim) = claim(&shared, job, acker, delivered).await else {
        return;
    };
    execute(&shared, claim, handoff).await;
}

/// A claimed run: the lease is held and the log position is known.
struct Claim {
    job: Job,
    acker: Acker,
    delivered: u64,
    key: String,
    lease: Lease,
    revision: u64,
    last: LastEvent,
}

async fn claim(shared: &Shared, job: Job, acker: Acker, delivered: u64) -> Option<Claim> {
    let run_id = job.run_id;
    let delay = shared.config.lease_held_delay;
    let key = shared.names.lease_key(run_id);
    let now = time::now_ms();
    let mut lease =
        Lease { run_id, worker_id: shared.id.clone(), attempt: 0, acquired_ms: now, renewed_ms: now };
    let revision = match lease::acquire(&shared.leases, &key, &lease).await {
        Ok(revision) => revision,
        Err(lease::Error::Held { .. }) => {
            debug!(run_id = %run_id, delivered, "run leased by another worker; job nak'd with delay");
            nak(&acker, run_id, Some(delay)).await;
            return None;
        }
        Err(e) => {
            warn!(run_id = %run_id, error = %e, "could not create lease; job nak'd with delay");
            nak(&acker, run_id, Some(delay)).await;
            return None;
        }
    };

    let last = match events::read_last(&shared.events, &shared.names, &job.tenant, run_id).await {
        Ok(Some(last)) => last,
        Ok(None) => {
            warn!(run_id = %run_id, "job has no run.created event; lease released, job nak'd with delay");
            release(shared, &key, run_id, revision).await;
            nak(&acker, run_id, Some(delay)).await;
            return None;
        }
        Err(e) => {
            warn!(run_id = %run_id, error = %e, "could not read the run's last event; lease released, job nak'd with delay");
            release(shared, &key, run_id, revision).await;
            nak(&acker, run_id, Some(delay)).await;
            return None;
        }
    };

    if last.event.body.is_terminal() {
        info!(
            run_id = %run_id,
            state = %last.event.state_after(),
            seq = last.event.seq,
            "job of a terminal run acked"
        );
        ack(&acker, run_id).await;
        release(shared, &key, run_id, revision).await;
        return None;
    }

    // Record the attempt in the lease (the revision is the fencing token).
    lease.attempt = last.event.attempt.saturating_add(1);
    let revision = match lease::update(&shared.leases, &key, &lease, revision).await {
        Ok(revision) => revision,
        Err(lease::Error::Lost { .. }) => {
            warn!(run_id = %run_id, "lease lost while claiming; run left alone");
            return None;
        }
        Err(e) => {
            warn!(run_id = %run_id, error = %e, "could not update lease; lease released, job nak'd with delay");
            release(shared, &key, run_id, revision).await;
            nak(&acker, run_id, Some(delay)).await;
            return None;
        }
    };
    Some(Claim { job, acker, delivered, key, lease, revision, last })
}

/// How a run attempt ended, before the job and lease are settled.
enum Outcome {
    /// A terminal event was written.
    Terminal,
    /// The run must stop without writing more: lease lost, handed off, or
    /// the log failed.
    Interrupted(Option<events::Error>),
}

#[tracing::instrument(skip_all, fields(run_id = %claim.job.run_id, attempt = claim.lease.attempt))]
async fn execute(shared: &Shared, claim: Claim, handoff: CancellationToken) {
    let Claim { job, acker, delivered, key, lease, revision, last } = claim;
    let run_id = job.run_id;
    let attempt = lease.attempt;
    let stop = handoff.child_token();
    let held = Held::new(run_id, key, lease, revision, acker, stop.clone());
    let _registration = shared.hold(held.clone());

    let log = EventLog::new(shared.js.clone(), shared.names.clone(), shared.id.clone(), attempt, &last);
    let mut ctx = RunContext::new(log, job.agent.clone(), job.input.clone(), stop.clone());

    let outcome = match shared.agents.get(&job.agent).cloned() {
        None => {
            let available: Vec<&str> = shared.agents.names().map(|n| n.as_str()).collect();
            let message = format!(
                "agent {} is not registered in worker {} (it has: {}); run it on a worker that registers the agent",
                job.agent,
                shared.id,
                available.join(", ")
            );
            warn!(run_id = %run_id, agent = %job.agent, "unknown agent; run failed");
            let body =
                EventBody::Failed(RunFailed { error: RunError { code: ErrorCode::UnknownAgent, message } });
            append_terminal(ctx.log_mut(), &stop, body).await
        }
        // Handed off before it began: write nothing.
        Some(_) if stop.is_cancelled() => Outcome::Interrupted(None),
        Some(agent) => {
            match ctx.log_mut().append(EventBody::Started(RunStarted { delivery: delivered })).await {
                Err(e) => Outcome::Interrupted(Some(e)),
                Ok(_) => {
                    info!(run_id = %run_id, attempt, agent = %job.agent, delivered, "run claimed");
                    let result = {
                        let run = AssertUnwindSafe(agent.run(&mut ctx, job.input)).catch_unwind();
                        tokio::select! {
                            biased;
                            () = stop.cancelled() => None,
                            result = run => Some(result),
                        }
                    };
                    let log = ctx.log_mut();
                    match result {
                        None => Outcome::Interrupted(None),
                        Some(Ok(Ok(output))) => {
                            info!(run_id = %run_id, attempt, "run completed");
                            append_terminal(log, &stop, EventBody::Completed(RunCompleted { output })).await
                        }
                        Some(Ok(Err(AgentError::Interrupted(e)))) => Outcome::Interrupted(Some(e)),
                        Some(Ok(Err(e))) => {
                            info!(run_id = %run_id, attempt, code = %e.code(), error = %e, "run failed");
                            let body = EventBody::Failed(RunFailed {
                                error: RunError { code: e.code(), message: e.to_string() },
                            });
                            append_terminal(log, &stop, body).await
                        }
                        Some(Err(panic)) => {
                            let message = format!("agent {} panicked: {}", job.agent, panic_message(&*panic));
                            error!(run_id = %run_id, attempt, agent = %job.agent, %message, "agent panicked; run failed");
                            let body = EventBody::Failed(RunFailed {
                                error: RunError { code: ErrorCode::AgentPanicked, message },
                            });
                            append_terminal(log, &stop, body).await
                        }
                    }
                }
            }
        }
    };

    match outcome {
        Outcome::Terminal => {
            // Terminal event first, then the job, then the lease: a crash in
            // between leaves a terminal run whose next claimant only acks.
            let revision = held.finish().await;
            ack(&held.acker, run_id).await;
            if let Some(revision) = revision {
                release(shared, &held.key, run_id, revision).await;
            }
        }
        Outcome::Interrupted(error) => {
            // After `finish` the heartbeat no longer renews the lease, so
            // whether it found the lease lost is settled. The log remembers a
            // refused append even if the agent swallowed the error and went
            // on to return something else.
            let revision = held.finish().await;
            let lost = held.is_lost()
                || ctx.log_mut().is_lost()
                || error.as_ref().is_some_and(events::Error::is_lease_lost);
            if lost {
                // Someone else owns the run now: write nothing, leave the job
                // and the lease to their new owner (or to redelivery).
                held.mark_lost();
                warn!(run_id = %run_id, attempt, "lease lost; run stopped without writing more");
            } else {
                // Hand off (shutdown) or an unknown log position (publish
                // failure): release and let another attempt continue.
                let delay = if handoff.is_cancelled() { None } else { Some(shared.config.lease_held_delay) };
                match &error {
                    Some(e) => {
                        warn!(run_id = %run_id, attempt, error = %e, "run interrupted; lease released, job nak'd")
                    }
                    None => {
                        info!(run_id = %run_id, attempt, "run handed off at shutdown; lease released, job nak'd")
                    }
                }
                if let Some(revision) = revision {
                    release(shared, &held.key, run_id, revision).await;
                }
                nak(&held.acker, run_id, delay).await;
            }
        }
    }
}

async fn append_terminal(log: &mut EventLog, stop: &CancellationToken, body: EventBody) -> Outcome {
    if stop.is_cancelled() {
        log.close();
        return Outcome::Interrupted(None);
    }
    match log.append(body).await {
        Ok(_) => Outcome::Terminal,
        Err(e) => Outcome::Interrupted(Some(e)),
    }
}

async fn ack(acker: &Acker, run_id: RunId) {
    if let Err(e) = acker.double_ack().await {
        warn!(run_id = %run_id, error = %e, "could not ack job; the next delivery will only ack it");
    }
}

async fn nak(acker: &Acker, run_id: RunId, delay: Option<Duration>) {
    // Confirmed, so a hand-off NAK is not lost when the worker disconnects.
    if let Err(e) = acker.double_ack_with(AckKind::Nak(delay)).await {
        warn!(run_id = %run_id, error = %e, "could not nak job; it will be redelivered after its ack wait");
    }
}

async fn release(shared: &Shared, key: &str, run_id: RunId, revision: u64) {
    if let Err(e) = lease::release(&shared.leases, key, run_id, revision).await {
        warn!(run_id = %run_id, error = %e, "could not release lease; it will age out");
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
