//! Claiming and executing one job: the run path of DESIGN.md, steps 2–5.
//!
//! Claim: decode the job, create the lease, read the run's last event (a
//! submission's first claim does neither: see `claim`). Run:
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
use runfleet_ops::telemetry;
use runfleet_protocol::control::CancelRecord;
use runfleet_protocol::event::{
    EventBody, RunCancelled, RunCompleted, RunError, RunFailed, RunHandoff, RunResumed, RunRetrying,
    RunStarted, RunWaiting,
};
use runfleet_protocol::job::Job;
use runfleet_protocol::lease::Lease;
use runfleet_protocol::{codec, time, ErrorCode, RunId};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::checkpoints::{CheckpointLog, Writer};
use super::control::{self, CancelSlot};
use super::events::{self, EventLog, LastEvent};
use super::lease::{self, Held};
use super::{wake, Shared};
use crate::sdk::{AgentError, ContextParts, Interruption, Park, RunContext};

/// The stop tokens a run task gets from the pull loop at shutdown.
#[derive(Clone, Debug)]
pub(crate) struct Shutdown {
    /// Cancelled when the shutdown grace is over: runs hand off at their
    /// next step boundary.
    pub drain: CancellationToken,
    /// Cancelled when the hand-off timeout is over too: runs are stopped
    /// wherever they are and handed off.
    pub handoff: CancellationToken,
}

/// Handles one fetched job message to the end. Never panics on run-time
/// failures; every outcome is logged.
pub(crate) async fn handle(shared: Arc<Shared>, message: Message, shutdown: Shutdown) {
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
    // One span per attempt, in the trace of the run's submission: its
    // fields are on every log line and its steps are its children.
    let span = info_span!(
        "run",
        otel.name = %format!("run {}", job.agent),
        otel.kind = "consumer",
        run_id = %job.run_id,
        tenant = %job.tenant,
        agent = %job.agent,
        worker_id = %shared.id,
        attempt = tracing::field::Empty,
    );
    telemetry::set_parent(&span, job.traceparent.as_deref());
    async move {
        debug!(stream_seq, delivered, "job received");
        // Registered before the claim reads the control bucket, so a cancel
        // request is either seen by that read or delivered by the watch.
        let cancel = shared.cancels.register(job.run_id);
        // Both futures are boxed: inline they made this task's future about
        // 15 KB, which tokio copies whole when the pull loop spawns the task
        // and again when it ends.
        let Some(claim) = Box::pin(claim(&shared, job, acker, delivered, cancel.slot())).await else {
            return;
        };
        tracing::Span::current().record("attempt", claim.lease.attempt);
        Box::pin(execute(&shared, claim, cancel.slot(), shutdown)).await;
    }
    .instrument(span)
    .await;
}

/// A claimed run: the lease is held, the attempt's first event is written
/// (`run.resumed`) or about to be (`run.started`, in `started`) and, for a
/// resume, the checkpoints are loaded and fenced.
struct Claim {
    job: Job,
    acker: Acker,
    key: String,
    lease: Lease,
    revision: u64,
    log: EventLog,
    checkpoints: CheckpointLog,
    /// Failed attempts before this one (see `RunResumed::failures`).
    failures: u32,
    /// A fresh run's `run.started` on the job's first delivery, held to
    /// share one message with the run's next event (see
    /// [`EventLog::hold`]): nothing the agent does before that append is
    /// recorded, so nothing depends on it being stored first, and the append
    /// is fenced on `run.created` all the same.
    started: Option<EventBody>,
}

/// How often a claim starts over when an earlier attempt wrote to the log
/// between our read and our first append (it had not noticed yet that its
/// lease expired).
const CLAIM_ROUNDS: u32 = 5;
/// How often a cancel re-reads the log after the agent was dropped
/// mid-append.
const CANCEL_ROUNDS: u32 = 5;
/// The smallest delay of a NAK for a job whose run is leased elsewhere.
const MIN_HELD_DELAY: Duration = Duration::from_millis(100);

/// What a claimant does with a run whose last event parked it.
enum Parked {
    /// Not parked, or its wait is over: run it.
    Due,
    /// Still waiting: the job is early (a duplicate wake or a stray timer).
    /// Re-arm the timer for this deadline, if any, and drop the job.
    NotYet { deadline_ms: Option<i64> },
}

async fn parked(shared: &Shared, last: &LastEvent) -> Parked {
    let now = time::now_ms();
    match &last.event.body {
        EventBody::Waiting(waiting) => {
            if waiting.deadline_ms.is_some_and(|deadline| now >= deadline) {
                return Parked::Due;
            }
            if let Some(key) = &waiting.key {
                match wake::signal_arrived(shared, last.event.run_id, key).await {
                    Ok(true) => return Parked::Due,
                    Ok(false) => {}
                    // Run it: the attempt reads the signal again and parks
                    // once more if it is not there.
                    Err(e) => {
                        warn!(run_id = %last.event.run_id, error = %e, "could not check the awaited signal; resuming the run to find out");
                        return Parked::Due;
                    }
                }
            }
            Parked::NotYet { deadline_ms: waiting.deadline_ms }
        }
        EventBody::Retrying(retrying) => {
            let due = retrying.due_ms(last.event.ts_ms);
            if now >= due {
                Parked::Due
            } else {
                Parked::NotYet { deadline_ms: Some(due) }
            }
        }
        _ => Parked::Due,
    }
}

async fn claim(
    shared: &Shared,
    job: Job,
    acker: Acker,
    delivered: u64,
    cancel: &CancelSlot,
) -> Option<Claim> {
    let run_id = job.run_id;
    let delay = shared.config.lease_held_delay;
    let key = shared.names.lease_key(run_id);

    let lease_for = |attempt| {
        let now = time::now_ms();
        Lease { run_id, worker_id: shared.id.clone(), attempt, acquired_ms: now, renewed_ms: now }
    };
    // A submission's own job on its first delivery names the stream sequence
    // of its run's `run.created` (the fast claim): the run is almost surely
    // fresh, so neither the log nor the control bucket is read, and no lease
    // is created: the first append, fenced on that `run.created`, decides
    // the claim, and the heartbeat creates the lease for attempt 1 if the
    // run is still going a period later (`lease::NO_LEASE`). No other
    // claimant can hold the run meanwhile: this is the job's first delivery,
    // and a redelivery comes only after the ack wait, which in-progress acks
    // from the same heartbeat keep from running out. A cancel made while the
    // run was queued has either written `run.cancelled` (the first append
    // fails) or found the run started and written its record again *after*
    // that, which the control watch delivers to the slot registered before
    // the claim. Otherwise the run's last event and cancel request are read
    // before the lease is created, both at once, and the lease is created
    // with the attempt it will hold.
    //
    // Either way, what was assumed or read before the lease is trusted only
    // to start a fresh run or to ack a finished one, and every append is
    // fenced by the log's sequence: if anything was written after what we
    // assumed or read, our first append is refused and the claim reads
    // again under the lease. Any other decision is taken on a read made
    // under the lease.
    let (mut reads, mut lease, acquired) = match job.created_seq.filter(|_| delivered == 1) {
        Some(created_seq) => {
            let request = cancel.request();
            (
                Some(Ok(Some((LastEvent::created(&job, created_seq), request)))),
                lease_for(1),
                Ok(lease::NO_LEASE),
            )
        }
        None => {
            let reads = read_state(shared, &job, cancel).await;
            let attempt = match &reads {
                Ok(Some((last, _))) => last.event.attempt.saturating_add(1),
                _ => 1,
            };
            let lease = lease_for(attempt);
            let acquired = lease::acquire(&shared.leases, &key, &lease).await;
            (Some(reads), lease, acquired)
        }
    };
    let mut revision = match acquired {
        Ok(revision) => revision,
        Err(lease::Error::Held { .. }) => {
            // Come back when the holder's lease would have expired, so a
            // crashed holder's run fails over within about one lease TTL;
            // but soon if the holder is letting go (it just parked or handed
            // off the run, and a wake raced its release).
            let letting_go = match &reads {
                Some(Ok(Some((last, _)))) => last.event.body.failures().is_some(),
                _ => false,
            };
            let delay =
                if letting_go { MIN_HELD_DELAY } else { held_delay(shared, &key).await.unwrap_or(delay) };
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
        let read = match reads.take() {
            // Read before the lease: good enough to start a fresh run or to
            // ack a finished one; anything else is read again.
            Some(Ok(Some((last, request))))
                if request.is_none()
                    && (last.event.body.is_terminal()
                        || matches!(last.event.body, EventBody::Created(_))) =>
            {
                Ok(Some((last, request)))
            }
            _ => read_state(shared, &job, cancel).await,
        };
        let (last, request) = match read {
            Ok(Some(read)) => read,
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
            finish(shared, &acker, &key, run_id, Some(revision)).await;
            return None;
        }

        // Cancelled while queued or waiting, or its worker died after the
        // request: cancel it here, as the attempt that wrote `last`.
        if let Some(request) = request {
            let mut log = EventLog::new(&shared.writer, &job, last.event.attempt, &last);
            match log.append(EventBody::Cancelled(RunCancelled { reason: request.reason })).await {
                Ok(_) => {
                    info!(run_id = %run_id, "run cancelled before it resumed");
                    ack(&acker, run_id).await;
                    if let Err(e) = wake::disarm(shared, run_id).await {
                        warn!(run_id = %run_id, error = %e, "could not disarm the cancelled run's timer; it will find the run terminal");
                    }
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
                    warn!(run_id = %run_id, error = %e, "could not cancel the run; lease released, job nak'd with delay");
                    release(shared, &key, run_id, revision).await;
                    nak(&acker, run_id, Some(delay)).await;
                    return None;
                }
            }
        }

        if let Parked::NotYet { deadline_ms } = parked(shared, &last).await {
            // An early job: the wait is not over. Make sure the timer is
            // armed (the parking worker may have died before arming it),
            // then drop the job; the timer or the signal dispatches again.
            if let Some(deadline_ms) = deadline_ms {
                if let Err(e) = wake::arm(shared, &job, deadline_ms).await {
                    warn!(run_id = %run_id, error = %e, "could not arm the parked run's timer; lease released, job nak'd with delay");
                    release(shared, &key, run_id, revision).await;
                    nak(&acker, run_id, Some(delay)).await;
                    return None;
                }
            }
            if cancel.is_requested() {
                // Cancelled while we looked: cancel it, lease in hand.
                continue;
            }
            debug!(run_id = %run_id, seq = last.event.seq, "job for a run whose wait is not over dropped");
            ack(&acker, run_id).await;
            release(shared, &key, run_id, revision).await;
            return None;
        }

        let failures = match last.event.body.failures() {
            Some(failures) => failures,
            None if last.event.attempt == 0 => 0,
            // The last attempt ended without saying so: it crashed, lost its
            // lease or was stopped. That is a failure.
            None => match events::failures_before(&shared.events, &shared.names, &last).await {
                Ok(before) => before.saturating_add(1),
                Err(e) => {
                    warn!(run_id = %run_id, error = %e, "could not count the run's failed attempts; lease released, job nak'd with delay");
                    release(shared, &key, run_id, revision).await;
                    nak(&acker, run_id, Some(delay)).await;
                    return None;
                }
            },
        };
        if failures >= job.max_attempts {
            // Written as the last attempt: no new attempt starts.
            let mut log = EventLog::new(&shared.writer, &job, last.event.attempt, &last);
            let body = EventBody::Failed(RunFailed { error: attempts_exhausted(&job, &last, failures) });
            match log.append(body).await {
                Ok(_) => {
                    warn!(run_id = %run_id, failures, max_attempts = job.max_attempts, "run failed: max_attempts used up");
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

        // Record the attempt in the lease (it was created with the attempt
        // of the first read, so this is only for a claim that read again);
        // its revision is the attempt's fencing token.
        let attempt = last.event.attempt.saturating_add(1);
        if lease.attempt != attempt {
            lease.attempt = attempt;
            // Never without a lease: only a fast claim holds none, and it
            // is created for the attempt it starts.
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
        }

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

        let mut log = EventLog::new(&shared.writer, &job, attempt, &last);
        if shared.agents.get(&job.agent).is_none() {
            // Nothing starts: `execute` fails the run naming the agent.
            return Some(Claim {
                job,
                acker,
                key,
                lease,
                revision,
                log,
                checkpoints,
                failures,
                started: None,
            });
        }
        // A fresh run's first delivery holds `run.started` for the agent's
        // first event. Only the first: an attempt that dies before that
        // append leaves no trace and counts as no failure, so a later
        // delivery writes `run.started` before the agent runs (an agent that
        // crashes its worker every time still uses up its attempts).
        if !resume && delivered == 1 {
            let started = Some(EventBody::Started(RunStarted { delivery: delivered }));
            return Some(Claim { job, acker, key, lease, revision, log, checkpoints, failures, started });
        }
        let first = if resume {
            EventBody::Resumed(RunResumed {
                delivery: delivered,
                steps_replayed: checkpoints.recorded_count(),
                failures,
            })
        } else {
            EventBody::Started(RunStarted { delivery: delivered })
        };
        match log.append(first).await {
            Ok(_) => {
                if resume {
                    info!(run_id = %run_id, attempt, delivered, failures, steps_replayed = checkpoints.recorded_count(), "run resumed");
                }
                // Woken before its deadline (by a signal): its timer would
                // only deliver a job to drop later.
                if matches!(&last.event.body, EventBody::Waiting(w) if w.deadline_ms.is_some_and(|d| d > time::now_ms()))
                {
                    if let Err(e) = wake::disarm(shared, run_id).await {
                        debug!(run_id = %run_id, error = %e, "could not disarm the woken run's timer");
                    }
                }
                return Some(Claim {
                    job,
                    acker,
                    key,
                    lease,
                    revision,
                    log,
                    checkpoints,
                    failures,
                    started: None,
                });
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

/// Renews the lease to prove it is still ours (creates it, for a run held
/// without one); `None` (after logging) if it is not.
async fn still_ours(shared: &Shared, key: &str, lease: &Lease, revision: u64) -> Option<u64> {
    let written = if revision == lease::NO_LEASE {
        lease::acquire(&shared.leases, key, lease).await
    } else {
        lease::update(&shared.leases, key, lease, revision).await
    };
    match written {
        Ok(revision) => Some(revision),
        Err(e) => {
            warn!(run_id = %lease.run_id, error = %e, "lease not ours any more while claiming; run left alone");
            None
        }
    }
}

/// The run's last event and its cancel request (stored, or delivered to
/// this worker's slot by the control watch), read at once. `None` if the
/// run has no event at all.
async fn read_state(
    shared: &Shared,
    job: &Job,
    cancel: &CancelSlot,
) -> Result<Option<(LastEvent, Option<CancelRecord>)>, events::Error> {
    let run_id = job.run_id;
    let (last, request) = tokio::join!(
        events::read_last(&shared.events, &shared.names, &job.tenant, run_id),
        read_cancel(shared, run_id, cancel),
    );
    let Some(last) = last? else { return Ok(None) };
    Ok(Some((last, request)))
}

/// The run's cancel request: stored in the control bucket, or delivered to
/// this worker's slot by the control watch.
async fn read_cancel(shared: &Shared, run_id: RunId, cancel: &CancelSlot) -> Option<CancelRecord> {
    match control::read(&shared.control, &shared.names, run_id).await {
        Ok(request) => request.or_else(|| cancel.request()),
        Err(e) => {
            warn!(run_id = %run_id, error = %e, "could not read the run's cancel request; relying on the control watch");
            cancel.request()
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
fn attempts_exhausted(job: &Job, last: &LastEvent, failures: u32) -> RunError {
    let how = match &last.event.body {
        EventBody::Retrying(retrying) => format!("the last one failed: {}", retrying.error.message),
        _ => {
            let worker = last
                .event
                .worker_id
                .as_ref()
                .map_or_else(|| "a worker".to_owned(), |w| format!("worker {w}"));
            format!("the last one (on {worker}) stopped without finishing: its worker crashed or lost the run's lease")
        }
    };
    RunError {
        code: ErrorCode::MaxAttemptsExceeded,
        message: format!(
            "run {} used all {failures} of its attempts (max_attempts {}); {how}",
            job.run_id, job.max_attempts
        ),
    }
}

/// How a run attempt ended, before the job and lease are settled.
enum Outcome {
    /// A terminal event was written.
    Terminal,
    /// The agent parked on a wait: write `run.waiting`, arm its timer, ack.
    Park(Park),
    /// The worker is shutting down: write `run.handoff`, NAK without delay.
    HandOff,
    /// A retryable failure with attempts left: write `run.retrying`, arm a
    /// timer for the backoff, ack.
    Retry { error: RunError, delay: Duration },
    /// The run must stop without writing more: the lease is lost, or a
    /// write failed and the log's position is unknown.
    Interrupted(Option<Interruption>),
}

/// What stopped the agent's future.
enum Ended {
    /// The agent returned (or panicked).
    Returned(Result<Result<Value, AgentError>, Box<dyn Any + Send>>),
    /// The stop token fired: lease lost or hard hand-off.
    Stopped,
    /// A cancel request arrived.
    Cancelled,
}

async fn execute(shared: &Shared, claim: Claim, cancel: &CancelSlot, shutdown: Shutdown) {
    let Claim { job, acker, key, lease, revision, mut log, checkpoints, failures, started } = claim;
    let run_id = job.run_id;
    let attempt = lease.attempt;
    let stop = shutdown.handoff.child_token();
    let held = Held::new(run_id, job.tenant.clone(), key, lease, revision, acker, stop.clone());
    let _registration = shared.hold(held.clone());
    let fresh = started.is_some();
    let started = match started {
        Some(body) => log.hold(body, &stop).await,
        None => Ok(()),
    };

    let parts = ContextParts {
        log,
        checkpoints,
        signals: shared.signals.clone(),
        names: shared.names.clone(),
        stop: stop.clone(),
        drain: shutdown.drain.child_token(),
    };
    let mut ctx = RunContext::new(parts, job.agent.clone(), job.input.clone());

    let outcome = match (started, shared.agents.get(&job.agent).cloned()) {
        (Err(e), _) => Outcome::Interrupted(Some(e.into())),
        (Ok(()), None) => {
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
        (Ok(()), Some(_)) if stop.is_cancelled() => Outcome::Interrupted(None),
        (Ok(()), Some(agent)) => {
            info!(run_id = %run_id, attempt, agent = %job.agent, steps_recorded = ctx.steps_recorded(), "run claimed");
            let ended = if cancel.is_requested() {
                Ended::Cancelled
            } else {
                let run = AssertUnwindSafe(agent.run(&mut ctx, job.input.clone())).catch_unwind();
                tokio::select! {
                    biased;
                    () = stop.cancelled() => Ended::Stopped,
                    () = cancel.requested() => Ended::Cancelled,
                    result = run => Ended::Returned(result),
                }
            };
            outcome_of(shared, &job, attempt, failures, &mut ctx, &stop, cancel, ended).await
        }
    };
    settle(shared, &job, &held, &mut ctx, fresh, failures, outcome, cancel, &shutdown).await;
}

/// Turns how the agent ended into an outcome, writing the terminal event
/// if there is one.
#[allow(clippy::too_many_arguments)]
async fn outcome_of(
    shared: &Shared,
    job: &Job,
    attempt: u32,
    failures: u32,
    ctx: &mut RunContext,
    stop: &CancellationToken,
    cancel: &CancelSlot,
    ended: Ended,
) -> Outcome {
    let run_id = job.run_id;
    let fatal = ctx.fatal().cloned();
    let parked = ctx.parked().cloned();
    let handed_off = ctx.handed_off();
    let log = ctx.log_mut();
    match ended {
        Ended::Stopped => Outcome::Interrupted(None),
        Ended::Cancelled => {
            // The agent's future is dropped: no further step starts.
            let reason = cancel.request().and_then(|r| r.reason);
            info!(run_id = %run_id, attempt, ?reason, "run cancelled");
            let body = EventBody::Cancelled(RunCancelled { reason });
            if !log.is_closed() || log.is_lost() || stop.is_cancelled() {
                return append_terminal(log, stop, body).await;
            }
            // Dropped mid-append, so the log's position is unknown, but the
            // lease is still ours: find the position again rather than leave
            // the cancel to a redelivery. The dropped append may still land
            // after our read; our own attempt's event at the head means just
            // that, so read again.
            for _ in 0..CANCEL_ROUNDS {
                let last = match events::read_last(&shared.events, &shared.names, &job.tenant, run_id).await {
                    Ok(Some(last)) => last,
                    Ok(None) => return Outcome::Interrupted(None),
                    Err(e) => return Outcome::Interrupted(Some(e.into())),
                };
                if last.event.body.is_terminal() || last.event.attempt > attempt {
                    return Outcome::Interrupted(None);
                }
                *log = EventLog::new(&shared.writer, job, attempt, &last);
                match append_terminal(log, stop, body.clone()).await {
                    Outcome::Interrupted(Some(e)) if e.is_lease_lost() => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    outcome => return outcome,
                }
            }
            Outcome::Interrupted(None)
        }
        // A divergence fails the run whatever the agent made of it.
        Ended::Returned(Ok(_)) if fatal.is_some() => {
            let (code, message) = fatal.unwrap_or((ErrorCode::Internal, String::new()));
            warn!(run_id = %run_id, attempt, %code, %message, "run failed");
            append_terminal(log, stop, EventBody::Failed(RunFailed { error: RunError { code, message } }))
                .await
        }
        // Handed off at a step boundary, whatever the agent made of the
        // error the step returned.
        Ended::Returned(Ok(_)) if handed_off => Outcome::HandOff,
        // Parked, whatever the agent returned after the wait told it to.
        Ended::Returned(Ok(_)) if parked.is_some() => match parked {
            Some(park) => Outcome::Park(park),
            None => Outcome::Interrupted(None),
        },
        Ended::Returned(Ok(Err(AgentError::Interrupted(e)))) => Outcome::Interrupted(Some(e)),
        Ended::Returned(Ok(Ok(output))) => {
            info!(run_id = %run_id, attempt, "run completed");
            append_terminal(log, stop, EventBody::Completed(RunCompleted { output })).await
        }
        Ended::Returned(Ok(Err(e @ AgentError::Retryable { .. })))
            if failures.saturating_add(1) < job.max_attempts =>
        {
            let delay = retry_delay(shared, failures.saturating_add(1));
            info!(run_id = %run_id, attempt, error = %e, retry_in_ms = delay.as_millis() as u64, "run attempt failed; retrying");
            Outcome::Retry { error: RunError { code: e.code(), message: e.to_string() }, delay }
        }
        Ended::Returned(Ok(Err(e))) => {
            info!(run_id = %run_id, attempt, code = %e.code(), error = %e, "run failed");
            let (code, message) = match &e {
                AgentError::Retryable { .. } => (
                    ErrorCode::MaxAttemptsExceeded,
                    format!(
                        "run {run_id} used all {} of its attempts (max_attempts {}); the last one failed: {e}",
                        failures.saturating_add(1),
                        job.max_attempts
                    ),
                ),
                _ => (e.code(), e.to_string()),
            };
            append_terminal(log, stop, EventBody::Failed(RunFailed { error: RunError { code, message } }))
                .await
        }
        Ended::Returned(Err(panic)) => {
            let message = format!("agent {} panicked: {}", job.agent, panic_message(&*panic));
            error!(run_id = %run_id, attempt, agent = %job.agent, %message, "agent panicked; run failed");
            let body =
                EventBody::Failed(RunFailed { error: RunError { code: ErrorCode::AgentPanicked, message } });
            append_terminal(log, stop, body).await
        }
    }
}

/// Settles the job and the lease after an attempt: ack or NAK, release,
/// and for parked and retried runs the event and timer that wake them.
/// `fresh`: the attempt held its `run.started` (a fresh run's first
/// delivery).
#[allow(clippy::too_many_arguments)]
async fn settle(
    shared: &Shared,
    job: &Job,
    held: &Arc<Held>,
    ctx: &mut RunContext,
    fresh: bool,
    failures: u32,
    outcome: Outcome,
    cancel: &CancelSlot,
    shutdown: &Shutdown,
) {
    let run_id = job.run_id;
    let attempt = ctx.attempt();
    // A hard hand-off stops the agent through the stop token: with the
    // lease still ours that is a hand-off, not an interruption.
    let outcome = match outcome {
        Outcome::Interrupted(None)
            if shutdown.handoff.is_cancelled() && !held.is_lost() && !ctx.is_lost() =>
        {
            Outcome::HandOff
        }
        outcome => outcome,
    };
    // After `finish` the heartbeat no longer renews the lease, so whether it
    // found the lease lost is settled.
    let revision = held.finish().await;
    let refused = ctx.is_lost() || matches!(&outcome, Outcome::Interrupted(Some(e)) if e.is_lease_lost());
    let first_append_refused = fresh && refused && ctx.log_mut().wrote_nothing();
    if first_append_refused && revision.is_none() && !held.is_lost() {
        // Claimed without a lease (see `claim`), so nothing shows that the
        // job is still this attempt's: if it was redelivered (this worker
        // paused past its ack wait), a newer attempt wrote first and may own
        // it now, and a NAK would hand its job out again.
        settle_refused_fast_claim(shared, job, held, attempt).await;
        return;
    }
    if let Some(revision) = revision.filter(|_| first_append_refused && !held.is_lost()) {
        // The append carrying the held `run.started` was refused: someone
        // wrote after the `run.created` the claim assumed (a coordinator's
        // cancel racing the claim). If the lease is still ours, nobody else
        // owns the run: let go of the lease and the job at once, so that a
        // claim reads the log, rather than leave both to expire. (A refusal
        // after the attempt stored something leaves both to the new owner,
        // as below.)
        let lease = held.state.lock().await.lease.clone();
        if let Some(renewed) = still_ours(shared, &held.key, &lease, revision).await {
            info!(run_id = %run_id, attempt, "the run's log moved after the run.created the claim assumed; lease released, job nak'd to be claimed again");
            release(shared, &held.key, run_id, renewed).await;
            nak(&held.acker, run_id, None).await;
            return;
        }
    }
    if refused || held.is_lost() {
        // Someone else owns the run now: write nothing, leave the job and
        // the lease to their new owner (or to redelivery). The logs remember
        // a refused write even if the agent swallowed the error.
        held.mark_lost();
        if refused {
            warn!(run_id = %run_id, attempt, "lease lost: the server refused a write (a newer attempt owns the run); run stopped without writing more");
        } else {
            warn!(run_id = %run_id, attempt, "lease lost: the heartbeat found the lease changed; run stopped without writing more");
        }
        return;
    }
    let release_lease = || async {
        if let Some(revision) = revision {
            release(shared, &held.key, run_id, revision).await;
        }
    };
    let log = ctx.log_mut();
    // A cancel that arrived after the agent stopped: the run ends here
    // rather than park or retry (its timer or signal could be far away).
    let outcome = match (outcome, cancel.request()) {
        (Outcome::Park(_) | Outcome::Retry { .. }, Some(request)) => {
            info!(run_id = %run_id, attempt, "run cancelled as it was about to wait");
            match log.append(EventBody::Cancelled(RunCancelled { reason: request.reason })).await {
                Ok(_) => Outcome::Terminal,
                Err(e) => Outcome::Interrupted(Some(e.into())),
            }
        }
        (outcome, _) => outcome,
    };
    match outcome {
        Outcome::Terminal => {
            // Terminal event first, then the job and the lease, neither
            // waiting for the server: a crash, or an ack or delete lost
            // before it is stored, leaves a terminal run whose next
            // claimant only acks (and releases).
            finish(shared, &held.acker, &held.key, run_id, revision).await;
        }
        Outcome::Park(park) => {
            let waiting = RunWaiting { key: park.key.clone(), deadline_ms: park.deadline_ms, failures };
            let seq = match log.append(EventBody::Waiting(waiting)).await {
                Ok(seq) => seq,
                Err(e) => {
                    return interrupted(shared, held, run_id, attempt, Some(e.into()), release_lease).await
                }
            };
            // Arm the timer while the lease is still ours (a stale arm after
            // a newer attempt's would replace its timer), and before the
            // job is acked: if this worker dies in between, the job is
            // redelivered and its claimant arms it.
            if let Some(deadline_ms) = park.deadline_ms {
                if let Err(e) = wake::arm(shared, job, deadline_ms).await {
                    warn!(run_id = %run_id, error = %e, "could not arm the timer of a parked run; job nak'd so another claim arms it");
                    release_lease().await;
                    nak(&held.acker, run_id, Some(shared.config.lease_held_delay)).await;
                    return;
                }
            }
            // Then the lease: a wake job claimed at once (the signal came
            // while we parked) must find the run free.
            release_lease().await;
            // A cancel whose coordinator found the lease still ours: wake the
            // run so a claimant cancels it now, not when it would wake.
            if cancel_pending(shared, run_id, cancel).await {
                if let Err(e) = wake::dispatch(shared, job, seq).await {
                    warn!(run_id = %run_id, error = %e, "could not wake a run cancelled as it parked; the recovery loop will cancel it");
                }
            }
            // A signal that arrived while we parked found the run not yet
            // waiting: wake it ourselves (the coordinator uses the same
            // message id, so the wake is stored once).
            if let Some(key) = &park.key {
                match wake::signal_arrived(shared, run_id, key).await {
                    Ok(false) => {}
                    Ok(true) => {
                        if let Err(e) = wake::dispatch(shared, job, seq).await {
                            warn!(run_id = %run_id, error = %e, "could not wake a run whose signal arrived; job nak'd instead");
                            nak(&held.acker, run_id, None).await;
                            return;
                        }
                    }
                    Err(e) => {
                        warn!(run_id = %run_id, error = %e, "could not re-check the awaited signal; the recovery loop will")
                    }
                }
            }
            info!(run_id = %run_id, attempt, key = ?park.key, deadline_ms = ?park.deadline_ms, "run waiting; lease released, slot freed");
            ack(&held.acker, run_id).await;
        }
        Outcome::Retry { error, delay } => {
            let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
            let body =
                EventBody::Retrying(RunRetrying { error, retry_in_ms, failures: failures.saturating_add(1) });
            let seq = match log.append(body).await {
                Ok(seq) => seq,
                Err(e) => {
                    return interrupted(shared, held, run_id, attempt, Some(e.into()), release_lease).await
                }
            };
            let due = time::now_ms().saturating_add(i64::try_from(retry_in_ms).unwrap_or(i64::MAX));
            let armed = wake::arm(shared, job, due).await;
            release_lease().await;
            match armed {
                Ok(()) => {
                    if cancel_pending(shared, run_id, cancel).await {
                        if let Err(e) = wake::dispatch(shared, job, seq).await {
                            warn!(run_id = %run_id, error = %e, "could not wake a run cancelled as it failed; its retry timer will");
                        }
                    }
                    ack(&held.acker, run_id).await;
                }
                Err(e) => {
                    warn!(run_id = %run_id, error = %e, "could not arm the retry timer; job nak'd with the backoff instead");
                    nak(&held.acker, run_id, Some(delay)).await;
                }
            }
        }
        Outcome::HandOff => {
            if let Err(e) = log.append(EventBody::Handoff(RunHandoff { failures })).await {
                return interrupted(shared, held, run_id, attempt, Some(e.into()), release_lease).await;
            }
            info!(run_id = %run_id, attempt, "run handed off at shutdown; lease released, job nak'd for immediate redelivery");
            // The lease first, so the next claimant finds it free.
            release_lease().await;
            nak(&held.acker, run_id, None).await;
            // A redelivery stores no message, so it wakes no idle worker:
            // wake one, or the run waits for somebody's idle poll.
            let wakeup = shared.names.job_wakeup(&job.queue, job.priority, run_id);
            if let Err(e) = shared.js.client().publish(wakeup, bytes::Bytes::new()).await {
                debug!(run_id = %run_id, error = %e, "could not publish the hand-off wake-up; idle workers find the job by polling");
            }
        }
        Outcome::Interrupted(error) => {
            // The lease is still ours: a held `step.completed` goes in the
            // log rather than vanish with the attempt.
            if let Err(e) = log.flush().await {
                debug!(run_id = %run_id, error = %e, "could not write the held event of an interrupted run");
            }
            interrupted(shared, held, run_id, attempt, error, release_lease).await;
        }
    }
}

/// Whether a cancel request for the run is known: delivered by the watch,
/// or (read after the lease was released) stored by a coordinator that
/// found the lease still ours.
async fn cancel_pending(shared: &Shared, run_id: RunId, cancel: &CancelSlot) -> bool {
    if cancel.is_requested() {
        return true;
    }
    match control::read(&shared.control, &shared.names, run_id).await {
        Ok(request) => request.is_some(),
        Err(e) => {
            warn!(run_id = %run_id, error = %e, "could not re-read the run's cancel request; the recovery loop will check");
            false
        }
    }
}

/// An attempt that cannot go on (its log's position is unknown): release
/// and let another attempt continue after a short delay.
async fn interrupted<F, Fut>(
    shared: &Shared,
    held: &Held,
    run_id: RunId,
    attempt: u32,
    error: Option<Interruption>,
    release_lease: F,
) where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    match &error {
        Some(e) => warn!(run_id = %run_id, attempt, error = %e, "run interrupted; lease released, job nak'd"),
        None => info!(run_id = %run_id, attempt, "run stopped; lease released, job nak'd"),
    }
    release_lease().await;
    nak(&held.acker, run_id, Some(shared.config.lease_held_delay)).await;
}

/// The delay before attempt `failures + 1` of a run whose attempt failed
/// with a retryable error: exponential from `retry_backoff_min`, capped.
fn retry_delay(shared: &Shared, failures: u32) -> Duration {
    let min = shared.config.retry_backoff_min;
    let max = shared.config.retry_backoff_max.max(min);
    min.saturating_mul(1u32 << failures.saturating_sub(1).min(20)).min(max)
}

/// Settles the job of a fast claim (no lease) whose first append was
/// refused. A run that is over (a cancel that raced the claim wrote
/// `run.cancelled`) needs only its job acked. A run whose lease is held
/// belongs to whoever holds it: the job is left alone. Otherwise nobody
/// holds the run (the attempt that wrote after `run.created` is gone, or let
/// go of it): the job is NAK'd to be claimed again at once, by a claim that
/// reads the log.
async fn settle_refused_fast_claim(shared: &Shared, job: &Job, held: &Held, attempt: u32) {
    let run_id = job.run_id;
    let last = match events::read_last(&shared.events, &shared.names, &job.tenant, run_id).await {
        Ok(last) => last,
        Err(e) => {
            warn!(run_id = %run_id, attempt, error = %e, "the run's log moved after the run.created the claim assumed and could not be read; job left to its ack wait");
            return;
        }
    };
    if last.is_some_and(|last| last.event.body.is_terminal()) {
        info!(run_id = %run_id, attempt, "the run ended before its claim's first append; job acked");
        ack(&held.acker, run_id).await;
        return;
    }
    match shared.leases.get(&held.key).await {
        Ok(None) => {
            info!(run_id = %run_id, attempt, "the run's log moved after the run.created the claim assumed; job nak'd to be claimed again");
            nak(&held.acker, run_id, None).await;
        }
        Ok(Some(_)) => {
            warn!(run_id = %run_id, attempt, "another attempt holds the run this claim assumed fresh; run stopped, its job left to that attempt")
        }
        Err(e) => {
            warn!(run_id = %run_id, attempt, error = %e, "the run's log moved after the run.created the claim assumed and its lease could not be read; job left to its ack wait")
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
        Err(e) => Outcome::Interrupted(Some(e.into())),
    }
}

async fn ack(acker: &Acker, run_id: RunId) {
    debug!(run_id = %run_id, "job acked");
    if let Err(e) = acker.double_ack().await {
        warn!(run_id = %run_id, error = %e, "could not ack job; the next delivery will only ack it");
    }
}

/// Settles the job and the lease of a run whose terminal event is stored:
/// an ack and (if the lease is still ours, at `revision`) a delete, neither
/// confirmed. Nothing depends on either any more: a lost ack redelivers the
/// job after its ack wait, and its claimant finds the run terminal and only
/// acks; a lost delete leaves a lease that ages out.
async fn finish(shared: &Shared, acker: &Acker, key: &str, run_id: RunId, revision: Option<u64>) {
    debug!(run_id = %run_id, "job acked, lease released (unconfirmed)");
    if let Err(e) = acker.ack().await {
        warn!(run_id = %run_id, error = %e, "could not ack job; the next delivery will only ack it");
    }
    // No revision: the heartbeat already gave the lease up, or none was
    // ever written.
    let Some(revision) = revision.filter(|revision| *revision != lease::NO_LEASE) else { return };
    if let Err(e) =
        lease::release_unconfirmed(&shared.leases, &shared.js.client(), key, run_id, revision).await
    {
        warn!(run_id = %run_id, error = %e, "could not release lease; it will age out");
    }
}

async fn nak(acker: &Acker, run_id: RunId, delay: Option<Duration>) {
    // Confirmed, so a hand-off NAK is not lost when the worker disconnects.
    debug!(run_id = %run_id, delay_ms = delay.map(|d| d.as_millis() as u64), "job nak'd");
    if let Err(e) = acker.double_ack_with(AckKind::Nak(delay)).await {
        warn!(run_id = %run_id, error = %e, "could not nak job; it will be redelivered after its ack wait");
    }
}

async fn release(shared: &Shared, key: &str, run_id: RunId, revision: u64) {
    if revision == lease::NO_LEASE {
        return;
    }
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
