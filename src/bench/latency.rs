//! The `latency` scenario: submit→start and submit→complete of one-step
//! no-op runs under an open-loop load at fixed fractions (`--rates`, in
//! percent) of the fleet's throughput measured in the same bench.
//!
//! Each trial starts a fleet like `throughput`'s, pushes a warm-up batch
//! through it, then submits `rate × --latency-duration` runs, each at its
//! *intended* send time `start + i / rate`, from a task of its own so a slow
//! reply never delays the next submit. Latencies are taken from the intended
//! send time, not from when the submit actually left: if the bench (or the
//! machine) falls behind the schedule, the delay counts against runfleet as
//! it would for a real client, so coordinated omission cannot hide a stall.
//! Arrival instants are stamped by the tenant's event subscriber (see
//! [`Recorder`]).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use runfleet_protocol::RunId;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::fleet::{self, Fleet};
use super::floor::{self, FloorLatencyTrial};
use super::procs::{CpuClock, CpuMeter, CpuPerRun};
use super::throughput::{self, Recorder};
use super::{progress, BenchArgs, ServerTraffic, Spread};

/// Targets from the issue tracker, at 50% of throughput offered.
pub const TARGET_RATE_PERCENT: u32 = 50;
pub const TARGET_START_P99_MS: f64 = 10.0;
pub const TARGET_COMPLETE_P99_MS: f64 = 25.0;
/// Runs pushed through a fresh fleet before the clock starts.
const WARM_UP: u32 = 200;

/// Quantiles of one trial, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tail {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Tail {
    pub(super) fn of(hist: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1e3;
        Self {
            p50_ms: ms(hist.value_at_quantile(0.50)),
            p99_ms: ms(hist.value_at_quantile(0.99)),
            p999_ms: ms(hist.value_at_quantile(0.999)),
            max_ms: ms(hist.max()),
        }
    }
}

/// One trial at one offered rate.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyTrial {
    pub offered_per_sec: f64,
    /// Submits per second the bench actually sent (behind schedule if lower).
    pub sent_per_sec: f64,
    pub runs: u32,
    pub submit_to_start: Tail,
    pub submit_to_complete: Tail,
    /// Where the time goes: intended send time → the submit actually left
    /// (the bench's own scheduling, counted against runfleet all the same),
    /// and → the coordinator's reply (the run is stored and queued).
    pub send_lag: Tail,
    pub submit_to_reply: Tail,
    pub failed: u32,
    /// nats-server's traffic per run over the trial (first submit → the
    /// last run finished), at this offered rate.
    pub server: ServerTraffic,
    /// CPU per run over the same window: the bench's process (the fleet,
    /// the pacer, the subscriber) and nats-server. Higher at low rates than
    /// at saturation: fewer messages share each wake-up, write and commit.
    pub cpu: CpuPerRun,
    /// The bare JetStream floor at the same offered rate, run just before
    /// on a server of its own: what the machine takes for the durable part
    /// of a run at this rate.
    pub floor: FloorLatencyTrial,
}

/// Medians and ranges at one offered rate.
#[derive(Debug, Clone, Serialize)]
pub struct RateResult {
    pub percent: u32,
    pub offered_per_sec: f64,
    pub start_p50_ms: Spread,
    pub start_p99_ms: Spread,
    pub start_p999_ms: Spread,
    pub complete_p50_ms: Spread,
    pub complete_p99_ms: Spread,
    pub complete_p999_ms: Spread,
    pub reply_p50_ms: Spread,
    pub reply_p99_ms: Spread,
    pub reply_p999_ms: Spread,
    pub send_lag_p50_ms: Spread,
    pub send_lag_p99_ms: Spread,
    /// nats-server messages (in + out) per run at this rate.
    pub messages_per_run: Spread,
    /// CPU milliseconds per run at this rate (bench process + nats-server).
    pub cpu_ms_per_run: Spread,
    /// The floor at the same rate: job published → first event stored, →
    /// job acked; and its CPU per run.
    pub floor_start_p50_ms: Spread,
    pub floor_start_p99_ms: Spread,
    pub floor_complete_p99_ms: Spread,
    pub floor_cpu_ms_per_run: Spread,
    pub trials: Vec<LatencyTrial>,
}

/// What the `latency` scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyResult {
    /// The throughput (runs/s to the terminal event) the rates are
    /// fractions of.
    pub base_runs_per_sec: f64,
    pub seconds_per_trial: f64,
    pub rates: Vec<RateResult>,
    pub target_rate_percent: u32,
    pub target_start_p99_ms: f64,
    pub target_complete_p99_ms: f64,
}

pub(super) async fn measure(args: &BenchArgs, base: f64) -> anyhow::Result<LatencyResult> {
    anyhow::ensure!(base > 0.0, "the measured throughput is zero: nothing to offer a fraction of");
    let mut rates = Vec::new();
    for &percent in &args.rates {
        let offered = base * f64::from(percent) / 100.0;
        let mut trials = Vec::new();
        for trial in 1..=args.repeat {
            progress(
                args,
                format!("latency: {percent}% ({offered:.0} runs/s) trial {trial}/{}", args.repeat),
            );
            let floor = floor::open_loop(args, offered, args.latency_duration).await?;
            progress(
                args,
                format!(
                    "latency: floor: job→start p99 {:.2} ms, job→complete p99 {:.2} ms",
                    floor.job_to_start.p99_ms, floor.job_to_complete.p99_ms
                ),
            );
            let result = fleet_trial(args, offered, floor).await?;
            progress(
                args,
                format!(
                    "latency: submit→start p99 {:.2} ms, submit→complete p99 {:.2} ms \
                     (of which send lag p99 {:.2} ms, submit→reply p99 {:.2} ms)",
                    result.submit_to_start.p99_ms,
                    result.submit_to_complete.p99_ms,
                    result.send_lag.p99_ms,
                    result.submit_to_reply.p99_ms
                ),
            );
            trials.push(result);
        }
        let spread = |field: fn(&LatencyTrial) -> f64| {
            let values: Vec<f64> = trials.iter().map(field).collect();
            Spread::of(&values).context("no trial ran")
        };
        rates.push(RateResult {
            percent,
            offered_per_sec: offered,
            start_p50_ms: spread(|t| t.submit_to_start.p50_ms)?,
            start_p99_ms: spread(|t| t.submit_to_start.p99_ms)?,
            start_p999_ms: spread(|t| t.submit_to_start.p999_ms)?,
            complete_p50_ms: spread(|t| t.submit_to_complete.p50_ms)?,
            complete_p99_ms: spread(|t| t.submit_to_complete.p99_ms)?,
            complete_p999_ms: spread(|t| t.submit_to_complete.p999_ms)?,
            reply_p50_ms: spread(|t| t.submit_to_reply.p50_ms)?,
            reply_p99_ms: spread(|t| t.submit_to_reply.p99_ms)?,
            reply_p999_ms: spread(|t| t.submit_to_reply.p999_ms)?,
            send_lag_p50_ms: spread(|t| t.send_lag.p50_ms)?,
            send_lag_p99_ms: spread(|t| t.send_lag.p99_ms)?,
            messages_per_run: spread(|t| t.server.messages_per_run())?,
            cpu_ms_per_run: spread(|t| t.cpu.total_ms())?,
            floor_start_p50_ms: spread(|t| t.floor.job_to_start.p50_ms)?,
            floor_start_p99_ms: spread(|t| t.floor.job_to_start.p99_ms)?,
            floor_complete_p99_ms: spread(|t| t.floor.job_to_complete.p99_ms)?,
            floor_cpu_ms_per_run: spread(|t| t.floor.cpu.total_ms())?,
            trials,
        });
    }
    Ok(LatencyResult {
        base_runs_per_sec: base,
        seconds_per_trial: args.latency_duration.as_secs_f64(),
        rates,
        target_rate_percent: TARGET_RATE_PERCENT,
        target_start_p99_ms: TARGET_START_P99_MS,
        target_complete_p99_ms: TARGET_COMPLETE_P99_MS,
    })
}

pub(super) fn print(result: &LatencyResult) {
    println!(
        "latency: open loop, {:.0}s per trial, rates in % of {:.0} runs/s (median over trials, range in brackets)",
        result.seconds_per_trial, result.base_runs_per_sec
    );
    println!("  {:>5} {:>9}  {:>26}  {:>26}  {:>26}", "rate", "runs/s", "submit→start p50", "p99", "p99.9");
    let cell = |s: &Spread| format!("{:.2} [{:.2}–{:.2}]", s.median, s.min, s.max);
    for rate in &result.rates {
        println!(
            "  {:>4}% {:>9.0}  start    {:>17}  {:>26}  {:>26}",
            rate.percent,
            rate.offered_per_sec,
            cell(&rate.start_p50_ms),
            cell(&rate.start_p99_ms),
            cell(&rate.start_p999_ms)
        );
        println!(
            "  {:>5} {:>9}  complete {:>17}  {:>26}  {:>26}",
            "",
            "",
            cell(&rate.complete_p50_ms),
            cell(&rate.complete_p99_ms),
            cell(&rate.complete_p999_ms)
        );
        println!(
            "  {:>5} {:>9}  reply    {:>17}  {:>26}  {:>26}   (send lag p50 {}, p99 {}; {:.1} nats-server messages and {:.2} ms of CPU per run)",
            "",
            "",
            cell(&rate.reply_p50_ms),
            cell(&rate.reply_p99_ms),
            cell(&rate.reply_p999_ms),
            cell(&rate.send_lag_p50_ms),
            cell(&rate.send_lag_p99_ms),
            rate.messages_per_run.median,
            rate.cpu_ms_per_run.median
        );
        println!(
            "  {:>5} {:>9}  floor    {:>17}  {:>26}  {:>26}   (start p50, start p99, complete p99; {:.2} ms of CPU per run)",
            "",
            "",
            cell(&rate.floor_start_p50_ms),
            cell(&rate.floor_start_p99_ms),
            cell(&rate.floor_complete_p99_ms),
            rate.floor_cpu_ms_per_run.median
        );
    }
    if let Some(rate) = result.rates.iter().find(|r| r.percent == result.target_rate_percent) {
        let verdict = |value: f64, target: f64| if value <= target { "met" } else { "MISSED" };
        println!(
            "  target at {}%: submit→start p99 ≤ {} ms {}, submit→complete p99 ≤ {} ms {} (medians)",
            result.target_rate_percent,
            result.target_start_p99_ms,
            verdict(rate.start_p99_ms.median, result.target_start_p99_ms),
            result.target_complete_p99_ms,
            verdict(rate.complete_p99_ms.median, result.target_complete_p99_ms),
        );
    }
}

async fn fleet_trial(
    args: &BenchArgs,
    offered: f64,
    floor: FloorLatencyTrial,
) -> anyhow::Result<LatencyTrial> {
    let mut fleet = Fleet::start(fleet::DEFAULT_LEASE_TTL).await?;
    for _ in 0..args.workers {
        fleet.add_worker(args.slots, fleet::noop_agents()).await?;
    }
    let result = trial_on(args, &fleet, offered, floor).await;
    fleet.stop().await?;
    result
}

async fn trial_on(
    args: &BenchArgs,
    fleet: &Fleet,
    offered: f64,
    floor: FloorLatencyTrial,
) -> anyhow::Result<LatencyTrial> {
    let client = fleet.client().await?;
    let stop = CancellationToken::new();
    let recorder = Recorder::start(&client, stop.clone()).await?;

    let mut warm = Vec::new();
    for i in 0..WARM_UP {
        let reply = client.submit(throughput::noop_request(i)?).await?;
        warm.push((reply.run_id, Instant::now()));
    }
    recorder.wait_finished(&warm).await?;

    // Open loop: submit i leaves at `begin + i / rate`, whatever earlier
    // submits are doing. A blocking thread paces them on the OS timer and
    // spawns each on the runtime: tokio's timer rounds a deadline up to the
    // next millisecond, which made every submit up to a millisecond late
    // (counted against runfleet, as every lag of the sender is).
    let runs = (offered * args.latency_duration.as_secs_f64()).round().max(1.0) as u32;
    let interval = Duration::from_secs_f64(1.0 / offered);
    let clock = CpuClock::read();
    let cpu = CpuMeter { clock: &clock, nats_pid: fleet.nats_pid().context("nats-server is not running")? };
    let cpu_before = cpu.mark()?;
    let traffic_before = fleet.traffic().await?;
    let runtime = tokio::runtime::Handle::current();
    let pacer_client = client.clone();
    let (submits, sent) = tokio::task::spawn_blocking(move || {
        let begin = Instant::now();
        let mut submits = Vec::with_capacity(runs as usize);
        for i in 0..runs {
            let intended = begin + interval.mul_f64(f64::from(i));
            if let Some(wait) = intended.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let client = pacer_client.clone();
            submits.push(runtime.spawn(async move {
                let request = throughput::noop_request(i)?;
                let sent = Instant::now();
                let reply = client.submit(request).await?;
                let sent = Sent { intended, sent, replied: Instant::now() };
                Ok::<(RunId, Sent), anyhow::Error>((reply.run_id, sent))
            }));
        }
        (submits, begin.elapsed())
    })
    .await
    .context("the submit pacer panicked")?;
    let mut submitted = Vec::with_capacity(runs as usize);
    let mut send_lag = Histogram::<u64>::new(3)?;
    let mut submit_to_reply = Histogram::<u64>::new(3)?;
    for submit in submits {
        let (run, times) = submit.await.context("a submit task panicked")??;
        send_lag.record(micros(times.sent, times.intended))?;
        submit_to_reply.record(micros(times.replied, times.intended))?;
        submitted.push((run, times.intended));
    }
    recorder.wait_finished(&submitted).await?;
    let cpu = cpu.per_run(&cpu_before, runs)?;
    let traffic = fleet.traffic().await?.since(&traffic_before);
    stop.cancel();

    let seen = recorder.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut start_hist = Histogram::<u64>::new(3)?;
    let mut complete_hist = Histogram::<u64>::new(3)?;
    let mut failed = 0;
    for (run, intended) in &submitted {
        let started = seen.started.get(run).context("a run finished without run.started")?;
        start_hist.record(micros(*started, *intended))?;
        let (done, ok) = seen.finished.get(run).context("a run did not finish")?;
        complete_hist.record(micros(*done, *intended))?;
        failed += u32::from(!ok);
    }
    Ok(LatencyTrial {
        offered_per_sec: offered,
        sent_per_sec: f64::from(runs) / (sent + interval).as_secs_f64(),
        runs,
        submit_to_start: Tail::of(&start_hist),
        submit_to_complete: Tail::of(&complete_hist),
        send_lag: Tail::of(&send_lag),
        submit_to_reply: Tail::of(&submit_to_reply),
        failed,
        server: ServerTraffic::per_run(traffic, runs),
        cpu,
        floor,
    })
}

/// When one open-loop submit was meant to leave, left, and was answered.
struct Sent {
    intended: Instant,
    sent: Instant,
    replied: Instant,
}

/// `later - earlier` in whole microseconds (zero if `later` is earlier).
pub(super) fn micros(later: Instant, earlier: Instant) -> u64 {
    u64::try_from(later.saturating_duration_since(earlier).as_micros()).unwrap_or(u64::MAX)
}
