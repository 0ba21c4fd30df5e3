//! Waiting without holding a worker: [`RunContext::await_signal`],
//! [`RunContext::approval`] and [`RunContext::sleep`].
//!
//! A wait that cannot be satisfied at once *parks* the run: the call returns
//! [`AgentError::Interrupted`] ([`Interruption::Waiting`]), the agent returns
//! it (`?`), and the runtime appends `run.waiting`, arms a timer for the
//! deadline (a JetStream message schedule that publishes the run's job when
//! it is due), acks the job and releases the lease and the slot. A signal or
//! the timer dispatches the run again; the next attempt replays the steps
//! before the wait from their checkpoints and gets past it.
//!
//! Every wait is made of recorded steps, so replay is deterministic: the
//! deadline is recorded when the wait first starts, and the outcome (the
//! signal's payload, or the timeout) when the wait ends.

use std::any::type_name;
use std::time::Duration;

use runfleet_protocol::event::{ApprovalRequested, EventBody};
use runfleet_protocol::signal::{ApprovalDecision, SignalRecord};
use runfleet_protocol::{codec, time, SignalKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{AgentError, Interruption, RunContext};

/// The step names waits are recorded under (followed by `:<key>`).
const STEP_WAIT: &str = "runfleet.await";
const STEP_SIGNAL: &str = "runfleet.signal";
const STEP_SLEEP: &str = "runfleet.sleep";
/// The prefix of the signal key an approval waits on (followed by the
/// position of the approval's first step, so keys are stable across replays).
const APPROVAL_KEY_PREFIX: &str = "approval-";

/// What a parked run waits for; written into `run.waiting` by the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Park {
    pub key: Option<SignalKey>,
    pub deadline_ms: Option<i64>,
}

/// The recorded end of a signal wait.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
enum SignalOutcome {
    Received { payload: Value },
    TimedOut,
}

/// A request for a human decision (see [`RunContext::approval`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalRequest {
    /// The tool or action the agent wants to run.
    pub tool: String,
    /// Its arguments, as the person deciding should see them.
    pub arguments: Value,
    /// Why the agent wants it.
    pub reason: Option<String>,
    /// How long to wait for a decision; `None` waits for ever.
    pub timeout: Option<Duration>,
}

impl ApprovalRequest {
    /// A request to run `tool` with `arguments`, without reason or timeout.
    pub fn new(tool: impl Into<String>, arguments: Value) -> Self {
        Self { tool: tool.into(), arguments, reason: None, timeout: None }
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// The decision on an [`ApprovalRequest`].
#[derive(Debug, Clone, PartialEq)]
pub enum Approval {
    /// Run the action as requested.
    Approved,
    /// Do not run it.
    Rejected { reason: Option<String> },
    /// Run it with this input instead.
    Edited { input: Value },
    /// Nobody decided before the request's timeout.
    Expired,
}

impl RunContext {
    /// Waits for the signal `key` (sent with `runfleet signal RUN KEY` or
    /// the `signal` API verb) and returns its payload, or `Ok(None)` when
    /// `timeout` passes first. `None` as timeout waits for ever.
    ///
    /// A signal that arrived before the run got here is returned at once.
    /// Otherwise the run is parked: this returns
    /// [`AgentError::Interrupted`], which the agent must return (`?`); the
    /// run holds no slot and no lease while it waits, and a later attempt
    /// (on any worker) gets the payload from this call. The first signal
    /// for a key wins, so every attempt sees the same payload.
    ///
    /// # Errors
    ///
    /// [`AgentError::InvalidInput`] for a key that is not
    /// `[A-Za-z0-9_-]{1,64}` or a payload that does not decode as `T`;
    /// [`AgentError::Interrupted`] when the run parks or is being stopped.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use runfleet_worker::sdk::{AgentError, RunContext};
    /// # async fn demo(ctx: &mut RunContext) -> Result<(), AgentError> {
    /// let answer: Option<String> =
    ///     ctx.await_signal("customer-reply", Some(Duration::from_secs(3600))).await?;
    /// match answer {
    ///     Some(text) => { /* the customer replied */ let _ = text; }
    ///     None => { /* no reply within an hour */ }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn await_signal<T: DeserializeOwned>(
        &mut self,
        key: &str,
        timeout: Option<Duration>,
    ) -> Result<Option<T>, AgentError> {
        let key = SignalKey::new(key).map_err(|e| AgentError::invalid_input(format!("await_signal: {e}")))?;
        match self.signal_outcome(&key, timeout).await? {
            SignalOutcome::Received { payload } => serde_json::from_value(payload).map(Some).map_err(|e| {
                AgentError::invalid_input(format!(
                    "the payload of signal {key} does not decode as {}: {e}",
                    type_name::<T>()
                ))
            }),
            SignalOutcome::TimedOut => Ok(None),
        }
    }

    /// Asks a person to approve `request` and waits for the decision
    /// (`runfleet approve RUN [--edit JSON]` / `runfleet reject RUN`).
    ///
    /// Appends `approval.requested` (key, tool, arguments, reason,
    /// deadline), so a UI can decide from the event stream alone, then waits
    /// like [`RunContext::await_signal`] on the key `approval-<n>`, where
    /// `n` is the position of the approval in the run (stable across
    /// attempts, distinct for each approval of a run).
    ///
    /// # Errors
    ///
    /// As [`RunContext::await_signal`]; a decision that is not a valid
    /// [`ApprovalDecision`] is [`AgentError::InvalidInput`].
    pub async fn approval(&mut self, request: ApprovalRequest) -> Result<Approval, AgentError> {
        let position = self.next_step;
        let key = SignalKey::new(format!("{APPROVAL_KEY_PREFIX}{position}"))
            .map_err(|e| AgentError::failed(format!("approval key: {e}")))?;
        // Emitted before the wait's first step is recorded: a crash in
        // between emits it again on the next attempt (same key), never not
        // at all.
        if self.checkpoints.recorded(position).is_none() {
            let deadline_ms = request.timeout.map(deadline_from_now);
            self.append(EventBody::ApprovalRequested(ApprovalRequested {
                key: key.clone(),
                tool: request.tool.clone(),
                arguments: request.arguments.clone(),
                reason: request.reason.clone(),
                deadline_ms,
            }))
            .await?;
        }
        match self.signal_outcome(&key, request.timeout).await? {
            SignalOutcome::TimedOut => Ok(Approval::Expired),
            SignalOutcome::Received { payload } => {
                let decision: ApprovalDecision = serde_json::from_value(payload).map_err(|e| {
                    AgentError::invalid_input(format!(
                        "the decision on {key} is not {{\"decision\": \"approve\"|\"reject\"|\"edit\", …}}: {e}"
                    ))
                })?;
                Ok(match decision {
                    ApprovalDecision::Approve => Approval::Approved,
                    ApprovalDecision::Reject { reason } => Approval::Rejected { reason },
                    ApprovalDecision::Edit { input } => Approval::Edited { input },
                })
            }
        }
    }

    /// Sleeps durably for `duration`: the wake-up time is recorded, the run
    /// parks (no slot, no lease) and a timer dispatches it again when due,
    /// after any restart of workers, coordinator or nats-server.
    ///
    /// # Errors
    ///
    /// [`AgentError::Interrupted`] when the run parks (return it with `?`)
    /// or is being stopped.
    pub async fn sleep(&mut self, duration: Duration) -> Result<(), AgentError> {
        let wake_at: i64 = self.step(STEP_SLEEP, |_| async move { Ok(deadline_from_now(duration)) }).await?;
        if time::now_ms() >= wake_at {
            return Ok(());
        }
        Err(self.park(Park { key: None, deadline_ms: Some(wake_at) }))
    }

    /// The recorded outcome of waiting on `key`, parking the run when there
    /// is none yet.
    async fn signal_outcome(
        &mut self,
        key: &SignalKey,
        timeout: Option<Duration>,
    ) -> Result<SignalOutcome, AgentError> {
        let deadline_ms: Option<i64> = self
            .step(&format!("{STEP_WAIT}:{key}"), |_| async move { Ok(timeout.map(deadline_from_now)) })
            .await?;
        let index = self.next_step;
        let outcome = if self.checkpoints.recorded(index).is_some() {
            // Replayed by `step` below.
            SignalOutcome::TimedOut
        } else if let Some(record) = self.read_signal(key).await? {
            SignalOutcome::Received { payload: record.payload }
        } else if deadline_ms.is_some_and(|deadline| time::now_ms() >= deadline) {
            SignalOutcome::TimedOut
        } else {
            return Err(self.park(Park { key: Some(key.clone()), deadline_ms }));
        };
        self.step(&format!("{STEP_SIGNAL}:{key}"), |_| {
            let outcome = outcome.clone();
            async move { Ok(outcome) }
        })
        .await
    }

    async fn read_signal(&mut self, key: &SignalKey) -> Result<Option<SignalRecord>, AgentError> {
        let kv_key = self.names.signal_key(self.run_id(), key);
        let entry = self.signals.get(&kv_key).await.map_err(|e| {
            AgentError::Interrupted(Interruption::Signals { key: key.to_string(), message: e.to_string() })
        })?;
        entry
            .map(|bytes| {
                codec::decode::<SignalRecord>(&bytes).map_err(|e| {
                    AgentError::invalid_input(format!("the stored signal {key} is not decodable: {e}"))
                })
            })
            .transpose()
    }

    /// Marks the run parked: nothing more is recorded by this attempt, and
    /// the runtime parks it once the agent returns.
    fn park(&mut self, park: Park) -> AgentError {
        self.parked = Some(park);
        AgentError::Interrupted(Interruption::Waiting)
    }
}

fn deadline_from_now(duration: Duration) -> i64 {
    time::now_ms().saturating_add(i64::try_from(duration.as_millis()).unwrap_or(i64::MAX))
}
