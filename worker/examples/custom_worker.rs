//! A worker binary of your own: the built-in agents plus one you write.
//!
//! ```sh
//! runfleet dev --workers 0 &                       # nats-server + coordinator, no workers
//! cargo run -p runfleet-worker --example custom_worker -- nats://127.0.0.1:4222
//! runfleet submit --agent word_count --input '{"text": "to be or not to be"}' --wait
//! ```

use anyhow::Context as _;
use runfleet_protocol::AgentName;
use std::time::Duration;

use runfleet_worker::sdk::{async_trait, Agent, AgentError, RunContext, StepOptions};
use runfleet_worker::{agents, Worker, WorkerConfig};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Counts the words of `{"text": …}` in two durable steps and reports
/// progress as it goes. If the worker dies between the steps, the run
/// resumes elsewhere and the first step's result is replayed, not recomputed.
struct WordCount;

#[async_trait]
impl Agent for WordCount {
    async fn run(&self, ctx: &mut RunContext, input: Value) -> Result<Value, AgentError> {
        let text = input
            .get("text")
            .and_then(Value::as_str)
            .ok_or_else(|| AgentError::invalid_input("word_count expects {\"text\": \"…\"}"))?
            .to_owned();
        // A step's output is checkpointed before the run goes on.
        let words: Vec<String> = ctx
            .step("split", |_| {
                let text = text.clone();
                async move { Ok(text.split_whitespace().map(str::to_owned).collect()) }
            })
            .await?;
        ctx.emit("split", json!({ "words": words.len() })).await?;
        // Steps that call out get a timeout, retries, and an idempotency key
        // that is the same on every try and after any crash.
        let options = StepOptions::new().timeout(Duration::from_secs(10)).retries(3);
        let distinct: usize = ctx
            .step_with("count-distinct", options, |step| {
                let words = words.clone();
                async move {
                    tracing::info!(key = %step.idempotency_key(), try_ = step.attempt(), "counting");
                    let unique: std::collections::BTreeSet<&String> = words.iter().collect();
                    Ok(unique.len())
                }
            })
            .await?;
        Ok(json!({ "words": words.len(), "distinct": distinct }))
    }
}

/// On runfleet's runtime rather than `#[tokio::main]`'s: the same, without
/// tokio's LIFO slot, so the worker's NATS writes batch under load
/// (`runfleet_ops::runtime`; a binary in another workspace also needs
/// `--cfg tokio_unstable`, as in this repository's `.cargo/config.toml`).
fn main() -> anyhow::Result<()> {
    runfleet_ops::runtime::build()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
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
