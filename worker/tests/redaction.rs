//! Secrets in event payloads are redacted before they are published, while
//! the agent still sees the real values (the job and the checkpoints keep
//! them): against a real nats-server.

mod common;

use std::time::Duration;

use async_trait::async_trait;
use common::{types, Env};
use runfleet_ops::redact::{RedactionConfig, REDACTED};
use runfleet_protocol::event::EventBody;
use runfleet_protocol::AgentName;
use runfleet_worker::sdk::{Agent, AgentError, RunContext};
use runfleet_worker::{agents, WorkerConfig};
use serde_json::{json, Value};

/// Reports whether it saw the real password, emits an event with a token in
/// it and returns the secrets it was given.
struct Peek;

#[async_trait]
impl Agent for Peek {
    async fn run(&self, ctx: &mut RunContext, input: Value) -> Result<Value, AgentError> {
        let password = input["login"]["password"].clone();
        let stored: Value = ctx.step("fetch", |_| async { Ok(json!({"session_token": "tok-1"})) }).await?;
        ctx.emit("login", json!({"user": "bob", "session_token": stored["session_token"]})).await?;
        Ok(json!({
            "saw_real_password": password == json!("hunter2"),
            "stored_token_is_real": stored["session_token"] == json!("tok-1"),
            "password": password,
            "items": [{"api_key": "sk-1", "name": "a"}],
        }))
    }
}

#[tokio::test]
async fn event_payloads_are_redacted_but_agents_see_real_values() -> anyhow::Result<()> {
    let env = Env::start(Duration::from_secs(15)).await?;
    let mut agents = agents::builtin();
    agents.register(AgentName::new("peek")?, Peek);
    let config = WorkerConfig {
        redaction: RedactionConfig { keys: vec!["password".into(), "*_token".into(), "api_key".into()] },
        ..env.config(1)
    };
    let worker = env.worker(config, agents).await?;
    let run = env.submit("peek", json!({"login": {"user": "bob", "password": "hunter2"}}), 2).await?;
    let events = env.wait_terminal(run).await?;
    assert_eq!(types(&events).last(), Some(&"run.completed"), "{events:?}");

    let emitted = events.iter().find_map(|e| match &e.body {
        EventBody::Agent(agent) => Some(agent.data.clone()),
        _ => None,
    });
    assert_eq!(emitted, Some(json!({"user": "bob", "session_token": REDACTED})));
    let Some(EventBody::Completed(completed)) = events.last().map(|e| &e.body) else {
        anyhow::bail!("no run.completed")
    };
    assert_eq!(
        completed.output,
        json!({
            "saw_real_password": true,
            "stored_token_is_real": true,
            "password": REDACTED,
            "items": [{"api_key": REDACTED, "name": "a"}],
        })
    );
    // The checkpoint keeps the real value: a replay must return what the step returned.
    let checkpoints = env.checkpoints(run).await?;
    let output = serde_json::to_value(checkpoints.get(&0).map(|c| c.output.clone()))?;
    assert!(output.to_string().contains("tok-1"), "{output}");
    worker.stop().await
}
