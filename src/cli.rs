//! The `runfleet` command line: argument definitions and the client commands.
//! Server commands (`coordinator`, `worker`, `dev`, `bench`) live in their own
//! modules; this one only parses and dispatches.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use runfleet_ops::nats::NatsConfig;
use runfleet_protocol::api::{CancelResponse, ListRequest, RunView, SignalResponse, SubmitRequest};
use runfleet_protocol::event::{Event, EventBody};
use runfleet_protocol::names::Prefix;
use runfleet_protocol::signal::ApprovalDecision;
use runfleet_protocol::{time, ErrorCode, Names, RunId, RunState, TenantId};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::client::Client;
use runfleet_ops::telemetry::{Telemetry, TelemetryConfig};

#[derive(Debug, Parser)]
#[command(
    name = "runfleet",
    version,
    about = "Durable AI-agent runs on a fleet of workers over NATS JetStream"
)]
pub struct Cli {
    /// TOML configuration file (shared keys at the top, `[coordinator]` and `[worker]` sections).
    #[arg(long, global = true, env = "RUNFLEET_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a coordinator: API service, scheduling and the SQL registry.
    Coordinator(crate::serve::CoordinatorArgs),
    /// Run a worker serving one or more queues.
    Worker(crate::serve::WorkerArgs),
    /// Run everything on one machine: a child nats-server, a coordinator on SQLite and workers.
    Dev(crate::dev::DevArgs),
    /// Submit a run and print its id.
    Submit(SubmitArgs),
    /// Show one run.
    Get(GetArgs),
    /// List runs, newest first.
    List(ListArgs),
    /// Print a run's events from the start, then follow it until it ends.
    Watch(WatchArgs),
    /// Send a signal to a run under a key (the first signal for a key wins).
    Signal(SignalArgs),
    /// Approve the action a run asked approval for (optionally with edited input).
    Approve(ApproveArgs),
    /// Reject the action a run asked approval for.
    Reject(RejectArgs),
    /// Cancel a run, in any state.
    Cancel(CancelArgs),
    /// List the live workers (reads the workers bucket: needs a NATS user
    /// of the fleet, not a tenant's).
    Workers(ClientArgs),
    /// Measure run throughput and latency, durable step overhead and worker
    /// failover on fleets started for the purpose.
    Bench(crate::bench::BenchArgs),
    /// Abuse a fleet started for the purpose (kill, pause and restart while
    /// runs are in flight) and check every run's invariants afterwards.
    Chaos(crate::chaos::ChaosArgs),
}

/// Options every client command takes. Each may also come from the
/// `--config` file's top level (`nats_url`, `prefix`, `tenant`) or from
/// `RUNFLEET_NATS_URL`, `RUNFLEET_PREFIX`, `RUNFLEET_TENANT`; flags win.
/// Credentials and TLS come from the file's `[nats]` table or
/// `RUNFLEET_NATS__<KEY>` (see `docs/security.md`).
#[derive(Debug, Clone, Args, Serialize)]
pub struct ClientArgs {
    /// NATS server URL [default: nats://127.0.0.1:4222].
    #[arg(long, env = "RUNFLEET_NATS_URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<String>,
    /// Tenant whose runs to act on [default: default].
    #[arg(long, env = "RUNFLEET_TENANT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Subject/stream prefix of the fleet [default: runfleet].
    #[arg(long, env = "RUNFLEET_PREFIX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Machine-readable JSON output.
    #[arg(long)]
    #[serde(skip)]
    pub json: bool,
}

/// What a client connects with, after layering defaults, the config file,
/// the environment and flags.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientConfig {
    pub nats_url: String,
    pub tenant: String,
    pub prefix: String,
    /// Credentials, TLS and inbox prefix (the shared `[nats]` table).
    pub nats: NatsConfig,
    /// Logs and traces (the shared `[telemetry]` table): with an OTLP
    /// endpoint, each request is a client span the coordinator and the run
    /// join.
    pub telemetry: TelemetryConfig,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            tenant: TenantId::default_tenant().to_string(),
            prefix: Prefix::default().to_string(),
            nats: NatsConfig::default(),
            telemetry: TelemetryConfig::default(),
        }
    }
}

/// The client command's telemetry, flushed by [`finish_telemetry`] before
/// the process exits.
static TELEMETRY: std::sync::Mutex<Option<Telemetry>> = std::sync::Mutex::new(None);

/// Exports the spans a client command buffered. Call once, at exit.
pub async fn finish_telemetry() {
    let telemetry = TELEMETRY.lock().ok().and_then(|mut t| t.take());
    if let Some(telemetry) = telemetry {
        telemetry.shutdown().await;
    }
}

impl ClientArgs {
    pub async fn connect(&self, config_file: Option<&Path>) -> anyhow::Result<Client> {
        let config: ClientConfig = crate::config::load_client(config_file, self)?;
        if config.telemetry.otlp_endpoint.is_some() {
            let telemetry = runfleet_ops::telemetry::init(&config.telemetry, "runfleet-cli", "warn")?;
            if let Ok(mut slot) = TELEMETRY.lock() {
                *slot = Some(telemetry);
            }
        }
        let tenant = TenantId::new(config.tenant).context("invalid tenant")?;
        let prefix = Prefix::new(config.prefix).context("invalid prefix")?;
        Ok(Client::connect_with(&config.nats_url, &config.nats, tenant, Names::new(prefix)).await?)
    }
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The agent to run.
    #[arg(long)]
    pub agent: String,
    /// The run's input, as JSON.
    #[arg(long, default_value = "null")]
    pub input: String,
    /// Queue to submit to.
    #[arg(long)]
    pub queue: Option<String>,
    /// Priority band, 0 = highest.
    #[arg(long)]
    pub priority: Option<u8>,
    /// Submitting twice with the same key and input makes one run.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Executions allowed before the run fails for good.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Follow the run until it ends; exit non-zero unless it completed.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub run: String,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Only runs in this state (queued, running, waiting, completed, failed, cancelled).
    #[arg(long)]
    pub state: Option<String>,
    #[arg(long)]
    pub queue: Option<String>,
    #[arg(long)]
    pub agent: Option<String>,
    /// Page size.
    #[arg(long)]
    pub limit: Option<u32>,
    /// Continue after a previous page (its `next_cursor`).
    #[arg(long)]
    pub cursor: Option<String>,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub run: String,
}

#[derive(Debug, Args)]
pub struct SignalArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub run: String,
    /// The key the run awaits (letters, digits, `-` and `_`).
    pub key: String,
    /// The signal's value, as JSON.
    #[arg(long, default_value = "null")]
    pub payload: String,
}

#[derive(Debug, Args)]
pub struct ApproveArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub run: String,
    /// Approve with this input for the action instead of the one the run
    /// proposed, as JSON.
    #[arg(long)]
    pub edit: Option<String>,
    /// The approval's signal key [default: the key of the run's latest approval request].
    #[arg(long)]
    pub key: Option<String>,
}

#[derive(Debug, Args)]
pub struct RejectArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub run: String,
    /// Why, for the agent and the run's log.
    #[arg(long)]
    pub reason: Option<String>,
    /// The approval's signal key [default: the key of the run's latest approval request].
    #[arg(long)]
    pub key: Option<String>,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub run: String,
    /// Why, recorded in the run's `run.cancelled` event.
    #[arg(long)]
    pub reason: Option<String>,
    /// Wait (up to 30 s) until the run has ended and print its final state.
    #[arg(long)]
    pub wait: bool,
}

/// How long `cancel --wait` waits for a running run's worker to stop it.
const CANCEL_WAIT: Duration = Duration::from_secs(30);
/// How often `cancel --wait` polls the run.
const CANCEL_POLL: Duration = Duration::from_millis(200);

fn parse_run(run: &str) -> anyhow::Result<RunId> {
    run.parse().with_context(|| format!("invalid run id {run:?}"))
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// The JSON shape of an event on the command line: the wire fields, flat.
pub fn event_json(event: &Event) -> serde_json::Value {
    let mut value = serde_json::to_value(event).unwrap_or_else(|e| json!({"error": e.to_string()}));
    if let Some(map) = value.as_object_mut() {
        map.insert("state".into(), json!(event.state_after()));
    }
    value
}

fn describe_event(event: &Event) -> String {
    let worker = event.worker_id.as_ref().map(|w| w.to_string()).unwrap_or_default();
    let detail = match &event.body {
        EventBody::Created(c) => format!("agent={} queue={} priority={}", c.agent, c.queue, c.priority),
        EventBody::Started(_) => format!("attempt={} worker={worker}", event.attempt),
        EventBody::Resumed(r) => {
            format!("attempt={} worker={worker} steps_replayed={}", event.attempt, r.steps_replayed)
        }
        EventBody::StepStarted(s) => format!("#{} {} try={}", s.index, s.name, s.attempt),
        EventBody::StepCompleted(s) => {
            format!("#{} {} try={} {}ms", s.index, s.name, s.attempt, s.duration_ms)
        }
        EventBody::StepFailed(s) => format!(
            "#{} {} try={} error={}{}",
            s.index,
            s.name,
            s.attempt,
            s.error,
            s.retry_in_ms.map(|ms| format!(" retry_in={ms}ms")).unwrap_or_default()
        ),
        EventBody::Retrying(r) => {
            format!("error={}: {} retry_in={}ms", r.error.code, r.error.message, r.retry_in_ms)
        }
        EventBody::Waiting(w) => {
            let mut detail = String::new();
            if let Some(key) = &w.key {
                detail.push_str(&format!("key={key}"));
            }
            if let Some(deadline) = w.deadline_ms {
                let sep = if detail.is_empty() { "" } else { " " };
                detail.push_str(&format!("{sep}until={}", time::rfc3339_ms(deadline)));
            }
            detail
        }
        EventBody::ApprovalRequested(a) => {
            let mut detail = format!("key={} tool={} arguments={}", a.key, a.tool, a.arguments);
            if let Some(reason) = &a.reason {
                detail.push_str(&format!(" reason={reason:?}"));
            }
            detail
        }
        EventBody::Handoff(_) => format!("attempt={} worker={worker}", event.attempt),
        EventBody::Agent(a) => format!("{} {}", a.name, a.data),
        EventBody::Completed(c) => format!("output={}", c.output),
        EventBody::Failed(f) => format!("error={}: {}", f.error.code, f.error.message),
        EventBody::Cancelled(c) => c.reason.as_ref().map(|r| format!("reason={r:?}")).unwrap_or_default(),
        EventBody::Unknown => "(an event type this version does not know)".to_owned(),
    };
    format!("{:>4}  {:<18} {}", event.seq, event.body.type_name(), detail)
}

fn describe_run(run: &RunView) -> String {
    let mut line = format!(
        "{}  {:<9}  agent={} queue={} p{} attempt={} max_attempts={}",
        run.run_id, run.state, run.agent, run.queue, run.priority, run.attempt, run.max_attempts
    );
    // A queued or waiting run is held by no worker, whoever wrote its last
    // event.
    if let Some(worker) =
        run.worker_id.as_ref().filter(|_| !matches!(run.state, RunState::Queued | RunState::Waiting))
    {
        line.push_str(&format!(" worker={worker}"));
    }
    if let Some(output) = &run.output {
        line.push_str(&format!(" output={output}"));
    }
    match &run.error {
        // The message already says "cancelled" (and why).
        Some(error) if error.code == ErrorCode::Cancelled => line.push_str(&format!(" {}", error.message)),
        Some(error) => line.push_str(&format!(" error={}: {}", error.code, error.message)),
        None => {}
    }
    line
}

pub async fn submit(args: SubmitArgs, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let input: serde_json::Value = serde_json::from_str(&args.input).context("--input is not valid JSON")?;
    let client = args.client.connect(config).await?;
    let reply = client
        .submit(SubmitRequest {
            agent: args.agent,
            input,
            queue: args.queue,
            priority: args.priority,
            idempotency_key: args.idempotency_key,
            max_attempts: args.max_attempts,
        })
        .await?;
    if !args.wait {
        if args.client.json {
            print_json(&reply)?;
        } else {
            println!("{}", reply.run_id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let last = client.wait(reply.run_id).await?;
    let state = last.state_after();
    if args.client.json {
        let mut out = json!({"run_id": reply.run_id, "state": state, "created": reply.created});
        match &last.body {
            EventBody::Completed(c) => out["output"] = c.output.clone(),
            EventBody::Failed(f) => out["error"] = serde_json::to_value(&f.error)?,
            _ => {}
        }
        print_json(&out)?;
    } else {
        println!("{}  {}", reply.run_id, describe_event(&last).trim_start());
    }
    Ok(if matches!(last.body, EventBody::Completed(_)) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

pub async fn get(args: GetArgs, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let run = parse_run(&args.run)?;
    let view = args.client.connect(config).await?.get(run).await?;
    if args.client.json {
        print_json(&view)?;
    } else {
        println!("{}", describe_run(&view));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn list(args: ListArgs, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let client = args.client.connect(config).await?;
    let page = client
        .list(ListRequest {
            state: args.state,
            queue: args.queue,
            agent: args.agent,
            limit: args.limit,
            cursor: args.cursor,
        })
        .await?;
    if args.client.json {
        print_json(&page.runs)?;
    } else {
        for run in &page.runs {
            println!("{}", describe_run(run));
        }
        if let Some(cursor) = page.next_cursor {
            println!("(more: --cursor {cursor})");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn watch(args: WatchArgs, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let run = parse_run(&args.run)?;
    let client = args.client.connect(config).await?;
    let mut events = Box::pin(client.watch(run).await?);
    let mut completed = false;
    while let Some(event) = events.next().await {
        let event = event?;
        completed = matches!(event.body, EventBody::Completed(_));
        if args.client.json {
            print_json(&event_json(&event))?;
        } else {
            println!("{}", describe_event(&event));
        }
    }
    Ok(if completed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

pub async fn workers(args: ClientArgs, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let workers = args.connect(config).await?.workers().await?;
    if args.json {
        print_json(&workers)?;
    } else {
        for w in &workers {
            let queues: Vec<_> = w.queues.iter().map(|q| q.as_str()).collect();
            println!(
                "{}  running {}/{}  queues={}  agents={}  v{} {}:{}",
                w.worker_id,
                w.running,
                w.slots,
                queues.join(","),
                w.agents.join(","),
                w.version,
                w.hostname,
                w.pid
            );
        }
        if workers.is_empty() {
            println!("no live workers");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn signal(args: SignalArgs, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let run = parse_run(&args.run)?;
    let payload: serde_json::Value =
        serde_json::from_str(&args.payload).context("--payload is not valid JSON")?;
    let reply = args.client.connect(config).await?.signal(run, &args.key, payload).await?;
    print_signal(&args.client, &reply, &format!("signal {}", reply.key))?;
    Ok(ExitCode::SUCCESS)
}

pub async fn approve(args: ApproveArgs, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let run = parse_run(&args.run)?;
    let decision = match &args.edit {
        Some(edit) => {
            ApprovalDecision::Edit { input: serde_json::from_str(edit).context("--edit is not valid JSON")? }
        }
        None => ApprovalDecision::Approve,
    };
    decide(&args.client, config, run, args.key, decision).await
}

pub async fn reject(args: RejectArgs, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let run = parse_run(&args.run)?;
    decide(&args.client, config, run, args.key, ApprovalDecision::Reject { reason: args.reason }).await
}

/// Sends an approval decision under `key`, or under the key of the run's
/// latest `approval.requested`.
/// How long `approve`/`reject` look for the run's `approval.requested`:
/// the events API reads the registry, which may lag the run's log by
/// moments (a run seen waiting may not show its request there yet).
const APPROVAL_LOOKUP: Duration = Duration::from_secs(3);

/// The key of the run's latest approval request, waiting briefly for the
/// registry to catch up while the run is not over.
async fn approval_key(client: &Client, run: RunId) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + APPROVAL_LOOKUP;
    loop {
        if let Some(request) = client.latest_approval_request(run).await? {
            return Ok(request.key.to_string());
        }
        let state = client.get(run).await?.state;
        if state.is_terminal() || tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "run {run} ({state}) has not requested an approval; pass --key to signal a specific key"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn decide(
    client_args: &ClientArgs,
    config: Option<&Path>,
    run: RunId,
    key: Option<String>,
    decision: ApprovalDecision,
) -> anyhow::Result<ExitCode> {
    let client = client_args.connect(config).await?;
    let key = match key {
        Some(key) => key,
        None => approval_key(&client, run).await?,
    };
    let what = match &decision {
        ApprovalDecision::Approve => "approval",
        ApprovalDecision::Reject { .. } => "rejection",
        ApprovalDecision::Edit { .. } => "approval with edited input",
    };
    let reply = client.signal(run, &key, serde_json::to_value(&decision)?).await?;
    print_signal(client_args, &reply, &format!("{what} ({key})"))?;
    Ok(ExitCode::SUCCESS)
}

fn print_signal(client: &ClientArgs, reply: &SignalResponse, what: &str) -> anyhow::Result<()> {
    if client.json {
        return print_json(reply);
    }
    let stored = if reply.created { "stored" } else { "was already stored" };
    let effect = if reply.woke {
        "run woken".to_owned()
    } else {
        format!("run is {}, not waiting on it (yet)", reply.state)
    };
    println!("run {}: {what} {stored}; {effect}", reply.run_id);
    Ok(())
}

pub async fn cancel(args: CancelArgs, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let run = parse_run(&args.run)?;
    let client = args.client.connect(config).await?;
    let mut reply = client.cancel(run, args.reason).await?;
    if args.wait && !reply.state.is_terminal() {
        reply.state = wait_terminal(&client, run).await?;
    }
    if args.client.json {
        print_json(&reply)?;
    } else {
        println!("{}", describe_cancel(&reply));
    }
    Ok(ExitCode::SUCCESS)
}

/// Polls the run until it has ended; fails after [`CANCEL_WAIT`].
async fn wait_terminal(client: &Client, run: RunId) -> anyhow::Result<RunState> {
    let deadline = tokio::time::Instant::now() + CANCEL_WAIT;
    loop {
        let state = client.get(run).await?.state;
        if state.is_terminal() {
            return Ok(state);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "run {run} is still {state} after {}s; its worker has been asked to stop it \
                 (check `runfleet get {run}` later)",
                CANCEL_WAIT.as_secs()
            );
        }
        tokio::time::sleep(CANCEL_POLL).await;
    }
}

fn describe_cancel(reply: &CancelResponse) -> String {
    let run = reply.run_id;
    match (reply.state, reply.cancelled) {
        (RunState::Cancelled, true) => format!("run {run}: cancelled"),
        (state, false) => format!("run {run}: already {state}; nothing to cancel"),
        (state, true) if state.is_terminal() => format!("run {run}: {state}"),
        (state, true) => format!("run {run}: cancel requested; it is {state} and its worker stops it"),
    }
}
