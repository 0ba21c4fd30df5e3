//! The agent SDK: what agent code implements ([`Agent`]) and what it gets
//! while it runs ([`RunContext`]).
//!
//! A worker binary builds an [`Agents`] registry, registers its agents under
//! their names and hands it to [`crate::Worker::start`]. Jobs name the agent
//! they are for; a worker that does not have it fails the run with
//! [`ErrorCode::UnknownAgent`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use runfleet_protocol::event::{AgentEvent, EventBody};
use runfleet_protocol::{AgentName, ErrorCode, RunId, TenantId, WorkerId};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::runtime::events::{self, EventLog};

pub use async_trait::async_trait;

/// Agent code: one invocation per run attempt.
///
/// The runtime calls [`Agent::run`] after it has claimed the run (holds its
/// lease and has written `run.started`). `Ok(output)` becomes `run.completed`,
/// `Err(e)` becomes `run.failed` with [`AgentError::code`]. A panic is caught
/// and becomes `run.failed` with [`ErrorCode::AgentPanicked`]; it never takes
/// the worker down.
///
/// **Cancellation:** the returned future is dropped at an `.await` point when
/// the worker loses the run's lease or hands the run off at shutdown, so agent
/// code must tolerate being stopped between any two awaits (use
/// [`RunContext::cancelled`] to clean up first). A run may be executed more
/// than once (a worker crash means another attempt from the start), so side
/// effects should be idempotent; [`RunContext::attempt`] tells which attempt
/// this is.
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
///         ctx.emit("greeting", json!({ "to": name })).await?;
///         Ok(json!({ "message": format!("hello, {name}") }))
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
    /// The run's event log refused a write ([`RunContext::emit`] failed),
    /// usually because the lease was lost. The runtime writes nothing more
    /// for this attempt; return this error as is (`?`).
    #[error("run interrupted: {0}")]
    Interrupted(#[from] events::Error),
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

    /// The error code the failure is reported with in `run.failed`.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Failed { .. } => ErrorCode::AgentFailed,
            Self::InvalidInput { .. } => ErrorCode::InvalidInput,
            Self::Interrupted(_) => ErrorCode::Unavailable,
        }
    }
}

/// What agent code sees of its run while it executes.
///
/// One `RunContext` exists per run attempt; it owns the run's event log, so
/// everything the agent reports is appended with the lease's fencing (see
/// [`crate::runtime::events`]).
pub struct RunContext {
    log: EventLog,
    agent: AgentName,
    input: Value,
    stop: CancellationToken,
}

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
    pub(crate) fn new(log: EventLog, agent: AgentName, input: Value, stop: CancellationToken) -> Self {
        Self { log, agent, input, stop }
    }

    pub(crate) fn log_mut(&mut self) -> &mut EventLog {
        &mut self.log
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
        if self.stop.is_cancelled() {
            self.log.close();
            return Err(AgentError::Interrupted(events::Error::Closed { run_id: self.run_id() }));
        }
        match self.log.append(EventBody::Agent(AgentEvent { name: name.into(), data })).await {
            Ok(_) => Ok(()),
            Err(e) => {
                // Someone else wrote to the log: stop the run at once, even
                // if the agent swallows this error.
                if e.is_lease_lost() {
                    self.stop.cancel();
                }
                Err(AgentError::Interrupted(e))
            }
        }
    }

    /// Completes when the run is being stopped (lease lost, or handed off at
    /// shutdown). Cancellation safe. The runtime drops the agent's future
    /// shortly after, so use this only for quick cleanup.
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
