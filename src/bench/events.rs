//! The `events` scenario: how far behind a worker's `ctx.emit` an external
//! subscriber of the run events is, at a fixed event rate.
//!
//! Each of `--repeat` trials starts a fleet of its own ([`Fleet`]: child
//! nats-server, in-process coordinator on SQLite, one in-process worker with
//! one slot per producer and the [`Producer`] agent registered beside the
//! built-ins) and measures two phases one after the other on it, each a
//! [`WARM_UP`] that is not recorded followed by `--event-duration` at
//! `--event-rate` events/s in total:
//!
//! - **baseline**: the floor. Tasks of the bench publish to a scratch stream
//!   of its own ([`BASE_STREAM`], file storage like the events stream) with
//!   bare async-nats JetStream publishes, each awaiting its ack, no headers.
//!   The payload is a runfleet event encoded with runfleet's codec (same
//!   fields, same size, same decoding at the subscriber),
//!   so what differs from the runfleet phase is runfleet's event path alone.
//! - **runfleet**: one run of [`Producer`] per producer. Each calls
//!   `ctx.emit` on its schedule: an `agent.event` appended to the run's log,
//!   one acknowledged, fenced JetStream publish
//!   (`Nats-Expected-Last-Subject-Sequence`) on the run's events subject.
//!
//! The baseline goes first so that the work the runfleet phase leaves behind
//! (the coordinator projecting every event into SQLite) cannot slow it down;
//! the runfleet phase pays for that projection while it runs, as a real fleet
//! does.
//!
//! **Pacing.** The offered load is open-loop: the i-th event of producer k of
//! P is due at `start + (i·P + k) / rate`, so the producers interleave into
//! one evenly spaced stream, and a producer that falls behind sends what is
//! due at once (a burst) rather than stretching the schedule. Each producer
//! has one publish in flight (`emit` awaits the ack, as a run's fenced
//! appends must), so there are enough producers (at least [`MIN_PRODUCERS`],
//! at most [`PER_PRODUCER_RATE`] events/s each: 16 at the default rate) for
//! the total to reach the rate with room for slow acks.
//! tokio's timers have millisecond resolution, so in practice each
//! millisecond tick releases `rate / 1000` events (10 at the default rate),
//! the same for both phases. The achieved rate (events sent over the first
//! measured event's due time → the last one's send) is reported, and how far
//! behind schedule sends were: producers that cannot keep up show there, not
//! as a lower offered rate.
//!
//! **Clock.** Everything runs in one process, so one monotonic clock serves
//! both ends: nanoseconds since a process-wide base [`Instant`] are taken
//! immediately before `ctx.emit` (or the bare publish) and carried in the
//! event's data. The subscriber is a plain core-NATS subscription to the
//! tenant's events (and to the baseline's subject) on a connection of its
//! own, running on a thread of its own with a single-threaded tokio runtime
//! of its own: it models an external process, and arrivals are stamped
//! before decoding without waiting behind the fleet's tasks on the bench's
//! runtime (a task of its own on the shared runtime, as `observe` does, is
//! still queued behind the worker's and coordinator's tasks on a 2-core
//! machine). Lag = arrival − send, recorded in nanoseconds. A core
//! subscription gets a message when the server routes it, which is before
//! the stream has stored it (and whether or not the stream accepts it): a
//! JetStream consumer of the events stream would lag more.
//!
//! **Why.** Beside the lags, each phase reports what explains them on a
//! small machine: each producer's send → ack time (what it waits for
//! before its next event; late acks make producers fall behind and then
//! burst) and the CPU this process (worker, coordinator with the projector
//! and SQLite, the bench's producers and subscriber) and nats-server used
//! while the phase ran, from `/proc/<pid>/stat`.
//!
//! **Loss.** Every run's terminal event is awaited (it arrives after the
//! run's emits on the same subscription) before the fleet stops; events
//! emitted (the runs' outputs, the baseline tasks' counts) but never received
//! are reported as lost, as are events a slow subscriber would drop. Expected
//! 0.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use hdrhistogram::Histogram;
use runfleet_protocol::api::SubmitRequest;
use runfleet_protocol::event::{AgentEvent, Event, EventBody};
use runfleet_protocol::{codec, time, AgentName, Names, RunId, TenantId, WorkerId};
use runfleet_worker::sdk::{async_trait, Agent, AgentError, RunContext};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::fleet::{self, Fleet};
use super::procs::{CpuClock, CpuMeter, CpuUse};
use super::{progress, BenchArgs, Spread};
use crate::client::Client;

/// The name the bench registers [`Producer`] under.
const AGENT: &str = "bench_event_producer";
/// The name of the agent events the producers emit.
const EVENT_NAME: &str = "bench.tick";
/// Target from the issue tracker, reported against, never asserted.
const TARGET_P99_MS: f64 = 2.0;
const TARGET_RATE: u32 = 10_000;
/// The scratch stream and subject of the baseline; the bench's own, on the
/// bench's own server, outside runfleet's names.
const BASE_STREAM: &str = "BENCH_EVENTS_BASE";
const BASE_SUBJECT: &str = "bench.events.base";
/// Sent at the rate before each phase's recorded part, not recorded
/// (connections, the first writes to the streams, the runtime's threads).
const WARM_UP: Duration = Duration::from_secs(1);
/// Producers per phase: at least this many, more if each would otherwise
/// offer over [`PER_PRODUCER_RATE`], at most [`MAX_PRODUCERS`].
const MIN_PRODUCERS: u32 = 8;
const MAX_PRODUCERS: u32 = 64;
/// A producer's largest share of the rate: one event every 1.6 ms. A run's
/// appends cannot overlap (each names the stream sequence the previous one's
/// ack returned), and under this load an append's ack takes ~0.45 ms at p50
/// and 2–4 ms at p99 on a 2-core machine: at 1,250 events/s (0.8 ms apart)
/// the producers fell tens of milliseconds behind schedule and caught up in
/// bursts, at 625 they stay within a few.
const PER_PRODUCER_RATE: u32 = 625;
/// Between the moment a schedule is set and its first event.
const LEAD_TIME: Duration = Duration::from_millis(50);
/// How long the runs may take to be claimed and report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after its last send a phase's events may take to arrive; beyond
/// that they count as lost.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How much longer than their schedule the runs may take to end.
const END_TIMEOUT: Duration = Duration::from_secs(60);

/// The process-wide base of the send and arrival stamps.
static BASE: OnceLock<Instant> = OnceLock::new();

fn base() -> Instant {
    *BASE.get_or_init(Instant::now)
}

/// Added to every stamp so that all of them are over `u32::MAX`:
/// MessagePack writes an integer in as few bytes as it fits, and stamps of
/// both phases must make payloads of the same size.
const STAMP_OFFSET_NS: u64 = 1 << 32;

/// Nanoseconds since [`base`] plus [`STAMP_OFFSET_NS`], on the monotonic
/// clock.
fn now_ns() -> u64 {
    STAMP_OFFSET_NS.saturating_add(u64::try_from(base().elapsed().as_nanos()).unwrap_or(u64::MAX))
}

/// Lag quantiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Lag {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Lag {
    /// From a histogram of nanoseconds.
    fn from_nanos(hist: &Histogram<u64>) -> Self {
        let ms = |value: u64| value as f64 / 1e6;
        Self {
            p50_ms: ms(hist.value_at_quantile(0.50)),
            p99_ms: ms(hist.value_at_quantile(0.99)),
            p999_ms: ms(hist.value_at_quantile(0.999)),
            max_ms: ms(hist.max()),
        }
    }
}

/// One phase of one trial.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseTrial {
    /// Send → the subscriber's arrival stamp, of the recorded events.
    pub lag: Lag,
    /// Events sent per second over the recorded part.
    pub events_per_sec: f64,
    /// Recorded events sent (acknowledged by JetStream).
    pub emitted: u64,
    /// Recorded events the subscriber received.
    pub received: u64,
    /// `emitted` − `received`, expected 0.
    pub lost: u64,
    /// How late sends were against their schedule (send − due time).
    pub behind_schedule: Lag,
    /// Send → JetStream's ack received by the producer: what each producer
    /// waits for before its next event.
    pub send_to_ack: Lag,
    /// The mean size of the messages' payloads (headers not counted).
    pub payload_bytes: f64,
    /// CPU used while the phase ran, in cores.
    pub cpu: CpuUse,
}

/// One phase over the trials: median and range of each figure.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseResult {
    pub p50_ms: Spread,
    pub p99_ms: Spread,
    pub p999_ms: Spread,
    pub max_ms: Spread,
    pub events_per_sec: Spread,
    pub behind_schedule_p99_ms: Spread,
    pub send_to_ack_p99_ms: Spread,
    pub process_cores: Spread,
    pub nats_server_cores: Spread,
    /// Over all trials.
    pub emitted: u64,
    pub lost: u64,
    pub payload_bytes: f64,
}

impl PhaseResult {
    fn of(trials: &[&PhaseTrial]) -> anyhow::Result<Self> {
        let spread = |f: fn(&PhaseTrial) -> f64| {
            Spread::of(&trials.iter().map(|t| f(t)).collect::<Vec<_>>()).context("no trial was measured")
        };
        Ok(Self {
            p50_ms: spread(|t| t.lag.p50_ms)?,
            p99_ms: spread(|t| t.lag.p99_ms)?,
            p999_ms: spread(|t| t.lag.p999_ms)?,
            max_ms: spread(|t| t.lag.max_ms)?,
            events_per_sec: spread(|t| t.events_per_sec)?,
            behind_schedule_p99_ms: spread(|t| t.behind_schedule.p99_ms)?,
            send_to_ack_p99_ms: spread(|t| t.send_to_ack.p99_ms)?,
            process_cores: spread(|t| t.cpu.process_cores)?,
            nats_server_cores: spread(|t| t.cpu.nats_server_cores)?,
            emitted: trials.iter().map(|t| t.emitted).sum(),
            lost: trials.iter().map(|t| t.lost).sum(),
            payload_bytes: spread(|t| t.payload_bytes)?.median,
        })
    }
}

/// One trial: the baseline, then runfleet, on the same fleet.
#[derive(Debug, Clone, Serialize)]
pub struct EventsTrial {
    pub baseline: PhaseTrial,
    pub runfleet: PhaseTrial,
}

/// What the `events` scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct EventsResult {
    pub trials: u32,
    /// Events per second offered in total, per phase.
    pub offered_events_per_sec: u32,
    /// Producers (runs, or baseline tasks) sharing the rate.
    pub producers: u32,
    /// The recorded part of each phase, after `warm_up_secs`.
    pub duration_secs: f64,
    pub warm_up_secs: f64,
    /// Lag behind `ctx.emit` (an `agent.event` appended to a run's log).
    pub runfleet: PhaseResult,
    /// Lag behind a bare acknowledged JetStream publish of the same payload.
    pub baseline: PhaseResult,
    /// runfleet p99 over baseline p99, medians.
    pub p99_over_baseline: f64,
    pub target_p99_ms: f64,
    pub target_events_per_sec: u32,
    /// Whether runfleet's median p99 is within the target at (at least 99%
    /// of) the target's rate.
    pub meets_target: bool,
    pub per_trial: Vec<EventsTrial>,
}

/// When each event of a phase is due; the same for both phases.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    /// The first event's due time, a stamp like [`now_ns`]'s.
    start_ns: u64,
    /// Between two consecutive events of all producers together.
    period_ns: f64,
    producers: u32,
    /// Events per producer that are not recorded, then that are.
    warm_up: u64,
    measured: u64,
}

impl Schedule {
    fn new(rate: u32, producers: u32, duration: Duration, start_ns: u64) -> Self {
        let per_producer =
            |d: Duration| (f64::from(rate) * d.as_secs_f64() / f64::from(producers)).round() as u64;
        Self {
            start_ns,
            period_ns: 1e9 / f64::from(rate),
            producers,
            warm_up: per_producer(WARM_UP).max(1),
            measured: per_producer(duration).max(1),
        }
    }

    /// The events of `producer` in order.
    fn ticks(&self, producer: u32) -> impl Iterator<Item = Tick> + '_ {
        (0..self.warm_up + self.measured).map(move |index| {
            let slot = index * u64::from(self.producers) + u64::from(producer);
            Tick {
                producer,
                index,
                due_ns: self.start_ns + (slot as f64 * self.period_ns) as u64,
                warm_up: index < self.warm_up,
            }
        })
    }

    /// Recorded events over all producers.
    fn measured_total(&self) -> u64 {
        self.measured * u64::from(self.producers)
    }
}

/// One event a producer owes.
struct Tick {
    producer: u32,
    index: u64,
    due_ns: u64,
    warm_up: bool,
}

impl Tick {
    /// Sleeps until the event is due; returns at once if it is overdue.
    async fn due(&self) {
        let due = base() + Duration::from_nanos(self.due_ns.saturating_sub(STAMP_OFFSET_NS));
        if Instant::now() < due {
            tokio::time::sleep_until(due.into()).await;
        }
    }

    /// The event's data, stamped now, and the stamp: call immediately
    /// before publishing.
    fn stamp(&self) -> Result<(Value, u64), serde_json::Error> {
        let sent_ns = now_ns();
        let stamp = Stamp {
            producer: self.producer,
            index: self.index,
            due_ns: self.due_ns,
            sent_ns,
            warm_up: self.warm_up,
        };
        Ok((serde_json::to_value(stamp)?, sent_ns))
    }
}

/// The data of every event the producers send.
#[derive(Debug, Serialize, Deserialize)]
struct Stamp {
    producer: u32,
    index: u64,
    due_ns: u64,
    sent_ns: u64,
    warm_up: bool,
}

/// How many events a producer sent (and had acknowledged).
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
struct Emitted {
    warm_up: u64,
    measured: u64,
}

impl Emitted {
    fn add(&mut self, other: Emitted) {
        self.warm_up += other.warm_up;
        self.measured += other.measured;
    }
}

/// What one producer keeps while it sends: counts and send → ack times.
struct Sending {
    emitted: Emitted,
    /// Nanoseconds, recorded events only.
    acks: Histogram<u64>,
}

impl Sending {
    fn new() -> Result<Self, hdrhistogram::CreationError> {
        Ok(Self { emitted: Emitted::default(), acks: Histogram::new(3)? })
    }

    /// Counts `tick`'s event, acknowledged now, sent at `sent_ns`.
    fn acked(&mut self, tick: &Tick, sent_ns: u64) -> Result<(), hdrhistogram::RecordError> {
        if tick.warm_up {
            self.emitted.warm_up += 1;
            return Ok(());
        }
        self.emitted.measured += 1;
        self.acks.record(now_ns().saturating_sub(sent_ns))
    }
}

/// Input of [`Producer`].
#[derive(Serialize, Deserialize)]
struct ProducerInput {
    producer: u32,
}

/// The bench's agent: says it is ready, waits for the bench's schedule, then
/// emits one [`EVENT_NAME`] event per tick of its share and returns what it
/// emitted ([`Emitted`]).
struct Producer {
    ready: mpsc::UnboundedSender<u32>,
    schedule: watch::Receiver<Option<Schedule>>,
    /// Send → ack of every run's recorded events, nanoseconds.
    acks: Arc<Mutex<Histogram<u64>>>,
}

#[async_trait]
impl Agent for Producer {
    async fn run(&self, ctx: &mut RunContext, input: Value) -> Result<Value, AgentError> {
        let ProducerInput { producer } = serde_json::from_value(input)
            .map_err(|e| AgentError::invalid_input(format!("expected {{\"producer\": N}}: {e}")))?;
        let mut schedule = self.schedule.clone();
        // The bench may be gone (failed); the wait below then fails too.
        let _ = self.ready.send(producer);
        let schedule = schedule
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|schedule| *schedule)
            .ok_or_else(|| AgentError::failed("the bench stopped before setting a schedule"))?;
        let failed = |what: &str, e: &dyn std::fmt::Display| AgentError::failed(format!("{what}: {e}"));
        let mut sending = Sending::new().map_err(|e| failed("could not make a histogram", &e))?;
        for tick in schedule.ticks(producer) {
            tick.due().await;
            let (data, sent_ns) = tick.stamp().map_err(|e| failed("could not stamp", &e))?;
            ctx.emit(EVENT_NAME, data).await?;
            sending.acked(&tick, sent_ns).map_err(|e| failed("could not record", &e))?;
        }
        let mut acks = self.acks.lock().unwrap_or_else(PoisonError::into_inner);
        acks.add(&sending.acks).map_err(|e| failed("could not record", &e))?;
        serde_json::to_value(sending.emitted).map_err(|e| failed("could not report", &e))
    }
}

/// What the subscriber received of one phase.
struct Received {
    /// Send → arrival, nanoseconds, recorded events only.
    lag: Histogram<u64>,
    /// Send − due time, nanoseconds, recorded events only.
    behind: Histogram<u64>,
    warm_up: u64,
    measured: u64,
    payload_bytes: u64,
    /// The earliest due time and the latest send of the recorded events.
    first_due_ns: u64,
    last_sent_ns: u64,
    /// Values the histograms refused (expected 0).
    unrecorded: u64,
}

impl Received {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            lag: Histogram::new(3)?,
            behind: Histogram::new(3)?,
            warm_up: 0,
            measured: 0,
            payload_bytes: 0,
            first_due_ns: u64::MAX,
            last_sent_ns: 0,
            unrecorded: 0,
        })
    }

    fn note(&mut self, stamp: &Stamp, arrived_ns: u64, payload_bytes: usize) {
        if stamp.warm_up {
            self.warm_up += 1;
            return;
        }
        self.measured += 1;
        self.payload_bytes += payload_bytes as u64;
        self.first_due_ns = self.first_due_ns.min(stamp.due_ns);
        self.last_sent_ns = self.last_sent_ns.max(stamp.sent_ns);
        // `record`, not `saturating_record`: the histograms grow as needed.
        let lag = self.lag.record(arrived_ns.saturating_sub(stamp.sent_ns));
        let behind = self.behind.record(stamp.sent_ns.saturating_sub(stamp.due_ns));
        if lag.is_err() || behind.is_err() {
            self.unrecorded += 1;
        }
    }

    fn total(&self) -> u64 {
        self.warm_up + self.measured
    }

    /// The phase's figures, given what was sent.
    fn phase(
        &self,
        emitted: Emitted,
        acks: &Histogram<u64>,
        cpu: CpuUse,
        schedule: &Schedule,
    ) -> anyhow::Result<PhaseTrial> {
        anyhow::ensure!(self.unrecorded == 0, "{} lags could not be recorded", self.unrecorded);
        anyhow::ensure!(self.measured > 0, "no recorded event arrived");
        let span_ns = self.last_sent_ns.saturating_sub(self.first_due_ns) as f64 + schedule.period_ns;
        Ok(PhaseTrial {
            lag: Lag::from_nanos(&self.lag),
            events_per_sec: emitted.measured as f64 / (span_ns / 1e9),
            emitted: emitted.measured,
            received: self.measured,
            lost: emitted.measured.saturating_sub(self.measured),
            behind_schedule: Lag::from_nanos(&self.behind),
            send_to_ack: Lag::from_nanos(acks),
            payload_bytes: self.payload_bytes as f64 / self.measured as f64,
            cpu,
        })
    }
}

/// What the subscriber received, by phase.
struct Lags {
    baseline: Received,
    runfleet: Received,
}

/// The external subscriber: a thread with a runtime and a NATS connection of
/// its own, subscribed to the tenant's run events and the baseline's
/// subject. It records the producers' events in [`Lags`] and forwards every
/// terminal run event. Stopped by [`Subscriber::stop`], or when dropped.
struct Subscriber {
    lags: Arc<Mutex<Lags>>,
    ended: mpsc::UnboundedReceiver<(RunId, EventBody)>,
    stop: CancellationToken,
    _stop_on_drop: DropGuard,
    thread: std::thread::JoinHandle<()>,
}

impl Subscriber {
    /// Starts the thread and returns once both subscriptions are in place.
    async fn start(url: String, tenant: TenantId, names: Names) -> anyhow::Result<Self> {
        let lags = Arc::new(Mutex::new(Lags { baseline: Received::new()?, runfleet: Received::new()? }));
        let (ended_tx, ended) = mpsc::unbounded_channel();
        let (ready_tx, ready) = oneshot::channel();
        let stop = CancellationToken::new();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("could not build the subscriber's runtime")?;
        let (thread_lags, thread_stop) = (lags.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("bench-events-subscriber".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    let subscriptions = async {
                        let client = Client::connect(&url, tenant.clone(), names.clone()).await?;
                        let events = client.nats().subscribe(names.tenant_events(&tenant)).await?;
                        let baseline = client.nats().subscribe(BASE_SUBJECT).await?;
                        client.nats().flush().await?;
                        anyhow::Ok((client, futures::stream::select(events, baseline)))
                    };
                    match subscriptions.await {
                        Ok((_client, messages)) => {
                            let _ = ready_tx.send(Ok(()));
                            receive(messages, &thread_lags, &ended_tx, &thread_stop).await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })
            .context("could not start the subscriber's thread")?;
        ready
            .await
            .context("the subscriber's thread ended before subscribing")?
            .context("the subscriber could not subscribe")?;
        Ok(Self { lags, ended, _stop_on_drop: stop.clone().drop_guard(), stop, thread })
    }

    /// Reads what was received so far.
    fn with_lags<T>(&self, f: impl FnOnce(&Lags) -> T) -> T {
        f(&self.lags.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Waits until `count` of the phase `side` picks arrived, or `timeout`
    /// passed (what is missing then counts as lost).
    async fn until_received(&self, side: fn(&Lags) -> &Received, count: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.with_lags(|lags| side(lags).total()) < count && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the thread and waits for it.
    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .context("could not wait for the subscriber's thread")?
            .map_err(|_| anyhow::anyhow!("the subscriber's thread panicked"))
    }
}

/// The subscriber's loop: stamps each message on arrival, before decoding.
async fn receive(
    mut messages: impl futures::Stream<Item = async_nats::Message> + Unpin,
    lags: &Mutex<Lags>,
    ended: &mpsc::UnboundedSender<(RunId, EventBody)>,
    stop: &CancellationToken,
) {
    loop {
        let message = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            message = messages.next() => message,
        };
        let Some(message) = message else { return };
        let arrived_ns = now_ns();
        let Ok(events) = runfleet_protocol::event::decode_log_message(&message.payload) else { continue };
        for event in events {
            match event.body {
                EventBody::Agent(AgentEvent { name, data }) if name == EVENT_NAME => {
                    let Ok(stamp) = serde_json::from_value::<Stamp>(data) else { continue };
                    let mut lags = lags.lock().unwrap_or_else(PoisonError::into_inner);
                    let received = if message.subject.as_str() == BASE_SUBJECT {
                        &mut lags.baseline
                    } else {
                        &mut lags.runfleet
                    };
                    received.note(&stamp, arrived_ns, message.payload.len());
                }
                body if body.is_terminal() => {
                    let _ = ended.send((event.run_id, body));
                }
                _ => {}
            }
        }
    }
}

/// The number of producers for `rate` events/s.
fn producers(rate: u32) -> u32 {
    rate.div_ceil(PER_PRODUCER_RATE).clamp(MIN_PRODUCERS, MAX_PRODUCERS).min(rate)
}

/// Runs the trials, each on a fresh fleet.
pub(super) async fn measure(args: &BenchArgs) -> anyhow::Result<EventsResult> {
    let producers = producers(args.event_rate);
    let clock = CpuClock::read();
    let mut per_trial = Vec::new();
    for trial in 1..=args.repeat {
        progress(
            args,
            format!(
                "events: trial {trial}/{}: {} events/s from {producers} producers, {}s warm-up + {}s, \
                 bare JetStream publishes then runfleet emits",
                args.repeat,
                args.event_rate,
                WARM_UP.as_secs_f64(),
                args.event_duration.as_secs_f64()
            ),
        );
        per_trial.push(self::trial(args, producers, &clock).await.with_context(|| format!("trial {trial}"))?);
    }

    let runfleet = PhaseResult::of(&per_trial.iter().map(|t| &t.runfleet).collect::<Vec<_>>())?;
    let baseline = PhaseResult::of(&per_trial.iter().map(|t| &t.baseline).collect::<Vec<_>>())?;
    let meets_target = runfleet.p99_ms.median <= TARGET_P99_MS
        && runfleet.events_per_sec.median >= 0.99 * f64::from(TARGET_RATE);
    Ok(EventsResult {
        trials: args.repeat,
        offered_events_per_sec: args.event_rate,
        producers,
        duration_secs: args.event_duration.as_secs_f64(),
        warm_up_secs: WARM_UP.as_secs_f64(),
        p99_over_baseline: runfleet.p99_ms.median / baseline.p99_ms.median,
        runfleet,
        baseline,
        target_p99_ms: TARGET_P99_MS,
        target_events_per_sec: TARGET_RATE,
        meets_target,
        per_trial,
    })
}

/// What the bench holds of a trial's [`Producer`] runs.
struct Runs {
    count: u32,
    ready: mpsc::UnboundedReceiver<u32>,
    schedule: watch::Sender<Option<Schedule>>,
    acks: Arc<Mutex<Histogram<u64>>>,
}

/// Starts a trial's fleet, measures, and stops the fleet whether or not the
/// measurement succeeded.
async fn trial(args: &BenchArgs, producers: u32, clock: &CpuClock) -> anyhow::Result<EventsTrial> {
    let (ready_tx, ready) = mpsc::unbounded_channel();
    let (schedule_tx, schedule) = watch::channel(None);
    let acks = Arc::new(Mutex::new(Histogram::new(3)?));
    let mut agents = runfleet_worker::agents::builtin();
    agents.register(AgentName::new(AGENT)?, Producer { ready: ready_tx, schedule, acks: acks.clone() });
    let runs = Runs { count: producers, ready, schedule: schedule_tx, acks };

    let mut fleet = Fleet::start(fleet::DEFAULT_LEASE_TTL).await?;
    let result = match fleet.add_worker(producers, agents).await {
        Ok(()) => trial_on(args, &fleet, runs, clock).await,
        Err(e) => Err(e),
    };
    fleet.stop().await?;
    result
}

async fn trial_on(
    args: &BenchArgs,
    fleet: &Fleet,
    runs: Runs,
    clock: &CpuClock,
) -> anyhow::Result<EventsTrial> {
    let nats_pid = fleet.nats_pid().context("nats-server is not running")?;
    let client = fleet.client().await?;
    let mut subscriber =
        Subscriber::start(fleet.url(), client.tenant().clone(), client.names().clone()).await?;
    let phases = async {
        let cpu = CpuMeter { clock, nats_pid };
        let baseline = baseline(args, &client, &subscriber, runs.count, &cpu).await.context("baseline")?;
        // Dropping `runs` (its schedule sender) on the way out lets runs
        // still waiting for a schedule fail instead of hang.
        let runfleet = runfleet(args, &client, &mut subscriber, runs, &cpu).await.context("runfleet")?;
        anyhow::Ok(EventsTrial { baseline, runfleet })
    };
    let result = phases.await;
    subscriber.stop().await?;
    result
}

/// The baseline phase: bare acknowledged JetStream publishes from tasks of
/// the bench, on the schedule the runs get.
async fn baseline(
    args: &BenchArgs,
    client: &Client,
    subscriber: &Subscriber,
    producers: u32,
    cpu: &CpuMeter<'_>,
) -> anyhow::Result<PhaseTrial> {
    let js = jetstream::new(client.nats().clone());
    js.create_stream(stream::Config {
        name: BASE_STREAM.to_owned(),
        subjects: vec![BASE_SUBJECT.to_owned()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .context("could not create the baseline's stream")?;

    let schedule =
        Schedule::new(args.event_rate, producers, args.event_duration, now_ns() + nanos(LEAD_TIME));
    let began = cpu.mark()?;
    let mut tasks = tokio::task::JoinSet::new();
    for producer in 0..producers {
        tasks.spawn(publish_bare(js.clone(), client.tenant().clone(), schedule, producer));
    }
    let mut emitted = Emitted::default();
    let mut acks = Histogram::<u64>::new(3)?;
    while let Some(done) = tasks.join_next().await {
        let sending = done.context("a baseline task panicked")??;
        emitted.add(sending.emitted);
        acks.add(&sending.acks)?;
    }
    let cpu = cpu.since(&began)?;
    subscriber.until_received(|lags| &lags.baseline, emitted.warm_up + emitted.measured, DRAIN_TIMEOUT).await;
    subscriber.with_lags(|lags| lags.baseline.phase(emitted, &acks, cpu, &schedule))
}

/// One baseline producer: what [`Producer`] does, with a bare publish of an
/// event like the worker's (same fields, encoded with runfleet's codec)
/// instead of `ctx.emit`.
async fn publish_bare(
    js: jetstream::Context,
    tenant: TenantId,
    schedule: Schedule,
    producer: u32,
) -> anyhow::Result<Sending> {
    let (run_id, worker_id) = (RunId::generate(), WorkerId::generate());
    let mut sending = Sending::new()?;
    for tick in schedule.ticks(producer) {
        tick.due().await;
        let (data, sent_ns) = tick.stamp()?;
        let event = Event {
            run_id,
            tenant: tenant.clone(),
            // A run's events start with run.created and run.started.
            seq: tick.index + 3,
            ts_ms: time::now_ms(),
            attempt: 1,
            worker_id: Some(worker_id.clone()),
            trace_id: None,
            body: EventBody::Agent(AgentEvent { name: EVENT_NAME.to_owned(), data }),
        };
        let payload = codec::encode(&event)?;
        js.publish(BASE_SUBJECT, payload.into())
            .await
            .context("publish failed")?
            .await
            .context("publish was not acknowledged")?;
        sending.acked(&tick, sent_ns)?;
    }
    Ok(sending)
}

/// The runfleet phase: one [`Producer`] run per producer, started on the
/// same schedule once all of them run.
async fn runfleet(
    args: &BenchArgs,
    client: &Client,
    subscriber: &mut Subscriber,
    mut runs: Runs,
    cpu: &CpuMeter<'_>,
) -> anyhow::Result<PhaseTrial> {
    let mut ended = HashMap::new();
    for producer in 0..runs.count {
        let request = SubmitRequest {
            agent: AGENT.to_owned(),
            input: serde_json::to_value(ProducerInput { producer })?,
            queue: None,
            priority: None,
            idempotency_key: None,
            max_attempts: Some(1),
        };
        ended.insert(client.submit(request).await?.run_id, false);
    }
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    for _ in 0..runs.count {
        tokio::time::timeout_at(deadline, runs.ready.recv())
            .await
            .with_context(|| format!("the runs did not all start within {}s", READY_TIMEOUT.as_secs()))?
            .context("the worker dropped the producers")?;
    }

    let schedule =
        Schedule::new(args.event_rate, runs.count, args.event_duration, now_ns() + nanos(LEAD_TIME));
    let began = cpu.mark()?;
    runs.schedule.send_replace(Some(schedule));
    let deadline = tokio::time::Instant::now() + LEAD_TIME + WARM_UP + args.event_duration + END_TIMEOUT;
    let mut emitted = Emitted::default();
    while ended.values().any(|ended| !ended) {
        let (run, body) = tokio::time::timeout_at(deadline, subscriber.ended.recv())
            .await
            .context("the runs did not all end in time")?
            .context("the subscriber stopped")?;
        let Some(ended) = ended.get_mut(&run) else { continue };
        let output = match body {
            EventBody::Completed(completed) => completed.output,
            EventBody::Failed(failed) => {
                anyhow::bail!("run {run} failed: {}: {}", failed.error.code, failed.error.message)
            }
            other => anyhow::bail!("run {run} ended with {}", other.type_name()),
        };
        let one: Emitted =
            serde_json::from_value(output).with_context(|| format!("run {run}'s output is not a count"))?;
        emitted.add(one);
        *ended = true;
    }
    let cpu = cpu.since(&began)?;
    anyhow::ensure!(
        emitted.measured == schedule.measured_total(),
        "the runs emitted {} recorded events, {} were due",
        emitted.measured,
        schedule.measured_total()
    );
    // Each run's events arrive before its terminal event, on the same
    // subscription, so this returns at once unless some were dropped.
    subscriber.until_received(|lags| &lags.runfleet, emitted.warm_up + emitted.measured, DRAIN_TIMEOUT).await;
    let acks = runs.acks.lock().unwrap_or_else(PoisonError::into_inner).clone();
    subscriber.with_lags(|lags| lags.runfleet.phase(emitted, &acks, cpu, &schedule))
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

pub(super) fn print(result: &EventsResult) {
    // The median, and the range when trials differ.
    let spread = |s: &Spread, decimals: usize| {
        if s.min == s.max {
            format!("{:.decimals$}", s.median)
        } else {
            format!("{:.decimals$} ({:.decimals$}–{:.decimals$})", s.median, s.min, s.max)
        }
    };
    let (runfleet, bare) = (&result.runfleet, &result.baseline);
    println!(
        "events  {} trials: {} events/s offered by {} producers for {}s each (after {}s warm-up); \
         lag = an external subscriber's arrival − the publish; median (range)",
        result.trials,
        result.offered_events_per_sec,
        result.producers,
        result.duration_secs,
        result.warm_up_secs
    );
    println!("{:<26}{:<30}bare JetStream publish", "", "runfleet ctx.emit");
    // A row: its name, its figure and the figure's decimals.
    type Row = (&'static str, fn(&PhaseResult) -> &Spread, usize);
    let rows: [Row; 9] = [
        ("lag p50 (ms)", |p| &p.p50_ms, 3),
        ("lag p99 (ms)", |p| &p.p99_ms, 3),
        ("lag p99.9 (ms)", |p| &p.p999_ms, 3),
        ("lag max (ms)", |p| &p.max_ms, 3),
        ("events/s sent", |p| &p.events_per_sec, 0),
        ("behind schedule p99 (ms)", |p| &p.behind_schedule_p99_ms, 3),
        ("send→ack p99 (ms)", |p| &p.send_to_ack_p99_ms, 3),
        ("CPU bench process (cores)", |p| &p.process_cores, 2),
        ("CPU nats-server (cores)", |p| &p.nats_server_cores, 2),
    ];
    for (name, figure, decimals) in rows {
        println!("{name:<26}{:<30}{}", spread(figure(runfleet), decimals), spread(figure(bare), decimals));
    }
    let lost = |p: &PhaseResult| format!("{} of {}", p.lost, p.emitted);
    println!("{:<26}{:<30}{}", "lost events", lost(runfleet), lost(bare));
    let bytes = |p: &PhaseResult| format!("{:.0}", p.payload_bytes);
    println!("{:<26}{:<30}{}", "payload (bytes)", bytes(runfleet), bytes(bare));
    println!(
        "runfleet lag p99 = {:.2} x bare publish lag p99 (same fleet, same schedule)",
        result.p99_over_baseline
    );
    println!(
        "target: lag p99 ≤ {} ms at {} events/s: {} (p99 {:.3} ms at {:.0} events/s)",
        result.target_p99_ms,
        result.target_events_per_sec,
        if result.meets_target { "met" } else { "MISSED" },
        runfleet.p99_ms.median,
        runfleet.events_per_sec.median
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn producers_share_the_rate() {
        assert_eq!(producers(10_000), 16);
        assert_eq!(producers(2_000), MIN_PRODUCERS);
        assert_eq!(producers(1_000_000), MAX_PRODUCERS);
        assert_eq!(producers(3), 3);
    }

    #[test]
    fn schedule_interleaves_producers_evenly() {
        let schedule = Schedule::new(1_000, 4, Duration::from_secs(2), 5_000);
        assert_eq!((schedule.warm_up, schedule.measured), (250, 500));
        assert_eq!(schedule.measured_total(), 2_000);
        let mut due: Vec<(u64, bool)> = (0..4)
            .flat_map(|p| schedule.ticks(p).map(|t| (t.due_ns, t.warm_up)).collect::<Vec<_>>())
            .collect();
        due.sort_unstable();
        assert_eq!(due.len(), 3_000);
        for (i, (ns, warm_up)) in due.iter().enumerate() {
            assert_eq!(*ns, 5_000 + i as u64 * 1_000_000, "event {i}");
            assert_eq!(*warm_up, i < 1_000, "event {i}");
        }
    }

    #[test]
    fn received_counts_loss_and_rate() {
        let schedule = Schedule::new(1_000, 1, Duration::from_secs(1), 0);
        let mut received = Received::new().unwrap_or_else(|e| panic!("{e}"));
        for tick in schedule.ticks(0) {
            if tick.index % 100 == 7 && !tick.warm_up {
                continue;
            }
            let stamp = Stamp {
                producer: 0,
                index: tick.index,
                due_ns: tick.due_ns,
                sent_ns: tick.due_ns,
                warm_up: tick.warm_up,
            };
            received.note(&stamp, tick.due_ns + 500_000, 100);
        }
        let emitted = Emitted { warm_up: 1_000, measured: 1_000 };
        let acks = Histogram::new(3).unwrap_or_else(|e| panic!("{e}"));
        let cpu = CpuUse { process_cores: 0.5, nats_server_cores: 0.25 };
        let phase = received.phase(emitted, &acks, cpu, &schedule).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((phase.received, phase.lost), (990, 10));
        assert!((phase.lag.p99_ms - 0.5).abs() < 0.01, "{phase:?}");
        assert!((phase.events_per_sec - 1_000.0).abs() < 1.0, "{phase:?}");
        assert!((phase.payload_bytes - 100.0).abs() < f64::EPSILON);
    }
}
