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
use runfleet_protocol::event::{
    EventBody, RunCompleted, RunError, RunFailed, RunResumed, RunRetrying, RunStarted,
};
use runfleet_protocol::job::Job;
use runfleet_protocol::lease::Lease;
use runfleet_protocol::{codec, time, ErrorCode, RunId};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::checkpoints::{CheckpointLog, Writer};
use super::events::{self, EventLog, LastEvent};
use super::lease::{self, Held};
use super::Shared;
use crate::sdk::{AgentError, Interruption, RunContext};

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

/// A claimed run: the lease is held, the attempt's first event
/// (`run.started` or `run.resumed`) is written and, for a resume, the
/// checkpoints are loaded and fenced.
struct Claim {
    job: Job,
    acker: Acker,
    key: String,
    lease: Lease,
    revision: u64,
    log: EventLog,
    checkpoints: CheckpointLog,
}

/// How often a claim starts over when an earlier attempt wrote to the log
/// between our read and our first append (it had not noticed yet that its
/// lease expired).
const CLAIM_ROUNDS: u32 = 5;
/// The smallest delay of a NAK for a job whose run is leased elsewhere.
const MIN_HELD_DELAY: Duration = Duration::from_millis(100);

async fn claim(shared: &Shared, job: Job, acker: Acker, delivered: u64) -> Option<Claim> {
    let run_id = job.run_id;
    let delay = shared.config.lease_held_delay;
    let key = shared.names.lease_key(run_id);
    let now = time::now_ms();
    let mut lease =
        Lease { run_id, worker_id: shared.id.clone(), attempt: 0, acquired_ms: now, renewed_ms: now };
    let mut revision = match lease::acquire(&shared.leases, &key, &lease).await {
        Ok(revision) => revision,
        Err(lease::Error::Held { .. }) => {
            // Come back when the holder's lease would have expired, so a
            // crashed holder's run fails over within about one lease TTL.
            let delay = held_delay(shared, &key).await.unwrap_or(delay);
            debug!(run_id = %run_id, delivered, delay_ms = delay.as_millis() as u64, "run leased by another worker; job nak'd with delay");
            nak(&acker, run_id, Some(delay)).await;
            return None;
        }
        Err(e) => {
            warn!(run_id = %run_id, error = %e, "could not create lease; job nak'd with delay");
            nak(&acker, run_id, Some(delay)).await;
            return None;
        }
    };

    for _ in 0..CLAIM_ROUNDS {
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

        let attempt = last.event.attempt.saturating_add(1);
        if attempt > job.max_attempts {
            // Written as the last attempt: no new attempt starts.
            let mut log = EventLog::new(
                shared.js.clone(),
                shared.names.clone(),
                shared.id.clone(),
                last.event.attempt,
                &last,
            );
            let body = EventBody::Failed(RunFailed { error: attempts_exhausted(&job, &last) });
            match log.append(body).await {
                Ok(_) => {
                    warn!(run_id = %run_id, attempts = last.event.attempt, max_attempts = job.max_attempts, "run failed: max_attempts used up");
                    ack(&acker, run_id).await;
                    release(shared, &key, run_id, revision).await;
                    return None;
                }
                Err(e) if e.is_lease_lost() => match still_ours(shared, &key, &lease, revision).await {
                    Some(renewed) => {
                        revision = renewed;
                        continue;
                    }
                    None => return None,
                },
                Err(e) => {
                    warn!(run_id = %run_id, error = %e, "could not fail the run; lease released, job nak'd with delay");
                    release(shared, &key, run_id, revision).await;
                    nak(&acker, run_id, Some(delay)).await;
                    return None;
                }
            }
        }

        // Record the attempt in the lease; its new revision is the
        // attempt's fencing token.
        lease.attempt = attempt;
        revision = match lease::update(&shared.leases, &key, &lease, revision).await {
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

        // An attempt wrote its first event before anything else, so a run
        // whose last event is `run.created` has no checkpoints.
        let resume = last.event.attempt > 0;
        let writer = Writer { worker_id: shared.id.clone(), attempt, fencing_token: revision };
        let checkpoints = if resume {
            match CheckpointLog::resume(shared.checkpoint_stores(), run_id, writer).await {
                Ok(checkpoints) => checkpoints,
                Err(e) => {
                    warn!(run_id = %run_id, error = %e, "could not load the run's checkpoints; lease released, job nak'd with delay");
                    release(shared, &key, run_id, revision).await;
                    nak(&acker, run_id, Some(delay)).await;
                    return None;
                }
            }
        } else {
            CheckpointLog::fresh(shared.checkpoint_stores(), run_id, writer)
        };

        let mut log =
            EventLog::new(shared.js.clone(), shared.names.clone(), shared.id.clone(), attempt, &last);
        if shared.agents.get(&job.agent).is_none() {
            // Nothing starts: `execute` fails the run naming the agent.
            return Some(Claim { job, acker, key, lease, revision, log, checkpoints });
        }
        let first = if resume {
            EventBody::Resumed(RunResumed {
                delivery: delivered,
                steps_replayed: checkpoints.recorded_count(),
            })
        } else {
            EventBody::Started(RunStarted { delivery: delivered })
        };
        match log.append(first).await {
            Ok(_) => {
                if resume {
                    info!(run_id = %run_id, attempt, delivered, steps_replayed = checkpoints.recorded_count(), "run resumed");
                }
                return Some(Claim { job, acker, key, lease, revision, log, checkpoints });
            }
            // An earlier attempt wrote after our read: if the lease is still
            // ours it has just not noticed yet; read again.
            Err(e) if e.is_lease_lost() => match still_ours(shared, &key, &lease, revision).await {
                Some(renewed) => revision = renewed,
                None => return None,
            },
            Err(e) => {
                warn!(run_id = %run_id, error = %e, "could not start the run; lease released, job nak'd with delay");
                release(shared, &key, run_id, revision).await;
                nak(&acker, run_id, Some(delay)).await;
                return None;
            }
        }
    }
    warn!(run_id = %run_id, rounds = CLAIM_ROUNDS, "run's log kept moving while claiming; lease released, job nak'd with delay");
    release(shared, &key, run_id, revision).await;
    nak(&acker, run_id, Some(delay)).await;
    None
}

/// Renews the lease to prove it is still ours; `None` (after logging) if it
/// is not.
async fn still_ours(shared: &Shared, key: &str, lease: &Lease, revision: u64) -> Option<u64> {
    match lease::update(&shared.leases, key, lease, revision).await {
        Ok(revision) => Some(revision),
        Err(e) => {
            warn!(run_id = %lease.run_id, error = %e, "lease not ours any more while claiming; run left alone");
            None
        }
    }
}

/// How long until the lease at `key` expires if its holder stops renewing.
async fn held_delay(shared: &Shared, key: &str) -> Option<Duration> {
    let entry = shared.leases.entry(key).await.ok()??;
    let held: Lease = codec::decode(&entry.value).ok()?;
    let age = u64::try_from(time::now_ms().saturating_sub(held.renewed_ms)).unwrap_or(0);
    let remaining = shared.lease_ttl.saturating_sub(Duration::from_millis(age));
    Some(remaining.clamp(MIN_HELD_DELAY, shared.lease_ttl))
}

/// The failure of a run that used up its attempts, saying how the last one
/// ended.
fn attempts_exhausted(job: &Job, last: &LastEvent) -> RunError {
    let how = match &last.event.body {
        EventBody::Retrying(retrying) => format!("the last one failed: {}", retrying.error.message),
        _ => {
            let worker = last
                .event
                .worker_id
                .as_ref()
                .map_or_else(|| "a worker".to_owned(), |w| format!("worker {w}"));
            format!("the last one (on {worker}) stopped without finishing: its worker crashed, lost the run's lease or was stopped")
        }
    };
    RunError {
        code: ErrorCode::MaxAttemptsExceeded,
        message: format!(
            "run {} used all {} of its attempts (max_attempts {}); {how}",
            job.run_id, last.event.attempt, job.max_attempts
        ),
    }
}

/// How a run attempt ended, before the job and lease are settled.
enum Outcome {
    /// A terminal event was written.
    Terminal,
    /// The run must stop without writing more: lease lost, handed off, a
    /// write failed, or (with `run.retrying` written) retried later.
    Interrupted(Option<Interruption>),
}

#[tracing::instrument(skip_all, fields(run_id = %claim.job.run_id, attempt = claim.lease.attempt))]
async fn execute(shared: &Shared, claim: Claim, handoff: CancellationToken) {
    let Claim { job, acker, key, lease, revision, log, checkpoints } = claim;
    let run_id = job.run_id;
    let attempt = lease.attempt;
    let stop = handoff.child_token();
    let held = Held::new(run_id, key, lease, revision, acker, stop.clone());
    let _registration = shared.hold(held.clone());

    let mut ctx = RunContext::new(log, checkpoints, job.agent.clone(), job.input.clone(), stop.clone());
    let mut retry_in = None;

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
        // Handed off before it began: write nothing more.
        Some(_) if stop.is_cancelled() => Outcome::Interrupted(None),
        Some(agent) => {
            info!(run_id = %run_id, attempt, agent = %job.agent, steps_recorded = ctx.steps_recorded(), "run claimed");
            let result = {
                let run = AssertUnwindSafe(agent.run(&mut ctx, job.input)).catch_unwind();
                tokio::select! {
                    biased;
                    () = stop.cancelled() => None,
                    result = run => Some(result),
                }
            };
            let fatal = ctx.fatal().cloned();
            let log = ctx.log_mut();
            match result {
                None => Outcome::Interrupted(None),
                Some(Ok(Err(AgentError::Interrupted(e)))) => Outcome::Interrupted(Some(e)),
                // A divergence fails the run whatever the agent made of it.
                Some(Ok(_)) if fatal.is_some() => {
                    let (code, message) = fatal.unwrap_or((ErrorCode::Internal, String::new()));
                    warn!(run_id = %run_id, attempt, %code, %message, "run failed");
                    append_terminal(
                        log,
                        &stop,
                        EventBody::Failed(RunFailed { error: RunError { code, message } }),
                    )
                    .await
                }
                Some(Ok(Ok(output))) => {
                    info!(run_id = %run_id, attempt, "run completed");
                    append_terminal(log, &stop, EventBody::Completed(RunCompleted { output })).await
                }
                Some(Ok(Err(e @ AgentError::Retryable { .. }))) if attempt < job.max_attempts => {
                    let delay = retry_delay(shared, attempt);
                    info!(run_id = %run_id, attempt, error = %e, retry_in_ms = delay.as_millis() as u64, "run attempt failed; retrying");
                    let error = RunError { code: e.code(), message: e.to_string() };
                    let body = EventBody::Retrying(RunRetrying {
                        error,
                        retry_in_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    });
                    match append_terminal(log, &stop, body).await {
                        Outcome::Terminal => {
                            retry_in = Some(delay);
                            Outcome::Interrupted(None)
                        }
                        interrupted => interrupted,
                    }
                }
                Some(Ok(Err(e))) => {
                    info!(run_id = %run_id, attempt, code = %e.code(), error = %e, "run failed");
                    let (code, message) = match &e {
                        AgentError::Retryable { .. } => (
                            ErrorCode::MaxAttemptsExceeded,
                            format!(
                                "run {run_id} used all {attempt} of its attempts (max_attempts {}); the last one failed: {e}",
                                job.max_attempts
                            ),
                        ),
                        _ => (e.code(), e.to_string()),
                    };
                    append_terminal(
                        log,
                        &stop,
                        EventBody::Failed(RunFailed { error: RunError { code, message } }),
                    )
                    .await
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
            // whether it found the lease lost is settled. The logs remember a
            // refused write even if the agent swallowed the error and went
            // on to return something else.
            let revision = held.finish().await;
            let refused = ctx.is_lost() || error.as_ref().is_some_and(|e| e.is_lease_lost());
            if refused || held.is_lost() {
                // Someone else owns the run now: write nothing, leave the job
                // and the lease to their new owner (or to redelivery).
                held.mark_lost();
                if refused {
                    warn!(run_id = %run_id, attempt, "lease lost: the server refused a write (a newer attempt owns the run); run stopped without writing more");
                } else {
                    warn!(run_id = %run_id, attempt, "lease lost: the heartbeat found the lease changed; run stopped without writing more");
                }
            } else {
                // A retry after backoff, a hand-off (shutdown) or an unknown
                // log position (publish failure): release and let another
                // attempt continue.
                let delay = match retry_in {
                    Some(delay) => Some(delay),
                    None if handoff.is_cancelled() => None,
                    None => Some(shared.config.lease_held_delay),
                };
                match &error {
                    Some(e) => {
                        warn!(run_id = %run_id, attempt, error = %e, "run interrupted; lease released, job nak'd")
                    }
                    None if retry_in.is_some() => {}
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

/// The delay before attempt `attempt + 1` of a run whose attempt failed
/// with a retryable error: exponential from `retry_backoff_min`, capped.
fn retry_delay(shared: &Shared, attempt: u32) -> Duration {
    let min = shared.config.retry_backoff_min;
    let max = shared.config.retry_backoff_max.max(min);
    min.saturating_mul(1u32 << attempt.saturating_sub(1).min(20)).min(max)
}

async fn append_terminal(log: &mut EventLog, stop: &CancellationToken, body: EventBody) -> Outcome {
    if stop.is_cancelled() {
        log.close();
        return Outcome::Interrupted(None);
    }
    match log.append(body).await {
        Ok(_) => Outcome::Terminal,
        Err(e) => Outcome::Interrupted(Some(e.into())),
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
