//! The recovery loop: finds runs that nothing will move and moves them.
//!
//! DESIGN.md's invariant: every non-terminal run is owned by something that
//! will move it — a job message, a lease, a timer or a signal. Crashes at
//! the wrong moment (a worker dying between acking a job and arming a timer,
//! a coordinator dying between `run.created` and the job, a purge by hand)
//! can leave a run with no owner. Every `recovery_interval` this loop asks
//! the registry for runs that are queued, running or waiting and have not
//! moved for `recovery_min_age`, checks each against JetStream (the truth)
//! and re-dispatches the ones nothing owns:
//!
//! | last event | owned by | otherwise |
//! | --- | --- | --- |
//! | terminal | — (skipped) | |
//! | any | a lease, or a job message | |
//! | any, cancel requested | | finish the cancel |
//! | `run.waiting` on a key | the signal's absence | wake job if the signal is there |
//! | `run.waiting` with a deadline | its timer | job if due, else a new timer |
//! | `run.retrying` | its timer | job if due, else a new timer |
//! | anything else | | job |
//!
//! Every publish happens only if the run's last event is still the one the
//! decision was made on, and carries a message id derived from it (the wake
//! id the worker also uses, or the recovery id), so replicas and retries
//! dispatch a run once.
//!
//! The loop also watches JetStream's max-deliveries advisory for the jobs
//! stream: a job past its consumer's `max_deliver` stays in the work queue
//! but is never delivered again, so its run would be stuck for good. The job
//! is re-published (a fresh message, deliveries from zero) and the old one
//! deleted, with a warning.

use std::time::Duration;

use async_nats::Message;
use futures::StreamExt;
use runfleet_protocol::event::EventBody;
use runfleet_protocol::job::Job;
use runfleet_protocol::names::API_QUEUE_GROUP;
use runfleet_protocol::{codec, time, Names};
use serde::Deserialize;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::registry::{Registry, StaleRun};
use crate::runs::{self, Cancelled, RunFacts, Runs, StartedRun};

/// Runs fetched from the registry per query.
const PAGE: u32 = 500;

/// The recovery loop could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not subscribe to {subject}: {source}")]
    Subscribe {
        subject: String,
        #[source]
        source: async_nats::SubscribeError,
    },
}

/// The recovery loop's settings (see `CoordinatorConfig::recovery_*`).
#[derive(Debug, Clone, Copy)]
pub struct RecoveryConfig {
    /// Time between passes.
    pub interval: Duration,
    /// Runs whose registry row changed more recently are left alone.
    pub min_age: Duration,
}

/// What one examination found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The run is terminal (the registry lagged).
    Ended,
    /// Something will move the run.
    Owned(&'static str),
    /// The run moved while it was examined; the next pass looks again.
    Moved,
    /// JetStream has no log for the run (the events stream's `max_age`).
    Missing,
    /// The run was re-dispatched (or its cancel finished) for this reason.
    Recovered(&'static str),
}

/// The recovery loop. [`Recovery::run`] runs it until cancelled.
pub struct Recovery {
    client: async_nats::Client,
    runs: Runs,
    registry: Registry,
    config: RecoveryConfig,
}

impl std::fmt::Debug for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recovery").field("config", &self.config).finish_non_exhaustive()
    }
}

/// JetStream's `io.nats.jetstream.advisory.v1.max_deliver` advisory (the
/// fields used here).
#[derive(Debug, Deserialize)]
struct MaxDeliveries {
    stream: String,
    consumer: String,
    stream_seq: u64,
    deliveries: u64,
}

impl Recovery {
    pub fn new(client: async_nats::Client, runs: Runs, registry: Registry, config: RecoveryConfig) -> Self {
        Self { client, runs, registry, config }
    }

    fn names(&self) -> &Names {
        self.runs.names()
    }

    /// Runs a pass every interval and handles advisories until `shutdown`.
    /// A pass in progress stops between two runs.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let subject = self.names().jobs_max_deliveries_advisory();
        // Replicas share the advisories like they share the API.
        let mut advisories = Some(
            self.client
                .queue_subscribe(subject.clone(), API_QUEUE_GROUP.to_owned())
                .await
                .map_err(|source| Error::Subscribe { subject, source })?,
        );
        let mut ticks = tokio::time::interval(self.config.interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        info!(
            interval_ms = u64::try_from(self.config.interval.as_millis()).unwrap_or(u64::MAX),
            min_age_ms = u64::try_from(self.config.min_age.as_millis()).unwrap_or(u64::MAX),
            "recovery started"
        );
        loop {
            let advisory = async {
                match advisories.as_mut() {
                    Some(subscriber) => subscriber.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticks.tick() => self.pass(&shutdown).await,
                message = advisory => match message {
                    Some(message) => self.on_max_deliveries(&message).await,
                    None => {
                        warn!("max-deliveries advisory subscription ended; stuck jobs are now found by the recovery passes only");
                        advisories = None;
                    }
                },
            }
        }
        if let Some(mut subscriber) = advisories {
            if let Err(error) = subscriber.unsubscribe().await {
                debug!(error = %error, "could not unsubscribe from advisories");
            }
        }
        info!("recovery stopped");
        Ok(())
    }

    /// Examines every stale run once, page by page.
    async fn pass(&self, shutdown: &CancellationToken) {
        let min_age_ms = i64::try_from(self.config.min_age.as_millis()).unwrap_or(i64::MAX);
        let updated_before = time::now_ms().saturating_sub(min_age_ms);
        let (mut examined, mut recovered, mut failed) = (0u64, 0u64, 0u64);
        let mut after = None;
        loop {
            let page = match self.registry.stale_runs(updated_before, after, PAGE).await {
                Ok(page) => page,
                Err(error) => {
                    warn!(error = %error, "recovery could not list runs from the registry; next pass retries");
                    return;
                }
            };
            for run in &page {
                if shutdown.is_cancelled() {
                    return;
                }
                examined += 1;
                match self.examine(run).await {
                    Ok(Verdict::Recovered(_)) => recovered += 1,
                    Ok(verdict) => {
                        debug!(run_id = %run.run_id, tenant = %run.tenant, verdict = ?verdict, "run examined")
                    }
                    Err(error) => {
                        failed += 1;
                        warn!(run_id = %run.run_id, tenant = %run.tenant, error = %error, "could not examine run; next pass retries");
                    }
                }
            }
            match page.last() {
                Some(last) if page.len() == usize::try_from(PAGE).unwrap_or(usize::MAX) => {
                    after = Some(last.run_id);
                }
                _ => break,
            }
        }
        if recovered > 0 || failed > 0 {
            info!(examined, recovered, failed, "recovery pass done");
        } else {
            debug!(examined, "recovery pass done");
        }
    }

    /// Checks one run against JetStream and re-dispatches it if nothing owns it.
    async fn examine(&self, run: &StaleRun) -> Result<Verdict, runs::Error> {
        let runs = &self.runs;
        let Some(facts) = runs.facts(&run.tenant, run.run_id).await? else {
            return Ok(Verdict::Missing);
        };
        let last = &facts.last.event;
        if last.state_after().is_terminal() {
            return Ok(Verdict::Ended);
        }
        if runs.lease_present(run.run_id).await? {
            return Ok(Verdict::Owned("lease"));
        }
        if let Some(request) = runs.cancel_request(run.run_id).await? {
            // Cancelled while a worker held it, and that worker let go
            // without ending the run (it parked it, or died): finish the
            // cancel rather than wait for a claimant that may never come.
            let outcome = runs
                .cancel_unowned(&run.tenant, &facts.job, last.attempt, &request, StartedRun::Cancel)
                .await?;
            return Ok(match outcome {
                Cancelled::Written => {
                    warn!(run_id = %run.run_id, tenant = %run.tenant, seq = last.seq, "run recovered: its cancel was requested but no worker finished it; cancelled");
                    Verdict::Recovered("cancel requested, nobody finished it")
                }
                Cancelled::AlreadyTerminal(_) => Verdict::Ended,
                Cancelled::LeaseHeld { .. } => Verdict::Owned("lease"),
            });
        }
        if let Some(seq) = runs.orphaned_job(&facts.job).await? {
            // Stored but behind its consumer's ack floor: no worker will
            // ever get it. Replace it (deleted first: should the new job be
            // dropped as a duplicate, a later pass finds no job and
            // dispatches again).
            if !self.unchanged(&facts).await? {
                return Ok(Verdict::Moved);
            }
            runs.delete_job_message(seq).await?;
            let msg_id = self.names().recovery_msg_id(run.run_id, last.seq);
            return self.dispatch(&facts, &msg_id, "its job is behind its consumer's ack floor").await;
        }
        if runs.job_present(&facts.job).await? {
            return Ok(Verdict::Owned("job"));
        }
        let now = time::now_ms();
        match &last.body {
            EventBody::Waiting(waiting) => {
                if let Some(key) = &waiting.key {
                    if runs.signal(run.run_id, key).await?.is_some() {
                        // Not the wake msg id: a wake that was sent and
                        // consumed without resuming the run would make this
                        // one a duplicate for the whole dedup window.
                        let msg_id = self.names().recovery_msg_id(run.run_id, last.seq);
                        return self.dispatch(&facts, &msg_id, "its signal arrived but nobody woke it").await;
                    }
                }
                match waiting.deadline_ms {
                    Some(deadline) => self.timer_or_dispatch(&facts, deadline, now).await,
                    None if waiting.key.is_some() => Ok(Verdict::Owned("signal")),
                    None => {
                        let msg_id = self.names().recovery_msg_id(run.run_id, last.seq);
                        self.dispatch(&facts, &msg_id, "it waits for neither a signal nor a deadline").await
                    }
                }
            }
            EventBody::Retrying(retrying) => {
                self.timer_or_dispatch(&facts, retrying.due_ms(last.ts_ms), now).await
            }
            _ => {
                let msg_id = self.names().recovery_msg_id(run.run_id, last.seq);
                self.dispatch(&facts, &msg_id, "no job, lease, timer or signal owns it").await
            }
        }
    }

    /// A run that waits for `due_ms`: owned by its timer; without one, it
    /// gets its job now if due, else a new timer.
    async fn timer_or_dispatch(
        &self,
        facts: &RunFacts,
        due_ms: i64,
        now: i64,
    ) -> Result<Verdict, runs::Error> {
        let run_id = facts.job.run_id;
        if self.runs.timer_present(run_id).await? {
            return Ok(Verdict::Owned("timer"));
        }
        if due_ms <= now {
            let msg_id = self.names().recovery_msg_id(run_id, facts.last.event.seq);
            return self.dispatch(facts, &msg_id, "its time came but no timer or job owns it").await;
        }
        if !self.unchanged(facts).await? {
            return Ok(Verdict::Moved);
        }
        self.runs.schedule(&facts.job, due_ms).await?;
        warn!(
            run_id = %run_id, tenant = %facts.job.tenant, seq = facts.last.event.seq, due_ms,
            reason = "no job, lease, timer or signal owns it",
            "run recovered: its timer was missing; timer re-created"
        );
        Ok(Verdict::Recovered("timer missing"))
    }

    /// Publishes the run's job under `msg_id` unless the run moved.
    async fn dispatch(
        &self,
        facts: &RunFacts,
        msg_id: &str,
        reason: &'static str,
    ) -> Result<Verdict, runs::Error> {
        if !self.unchanged(facts).await? {
            return Ok(Verdict::Moved);
        }
        let run_id = facts.job.run_id;
        let last = &facts.last.event;
        let stored = self.runs.publish_job(&facts.job, msg_id).await?;
        if stored {
            warn!(
                run_id = %run_id, tenant = %facts.job.tenant, state = %last.state_after(), seq = last.seq,
                event = last.body.type_name(), reason, msg_id,
                "run recovered: job re-dispatched"
            );
        } else {
            // The same re-dispatch went out moments ago (another replica, or
            // a job that has been consumed since); a later pass, outside the
            // duplicate window, publishes again if the run is still stuck.
            warn!(
                run_id = %run_id, tenant = %facts.job.tenant, seq = last.seq, reason, msg_id,
                "run has no owner but its re-dispatch was dropped as a duplicate; retrying on a later pass"
            );
        }
        Ok(Verdict::Recovered(reason))
    }

    /// Whether the run's last event is still the one `facts` were read at.
    async fn unchanged(&self, facts: &RunFacts) -> Result<bool, runs::Error> {
        let last = self.runs.last_event(&facts.job.tenant, facts.job.run_id).await?;
        Ok(last.is_some_and(|last| last.event.seq == facts.last.event.seq))
    }

    /// Re-publishes a job that reached its consumer's `max_deliver`: the
    /// fresh message is delivered again (and its run either progresses or
    /// uses up `max_attempts` and fails with a clear reason), then the stuck
    /// one is deleted so the work queue does not keep it forever.
    async fn on_max_deliveries(&self, message: &Message) {
        let advisory: MaxDeliveries = match serde_json::from_slice(&message.payload) {
            Ok(advisory) => advisory,
            Err(error) => {
                warn!(subject = %message.subject, error = %error, "max-deliveries advisory does not decode");
                return;
            }
        };
        if advisory.stream != self.names().jobs_stream() {
            return;
        }
        if let Err(error) = self.redispatch_stuck(&advisory).await {
            warn!(
                stream_seq = advisory.stream_seq, consumer = %advisory.consumer, error = %error,
                "could not re-dispatch a job past max deliveries; the recovery loop finds its run once it has no job"
            );
        }
    }

    async fn redispatch_stuck(&self, advisory: &MaxDeliveries) -> Result<(), runs::Error> {
        let seq = advisory.stream_seq;
        let Some(message) = self.runs.job_message(seq).await? else {
            debug!(stream_seq = seq, "job past max deliveries is already gone");
            return Ok(());
        };
        let job: Job = match codec::decode(&message.payload) {
            Ok(job) => job,
            Err(error) => {
                warn!(stream_seq = seq, subject = %message.subject, error = %error, "message past max deliveries is not a job; left in place");
                return Ok(());
            }
        };
        let last = self.runs.last_event(&job.tenant, job.run_id).await?;
        match last {
            Some(last) if !last.event.state_after().is_terminal() => {
                warn!(
                    run_id = %job.run_id, tenant = %job.tenant, consumer = %advisory.consumer,
                    deliveries = advisory.deliveries, stream_seq = seq, state = %last.event.state_after(),
                    "job reached its consumer's max deliveries; re-dispatching it"
                );
                let msg_id = self.names().recovery_msg_id(job.run_id, last.event.seq);
                self.runs.publish_job(&job.redispatch(), &msg_id).await?;
            }
            Some(last) => {
                info!(
                    run_id = %job.run_id, consumer = %advisory.consumer, deliveries = advisory.deliveries,
                    state = %last.event.state_after(), "job past max deliveries belongs to an ended run; deleting it"
                );
            }
            None => {
                warn!(run_id = %job.run_id, tenant = %job.tenant, "job past max deliveries has no event log; deleting it");
            }
        }
        self.runs.delete_job_message(seq).await
    }
}
