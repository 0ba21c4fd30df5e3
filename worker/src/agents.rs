//! Built-in agents, shipped so a fleet can be exercised without writing code:
//! `echo`, `sleep` and `fail`. See [`builtin`].

use std::time::Duration;

use async_trait::async_trait;
use runfleet_protocol::AgentName;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::sdk::{Agent, AgentError, Agents, RunContext};

/// The built-in agents under their names: `echo`, `sleep` and `fail`.
pub fn builtin() -> Agents {
    let mut agents = Agents::new();
    let builtins: [(&str, std::sync::Arc<dyn Agent>); 3] = [
        ("echo", std::sync::Arc::new(Echo)),
        ("sleep", std::sync::Arc::new(Sleep)),
        ("fail", std::sync::Arc::new(Fail)),
    ];
    for (name, agent) in builtins {
        // The names are constants that pass validation; a failure here would
        // only drop a built-in, never panic the worker.
        if let Ok(name) = AgentName::new(name) {
            agents.register_arc(name, agent);
        }
    }
    agents
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
/// after each, and outputs `{"steps": N}`. Useful to hold a slot and to watch
/// heartbeats keep a long run alive.
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
