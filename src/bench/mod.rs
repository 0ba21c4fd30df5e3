//! `runfleet bench [SCENARIO…]`: measurements on fleets the bench starts for
//! the purpose (a child nats-server in a temp dir, a coordinator on SQLite,
//! workers), torn down afterwards. With no scenario named, all five run, in
//! this order (none takes long: `signal` a few seconds, `drain` about 6 s a
//! trial, both less than `failover`, so the default run stays a check of
//! everything at once):
//!
//! - **`runs`** ([`runs`]): throughput and latency of short runs. N `echo`
//!   runs go through two in-process workers, closed-loop (at most
//!   `--concurrency` submits in flight); latencies are submit → `run.started`
//!   and submit → terminal event on the bench's clock, throughput is first
//!   submit → last terminal event.
//! - **`steps`** ([`steps`]): what one durable step costs. An agent of the
//!   bench's own, registered in an in-process worker beside the built-ins,
//!   times each `ctx.step("noop-i", …)` of a step that does nothing (three
//!   JetStream round trips: `step.started`, the fenced checkpoint write,
//!   `step.completed`) and, as the baseline measured in the same run, a plain
//!   async call doing the same nothing. The overhead is step minus baseline.
//!   For scale, one acknowledged JetStream publish is timed between the runs.
//! - **`signal`** ([`signal`]): how long a parked run takes to resume. One
//!   in-process worker; per trial an `await` run is signalled once it is
//!   parked (`run.waiting` seen and its lease released), and signal →
//!   `run.resumed` / `run.completed` and the signal API's reply are timed;
//!   the baseline, measured in the same trial, is an `echo` run's submit →
//!   `run.started`. Reports p50 / p90 / p99 / max and signal→resumed p50 over
//!   the baseline's p50.
//! - **`failover`** ([`failover`]): how long a crashed worker's runs wait. Per
//!   lease TTL, on a fresh fleet with two worker *processes*, the worker
//!   holding most of K running `steps` runs gets SIGKILL, and the time from
//!   the kill to each of its runs' `run.resumed` on the other worker is
//!   measured, with a breakdown (lease age at the kill, kill → lease expiry
//!   seen in the leases bucket).
//! - **`drain`** ([`drain`]): how long a gracefully stopped worker's runs
//!   wait. Per trial, on a fresh fleet with a 15 s lease TTL, a worker
//!   *process* with `--shutdown-grace 500ms` runs `--drain-runs` `steps`
//!   runs; a second worker process starts, the first gets SIGTERM, and
//!   SIGTERM → `run.handoff` and SIGTERM → `run.resumed` on the second are
//!   timed per run; each run's log is then checked (one terminal event,
//!   `run.completed`, steps once, hand-off from the first worker to the
//!   second). Reported against the lease TTL a crash would cost.
//!
//! The machine a bench runs on is usually shared and noisy: each scenario
//! reports medians and ranges, and compares only figures measured in the same
//! run. Targets are reported, never asserted.
//!
//! `--json` prints, and `--output FILE` writes, one JSON object with a key per
//! scenario that ran (`runs`, `steps`, `signal`, `failover`, `drain`); the
//! `runs` object keeps the fields the bench had before scenarios existed.

mod drain;
mod failover;
mod fleet;
mod observe;
mod procs;
mod runs;
mod signal;
mod steps;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use serde::Serialize;

pub use drain::{DrainResult, DrainTrial};
pub use failover::{FailoverResult, FailoverTrial, TtlResult};
pub use runs::RunsResult;
pub use signal::SignalResult;
pub use steps::StepsResult;

/// What `runfleet bench` measures; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Scenario {
    /// Throughput and submit→start / submit→complete latency of `echo` runs.
    Runs,
    /// Checkpoint overhead of one durable step against a plain async call.
    Steps,
    /// Signal → `run.resumed` of a parked run against submit → `run.started`.
    Signal,
    /// SIGKILL of a worker process → `run.resumed` on another, per lease TTL.
    Failover,
    /// SIGTERM of a worker process → `run.handoff` → `run.resumed` on another.
    Drain,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Scenarios to run, in any order: runs, steps, signal, failover, drain
    /// [default: all five].
    #[arg(value_enum)]
    pub scenarios: Vec<Scenario>,
    /// runs: runs to push through the fleet.
    #[arg(long, default_value_t = 2000)]
    pub runs: u32,
    /// runs: in-process workers.
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// runs: slots per worker.
    #[arg(long, default_value_t = 32)]
    pub slots: u32,
    /// runs: submits in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// steps: durable steps per run.
    #[arg(long, default_value_t = 50)]
    pub steps: u32,
    /// steps: runs measured, one after the other (after one warm-up run).
    #[arg(long, default_value_t = 20)]
    pub step_runs: u32,
    /// failover: lease TTLs to measure, comma separated (each at least 1s).
    #[arg(long, value_delimiter = ',', default_value = "2s,5s", value_parser = parse_duration)]
    pub ttls: Vec<Duration>,
    /// failover: `steps` runs submitted per trial.
    #[arg(long, default_value_t = 3)]
    pub failover_runs: u32,
    /// failover: trials per TTL, each on a fresh fleet.
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// signal: trials measured, one after the other (after 5 warm-up
    /// trials), each an `await` run signalled once parked and an `echo` run.
    #[arg(long, default_value_t = 200)]
    pub signal_runs: u32,
    /// drain: `steps` runs on the worker that gets SIGTERM, per trial.
    #[arg(long, default_value_t = 10)]
    pub drain_runs: u32,
    /// drain: trials, each on a fresh fleet.
    #[arg(long, default_value_t = 3)]
    pub drain_trials: u32,
    /// Print the result as JSON (one object, a key per scenario).
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON result to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

impl BenchArgs {
    /// The scenarios to run, each once, in their canonical order.
    fn selected(&self) -> Vec<Scenario> {
        if self.scenarios.is_empty() {
            return Scenario::value_variants().to_vec();
        }
        let mut selected = self.scenarios.clone();
        selected.sort_unstable();
        selected.dedup();
        selected
    }

    /// Rejects sizes that cannot produce a measurement, naming the flag.
    fn validate(&self, selected: &[Scenario]) -> anyhow::Result<()> {
        for scenario in selected {
            match scenario {
                Scenario::Runs => anyhow::ensure!(
                    self.runs > 0 && self.workers > 0 && self.slots > 0 && self.concurrency > 0,
                    "--runs, --workers, --slots and --concurrency must be positive"
                ),
                Scenario::Steps => {
                    anyhow::ensure!(
                        self.steps > 0 && self.step_runs > 0,
                        "--steps and --step-runs must be positive"
                    )
                }
                Scenario::Failover => {
                    anyhow::ensure!(!self.ttls.is_empty(), "--ttls must name at least one TTL");
                    anyhow::ensure!(
                        self.ttls.iter().all(|ttl| *ttl >= Duration::from_secs(1)),
                        "every --ttls value must be at least 1s (the coordinator's lease_ttl minimum)"
                    );
                    anyhow::ensure!(
                        self.failover_runs > 0 && self.repeat > 0,
                        "--failover-runs and --repeat must be positive"
                    );
                }
                Scenario::Signal => anyhow::ensure!(self.signal_runs > 0, "--signal-runs must be positive"),
                Scenario::Drain => anyhow::ensure!(
                    self.drain_runs > 0 && self.drain_trials > 0,
                    "--drain-runs and --drain-trials must be positive"
                ),
            }
        }
        Ok(())
    }
}

fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(value.trim())
        .map_err(|e| format!("{value:?} is not a duration such as 2s or 500ms: {e}"))
}

/// Everything one `runfleet bench` measured: a key per scenario that ran.
#[derive(Debug, Default, Serialize)]
pub struct BenchReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runs: Option<RunsResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<StepsResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<SignalResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainResult>,
}

/// p50 / p99 / max of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// From a histogram of microseconds.
    fn from_micros(hist: &Histogram<u64>) -> Self {
        Self::scaled(hist, 1e3)
    }

    /// From a histogram of nanoseconds.
    fn from_nanos(hist: &Histogram<u64>) -> Self {
        Self::scaled(hist, 1e6)
    }

    fn scaled(hist: &Histogram<u64>, per_ms: f64) -> Self {
        let ms = |value: u64| value as f64 / per_ms;
        Self {
            p50_ms: ms(hist.value_at_quantile(0.50)),
            p99_ms: ms(hist.value_at_quantile(0.99)),
            max_ms: ms(hist.max()),
        }
    }
}

/// p50 / p90 / p99 / max of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Quantiles {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Quantiles {
    /// From a histogram of microseconds.
    fn from_micros(hist: &Histogram<u64>) -> Self {
        let ms = |value: u64| value as f64 / 1e3;
        Self {
            p50_ms: ms(hist.value_at_quantile(0.50)),
            p90_ms: ms(hist.value_at_quantile(0.90)),
            p99_ms: ms(hist.value_at_quantile(0.99)),
            max_ms: ms(hist.max()),
        }
    }
}

/// The median and the extremes of a set of measurements.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// `None` for an empty set. The median of an even count is the mean of
    /// the middle two.
    fn of(values: &[f64]) -> Option<Self> {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let (first, last) = (*sorted.first()?, *sorted.last()?);
        let mid = sorted.len() / 2;
        let median = if sorted.len() % 2 == 0 { (sorted[mid - 1] + sorted[mid]) / 2.0 } else { sorted[mid] };
        Some(Self { median, min: first, max: last })
    }
}

/// Runs the selected scenarios, printing each one's table as it finishes
/// (unless `--json`), then the JSON report if asked. Ctrl-C or SIGTERM stops
/// the bench; the fleets' child processes are killed on every way out
/// (they are killed when dropped).
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let selected = args.selected();
    args.validate(&selected)?;
    let interrupted = crate::serve::shutdown_on_signals();
    let report = tokio::select! {
        report = run_scenarios(&args, &selected) => report?,
        () = interrupted.cancelled() => anyhow::bail!("bench interrupted; its fleets were killed"),
    };

    let json = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.output {
        std::fs::write(path, &json).with_context(|| format!("could not write {}", path.display()))?;
    }
    if args.json {
        println!("{json}");
    }
    Ok(())
}

async fn run_scenarios(args: &BenchArgs, selected: &[Scenario]) -> anyhow::Result<BenchReport> {
    let mut report = BenchReport::default();
    let mut first = true;
    for scenario in selected {
        if !args.json && !std::mem::take(&mut first) {
            println!();
        }
        match scenario {
            Scenario::Runs => {
                let result = runs::measure(args).await.context("bench runs")?;
                if !args.json {
                    runs::print(&result);
                }
                report.runs = Some(result);
            }
            Scenario::Steps => {
                let result = steps::measure(args).await.context("bench steps")?;
                if !args.json {
                    steps::print(&result);
                }
                report.steps = Some(result);
            }
            Scenario::Signal => {
                let result = signal::measure(args).await.context("bench signal")?;
                if !args.json {
                    signal::print(&result);
                }
                report.signal = Some(result);
            }
            Scenario::Failover => {
                let result = failover::measure(args).await.context("bench failover")?;
                if !args.json {
                    failover::print(&result);
                }
                report.failover = Some(result);
            }
            Scenario::Drain => {
                let result = drain::measure(args).await.context("bench drain")?;
                if !args.json {
                    drain::print(&result);
                }
                report.drain = Some(result);
            }
        }
    }
    Ok(report)
}

/// A progress line on stderr (never in `--json` output).
fn progress(args: &BenchArgs, line: impl std::fmt::Display) {
    if !args.json {
        eprintln!("  … {line}");
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// A uniformly distributed number in [0, 1), from the first 48 bits of a v4
/// UUID (all random; the version and variant bits come after them).
fn random_fraction() -> f64 {
    let (high, _) = uuid::Uuid::new_v4().as_u64_pair();
    (high >> 16) as f64 / (1u64 << 48) as f64
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> BenchArgs {
        let argv = std::iter::once("bench").chain(args.iter().copied());
        Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{e}")).bench
    }

    #[test]
    fn no_scenario_means_all_in_order() {
        let args = parse(&[]);
        assert_eq!(
            args.selected(),
            vec![Scenario::Runs, Scenario::Steps, Scenario::Signal, Scenario::Failover, Scenario::Drain]
        );
        assert!(args.validate(&args.selected()).is_ok());
        assert_eq!((args.signal_runs, args.drain_runs, args.drain_trials), (200, 10, 3));
        assert_eq!(args.ttls, vec![Duration::from_secs(2), Duration::from_secs(5)]);
    }

    #[test]
    fn scenarios_run_once_in_canonical_order() {
        let args = parse(&["failover", "steps", "failover", "--ttls", "1s,1500ms"]);
        assert_eq!(args.selected(), vec![Scenario::Steps, Scenario::Failover]);
        assert_eq!(args.ttls, vec![Duration::from_secs(1), Duration::from_millis(1500)]);
        assert!(args.validate(&args.selected()).is_ok());
    }

    #[test]
    fn rejects_sizes_that_measure_nothing() {
        let args = parse(&["failover", "--ttls", "500ms"]);
        assert!(args.validate(&args.selected()).is_err());
        let args = parse(&["steps", "--steps", "0"]);
        assert!(args.validate(&args.selected()).is_err());
        assert!(Cli::try_parse_from(["bench", "--ttls", "soon"]).is_err());
        assert!(Cli::try_parse_from(["bench", "walk"]).is_err());
        let args = parse(&["signal", "--signal-runs", "0"]);
        assert!(args.validate(&args.selected()).is_err());
        let args = parse(&["drain", "--drain-trials", "0"]);
        assert!(args.validate(&args.selected()).is_err());
        // A flag of a scenario that does not run is not checked.
        let args = parse(&["drain", "signal", "--drain-runs", "2", "--steps", "0"]);
        assert_eq!(args.selected(), vec![Scenario::Signal, Scenario::Drain]);
        assert!(args.validate(&args.selected()).is_ok());
    }

    #[test]
    fn spread_is_median_and_range() {
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[3.0, 1.0, 2.0]), Some(Spread { median: 2.0, min: 1.0, max: 3.0 }));
        assert_eq!(Spread::of(&[4.0, 1.0, 2.0, 3.0]), Some(Spread { median: 2.5, min: 1.0, max: 4.0 }));
    }

    #[test]
    fn latency_scales_to_milliseconds() {
        let mut hist = Histogram::<u64>::new(3).unwrap_or_else(|e| panic!("{e}"));
        for ns in [1_000_000u64, 2_000_000] {
            hist.record(ns).unwrap_or_else(|e| panic!("{e}"));
        }
        let latency = Latency::from_nanos(&hist);
        assert!((latency.max_ms - 2.0).abs() < 0.01, "{latency:?}");
        assert!((latency.p50_ms - 1.0).abs() < 0.01, "{latency:?}");
    }

    #[test]
    fn quantiles_scale_microseconds_to_milliseconds() {
        let mut hist = Histogram::<u64>::new(3).unwrap_or_else(|e| panic!("{e}"));
        for us in 1..=100u64 {
            hist.record(us * 1000).unwrap_or_else(|e| panic!("{e}"));
        }
        let q = Quantiles::from_micros(&hist);
        for (got, want) in [(q.p50_ms, 50.0), (q.p90_ms, 90.0), (q.p99_ms, 99.0), (q.max_ms, 100.0)] {
            assert!((got - want).abs() < 0.1, "{q:?}");
        }
    }
}
