//! `runfleet bench [SCENARIO…]`: measurements on fleets the bench starts for
//! the purpose (a child nats-server in a temp dir, a coordinator on SQLite,
//! workers), torn down afterwards. `docs/performance.md` describes each
//! scenario, the targets and the latest results. With no scenario named,
//! all run, in this order:
//!
//! - **`floor`** ([`floor`]): the minimal run lifecycle in bare async-nats
//!   calls, no runfleet code: the baseline of `throughput`.
//! - **`throughput`** ([`throughput`]): `--runs` one-step no-op runs through
//!   the whole fleet; runs/s to the last terminal event and to the last
//!   registry row, each over the floor's runs/s of the same bench.
//! - **`latency`** ([`latency`]): open-loop submits at fixed fractions of
//!   the measured throughput; submit→start and submit→complete quantiles
//!   from each submit's *intended* send time (coordinated omission).
//! - **`steps`** ([`steps`]): per-step overhead of a durable no-op step over
//!   a plain async call.
//! - **`events`** ([`events`]): an external subscriber's lag behind a
//!   worker's event publishes at a fixed event rate.
//! - **`failover`** ([`failover`]): SIGKILL of a worker process →
//!   `run.resumed` on another, per lease TTL.
//! - **`scale`** ([`scale`]): memory and heartbeat traffic with many runs
//!   in flight (waiting and running), and simulated leases beyond that.
//! - **`signal`** ([`signal`]): signal → `run.resumed` of a parked run.
//! - **`drain`** ([`drain`]): SIGTERM of a worker process → `run.handoff` →
//!   `run.resumed` on another.
//!
//! Every scenario runs `--repeat` trials (3 by default) and reports the
//! median and range. The machine a bench runs on is usually shared and
//! noisy: targets are ratios to figures measured in the same run wherever
//! the issue allows, and are reported, never asserted.
//!
//! `--json` prints, and `--output FILE` writes, one JSON object with a key
//! per scenario that ran, plus `machine` (what it ran on).

mod drain;
mod events;
mod failover;
mod fleet;
mod floor;
mod latency;
mod observe;
mod procs;
mod scale;
mod signal;
mod steps;
mod throughput;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use serde::Serialize;

pub use drain::{DrainResult, DrainTrial};
pub use events::EventsResult;
pub use failover::{FailoverResult, FailoverTrial, TtlResult};
pub use floor::FloorTrial;
pub use latency::{LatencyResult, LatencyTrial, RateResult};
pub use scale::ScaleResult;
pub use signal::SignalResult;
pub use steps::{StepsResult, StepsTrial};
pub use throughput::{ThroughputResult, ThroughputTrial};

/// What `runfleet bench` measures; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Scenario {
    /// The bare JetStream run lifecycle: the baseline.
    Floor,
    /// One-step runs through the whole fleet, against the floor.
    Throughput,
    /// Open-loop submit→start / submit→complete at fractions of throughput.
    Latency,
    /// Checkpoint overhead of one durable step against a plain async call.
    Steps,
    /// An external subscriber's lag behind published events.
    Events,
    /// SIGKILL of a worker process → `run.resumed` on another, per lease TTL.
    Failover,
    /// Memory and heartbeat traffic with many runs in flight.
    Scale,
    /// Signal → `run.resumed` of a parked run against submit → `run.started`.
    Signal,
    /// SIGTERM of a worker process → `run.handoff` → `run.resumed` on another.
    Drain,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Scenarios to run, in any order: floor, throughput, latency, steps,
    /// events, failover, scale, signal, drain [default: all].
    #[arg(value_enum)]
    pub scenarios: Vec<Scenario>,
    /// Trials of every scenario (each on a fresh fleet); medians and ranges
    /// are over these.
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// floor, throughput: runs per trial.
    #[arg(long, default_value_t = 20_000)]
    pub runs: u32,
    /// floor, throughput, latency: in-process workers (the floor runs
    /// workers × slots concurrent handlers).
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// floor, throughput, latency: slots per worker.
    #[arg(long, default_value_t = 64)]
    pub slots: u32,
    /// throughput: submits in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// latency: offered rates, in percent of the throughput measured in the
    /// same bench (measured first if `throughput` is not selected).
    #[arg(long, value_delimiter = ',', default_value = "25,50")]
    pub rates: Vec<u32>,
    /// latency: the throughput (runs/s) the rates are percentages of,
    /// instead of measuring it first: to compare builds at the same
    /// offered load.
    #[arg(long)]
    pub latency_base: Option<f64>,
    /// latency: how long each offered rate is held.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub latency_duration: Duration,
    /// steps: durable steps per run.
    #[arg(long, default_value_t = 50)]
    pub steps: u32,
    /// steps: runs measured per trial, one after the other (after one
    /// warm-up run).
    #[arg(long, default_value_t = 20)]
    pub step_runs: u32,
    /// events: events per second offered by the workers, in total.
    #[arg(long, default_value_t = 10_000)]
    pub event_rate: u32,
    /// events: how long the event rate is held per trial.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub event_duration: Duration,
    /// failover: lease TTLs to measure, comma separated (each at least 1s).
    #[arg(long, value_delimiter = ',', default_value = "2s,5s", value_parser = parse_duration)]
    pub ttls: Vec<Duration>,
    /// failover: `steps` runs submitted per trial.
    #[arg(long, default_value_t = 3)]
    pub failover_runs: u32,
    /// scale: runs in flight at once (waiting for a signal) per trial.
    #[arg(long, default_value_t = 10_000)]
    pub scale_runs: u32,
    /// scale: runs holding a slot at once (a long step), for the memory per
    /// running run.
    #[arg(long, default_value_t = 1_000)]
    pub scale_running: u32,
    /// scale: simulated leases renewed every TTL/3.
    #[arg(long, default_value_t = 100_000)]
    pub simulated_leases: u32,
    /// signal: trials measured, one after the other (after 5 warm-up
    /// trials), each an `await` run signalled once parked and an `echo` run.
    #[arg(long, default_value_t = 200)]
    pub signal_runs: u32,
    /// drain: `steps` runs on the worker that gets SIGTERM, per trial.
    #[arg(long, default_value_t = 10)]
    pub drain_runs: u32,
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
        anyhow::ensure!(self.repeat > 0, "--repeat must be positive");
        let fleet = || {
            anyhow::ensure!(self.workers > 0 && self.slots > 0, "--workers and --slots must be positive");
            Ok(())
        };
        for scenario in selected {
            match scenario {
                Scenario::Floor => {
                    fleet()?;
                    anyhow::ensure!(self.runs > 0, "--runs must be positive");
                }
                Scenario::Throughput => {
                    fleet()?;
                    anyhow::ensure!(
                        self.runs > 0 && self.concurrency > 0,
                        "--runs and --concurrency must be positive"
                    );
                }
                Scenario::Latency => {
                    fleet()?;
                    anyhow::ensure!(
                        !self.rates.is_empty() && self.rates.iter().all(|r| (1..=100).contains(r)),
                        "--rates must name percentages in 1..=100"
                    );
                    anyhow::ensure!(
                        self.latency_duration >= Duration::from_secs(1),
                        "--latency-duration must be at least 1s"
                    );
                    anyhow::ensure!(
                        self.latency_base.is_none_or(|base| base.is_finite() && base > 0.0),
                        "--latency-base must be a positive number of runs/s"
                    );
                }
                Scenario::Steps => anyhow::ensure!(
                    self.steps > 0 && self.step_runs > 0,
                    "--steps and --step-runs must be positive"
                ),
                Scenario::Events => anyhow::ensure!(
                    self.event_rate > 0 && self.event_duration >= Duration::from_secs(1),
                    "--event-rate must be positive and --event-duration at least 1s"
                ),
                Scenario::Failover => {
                    anyhow::ensure!(!self.ttls.is_empty(), "--ttls must name at least one TTL");
                    anyhow::ensure!(
                        self.ttls.iter().all(|ttl| *ttl >= Duration::from_secs(1)),
                        "every --ttls value must be at least 1s (the coordinator's lease_ttl minimum)"
                    );
                    anyhow::ensure!(self.failover_runs > 0, "--failover-runs must be positive");
                }
                Scenario::Scale => anyhow::ensure!(
                    self.scale_runs > 0 && self.scale_running > 0 && self.simulated_leases > 0,
                    "--scale-runs, --scale-running and --simulated-leases must be positive"
                ),
                Scenario::Signal => anyhow::ensure!(self.signal_runs > 0, "--signal-runs must be positive"),
                Scenario::Drain => anyhow::ensure!(self.drain_runs > 0, "--drain-runs must be positive"),
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
    pub machine: Machine,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor: Option<Vec<FloorTrial>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throughput: Option<ThroughputResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencyResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<StepsResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<EventsResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<ScaleResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<SignalResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainResult>,
}

/// What the bench ran on: results are only comparable on the same machine.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub os: String,
    pub nats_server: String,
    pub runfleet: String,
    /// Whether the bench's runtime kept tokio's LIFO slot
    /// ([`runfleet_ops::runtime`]): only a build without `--cfg tokio_unstable` or
    /// `RUNFLEET_TOKIO_LIFO_SLOT=1` does, and both run slower.
    pub tokio_lifo_slot: bool,
    /// The `GOGC` every nats-server of the bench ran with, the floor's and
    /// the fleet's alike ([`crate::embedded::DEFAULT_GOGC`] unless the
    /// environment set one).
    pub nats_gogc: String,
}

impl Machine {
    fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name").and_then(|rest| rest.split(':').nth(1)))
            .map(|model| model.trim().to_owned())
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_default();
        let os = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|release| format!("{} {}", std::env::consts::OS, release.trim()))
            .unwrap_or_else(|_| std::env::consts::OS.to_owned());
        Self {
            cpus: std::thread::available_parallelism().map(usize::from).unwrap_or(1),
            cpu_model,
            memory_gib: memory_kib / (1024.0 * 1024.0),
            os,
            nats_server: crate::embedded::server_version().unwrap_or_else(|e| format!("unknown: {e}")),
            runfleet: env!("CARGO_PKG_VERSION").to_owned(),
            tokio_lifo_slot: runfleet_ops::runtime::lifo_slot().unwrap_or(true),
            nats_gogc: crate::embedded::nats_gogc(),
        }
    }
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

/// nats-server's traffic per run over a measured window: what each run
/// costs the server in messages (in: published to it, out: delivered by it,
/// acks and replies included) and bytes. Deterministic where the runs/s are
/// noisy, so it compares designs across machines and hours.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ServerTraffic {
    pub messages_in_per_run: f64,
    pub messages_out_per_run: f64,
    pub bytes_in_per_run: f64,
    pub bytes_out_per_run: f64,
}

impl ServerTraffic {
    fn per_run(traffic: crate::embedded::Traffic, runs: u32) -> Self {
        let per_run = |count: u64| count as f64 / f64::from(runs.max(1));
        Self {
            messages_in_per_run: per_run(traffic.in_msgs),
            messages_out_per_run: per_run(traffic.out_msgs),
            bytes_in_per_run: per_run(traffic.in_bytes),
            bytes_out_per_run: per_run(traffic.out_bytes),
        }
    }

    /// Messages in and out per run.
    pub fn messages_per_run(&self) -> f64 {
        self.messages_in_per_run + self.messages_out_per_run
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
    let mut report = BenchReport { machine: Machine::read(), ..BenchReport::default() };
    let mut first = true;
    for scenario in selected {
        if !args.json && !std::mem::take(&mut first) {
            println!();
        }
        match scenario {
            Scenario::Floor => {
                // `throughput` runs its own floor trials, paired with its own.
                if selected.contains(&Scenario::Throughput) {
                    continue;
                }
                let mut trials = Vec::new();
                for _ in 0..args.repeat {
                    trials.push(floor::trial(args, args.runs).await.context("bench floor")?);
                }
                if !args.json {
                    floor::print(&trials);
                }
                report.floor = Some(trials);
            }
            Scenario::Throughput => {
                let result = throughput::measure(args).await.context("bench throughput")?;
                if !args.json {
                    if selected.contains(&Scenario::Floor) {
                        floor::print(&result.floor);
                        println!();
                    }
                    throughput::print(&result);
                }
                report.floor = Some(result.floor.clone());
                report.throughput = Some(result);
            }
            Scenario::Latency => {
                let base = match (args.latency_base, &report.throughput) {
                    (Some(base), _) => base,
                    (None, Some(throughput)) => throughput.terminal_runs_per_sec.median,
                    (None, None) => {
                        throughput::base_rate(args).await.context("bench latency: measuring throughput")?
                    }
                };
                let result = latency::measure(args, base).await.context("bench latency")?;
                if !args.json {
                    latency::print(&result);
                }
                report.latency = Some(result);
            }
            Scenario::Steps => {
                let result = steps::measure(args).await.context("bench steps")?;
                if !args.json {
                    steps::print(&result);
                }
                report.steps = Some(result);
            }
            Scenario::Events => {
                let result = events::measure(args).await.context("bench events")?;
                if !args.json {
                    events::print(&result);
                }
                report.events = Some(result);
            }
            Scenario::Failover => {
                let result = failover::measure(args).await.context("bench failover")?;
                if !args.json {
                    failover::print(&result);
                }
                report.failover = Some(result);
            }
            Scenario::Scale => {
                let result = scale::measure(args).await.context("bench scale")?;
                if !args.json {
                    scale::print(&result);
                }
                report.scale = Some(result);
            }
            Scenario::Signal => {
                let result = signal::measure(args).await.context("bench signal")?;
                if !args.json {
                    signal::print(&result);
                }
                report.signal = Some(result);
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
            vec![
                Scenario::Floor,
                Scenario::Throughput,
                Scenario::Latency,
                Scenario::Steps,
                Scenario::Events,
                Scenario::Failover,
                Scenario::Scale,
                Scenario::Signal,
                Scenario::Drain
            ]
        );
        assert!(args.validate(&args.selected()).is_ok());
        assert_eq!((args.repeat, args.runs, args.rates.clone()), (3, 20_000, vec![25, 50]));
        assert_eq!((args.event_rate, args.scale_runs, args.simulated_leases), (10_000, 10_000, 100_000));
        assert_eq!(args.ttls, vec![Duration::from_secs(2), Duration::from_secs(5)]);
    }

    #[test]
    fn scenarios_run_once_in_canonical_order() {
        let args = parse(&["failover", "steps", "failover", "throughput", "--ttls", "1s,1500ms"]);
        assert_eq!(args.selected(), vec![Scenario::Throughput, Scenario::Steps, Scenario::Failover]);
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
        let args = parse(&["drain", "--repeat", "0"]);
        assert!(args.validate(&args.selected()).is_err());
        let args = parse(&["latency", "--rates", "0,50"]);
        assert!(args.validate(&args.selected()).is_err());
        let args = parse(&["latency", "--rates", "150"]);
        assert!(args.validate(&args.selected()).is_err());
        let args = parse(&["latency", "--latency-base", "0"]);
        assert!(args.validate(&args.selected()).is_err());
        let args = parse(&["latency", "--latency-base", "2000"]);
        assert!(args.validate(&args.selected()).is_ok());
        let args = parse(&["throughput", "--runs", "0"]);
        assert!(args.validate(&args.selected()).is_err());
        let args = parse(&["events", "--event-duration", "10ms"]);
        assert!(args.validate(&args.selected()).is_err());
        let args = parse(&["scale", "--simulated-leases", "0"]);
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
