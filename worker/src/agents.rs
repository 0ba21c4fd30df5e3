//! Built-in agents, shipped so a fleet can be exercised without writing code:
//! `echo`, `sleep`, `fail`, `steps`, `approval` and `timer` (see
//! [`builtin`]), plus the test
//! agents runfleet's own crash tests and `runfleet chaos` use
//! ([`with_test_agents`]).

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use runfleet_protocol::AgentName;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::sdk::{Agent, AgentError, Agents, Approval, ApprovalRequest, RunContext, StepContext, StepError};

/// The built-in agents under their names: `echo`, `sleep`, `fail`,
/// `steps`, `approval` and `timer`.
pub fn builtin() -> Agents {
    let mut agents = Agents::new();
    let builtins: [(&str, Arc<dyn Agent>); 6] = [
        ("echo", Arc::new(Echo)),
        ("sleep", Arc::new(Sleep)),
        ("fail", Arc::new(Fail)),
        ("steps", Arc::new(Steps::default())),
        ("approval", Arc::new(ApprovalAgent)),
        ("timer", Arc::new(Timer)),
    ];
    register(&mut agents, builtins);
    agents
}

/// Options of the test agents.
#[derive(Debug, Clone, Default)]
pub struct TestAgents {
    /// The `steps` agent appends one line per step execution here:
    /// `<run_id> <step_index> <run_attempt> <worker_id> <fencing_token>`.
    pub journal: Option<PathBuf>,
    /// Prefix of the `steps` agent's step names (default `step`): a worker
    /// with another prefix runs "changed agent code" for divergence tests.
    pub step_prefix: Option<String>,
}

/// [`builtin`] with the test agents added: `steps` with `options`, `crash`,
/// which aborts its worker process, and `await` (see [`Await`]). Only for tests and chaos runs:
/// anyone who can submit `crash` can kill such a worker.
pub fn with_test_agents(options: TestAgents) -> Agents {
    let mut agents = builtin();
    let steps = Steps {
        journal: options.journal,
        prefix: options.step_prefix.unwrap_or_else(|| DEFAULT_STEP_PREFIX.to_owned()),
    };
    let tests: [(&str, Arc<dyn Agent>); 3] =
        [("steps", Arc::new(steps)), ("crash", Arc::new(Crash)), ("await", Arc::new(Await))];
    register(&mut agents, tests);
    agents
}

fn register<const N: usize>(agents: &mut Agents, list: [(&str, Arc<dyn Agent>); N]) {
    for (name, agent) in list {
        // The names are constants that pass validation; a failure here would
        // only drop a built-in, never panic the worker.
        if let Ok(name) = AgentName::new(name) {
            agents.register_arc(name, agent);
        }
    }
}

/// `echo`: the output is the input.
#[derive(Debug, Clone, Copy, Default)]
pub struct Echo;

#[async_trait]
impl Agent for Echo {
    async fn run(&self, _ctx: &mut RunContext, input: Value) -> Result<Value, AgentError> {
        Ok(input)
    }
}

/// `sleep`: input `{"steps": N, "ms": M}`; sleeps N steps of M milliseconds,
/// emitting `agent.event` `progress` with `{"step": i, "steps": N}` (i from 1)
/// after each, and outputs `{"steps": N}`. Not durable (no checkpoints):
/// useful to hold a slot and to watch heartbeats keep a long run alive.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sleep;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepInput {
    steps: u64,
    ms: u64,
}

#[async_trait]
impl Agent for Sleep {
    async fn run(&self, ctx: &mut RunContext, input: Value) -> Result<Value, AgentError> {
        let SleepInput { steps, ms } = serde_json::from_value(input).map_err(|e| {
            AgentError::invalid_input(format!("sleep expects {{\"steps\": N, \"ms\": M}}: {e}"))
        })?;
        for step in 1..=steps {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            ctx.emit("progress", json!({ "step": step, "steps": steps })).await?;
        }
        Ok(json!({ "steps": steps }))
    }
}

/// `approval`: input `{"action": S}`; asks for approval of `S`
/// (`approval.requested` with tool `action` and arguments `{"action": S}`),
/// waits for the decision without holding a slot, and completes with
/// `{"decision": "approve"|"reject"|"edit", "action": <final action>}`. An
/// edit's input is the final action: a string, or an object's `action`
/// field.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApprovalAgent;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalInput {
    action: String,
}

#[async_trait]
impl Agent for ApprovalAgent {
    async fn run(&self, ctx: &mut RunContext, input: Value) -> Result<Value, AgentError> {
        let ApprovalInput { action } = serde_json::from_value(input).map_err(|e| {
            AgentError::invalid_input(format!("approval expects {{\"action\": string}}: {e}"))
        })?;
        let request = ApprovalRequest::new("action", json!({ "action": action }))
            .reason(format!("the agent wants to {action}"));
        let output = match ctx.approval(request).await? {
            Approval::Approved => json!({ "decision": "approve", "action": action }),
            Approval::Rejected { reason } => {
                json!({ "decision": "reject", "action": null, "reason": reason })
            }
            Approval::Edited { input } => {
                let edited = match &input {
                    Value::String(s) => Value::String(s.clone()),
                    Value::Object(map) => map.get("action").cloned().unwrap_or(input.clone()),
                    other => other.clone(),
                };
                json!({ "decision": "edit", "action": edited })
            }
            Approval::Expired => json!({ "decision": "expired", "action": null }),
        };
        Ok(output)
    }
}

/// `timer`: input `{"sleep_ms": M}`; one durable sleep of M milliseconds
/// (no slot held while it sleeps), then completes with `{"slept_ms": M}`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timer;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TimerInput {
    sleep_ms: u64,
}

#[async_trait]
impl Agent for Timer {
    async fn run(&self, ctx: &mut RunContext, input: Value) -> Result<Value, AgentError> {
        let TimerInput { sleep_ms } = serde_json::from_value(input).map_err(|e| {
            AgentError::invalid_input(format!("timer expects {{\"sleep_ms\": integer}}: {e}"))
        })?;
        ctx.sleep(Duration::from_millis(sleep_ms)).await?;
        Ok(json!({ "slept_ms": sleep_ms }))
    }
}

/// `await` (test agent): input `{"key": K, "timeout_ms": T}` (`timeout_ms`
/// optional); waits for signal `K` and completes with `{"signal": payload}`
/// or, after the timeout, `{"timed_out": true}`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Await;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AwaitInput {
    key: String,
    timeout_ms: Option<u64>,
}

#[async_trait]
impl Agent for Await {
    async fn run(&self, ctx: &mut RunContext, input: Value) -> Result<Value, AgentError> {
        let AwaitInput { key, timeout_ms } = serde_json::from_value(input).map_err(|e| {
            AgentError::invalid_input(format!(
                "await expects {{\"key\": string, \"timeout_ms\"?: integer}}: {e}"
            ))
        })?;
        let received: Option<Value> = ctx.await_signal(&key, timeout_ms.map(Duration::from_millis)).await?;
        Ok(match received {
            Some(payload) => json!({ "signal": payload }),
            None => json!({ "timed_out": true }),
        })
    }
}

/// `fail`: input `{"message": S}`; fails with that message.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fail;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailInput {
    message: String,
}

#[async_trait]
impl Agent for Fail {
    async fn run(&self, _ctx: &mut RunContext, input: Value) -> Result<Value, AgentError> {
        let FailInput { message } = serde_json::from_value(input)
            .map_err(|e| AgentError::invalid_input(format!("fail expects {{\"message\": string}}: {e}")))?;
        Err(AgentError::failed(message))
    }
}

const DEFAULT_STEP_PREFIX: &str = "step";

/// `steps`: input `{"steps": N, "ms": M, "output_bytes": B}` (`ms` and
/// `output_bytes` optional, default 0). Runs N durable steps named
/// `step-0` … `step-<N-1>`, each sleeping M ms and producing
/// `{"index": i, "pad": <B bytes>}`; outputs `{"steps": N, "bytes": total}`
/// from the recorded step outputs. Shows crash resume: kill its worker and
/// another one finishes without re-running completed steps.
#[derive(Debug, Clone)]
pub struct Steps {
    journal: Option<PathBuf>,
    prefix: String,
}

impl Default for Steps {
    fn default() -> Self {
        Self { journal: None, prefix: DEFAULT_STEP_PREFIX.to_owned() }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepsInput {
    steps: u32,
    #[serde(default)]
    ms: u64,
    #[serde(default)]
    output_bytes: usize,
    /// The step that panics (after journaling), if any.
    #[serde(default)]
    panic_at: Option<u32>,
}

/// Upper bounds so a bad input cannot exhaust a worker.
const MAX_STEPS: u32 = 10_000;
const MAX_STEP_OUTPUT_BYTES: usize = 64 * 1024 * 1024;

#[derive(serde::Serialize, Deserialize)]
struct StepsOutput {
    index: u32,
    pad: String,
}

#[async_trait]
impl Agent for Steps {
    async fn run(&self, ctx: &mut RunContext, input: Value) -> Result<Value, AgentError> {
        let StepsInput { steps, ms, output_bytes, panic_at } =
            serde_json::from_value(input).map_err(|e| {
                AgentError::invalid_input(format!(
                    "steps expects {{\"steps\": N, \"ms\": M, \"output_bytes\": B, \"panic_at\": I}}: {e}"
                ))
            })?;
        if steps > MAX_STEPS || output_bytes > MAX_STEP_OUTPUT_BYTES {
            return Err(AgentError::invalid_input(format!(
                "steps allows at most {MAX_STEPS} steps of at most {MAX_STEP_OUTPUT_BYTES} bytes"
            )));
        }
        let mut total = 0;
        for index in 0..steps {
            let name = format!("{}-{index}", self.prefix);
            let journal = self.journal.clone();
            let output: StepsOutput = ctx
                .step(&name, |step| {
                    let journal = journal.clone();
                    async move {
                        if let Some(path) = journal {
                            record(&path, &step).map_err(StepError::fatal)?;
                        }
                        if ms > 0 {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        if panic_at == Some(index) {
                            panic!("step {index} panics, as its input asked");
                        }
                        Ok(StepsOutput { index, pad: pad(index, output_bytes) })
                    }
                })
                .await?;
            if output.index != index || output.pad != pad(index, output_bytes) {
                return Err(AgentError::failed(format!(
                    "step {index} returned a different output than it recorded"
                )));
            }
            total += output.pad.len();
        }
        Ok(json!({ "steps": steps, "bytes": total }))
    }
}

/// A deterministic, index-dependent filler, so a wrong replay is detected.
fn pad(index: u32, bytes: usize) -> String {
    let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let start = usize::try_from(index).unwrap_or(0);
    (0..bytes).map(|i| char::from(alphabet[(start + i) % alphabet.len()])).collect()
}

/// Appends one journal line in a single `write` (atomic for `O_APPEND`
/// files of this size, so several worker processes can share the file).
fn record(path: &PathBuf, step: &StepContext) -> std::io::Result<()> {
    let line = format!(
        "{} {} {} {} {}\n",
        step.run_id(),
        step.index(),
        step.run_attempt(),
        step.worker_id(),
        step.fencing_token()
    );
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(line.as_bytes())
}

/// `crash` (test agent): completes one step, then aborts its worker process,
/// every attempt. Shows that a poison run stops after `max_attempts`. With
/// `{"before_first_step": true}` it aborts before anything else, before the
/// attempt has stored a single event.
#[derive(Debug, Clone, Copy, Default)]
pub struct Crash;

#[async_trait]
impl Agent for Crash {
    async fn run(&self, ctx: &mut RunContext, input: Value) -> Result<Value, AgentError> {
        let attempt = ctx.attempt();
        if input["before_first_step"] == Value::Bool(true) {
            tracing::error!(run_id = %ctx.run_id(), attempt, "crash agent aborting the worker process before its first step");
            std::process::abort();
        }
        ctx.step("before-crash", |_| async { Ok(true) }).await?;
        tracing::error!(run_id = %ctx.run_id(), attempt, "crash agent aborting the worker process");
        std::process::abort();
    }
}
