//! A worker binary of your own: the built-in agents plus one you write.
//!
//! ```sh
//! runfleet dev --workers 0 &                       # nats-server + coordinator, no workers
//! cargo run -p runfleet-worker --example custom_worker -- nats://127.0.0.1:4222
//! runfleet submit --agent word_count --input '{"text": "to be or not to be"}' --wait
//! ```

use anyhow::Context as _;
use runfleet_protocol::AgentName;
use runfleet_worker::sdk::{async_trait, Agent, AgentError, RunContext};
use runfleet_worker::{agents, Worker, WorkerConfig};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Counts the words of `{"text": …}` and reports progress as it goes.
struct WordCount;

#[async_trait]
impl Agent for WordCount {
    async fn run(&self, ctx: &mut RunContext, input: Value) -> Result<Value, AgentError> {
        let text = input
            .get("text")
            .and_then(Value::as_str)
            .ok_or_else(|| AgentError::invalid_input("word_count expects {\"text\": \"…\"}"))?;
        let words = text.split_whitespace().count();
        ctx.emit("counted", json!({ "words": words })).await?;
        Ok(json!({ "words": words }))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let mut config = WorkerConfig::default();
    if let Some(url) = std::env::args().nth(1) {
        config.nats_url = url;
    }
    config.validate()?;

    let mut agents = agents::builtin();
    agents.register(AgentName::new("word_count")?, WordCount);

    let worker = Worker::start(config, agents).await.context("worker failed to start")?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    worker.run(shutdown).await?;
    Ok(())
}
