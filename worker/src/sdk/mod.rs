//! The agent SDK: what agent code implements ([`Agent`]) and what it gets
//! while it runs ([`RunContext`]).
//!
//! A worker binary builds an [`Agents`] registry, registers its agents under
//! their names and hands it to [`crate::Worker::start`]. Jobs name the agent
//! they are for; a worker that does not have it fails the run with
//! [`ErrorCode::UnknownAgent`].
//!
//! Agent code does its work in durable steps ([`RunContext::step`]): each
//! completed step is checkpointed, and a run resumed on another worker after
//! a crash replays completed steps from their checkpoints instead of running
//! them again.

mod step;
mod wait;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_nats::jetstream::kv;
use runfleet_protocol::event::{AgentEvent, EventBody};
use runfleet_protocol::{AgentName, ErrorCode, Names, RunId, TenantId, WorkerId};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::runtime::checkpoints::{self, CheckpointLog};
use crate::runtime::events::{self, EventLog};

pub use async_trait::async_trait;
pub use step::{StepContext, StepError, StepOptions};
pub(crate) use wait::Park;
pub use wait::{Approval, ApprovalRequest};

/// Agent code: one invocation per run attempt.
///
/// The runtime calls [`Agent::run`] after it has claimed the run: it holds
/// the run's lease and has written `run.started` or `run.resumed`, except
/// on a fresh run's first delivery, where `run.started` goes out with the
/// agent's first event (a step's `step.started`, whose acknowledgement the
/// step's work waits for, so no step runs before `run.started` is stored).
/// `Ok(output)` becomes `run.completed`,
/// `Err(e)` becomes `run.failed` with [`AgentError::code`]. A panic is caught
/// and becomes `run.failed` with [`ErrorCode::AgentPanicked`]; it never takes
/// the worker down.
///
/// **Durability:** a run may be executed by several attempts (a worker
/// crash, a lost lease or a hand-off means another attempt on another
/// worker). Each attempt calls `run` from the start, and every
/// [`RunContext::step`] that an earlier attempt completed returns its
/// recorded output without executing again. So: do side effects inside
/// steps, keep code outside steps deterministic (use [`RunContext::now`],
/// [`RunContext::uuid`] and [`RunContext::random`] rather than the clock or
/// an RNG), and make each step idempotent with
/// [`StepContext::idempotency_key`]: only the step in flight at a crash can
/// run twice.
///
/// **Cancellation:** the returned future is dropped at an `.await` point when
/// the run is cancelled (`runfleet cancel`), when the worker loses the run's
/// lease, or when a draining worker's hand-off timeout is over, so agent
/// code must tolerate being stopped between any two awaits. A draining
/// worker first asks nicely: the next [`RunContext::step`] returns
/// [`AgentError::Interrupted`] and the run is handed off at that boundary.
///
/// **Waiting:** [`RunContext::await_signal`], [`RunContext::approval`] and
/// [`RunContext::sleep`] park the run when they cannot return at once: they
/// return [`AgentError::Interrupted`], which the agent returns (`?`), and a
/// later attempt gets past them. The run holds no slot and no lease while it
/// waits.
///
/// # Example
///
/// ```
/// use runfleet_worker::sdk::{async_trait, Agent, AgentError, Agents, RunContext};
/// use runfleet_protocol::AgentName;
/// use serde_json::{json, Value};
///
/// struct Greeter;
///
/// #[async_trait]
/// impl Agent for Greeter {
///     async fn run(&self, ctx: &mut RunContext, input: Value) -> Result<Value, AgentError> {
///         let name = input["name"]
///             .as_str()
///             .ok_or_else(|| AgentError::invalid_input("expected {\"name\": string}"))?;
///         let name = name.to_owned();
///         // Runs once per run, even if the worker crashes afterwards.
///         let message: String = ctx
///             .step("compose", |_step| {
///                 let name = name.clone();
///                 async move { Ok(format!("hello, {name}")) }
///             })
///             .await?;
///         ctx.emit("greeting", json!({ "to": name })).await?;
///         Ok(json!({ "message": message }))
///     }
/// }
///
/// let mut agents = Agents::new();
/// agents.register(AgentName::new("greeter").unwrap(), Greeter);
/// assert!(agents.get(&AgentName::new("greeter").unwrap()).is_some());
/// ```
#[async_trait]
pub trait Agent: Send + Sync + 'static {
    /// Runs the agent on `input` (the run's input as submitted).
    async fn run(&self, ctx: &mut RunContext, input: Value) -> Result<Value, AgentError>;
}

/// Why an agent run did not produce an output.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent gave up; becomes `run.failed` with [`ErrorCode::AgentFailed`].
    #[error("{message}")]
    Failed { message: String },
    /// The input is not what the agent accepts; becomes `run.failed` with
    /// [`ErrorCode::InvalidInput`].
    #[error("invalid input: {message}")]
    InvalidInput { message: String },
    /// This attempt failed but the run may succeed on another: the run is
    /// retried after a backoff (resuming from its checkpoints) until it has
    /// used `max_attempts`.
    #[error("{message}")]
    Retryable { message: String },
    /// A durable step failed after its tries; becomes `run.failed` with
    /// [`ErrorCode::StepFailed`] unless the agent handles it.
    #[error("step {index} ({name}) failed after {attempts} tries: {message}")]
    Step { index: u32, name: String, attempts: u32, message: String },
    /// The agent's steps do not match the run's checkpoints: the run fails
    /// with [`ErrorCode::Divergence`] whatever the agent returns.
    #[error("{message}")]
    Divergence { message: String },
    /// A checkpoint could not be used (corrupt, or an output the step cannot
    /// serialize): the run fails with [`ErrorCode::Internal`].
    #[error("{message}")]
    Checkpoint { message: String },
    /// The run is being stopped: a write was refused (the lease was lost),
    /// the worker is handing the run off, or the log's position is unknown
    /// after a failed write. The runtime writes nothing more for this
    /// attempt; return this error as is (`?`).
    #[error("run interrupted: {0}")]
    Interrupted(#[from] Interruption),
}

/// Why a run attempt must stop without writing more.
#[derive(Debug, thiserror::Error)]
pub enum Interruption {
    #[error(transparent)]
    Events(#[from] events::Error),
    #[error(transparent)]
    Checkpoints(#[from] checkpoints::Error),
    /// The lease was lost, the run was cancelled or it is being handed off.
    #[error("the run is being stopped (lease lost, cancelled or handed off)")]
    Stopped,
    /// The worker is shutting down: the run is handed off to another worker
    /// at this step boundary (the steps so far are checkpointed).
    #[error("the worker is shutting down; the run is handed off at this step boundary")]
    HandedOff,
    /// The run waits for a signal or a timer: the runtime parks it (no
    /// slot, no lease) and it resumes on any worker when woken.
    #[error("the run is waiting for a signal or a timer")]
    Waiting,
    /// The run's signals could not be read.
    #[error("signal {key} could not be read: {message}")]
    Signals { key: String, message: String },
}

impl Interruption {
    /// Whether a newer attempt owns the run.
    pub fn is_lease_lost(&self) -> bool {
        match self {
            Self::Events(e) => e.is_lease_lost(),
            Self::Checkpoints(e) => e.is_lease_lost(),
            Self::Stopped | Self::HandedOff | Self::Waiting | Self::Signals { .. } => false,
        }
    }
}

impl From<events::Error> for AgentError {
    fn from(e: events::Error) -> Self {
        Self::Interrupted(e.into())
    }
}

impl AgentError {
    /// An agent failure with a message for the user.
    pub fn failed(message: impl Into<String>) -> Self {
        Self::Failed { message: message.into() }
    }

    /// An input the agent cannot work with.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::InvalidInput { message: message.into() }
    }

    /// A failure worth another attempt of the whole run (see
    /// [`AgentError::Retryable`]).
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::Retryable { message: message.into() }
    }

    /// The error code the failure is reported with in `run.failed`.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Failed { .. } | Self::Retryable { .. } => ErrorCode::AgentFailed,
            Self::InvalidInput { .. } => ErrorCode::InvalidInput,
            Self::Step { .. } => ErrorCode::StepFailed,
            Self::Divergence { .. } => ErrorCode::Divergence,
            Self::Checkpoint { .. } => ErrorCode::Internal,
            Self::Interrupted(_) => ErrorCode::Unavailable,
        }
    }
}

/// What agent code sees of its run while it executes.
///
/// One `RunContext` exists per run attempt; it owns the run's event log and
/// checkpoints, so everything the agent records is written with the lease's
/// fencing (see [`crate::runtime::events`] and
/// [`crate::runtime::checkpoints`]).
pub struct RunContext {
    log: EventLog,
    checkpoints: CheckpointLog,
    /// The signals bucket and the names to read it with.
    signals: Arc<kv::Store>,
    names: Names,
    agent: AgentName,
    input: Value,
    stop: CancellationToken,
    /// Cancelled when the worker drains: no new step starts.
    drain: CancellationToken,
    /// Set when the run parked on a wait (see [`RunContext::await_signal`]).
    parked: Option<Park>,
    /// Set when a step refused to start because the worker drains.
    handed_off: bool,
    /// The position of the next step.
    next_step: u32,
    /// Set when the run must fail whatever the agent returns (divergence).
    fatal: Option<(ErrorCode, String)>,
}

// Agents hold `&ctx` across awaits inside `Send` futures (`async_trait`), so
// the context must stay `Send + Sync`.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<RunContext>();
};

impl fmt::Debug for RunContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunContext")
            .field("run_id", &self.log.run_id())
            .field("attempt", &self.log.attempt())
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

impl RunContext {
    pub(crate) fn new(parts: ContextParts, agent: AgentName, input: Value) -> Self {
        let ContextParts { log, checkpoints, signals, names, stop, drain } = parts;
        Self {
            log,
            checkpoints,
            signals,
            names,
            agent,
            input,
            stop,
            drain,
            parked: None,
            handed_off: false,
            next_step: 0,
            fatal: None,
        }
    }

    /// Whether a step refused to start because the worker drains: the run
    /// is handed off whatever the agent made of that error.
    pub(crate) fn handed_off(&self) -> bool {
        self.handed_off
    }

    /// What the run parked on, if it did.
    pub(crate) fn parked(&self) -> Option<&Park> {
        self.parked.as_ref()
    }

    pub(crate) fn log_mut(&mut self) -> &mut EventLog {
        &mut self.log
    }

    /// Whether a write of this attempt was refused because a newer attempt
    /// owns the run.
    pub(crate) fn is_lost(&self) -> bool {
        self.log.is_lost() || self.checkpoints.is_lost()
    }

    /// The failure the run must end with regardless of the agent's result.
    pub(crate) fn fatal(&self) -> Option<&(ErrorCode, String)> {
        self.fatal.as_ref()
    }

    /// The fencing token of this attempt: the run's lease revision at claim,
    /// higher than any earlier attempt's; 0 for a submission's first attempt,
    /// which is claimed without a lease (no earlier attempt to fence off).
    /// Hand it to external systems that can refuse writes from a stale token.
    pub fn fencing_token(&self) -> u64 {
        self.checkpoints.fencing_token()
    }

    /// How many steps earlier attempts completed (replayed by this one).
    pub fn steps_recorded(&self) -> u32 {
        self.checkpoints.recorded_count()
    }

    /// The run's id.
    pub fn run_id(&self) -> RunId {
        self.log.run_id()
    }

    /// The tenant the run belongs to.
    pub fn tenant(&self) -> &TenantId {
        self.log.tenant()
    }

    /// The execution attempt, from 1. Greater than 1 when an earlier attempt
    /// crashed or was handed off.
    pub fn attempt(&self) -> u32 {
        self.log.attempt()
    }

    /// The name the agent was invoked under.
    pub fn agent(&self) -> &AgentName {
        &self.agent
    }

    /// The run's input (the same value [`Agent::run`] receives).
    pub fn input(&self) -> &Value {
        &self.input
    }

    /// Appends an `agent.event` named `name` with `data` to the run's log and
    /// waits until JetStream has stored it.
    ///
    /// # Errors
    ///
    /// [`AgentError::Interrupted`] if the log refused the write, usually
    /// because the lease was lost; the agent should return it (`?`). After an
    /// error nothing more can be emitted.
    pub async fn emit(&mut self, name: impl Into<String>, data: Value) -> Result<(), AgentError> {
        self.append(EventBody::Agent(AgentEvent { name: name.into(), data })).await
    }

    /// Appends one event unless the run is being stopped. A refusal stops
    /// the run at once, even if the agent swallows the error.
    async fn append(&mut self, body: EventBody) -> Result<(), AgentError> {
        self.begin_append(body).await?;
        self.confirm_append().await
    }

    /// Sends one event unless the run is being stopped, without waiting for
    /// its acknowledgement (see [`EventLog::begin`]).
    async fn begin_append(&mut self, body: EventBody) -> Result<(), AgentError> {
        self.writable()?;
        let sent = self.log.begin(body).await;
        sent.map_err(|e| self.refused(e))
    }

    /// Holds one event to go out with the run's next one, unless the run is
    /// being stopped (see [`EventLog::hold`]).
    async fn hold_append(&mut self, body: EventBody) -> Result<(), AgentError> {
        self.writable()?;
        let held = self.log.hold(body, &self.stop).await;
        held.map_err(|e| self.refused(e))
    }

    /// Refuses a write of a parked run or of one being stopped (whose log it
    /// closes).
    fn writable(&mut self) -> Result<(), AgentError> {
        if self.parked.is_some() {
            return Err(AgentError::Interrupted(Interruption::Waiting));
        }
        if self.stop.is_cancelled() {
            self.log.close();
            return Err(AgentError::Interrupted(Interruption::Stopped));
        }
        Ok(())
    }

    /// Waits for the event [`RunContext::begin_append`] sent, if any.
    async fn confirm_append(&mut self) -> Result<(), AgentError> {
        let confirmed = self.log.confirm().await;
        confirmed.map(drop).map_err(|e| self.refused(e))
    }

    /// A failed append: a refusal stops the run at once.
    fn refused(&self, e: events::Error) -> AgentError {
        if e.is_lease_lost() {
            self.stop.cancel();
        }
        e.into()
    }

    /// Completes when the run is being stopped at once (lease lost, or the
    /// hand-off timeout of a draining worker is over). Cancellation safe.
    /// The runtime drops the agent's future shortly after, so use this only
    /// for quick cleanup. A cancelled run's future is dropped without
    /// notice.
    pub async fn cancelled(&self) {
        self.stop.cancelled().await;
    }

    /// Whether the run is being stopped.
    pub fn is_cancelled(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// The worker executing the run.
    pub fn worker_id(&self) -> &WorkerId {
        self.log.worker_id()
    }
}

/// What the runtime hands a [`RunContext`]: the attempt's fenced logs, the
/// signals bucket and its stop tokens.
pub(crate) struct ContextParts {
    pub log: EventLog,
    pub checkpoints: CheckpointLog,
    pub signals: Arc<kv::Store>,
    pub names: Names,
    /// Stops the run at once (lease lost, cancelled, hard hand-off).
    pub stop: CancellationToken,
    /// Stops the run at its next step boundary (drain).
    pub drain: CancellationToken,
}

/// A registry of agents by name, handed to [`crate::Worker::start`].
/// Cheap to clone (agents are shared).
#[derive(Clone, Default)]
pub struct Agents {
    agents: BTreeMap<AgentName, Arc<dyn Agent>>,
}

impl fmt::Debug for Agents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.agents.keys()).finish()
    }
}

impl Agents {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `agent` under `name`, returning the agent it replaces.
    pub fn register(&mut self, name: AgentName, agent: impl Agent) -> Option<Arc<dyn Agent>> {
        self.agents.insert(name, Arc::new(agent))
    }

    /// Registers an already shared agent under `name`.
    pub fn register_arc(&mut self, name: AgentName, agent: Arc<dyn Agent>) -> Option<Arc<dyn Agent>> {
        self.agents.insert(name, agent)
    }

    /// The agent registered under `name`.
    pub fn get(&self, name: &AgentName) -> Option<&Arc<dyn Agent>> {
        self.agents.get(name)
    }

    /// The registered names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &AgentName> {
        self.agents.keys()
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }
}
