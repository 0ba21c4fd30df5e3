//! `runfleet chaos`: many multi-step runs on a fleet of worker *processes*
//! that is abused while the runs are in flight — workers SIGKILLed at random
//! (each replaced at once, so the fleet keeps its size), workers SIGSTOPped
//! past the lease TTL and then SIGCONTed (zombies whose writes must be
//! refused), nats-server restarted on the same port and store — followed by
//! a check of every run's invariants from what the fleet left behind: the
//! event log, the checkpoints and a side-effect journal the `steps` test
//! agent appends to at the start of every step execution.
//!
//! The command is in three parts:
//!
//! - this module: the flags, the chaos itself (submitting the runs, then
//!   killing, pausing and restarting on a seeded random schedule while they
//!   are in flight, polling which have ended) and the summary, with
//!   evidence for the first violating runs;
//! - `fleet`: the fleet of child processes the chaos abuses, and reading
//!   back what it stored (events, checkpoints, journal) once it is stopped;
//! - `check`: the invariant checker, which works on plain data so its unit
//!   tests can feed it hand-made violating logs (a checker that cannot fail
//!   proves nothing); its docs list the invariants.

mod check;
mod fleet;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use clap::Args;
use futures::{StreamExt, TryStreamExt};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use runfleet_protocol::api::SubmitRequest;
use runfleet_protocol::event::EventBody;
use runfleet_protocol::{Names, RunId, TenantId};
use serde::Serialize;
use serde_json::json;

use self::check::{check_run, RunRecord, RunReport};
use self::fleet::ChaosFleet;
use crate::client::Client;

/// Flags of `runfleet chaos`. The defaults are the size the test suite runs
/// (about a minute on two cores).
#[derive(Debug, Clone, Args)]
pub struct ChaosArgs {
    /// Runs to submit (all up front, each with an idempotency key).
    #[arg(long, default_value_t = 200)]
    pub runs: u32,
    /// Worker processes; the fleet is kept at this size.
    #[arg(long, default_value_t = 4)]
    pub workers: u32,
    /// Workers to SIGKILL while runs are in flight (each replaced at once).
    #[arg(long, default_value_t = 20)]
    pub kills: u32,
    /// Workers to SIGSTOP for twice the lease TTL, then SIGCONT.
    #[arg(long, default_value_t = 2)]
    pub pauses: u32,
    /// nats-server restarts (same port, same store).
    #[arg(long, default_value_t = 1)]
    pub server_restarts: u32,
    /// How long nats-server stays down during a restart, e.g. `1s`. Longer
    /// than the lease TTL (and the client's 5 s request timeout) turns a
    /// restart into an outage every running run must recover from.
    #[arg(long, default_value = "1s", value_parser = humantime_serde::re::humantime::parse_duration)]
    pub server_downtime: Duration,
    /// Durable steps per run.
    #[arg(long, default_value_t = 10)]
    pub steps: u32,
    /// How long each step sleeps, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub step_ms: u64,
    /// Slots per worker.
    #[arg(long, default_value_t = 8)]
    pub slots: u32,
    /// The coordinator's lease TTL (also the workers' ack wait), e.g. `2s`.
    #[arg(long, default_value = "2s", value_parser = humantime_serde::re::humantime::parse_duration)]
    pub lease_ttl: Duration,
    /// Seed of the chaos schedule (which worker, what when); random if absent.
    #[arg(long)]
    pub seed: Option<u64>,
    /// How long to wait, after the chaos schedule, for every run to end.
    #[arg(long, default_value = "5m", value_parser = humantime_serde::re::humantime::parse_duration)]
    pub deadline: Duration,
    /// Keep the fleet's files (store, logs, journal) here instead of a
    /// temporary directory (which is kept anyway when the check fails).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print the summary as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
}

impl ChaosArgs {
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.runs > 0, "--runs must be at least 1");
        anyhow::ensure!(self.steps > 0, "--steps must be at least 1");
        anyhow::ensure!(self.slots > 0, "--slots must be at least 1");
        anyhow::ensure!(self.workers >= 1, "--workers must be at least 1");
        // One worker keeps running while another is paused.
        anyhow::ensure!(
            self.workers >= 2 || self.pauses == 0,
            "--pauses needs --workers of at least 2 (one keeps running while another is paused)"
        );
        anyhow::ensure!(self.lease_ttl >= Duration::from_secs(1), "--lease-ttl must be at least 1s");
        Ok(())
    }
}

/// The agent the chaos runs execute (a built-in test agent that journals
/// every step execution).
const AGENT: &str = "steps";
/// Attempts each run may use: many, since one run may be hit by several kills,
/// a pause and a restart; running out would be a (reported) failure, not a
/// hang.
const MAX_ATTEMPTS: u32 = runfleet_protocol::limits::MAX_ATTEMPTS_LIMIT;
/// Submits in flight at once.
const SUBMIT_CONCURRENCY: usize = 16;
/// How long one submit is retried (the server may be restarting).
const SUBMIT_DEADLINE: Duration = Duration::from_secs(60);
/// How often the fleet is checked for due resumes and unexpected exits.
const TICK: Duration = Duration::from_millis(100);
/// How often the runs' last events are polled.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// Upper bound on one poll round (the server may be unreachable).
const POLL_TIMEOUT: Duration = Duration::from_secs(3);
/// Direct gets in flight during a poll.
const POLL_CONCURRENCY: usize = 32;

// ---------------------------------------------------------------------------
// The command
// ---------------------------------------------------------------------------

/// What `runfleet chaos` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub seed: u64,
    pub runs: u32,
    /// Runs whose log ends with `run.completed`.
    pub completed: u32,
    pub workers: u32,
    pub slots: u32,
    pub steps: u32,
    pub step_ms: u64,
    pub lease_ttl_ms: u64,
    /// Chaos actions actually performed.
    pub kills: u32,
    pub pauses: u32,
    pub server_restarts: u32,
    /// `run.resumed` events across all runs.
    pub resumes: u32,
    /// Resumes that took a run over from a worker that was killed / paused
    /// at some point. A paused worker may be killed later, so the two may
    /// add up to more than `resumes`; a resume after a server outage (or a
    /// heartbeat that came too late on a busy machine) may count under
    /// neither.
    pub resumes_from_killed: u32,
    pub resumes_from_paused: u32,
    /// Journal lines (step closure executions).
    pub step_executions: u64,
    /// Executions by an attempt whose result another attempt checkpointed:
    /// the in-flight step of an attempt that crashed, was paused or lost the
    /// server. Allowed, at most one per attempt.
    pub duplicate_executions: u32,
    /// Invariant violations, each `run <id>: …`.
    pub violations: Vec<String>,
    /// Failures of the fleet or the harness that are not a run's invariant
    /// (a worker that exited on its own, runs that never ended, a schedule
    /// that outlived the workload).
    pub problems: Vec<String>,
    pub elapsed_secs: f64,
    pub data_dir: String,
}

/// Runs the chaos and prints the summary; exits non-zero on any violation
/// or problem.
pub async fn main(args: ChaosArgs) -> anyhow::Result<ExitCode> {
    args.validate()?;
    let seed = args.seed.unwrap_or_else(rand::random);
    let (dir, temp) = match &args.data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
            (dir.clone(), None)
        }
        None => {
            let temp = tempfile::Builder::new().prefix("runfleet-chaos-").tempdir().context("temp dir")?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };
    init_tracing(&dir)?;
    let narrator = Narrator { started: Instant::now() };
    narrator.say(format!("seed {seed}; fleet files in {}", dir.display()));

    // On SIGINT/SIGTERM the run is dropped, and with it the fleet, whose
    // child processes are killed on drop: nothing outlives the command.
    let interrupted = crate::serve::shutdown_on_signals();
    let result = tokio::select! {
        result = run(&args, seed, &dir, &narrator) => result,
        () = interrupted.cancelled() => Err(anyhow::anyhow!("interrupted; the fleet was killed")),
    };
    let keep =
        !matches!(&result, Ok(summary) if summary.violations.is_empty() && summary.problems.is_empty());
    if let (true, Some(temp)) = (keep, temp) {
        let kept = temp.keep();
        eprintln!("chaos: fleet files kept in {}", kept.display());
    }
    let summary = result?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_summary(&summary);
    }
    let ok = summary.violations.is_empty() && summary.problems.is_empty();
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Starts the fleet, submits, runs the chaos schedule, waits for the runs,
/// stops the workers, collects and checks. The fleet is torn down on every
/// path (its children are also killed on drop).
async fn run(args: &ChaosArgs, seed: u64, dir: &Path, narrator: &Narrator) -> anyhow::Result<Summary> {
    let mut fleet = ChaosFleet::start(args, dir, narrator).await?;
    let outcome = drive(args, seed, &mut fleet, narrator).await;
    fleet.stop_workers().await;
    let result = match outcome {
        Ok(runs) => collect_and_check(args, seed, &mut fleet, &runs, narrator).await,
        Err(e) => Err(e),
    };
    fleet.shutdown().await;
    result
}

/// Progress lines on stderr, stamped with the time since start.
struct Narrator {
    started: Instant,
}

impl Narrator {
    fn say(&self, message: impl fmt::Display) {
        eprintln!("chaos [{:>6.1}s] {message}", self.started.elapsed().as_secs_f64());
    }
}

/// The in-process coordinator logs (and those of the NATS client) go to
/// `<dir>/chaos.log`, so the terminal shows only the chaos' own progress.
fn init_tracing(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join("chaos.log");
    let file =
        std::fs::File::create(&path).with_context(|| format!("could not create {}", path.display()))?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
    Ok(())
}

/// One chaos action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Kill,
    Pause,
    RestartServer,
}

/// The actions in a seeded random order.
fn schedule(args: &ChaosArgs, rng: &mut StdRng) -> Vec<Action> {
    let mut actions: Vec<Action> = std::iter::repeat_n(Action::Kill, args.kills as usize)
        .chain(std::iter::repeat_n(Action::Pause, args.pauses as usize))
        .chain(std::iter::repeat_n(Action::RestartServer, args.server_restarts as usize))
        .collect();
    actions.shuffle(rng);
    actions
}

/// The mean pause between actions: the schedule is spread over about 60 %
/// of the undisturbed workload (waves of `workers × slots` runs, each
/// `steps × step_ms`), so it ends while runs are still in flight (chaos only
/// makes the workload longer), clamped to 0.3–1.5 s.
fn action_gap(args: &ChaosArgs) -> Duration {
    let capacity = u64::from(args.workers.max(1)) * u64::from(args.slots.max(1));
    let waves = u64::from(args.runs).div_ceil(capacity);
    let work_ms = waves.saturating_mul(u64::from(args.steps)).saturating_mul(args.step_ms);
    let actions = (u64::from(args.kills) + u64::from(args.pauses) + u64::from(args.server_restarts)).max(1);
    Duration::from_millis((work_ms / 10 * 6 / actions).clamp(300, 1500))
}

/// Submits the runs, performs the schedule while they are in flight, then
/// waits (bounded) for every run to end. Returns the runs in submit order.
async fn drive(
    args: &ChaosArgs,
    seed: u64,
    fleet: &mut ChaosFleet,
    narrator: &Narrator,
) -> anyhow::Result<Vec<RunId>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let client = Client::connect(&fleet.url, TenantId::default_tenant(), fleet.names.clone()).await?;
    fleet.wait_for_workers(&client).await?;
    narrator
        .say(format!("{} workers x {} slots up; submitting {} runs", args.workers, args.slots, args.runs));

    let runs = submit_all(&client, args, seed).await?;
    let events = jetstream::new(client.nats().clone())
        .get_stream(fleet.names.events_stream())
        .await
        .context("events stream")?;
    let mut progress = Progress::new(events, fleet.names.clone(), &runs);
    narrator.say(format!("{} runs submitted", runs.len()));

    let gap = action_gap(args);
    let actions = schedule(args, &mut rng);
    fleet.idle(gap, &mut progress).await?;
    for (done, action) in actions.iter().enumerate() {
        if progress.pending.is_empty() {
            fleet.problems.push(format!(
                "every run ended after {done} of {} chaos actions: the chaos did not overlap the workload; \
                 raise --runs, --steps or --step-ms",
                actions.len()
            ));
            break;
        }
        let what = match action {
            Action::Kill => fleet.kill_random(&mut rng).await?,
            Action::Pause => fleet.pause_random(&mut rng, args.lease_ttl * 2, &client, &mut progress).await?,
            Action::RestartServer => fleet.restart_server(args.server_downtime, &mut progress).await?,
        };
        narrator.say(format!("{what} ({} runs unfinished)", progress.pending.len()));
        let jitter = rng.gen_range(0.5..1.5);
        fleet.idle(gap.mul_f64(jitter), &mut progress).await?;
    }
    // Resume whoever is still paused before waiting for the end: a paused
    // worker's runs are taken over, but its zombie writes must be tried.
    while fleet.any_paused() {
        fleet.idle(TICK, &mut progress).await?;
    }
    narrator.say(format!(
        "chaos done ({} kills, {} pauses, {} restarts); waiting for {} unfinished runs",
        fleet.kills,
        fleet.pauses,
        fleet.restarts,
        progress.pending.len()
    ));

    let deadline = Instant::now() + args.deadline;
    while !progress.pending.is_empty() && Instant::now() < deadline {
        fleet.idle(POLL_EVERY, &mut progress).await?;
    }
    if progress.pending.is_empty() {
        narrator.say("every run ended");
    } else {
        let ids: Vec<String> = progress.pending.iter().map(ToString::to_string).collect();
        fleet.problems.push(format!(
            "{} runs did not end within {:?} after the chaos: {}",
            ids.len(),
            args.deadline,
            ids.join(", ")
        ));
    }
    Ok(runs)
}

/// Submits every run, `SUBMIT_CONCURRENCY` at a time, each with an
/// idempotency key so a retried submit (the server may be restarting) cannot
/// make two runs.
async fn submit_all(client: &Client, args: &ChaosArgs, seed: u64) -> anyhow::Result<Vec<RunId>> {
    futures::stream::iter(0..args.runs)
        .map(|i| {
            let request = SubmitRequest {
                agent: AGENT.to_owned(),
                input: json!({ "steps": args.steps, "ms": args.step_ms }),
                queue: None,
                priority: None,
                idempotency_key: Some(format!("chaos-{seed}-{i}")),
                max_attempts: Some(MAX_ATTEMPTS),
            };
            async move {
                let deadline = Instant::now() + SUBMIT_DEADLINE;
                loop {
                    match client.submit(request.clone()).await {
                        Ok(reply) => return Ok(reply.run_id),
                        Err(e) if e.is_retryable() && Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                        Err(e) => return Err(anyhow::Error::new(e).context(format!("submit of run #{i}"))),
                    }
                }
            }
        })
        .buffered(SUBMIT_CONCURRENCY)
        .try_collect()
        .await
}

/// Which runs have not ended yet, from each run's last event (direct get).
struct Progress {
    events: jetstream::stream::Stream,
    names: Names,
    tenant: TenantId,
    pending: BTreeSet<RunId>,
    next_poll: Instant,
}

impl Progress {
    fn new(events: jetstream::stream::Stream, names: Names, runs: &[RunId]) -> Self {
        Self {
            events,
            names,
            tenant: TenantId::default_tenant(),
            pending: runs.iter().copied().collect(),
            next_poll: Instant::now(),
        }
    }

    /// Polls the pending runs if a poll is due. Errors (the server may be
    /// down) just leave runs pending until the next poll.
    async fn poll_if_due(&mut self) {
        if Instant::now() < self.next_poll || self.pending.is_empty() {
            return;
        }
        let round = futures::stream::iter(self.pending.iter().copied())
            .map(|run| {
                let subject = self.names.run_events(&self.tenant, run);
                let events = &self.events;
                async move {
                    let last = events.direct_get_last_for_subject(subject).await.ok()?;
                    let event = runfleet_protocol::event::decode_last_of_log_message(&last.payload).ok()?;
                    event.body.is_terminal().then_some(run)
                }
            })
            .buffer_unordered(POLL_CONCURRENCY)
            .filter_map(|ended| async move { ended })
            .collect::<Vec<_>>();
        if let Ok(ended) = tokio::time::timeout(POLL_TIMEOUT, round).await {
            for run in ended {
                self.pending.remove(&run);
            }
        }
        self.next_poll = Instant::now() + POLL_EVERY;
    }
}

// ---------------------------------------------------------------------------
// Checking what the fleet left behind
// ---------------------------------------------------------------------------

/// Reads the events, checkpoints and journal, checks every run and builds
/// the summary; prints evidence for the first violating runs.
async fn collect_and_check(
    args: &ChaosArgs,
    seed: u64,
    fleet: &mut ChaosFleet,
    runs: &[RunId],
    narrator: &Narrator,
) -> anyhow::Result<Summary> {
    let mut problems = std::mem::take(&mut fleet.problems);
    let records = fleet.collect(runs, &mut problems).await?;
    narrator.say(format!("collected the state of {} runs; checking", records.len()));

    let mut summary = Summary {
        seed,
        runs: args.runs,
        completed: 0,
        workers: args.workers,
        slots: args.slots,
        steps: args.steps,
        step_ms: args.step_ms,
        lease_ttl_ms: u64::try_from(args.lease_ttl.as_millis()).unwrap_or(u64::MAX),
        kills: fleet.kills,
        pauses: fleet.pauses,
        server_restarts: fleet.restarts,
        resumes: 0,
        resumes_from_killed: 0,
        resumes_from_paused: 0,
        step_executions: 0,
        duplicate_executions: 0,
        violations: Vec::new(),
        problems: Vec::new(),
        elapsed_secs: 0.0,
        data_dir: fleet.dir.display().to_string(),
    };
    let mut shown = 0;
    for record in records.values() {
        let report = check_run(args.steps, record);
        summary.completed += u32::from(report.completed);
        summary.resumes += report.resumes;
        summary.duplicate_executions += report.duplicate_executions;
        summary.step_executions += report.executions;
        for worker in &report.taken_over_from {
            summary.resumes_from_killed += u32::from(fleet.killed.contains(worker));
            summary.resumes_from_paused += u32::from(fleet.paused.contains(worker));
        }
        for violation in &report.violations {
            summary.violations.push(format!("run {}: {violation}", record.run_id));
        }
        if !report.violations.is_empty() && shown < 3 {
            shown += 1;
            eprintln!("{}", evidence(record, &report, fleet));
        }
    }
    summary.problems = problems;
    summary.elapsed_secs = (narrator.started.elapsed().as_secs_f64() * 10.0).round() / 10.0;
    Ok(summary)
}

/// A violating run's log, checkpoints and journal lines, and the lines of
/// the involved workers' logs that name it.
fn evidence(record: &RunRecord, report: &RunReport, fleet: &ChaosFleet) -> String {
    let mut out = format!("==== evidence for run {} ====\n", record.run_id);
    for violation in &report.violations {
        out.push_str(&format!("violation: {violation}\n"));
    }
    out.push_str("-- events (seq type attempt worker detail)\n");
    let mut workers = BTreeSet::new();
    for event in &record.events {
        let worker = event.worker_id.as_ref().map(ToString::to_string).unwrap_or_default();
        if !worker.is_empty() {
            workers.insert(worker.clone());
        }
        let detail = match &event.body {
            EventBody::Resumed(r) => format!("replayed={}", r.steps_replayed),
            EventBody::StepStarted(s) => format!("#{} try={}", s.index, s.attempt),
            EventBody::StepCompleted(s) => format!("#{} try={}", s.index, s.attempt),
            EventBody::StepFailed(s) => format!("#{} {}", s.index, s.error),
            EventBody::Retrying(r) => r.error.message.clone(),
            EventBody::Completed(c) => c.output.to_string(),
            EventBody::Failed(f) => format!("{}: {}", f.error.code, f.error.message),
            _ => String::new(),
        };
        out.push_str(&format!(
            "{:>4} {:<15} a{} {worker} {detail}\n",
            event.seq,
            event.body.type_name(),
            event.attempt
        ));
    }
    out.push_str("-- checkpoints (index attempt worker token stream-seq)\n");
    for stored in &record.checkpoints {
        let c = &stored.checkpoint;
        out.push_str(&format!(
            "#{} a{} {} t{} s{}\n",
            stored.key_index, c.attempt, c.worker_id, c.fencing_token, stored.stream_seq
        ));
    }
    if let Some(fence) = &record.fence {
        out.push_str(&format!(
            "fence a{} {} t{} s{}\n",
            fence.fence.attempt, fence.fence.worker_id, fence.fence.fencing_token, fence.stream_seq
        ));
    }
    out.push_str("-- journal (index attempt worker token)\n");
    for x in &record.executions {
        out.push_str(&format!("#{} a{} {} t{}\n", x.index, x.attempt, x.worker_id, x.fencing_token));
        workers.insert(x.worker_id.clone());
    }
    let run = record.run_id.to_string();
    for worker in workers {
        let path = fleet.worker_log(&worker);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(&run)).collect();
        out.push_str(&format!("-- {} lines of {} naming the run\n", lines.len(), path.display()));
        for line in &lines[lines.len().saturating_sub(40)..] {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn print_summary(s: &Summary) {
    for problem in &s.problems {
        println!("problem: {problem}");
    }
    for violation in &s.violations {
        println!("violation: {violation}");
    }
    println!(
        "runs            {} ({} completed), {} steps x {} ms each\n\
         fleet           {} workers x {} slots, lease ttl {} ms, seed {}\n\
         chaos           {} kills, {} pauses, {} server restarts\n\
         resumes         {} ({} from killed workers, {} from paused workers)\n\
         executions      {} step executions, {} duplicate executions of in-flight steps\n\
         violations      {}\n\
         problems        {}\n\
         elapsed         {:.1}s",
        s.runs,
        s.completed,
        s.steps,
        s.step_ms,
        s.workers,
        s.slots,
        s.lease_ttl_ms,
        s.seed,
        s.kills,
        s.pauses,
        s.server_restarts,
        s.resumes,
        s.resumes_from_killed,
        s.resumes_from_paused,
        s.step_executions,
        s.duplicate_executions,
        s.violations.len(),
        s.problems.len(),
        s.elapsed_secs,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_has_every_action_and_the_gap_is_bounded() {
        let args = ChaosArgs {
            runs: 200,
            workers: 4,
            kills: 20,
            pauses: 2,
            server_restarts: 1,
            server_downtime: Duration::from_secs(1),
            steps: 10,
            step_ms: 500,
            slots: 8,
            lease_ttl: Duration::from_secs(2),
            seed: Some(1),
            deadline: Duration::from_secs(300),
            data_dir: None,
            json: false,
        };
        let actions = schedule(&args, &mut StdRng::seed_from_u64(7));
        assert_eq!(actions.iter().filter(|a| **a == Action::Kill).count(), 20);
        assert_eq!(actions.iter().filter(|a| **a == Action::Pause).count(), 2);
        assert_eq!(actions.iter().filter(|a| **a == Action::RestartServer).count(), 1);
        let gap = action_gap(&args);
        assert!(gap >= Duration::from_millis(300) && gap <= Duration::from_millis(1500), "{gap:?}");
        assert_eq!(
            action_gap(&ChaosArgs { runs: 1, steps: 1, step_ms: 1, ..args }),
            Duration::from_millis(300)
        );
    }
}
