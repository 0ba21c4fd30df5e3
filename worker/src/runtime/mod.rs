//! The worker runtime: one pull loop, slots, leases, heartbeats, event
//! publishing, parking, cancellation and drain.
//!
//! Shape: [`Worker::start`] connects and prepares (consumers, wake-up
//! subscriptions, registry entry); [`Worker::run`] runs the pull loop until
//! its cancellation token fires, then drains. Besides the pull loop the
//! worker owns exactly three tasks, the heartbeat (`heartbeat.rs`), the
//! registry refresh (`registry.rs`) and the control-bucket watch
//! (`control.rs`), plus one task per running run.

pub mod checkpoints;
mod control;
pub mod events;
mod heartbeat;
mod idle_pull;
pub mod lease;
mod registry;
mod run;
mod wake;
mod wakeups;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::{self, kv, object_store, stream};
use futures::future::BoxFuture;
use futures::StreamExt;
use runfleet_ops::http::Probe;
use runfleet_ops::redact::Redactor;
use runfleet_protocol::limits::{DEFAULT_PRIORITY, PRIORITY_BANDS};
use runfleet_protocol::{time, Names, QueueName, WorkerId};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{self, WorkerConfig};
use crate::runtime::events::LogWriter;
use crate::sdk::Agents;
use idle_pull::{IdlePull, Pulled};
use lease::Held;
use wakeups::{Mode, Wakeups};

/// The lease TTL assumed when the leases bucket has no `max_age`.
const FALLBACK_LEASE_TTL: Duration = Duration::from_secs(15);
/// The registry TTL assumed when the workers bucket has no `max_age`.
const FALLBACK_WORKERS_TTL: Duration = Duration::from_secs(30);
/// `max_ack_pending` of the job consumers: large, because the real bound is
/// every worker's slot count.
const MAX_ACK_PENDING: i64 = 100_000;
/// Upper bound on one no-wait fetch round trip, so a lost reply cannot stall
/// the pull loop.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How soon a consumer is fetched again when a fetch right after a wake-up
/// found nothing (see [`Ready`]).
const RECHECK_AFTER: Duration = Duration::from_millis(5);
/// How recent a wake-up must be for an empty fetch to get that second look.
const RECHECK_WINDOW: Duration = Duration::from_millis(50);
/// Longest pause between checks for the coordinator's streams and buckets.
const MAX_STARTUP_BACKOFF: Duration = Duration::from_secs(5);

/// Why the worker could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    /// NATS refused the credentials or the TLS handshake failed.
    #[error(transparent)]
    Connect(#[from] runfleet_ops::nats::Error),
    #[error("stream {stream} does not allow direct gets; the coordinator must create it with allow_direct")]
    DirectGetDisabled { stream: String },
    #[error("could not create or update job consumer {name}: {source}")]
    Consumer { name: String, source: jetstream::stream::ConsumerError },
    #[error("could not subscribe to {subject}: {source}")]
    Subscribe { subject: String, source: async_nats::SubscribeError },
    #[error("could not register the worker: {0}")]
    Register(#[from] registry::Error),
    #[error("worker.heartbeat_interval ({interval:?}) must be below the lease TTL ({lease_ttl:?}, the coordinator's lease_ttl); a third of it is a good value")]
    HeartbeatTooSlow { interval: Duration, lease_ttl: Duration },
    #[error("worker.heartbeat_interval ({interval:?}) must be below worker.ack_wait ({ack_wait:?}): a run claimed without a lease keeps its job only through the heartbeat's in-progress acks; a third of it is a good value")]
    HeartbeatSlowerThanAckWait { interval: Duration, ack_wait: Duration },
}

/// State shared by the pull loop, the run tasks and the two background tasks.
pub(crate) struct Shared {
    pub id: WorkerId,
    pub config: WorkerConfig,
    pub names: Names,
    pub js: jetstream::Context,
    /// What the runs' event logs are written with.
    pub writer: Arc<LogWriter>,
    pub events: stream::Stream,
    /// The jobs stream, which also holds the runs' timers.
    pub jobs: stream::Stream,
    pub leases: kv::Store,
    /// Shared with every run's context (a store handle carries its stream's
    /// whole configuration, too much to clone per run).
    pub signals: Arc<kv::Store>,
    pub control: kv::Store,
    /// The runs being claimed or run, for the control watch.
    pub cancels: Arc<control::Cancels>,
    pub workers: kv::Store,
    /// Where runs' checkpoints are stored (shared: a stream handle carries
    /// the stream's whole configuration, too much to clone per run).
    checkpoint_stores: Arc<checkpoints::Stores>,
    pub agents: Agents,
    pub lease_ttl: Duration,
    /// How often the heartbeat renews every lease.
    pub heartbeat_interval: Duration,
    pub workers_ttl: Duration,
    pub started_ms: i64,
    /// The runs the heartbeat renews, keyed by a per-claim id rather than
    /// the run id: a run whose lease expired can be claimed again by this
    /// worker while the stale attempt is still winding down, and each
    /// attempt must keep (and remove) only its own entry.
    held: Mutex<HashMap<u64, Arc<Held>>>,
    next_hold: AtomicU64,
}

impl Shared {
    /// Where runs' checkpoints are stored.
    pub(crate) fn checkpoint_stores(&self) -> Arc<checkpoints::Stores> {
        self.checkpoint_stores.clone()
    }

    /// Registers a held run with the heartbeat until the guard is dropped.
    pub(crate) fn hold(&self, held: Arc<Held>) -> HoldGuard<'_> {
        let key = self.next_hold.fetch_add(1, Ordering::Relaxed);
        self.held.lock().unwrap_or_else(PoisonError::into_inner).insert(key, held);
        HoldGuard { shared: self, key }
    }

    pub(crate) fn held_runs(&self) -> Vec<Arc<Held>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect()
    }

    pub(crate) fn held_count(&self) -> usize {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// Removes a run from the held table when its task is done with it.
pub(crate) struct HoldGuard<'a> {
    shared: &'a Shared,
    key: u64,
}

impl Drop for HoldGuard<'_> {
    fn drop(&mut self) {
        self.shared.held.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.key);
    }
}

/// A started worker. See the crate docs for the run path.
pub struct Worker {
    shared: Arc<Shared>,
    /// Job consumers by band (index = band), each with its queue.
    bands: Vec<Vec<(QueueName, PullConsumer)>>,
    /// The served queues' headers-only job wake-ups, for the pull loop.
    wakeups: Wakeups,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.shared.id)
            .field("queues", &self.shared.config.queues)
            .field("slots", &self.shared.config.slots)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Validates `config`, connects to NATS, waits until the coordinator has
    /// created the jobs and events streams and the leases and workers buckets
    /// (logging while it waits, retrying forever), creates or updates the job
    /// consumers (one per served queue and priority band; several workers may
    /// do this at once), subscribes to job wake-ups and registers the worker
    /// in the workers bucket.
    ///
    /// Cancellation safe: dropping the future (for example on Ctrl-C while
    /// waiting for the coordinator) leaves nothing behind but a closed
    /// connection.
    ///
    /// # Errors
    ///
    /// Invalid configuration, NATS refusing the credentials or the TLS
    /// handshake (an unreachable server is waited for), an events stream
    /// without direct gets, or a consumer, subscription or registry write
    /// the server refused.
    pub async fn start(config: WorkerConfig, agents: Agents) -> Result<Self, Error> {
        config.validate()?;
        let names = Names::new(config.prefix()?);
        let id = config.worker_id.clone().unwrap_or_else(WorkerId::generate);
        let redactor = Redactor::new(&config.redaction).map_err(|e| config::Error::Shared(e.to_string()))?;
        let client = runfleet_ops::nats::connect_waiting(
            &config.nats_url,
            &config.nats,
            &format!("runfleet-worker {id}"),
            &CancellationToken::new(),
        )
        .await?;
        // Every running step holds one acknowledgement in flight while it
        // works (its `step.started`, see `sdk::step`), so the context's
        // bound on them (5,000 by default) must stay well above the slots or
        // heartbeats, which publish through it too, would wait behind them.
        let inflight = usize::try_from(config.slots).unwrap_or(usize::MAX).saturating_mul(4).max(5_000);
        let js = jetstream::ContextBuilder::new().max_ack_inflight(inflight).build(client.clone());

        let Infrastructure { jobs, events, leases, workers, checkpoints, blobs, signals, control } =
            wait_for_infrastructure(&js, &names).await;
        if !events.cached_info().config.allow_direct {
            return Err(Error::DirectGetDisabled { stream: names.events_stream() });
        }
        let lease_ttl = nonzero_or(leases.stream.cached_info().config.max_age, FALLBACK_LEASE_TTL);
        let workers_ttl = nonzero_or(workers.stream.cached_info().config.max_age, FALLBACK_WORKERS_TTL);
        let ack_wait = config.ack_wait.unwrap_or(lease_ttl);
        let heartbeat_interval =
            config.heartbeat_interval.unwrap_or_else(|| heartbeat::period(lease_ttl, ack_wait));
        if heartbeat_interval >= lease_ttl {
            return Err(Error::HeartbeatTooSlow { interval: heartbeat_interval, lease_ttl });
        }
        if heartbeat_interval >= ack_wait {
            return Err(Error::HeartbeatSlowerThanAckWait { interval: heartbeat_interval, ack_wait });
        }

        let mut bands = Vec::with_capacity(usize::from(PRIORITY_BANDS));
        for band in 0..PRIORITY_BANDS {
            let mut consumers = Vec::with_capacity(config.queues.len());
            for queue in &config.queues {
                let name = names.job_consumer(queue, band);
                let consumer = jobs
                    .create_consumer(pull::Config {
                        durable_name: Some(name.clone()),
                        filter_subject: names.job_band_filter(queue, band),
                        ack_policy: AckPolicy::Explicit,
                        ack_wait,
                        max_ack_pending: MAX_ACK_PENDING,
                        max_deliver: -1,
                        ..Default::default()
                    })
                    .await
                    .map_err(|source| Error::Consumer { name, source })?;
                consumers.push((queue.clone(), consumer));
            }
            bands.push(consumers);
        }

        let wakeups = Wakeups::subscribe(client.clone(), &names, &config.queues).await?;

        let writer = Arc::new(LogWriter {
            js: js.clone(),
            names: names.clone(),
            worker_id: id.clone(),
            redactor,
            hold_for: config.step_completed_hold,
        });
        let checkpoint_stores = Arc::new(checkpoints::Stores {
            js: js.clone(),
            names: names.clone(),
            stream: checkpoints.stream,
            blobs,
            inline_limit: config.checkpoint_inline_limit,
        });
        let shared = Arc::new(Shared {
            id,
            config,
            names,
            js,
            writer,
            events,
            jobs: jobs.clone(),
            leases,
            signals: Arc::new(signals),
            control,
            cancels: Arc::new(control::Cancels::default()),
            workers,
            checkpoint_stores,
            agents,
            lease_ttl,
            heartbeat_interval,
            workers_ttl,
            started_ms: time::now_ms(),
            held: Mutex::new(HashMap::new()),
            next_hold: AtomicU64::new(0),
        });
        registry::put(&shared).await?;
        info!(
            worker_id = %shared.id,
            queues = ?shared.config.queues,
            slots = shared.config.slots,
            agents = ?shared.agents,
            lease_ttl_ms = shared.lease_ttl.as_millis() as u64,
            heartbeat_ms = shared.heartbeat_interval.as_millis() as u64,
            "worker started"
        );
        Ok(Self { shared, bands, wakeups })
    }

    /// This worker's identity (in leases, events and the registry).
    pub fn id(&self) -> &WorkerId {
        &self.shared.id
    }

    /// What `/readyz` asks this worker: ready when connected to NATS with
    /// every stream and bucket in place.
    pub fn probe(&self) -> Arc<dyn Probe> {
        Arc::new(WorkerProbe { client: self.shared.js.client(), names: self.shared.names.clone() })
    }

    /// Runs the pull loop until `shutdown` is cancelled, then drains: stops
    /// fetching, lets running runs finish for up to `shutdown_grace`, then
    /// hands the rest off at their next step boundary (`run.handoff`, lease
    /// released, job NAKed for immediate redelivery, so another worker
    /// resumes them at once); runs that reach no boundary within
    /// `handoff_timeout` are stopped where they are and handed off the same
    /// way. Then it stops the heartbeat and deregisters.
    ///
    /// Transient NATS failures are logged and retried; they do not end the
    /// loop.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let Self { shared, bands, mut wakeups } = self;
        let background = CancellationToken::new();
        let stopping = run::Shutdown { drain: CancellationToken::new(), handoff: CancellationToken::new() };
        let heartbeat = tokio::spawn(heartbeat::run(shared.clone(), background.clone()));
        let registry = tokio::spawn(registry::run(shared.clone(), background.clone()));
        let watching = CancellationToken::new();
        let watch = tokio::spawn(control::watch(
            shared.control.clone(),
            shared.names.clone(),
            shared.cancels.clone(),
            watching.clone(),
            background.clone(),
        ));
        // No claim before the control watch is in place.
        tokio::select! {
            () = watching.cancelled() => {}
            () = shutdown.cancelled() => {}
        }

        let slots = usize::try_from(shared.config.slots).unwrap_or(usize::MAX);
        let mut ready = Ready::new(&bands);
        let mut runs: JoinSet<()> = JoinSet::new();
        // The idle worker's waiting pull request, on its first queue's
        // default band (see `idle_pull`).
        let pull_at = (usize::from(DEFAULT_PRIORITY), 0);
        let pull_consumer = bands.get(pull_at.0).and_then(|consumers| consumers.get(pull_at.1));
        let mut pull: Option<IdlePull> = None;
        // After a request the server refused, none before this.
        let mut pull_after = Instant::now();

        loop {
            while let Some(done) = runs.try_join_next() {
                report_join(done);
            }
            if shutdown.is_cancelled() {
                break;
            }
            let free = slots.saturating_sub(runs.len());
            // Slots a waiting pull request may still fill are taken.
            let available = free.saturating_sub(pull.as_ref().map_or(0, IdlePull::reserved));
            let metrics = runfleet_ops::metrics::get();
            metrics.worker_running.set(i64::try_from(runs.len()).unwrap_or(i64::MAX));
            metrics.worker_free_slots.set(i64::try_from(free).unwrap_or(i64::MAX));
            if available == 0 {
                // Busy (or every free slot is the waiting pull request's):
                // leave the wake-up groups to idle workers, but keep
                // reading every wake-up (which bands got jobs), also because
                // a subscription left unread buffers up to the client's
                // subscription capacity.
                // (On failure it stays shared; the idle poll covers a
                // wake-up it then takes from an idle worker.)
                wakeups.switch(Mode::Every, |subject| ready.woken(subject, &bands, Instant::now())).await;
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    Some(done) = runs.join_next() => report_join(done),
                    subject = wakeups.next() => ready.woken(&subject, &bands, Instant::now()),
                    pulled = idle_pull::next(&mut pull) => {
                        if on_pulled(pulled, &mut pull, &mut ready, &mut runs, &shared, &stopping) {
                            pull_after = Instant::now() + shared.config.idle_poll;
                        }
                    }
                }
                continue;
            }

            // Wake-ups seen so far are covered by the fetch below.
            while let Some(subject) = wakeups.try_next() {
                ready.woken(&subject, &bands, Instant::now());
            }
            ready.sweep(shared.config.idle_poll);
            ready.recheck_if_due(Instant::now());

            let waiting = pull.as_ref().map(|pull| pull.consumer);
            let messages = fetch(&bands, &mut ready, available, waiting).await;
            if !messages.is_empty() {
                debug!(count = messages.len(), free, "jobs fetched");
                for message in messages {
                    runs.spawn(run::handle(shared.clone(), message, stopping.clone()));
                }
                continue;
            }
            // Nothing left to fetch: take a share of the wake-ups again. What
            // the plain subscription read until the server had the shared one
            // marks its consumers for one more round. If the switch fails the
            // loop sleeps below and tries again after the next wake-up or
            // idle poll, rather than spin.
            if wakeups.mode() == Mode::Every
                && wakeups.switch(Mode::Shared, |subject| ready.woken(subject, &bands, Instant::now())).await
            {
                continue;
            }

            // Idle: wait at the server for the default band's next jobs.
            if pull.is_none() && !shared.config.idle_pull.is_zero() && Instant::now() >= pull_after {
                if let Some((_, consumer)) = pull_consumer {
                    pull = IdlePull::start(consumer, pull_at, available, shared.config.idle_pull).await;
                    if pull.is_some() {
                        continue;
                    }
                }
            }

            // Nothing to do: sleep until a job is published or pulled, a run
            // ends, the idle poll is due (redeliveries publish nothing) or
            // shutdown.
            let recheck_at = ready.recheck_at;
            tokio::select! {
                () = shutdown.cancelled() => break,
                subject = wakeups.next() => ready.woken(&subject, &bands, Instant::now()),
                Some(done) = runs.join_next(), if !runs.is_empty() => report_join(done),
                () = sleep_until_some(recheck_at) => ready.recheck_if_due(Instant::now()),
                () = tokio::time::sleep(shared.config.idle_poll) => ready.mark_all(),
                pulled = idle_pull::next(&mut pull) => {
                    if on_pulled(pulled, &mut pull, &mut ready, &mut runs, &shared, &stopping) {
                        pull_after = Instant::now() + shared.config.idle_poll;
                    }
                }
            }
        }

        drop(wakeups);
        if let Some(pull) = pull.take() {
            pull.finish().await;
        }
        let grace = shared.config.shutdown_grace;
        let handoff_timeout = shared.config.handoff_timeout;
        info!(worker_id = %shared.id, running = runs.len(), grace_ms = grace.as_millis() as u64, "worker stopping; draining runs");
        let deadline = tokio::time::sleep(grace);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                done = runs.join_next() => match done {
                    Some(done) => report_join(done),
                    None => break,
                },
                () = &mut deadline, if !stopping.handoff.is_cancelled() => {
                    if stopping.drain.is_cancelled() {
                        info!(worker_id = %shared.id, running = runs.len(), "hand-off timeout over; stopping remaining runs where they are");
                        stopping.handoff.cancel();
                    } else {
                        info!(worker_id = %shared.id, running = runs.len(), "shutdown grace over; handing off remaining runs at their next step");
                        stopping.drain.cancel();
                        deadline.as_mut().reset(Instant::now() + handoff_timeout);
                    }
                }
            }
        }

        background.cancel();
        for task in [heartbeat, registry, watch] {
            if let Err(e) = task.await {
                error!(worker_id = %shared.id, error = %e, "worker background task failed");
            }
        }
        // Deliver any acks still buffered before the connection goes away.
        if let Err(e) = shared.js.client().flush().await {
            warn!(worker_id = %shared.id, error = %e, "could not flush the NATS connection");
        }
        info!(worker_id = %shared.id, "worker stopped");
        Ok(())
    }
}

struct WorkerProbe {
    client: async_nats::Client,
    names: Names,
}

impl Probe for WorkerProbe {
    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(runfleet_ops::ready::nats(&self.client, &self.names, runfleet_ops::ready::Needs::Worker))
    }
}

/// Which consumers (band × queue) may hold jobs, so a fetch round asks only
/// those instead of every band from the top: under load, the bands above
/// the busy one are empty and asking them cost a round trip each.
///
/// A consumer is marked by a wake-up naming its queue and band (the jobs
/// stream republishes every stored job's headers to
/// `<prefix>.wake.<queue>.p<band>.<run_id>`), by a fetch that came back full,
/// and by a sweep every `idle_poll` that marks them all (redeliveries, such
/// as delayed NAKs and expired ack waits, publish no wake-up). A mark is
/// cleared just *before* its consumer is fetched, so a wake-up that arrives
/// while the fetch is in flight marks it again for the next round.
///
/// A fetch that finds nothing within [`RECHECK_WINDOW`] of a wake-up for
/// its consumer marks that consumer once more, [`RECHECK_AFTER`] later:
/// nats-server republishes a stored job before its consumer has counted it,
/// and a no-wait fetch that arrives in between is answered "no messages".
/// Without the second look the job waited for the next `idle_poll` sweep
/// (500 ms), about one run in a thousand on a one-slot worker (`runfleet
/// bench signal`). An empty fetch after an older wake-up gets no second
/// look: by then the consumer has counted the job, and another worker took
/// it.
struct Ready {
    marks: Vec<Vec<bool>>,
    /// When a wake-up last marked each consumer.
    woken_at: Vec<Vec<Option<Instant>>>,
    /// Consumers to mark again at `recheck_at`.
    recheck: Vec<Vec<bool>>,
    recheck_at: Option<Instant>,
    swept: Instant,
}

impl Ready {
    fn new<C>(bands: &[Vec<C>]) -> Self {
        Self {
            marks: bands.iter().map(|consumers| vec![true; consumers.len()]).collect(),
            woken_at: bands.iter().map(|consumers| vec![None; consumers.len()]).collect(),
            recheck: bands.iter().map(|consumers| vec![false; consumers.len()]).collect(),
            recheck_at: None,
            swept: Instant::now(),
        }
    }

    /// Marks the consumer a wake-up names, read `now`; an unparsable
    /// subject marks all.
    fn woken<C>(&mut self, subject: &str, bands: &[Vec<(QueueName, C)>], now: Instant) {
        let mut parts = subject.rsplit('.');
        let (_run, band, queue) = (parts.next(), parts.next(), parts.next());
        let band = band.and_then(|b| b.strip_prefix('p')).and_then(|b| b.parse::<usize>().ok());
        let found = band.zip(queue).and_then(|(band, queue)| {
            let index = bands.get(band)?.iter().position(|(q, _)| q.as_str() == queue)?;
            Some((band, index))
        });
        match found {
            Some((band, index)) => {
                self.marks[band][index] = true;
                self.woken_at[band][index] = Some(now);
            }
            None => self.mark_all(),
        }
    }

    /// Takes the consumer's mark just before it is fetched (`now`), and
    /// whether a wake-up marked it within [`RECHECK_WINDOW`].
    fn take(&mut self, band: usize, index: usize, now: Instant) -> Option<bool> {
        let woken_at = self.woken_at[band][index].take();
        let fresh = woken_at.is_some_and(|at| now.saturating_duration_since(at) <= RECHECK_WINDOW);
        std::mem::replace(&mut self.marks[band][index], false).then_some(fresh)
    }

    /// Records a fetch's answer, received `now`: a full one marks the
    /// consumer again at once, an empty one right after a wake-up (`fresh`)
    /// marks it again after [`RECHECK_AFTER`].
    fn fetched(&mut self, band: usize, index: usize, fresh: bool, got: usize, wanted: usize, now: Instant) {
        self.marks[band][index] = got == wanted;
        if got == 0 && fresh {
            self.recheck[band][index] = true;
            self.recheck_at.get_or_insert(now + RECHECK_AFTER);
        }
    }

    /// Marks the consumers due for a second look, if `now` is their time.
    fn recheck_if_due(&mut self, now: Instant) {
        if self.recheck_at.is_none_or(|at| now < at) {
            return;
        }
        self.recheck_at = None;
        for (marks, recheck) in self.marks.iter_mut().zip(&mut self.recheck) {
            for (mark, again) in marks.iter_mut().zip(recheck.iter_mut()) {
                *mark |= std::mem::replace(again, false);
            }
        }
    }

    /// Marks every consumer if `every` has passed since the last sweep.
    fn sweep(&mut self, every: Duration) {
        if self.swept.elapsed() >= every {
            self.mark_all();
        }
    }

    fn mark_all(&mut self) {
        for marks in &mut self.marks {
            marks.fill(true);
        }
        self.swept = Instant::now();
    }
}

/// Fetches at most `free` jobs, strictly highest band first: the marked
/// consumers (see [`Ready`]) are tried in band order, each with a no-wait
/// fetch of the slots still free, and the first band that yields anything
/// ends the round (the next round starts again at band 0). The consumer an
/// idle pull request is `waiting` on is skipped. A timed-out fetch
/// also ends the round: the connection is likely down, and trying every
/// remaining consumer would keep the pull loop (and shutdown) waiting
/// `FETCH_TIMEOUT` for each of them; its consumers are marked again.
async fn fetch(
    bands: &[Vec<(QueueName, PullConsumer)>],
    ready: &mut Ready,
    free: usize,
    waiting: Option<(usize, usize)>,
) -> Vec<jetstream::Message> {
    let mut fetched = Vec::new();
    'bands: for (band, consumers) in bands.iter().enumerate() {
        for (index, (queue, consumer)) in consumers.iter().enumerate() {
            let want = free.saturating_sub(fetched.len());
            if want == 0 {
                break 'bands;
            }
            if waiting == Some((band, index)) {
                // A pull request waits there; its mark keeps for its end.
                continue;
            }
            let Some(fresh) = ready.take(band, index, Instant::now()) else {
                continue;
            };
            let before = fetched.len();
            let round = async {
                let mut batch = consumer.fetch().max_messages(want).messages().await?;
                while let Some(message) = batch.next().await {
                    fetched.push(message?);
                }
                Ok::<(), async_nats::Error>(())
            };
            match tokio::time::timeout(FETCH_TIMEOUT, round).await {
                // Full: there may be more.
                Ok(Ok(())) => ready.fetched(band, index, fresh, fetched.len() - before, want, Instant::now()),
                Ok(Err(e)) => {
                    warn!(queue = %queue, band, error = %e, "job fetch failed");
                    ready.marks[band][index] = true;
                }
                Err(_) => {
                    warn!(queue = %queue, band, "job fetch timed out; retrying after idle_poll");
                    ready.marks[band][index] = true;
                    break 'bands;
                }
            }
        }
        if !fetched.is_empty() {
            break;
        }
    }
    fetched
}

/// Completes at `at`, or never.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Starts the run of a job the idle pull request delivered, or lets the
/// ended request go, marking its consumer if it may hold more. True when
/// the request failed.
fn on_pulled(
    pulled: Pulled,
    pull: &mut Option<IdlePull>,
    ready: &mut Ready,
    runs: &mut JoinSet<()>,
    shared: &Arc<Shared>,
    stopping: &run::Shutdown,
) -> bool {
    match pulled {
        Pulled::Job(message) => {
            debug!("job pulled while idle");
            runs.spawn(run::handle(shared.clone(), *message, stopping.clone()));
            false
        }
        Pulled::Ended => {
            let Some(ended) = pull.take() else { return false };
            if ended.ended() {
                let (band, index) = ended.consumer;
                ready.marks[band][index] = true;
            }
            ended.failed()
        }
    }
}

fn report_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        // Agent panics are caught inside the run; this is a runtime bug.
        error!(error = %e, "run task failed");
    }
}

fn nonzero_or(value: Duration, fallback: Duration) -> Duration {
    if value.is_zero() {
        fallback
    } else {
        value
    }
}

/// The streams, buckets and object store the worker uses.
struct Infrastructure {
    jobs: stream::Stream,
    events: stream::Stream,
    leases: kv::Store,
    workers: kv::Store,
    checkpoints: kv::Store,
    blobs: object_store::ObjectStore,
    signals: kv::Store,
    control: kv::Store,
}

/// Waits until the coordinator has created what the worker needs, logging
/// what is missing. Retries forever; cancel by dropping the future.
async fn wait_for_infrastructure(js: &jetstream::Context, names: &Names) -> Infrastructure {
    let mut backoff = Duration::from_millis(250);
    loop {
        let missing = match tokio::try_join!(
            async {
                js.get_stream(names.jobs_stream()).await.map_err(|e| (names.jobs_stream(), e.to_string()))
            },
            async {
                js.get_stream(names.events_stream()).await.map_err(|e| (names.events_stream(), e.to_string()))
            },
            async {
                js.get_key_value(names.leases_bucket())
                    .await
                    .map_err(|e| (names.leases_bucket(), e.to_string()))
            },
            async {
                js.get_key_value(names.workers_bucket())
                    .await
                    .map_err(|e| (names.workers_bucket(), e.to_string()))
            },
            async {
                js.get_key_value(names.checkpoints_bucket())
                    .await
                    .map_err(|e| (names.checkpoints_bucket(), e.to_string()))
            },
            async {
                js.get_object_store(names.blobs_bucket())
                    .await
                    .map_err(|e| (names.blobs_bucket(), e.to_string()))
            },
            async {
                js.get_key_value(names.signals_bucket())
                    .await
                    .map_err(|e| (names.signals_bucket(), e.to_string()))
            },
            async {
                js.get_key_value(names.control_bucket())
                    .await
                    .map_err(|e| (names.control_bucket(), e.to_string()))
            },
        ) {
            Ok((jobs, events, leases, workers, checkpoints, blobs, signals, control)) => {
                return Infrastructure { jobs, events, leases, workers, checkpoints, blobs, signals, control }
            }
            Err(missing) => missing,
        };
        info!(
            missing = %missing.0,
            error = %missing.1,
            retry_in_ms = backoff.as_millis() as u64,
            "waiting for the coordinator to create the runfleet streams and buckets"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_STARTUP_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bands() -> Vec<Vec<(QueueName, ())>> {
        let queue = |name: &str| (QueueName::new(name).unwrap_or_else(|e| panic!("{e}")), ());
        vec![vec![queue("default"), queue("bulk")], vec![queue("default")]]
    }

    const WAKE_DEFAULT_P0: &str = "runfleet.wake.default.p0.0190f5d2-8a4e-7c3b-9d21-4e5f6a7b8c9d";

    /// Takes every mark at `now`, as a fetch round does, and answers each
    /// with `got` of 8 wanted jobs; the consumers fetched.
    fn fetch_all(
        ready: &mut Ready,
        bands: &[Vec<(QueueName, ())>],
        got: usize,
        now: Instant,
    ) -> Vec<(usize, usize)> {
        let mut taken = Vec::new();
        for (band, consumers) in bands.iter().enumerate() {
            for index in 0..consumers.len() {
                if let Some(fresh) = ready.take(band, index, now) {
                    ready.fetched(band, index, fresh, got, 8, now);
                    taken.push((band, index));
                }
            }
        }
        taken
    }

    #[test]
    fn an_empty_fetch_right_after_a_wake_up_is_looked_at_once_more() {
        let bands = bands();
        let t0 = Instant::now();
        let mut ready = Ready::new(&bands);
        fetch_all(&mut ready, &bands, 0, t0); // the start marks every consumer
        assert_eq!(ready.recheck_at, None, "an empty fetch no wake-up asked for is not looked at again");

        ready.woken(WAKE_DEFAULT_P0, &bands, t0);
        let fetched_at = t0 + Duration::from_millis(1);
        assert_eq!(fetch_all(&mut ready, &bands, 0, fetched_at), vec![(0, 0)]);
        assert_eq!(ready.recheck_at, Some(fetched_at + RECHECK_AFTER), "a second look is scheduled");
        ready.recheck_if_due(fetched_at + RECHECK_AFTER - Duration::from_millis(1));
        assert!(fetch_all(&mut ready, &bands, 0, fetched_at).is_empty(), "not before RECHECK_AFTER");

        let due = fetched_at + RECHECK_AFTER;
        ready.recheck_if_due(due);
        assert_eq!(ready.recheck_at, None);
        assert_eq!(fetch_all(&mut ready, &bands, 0, due), vec![(0, 0)], "only the woken consumer");
        assert_eq!(ready.recheck_at, None, "the second look, empty too, schedules no third");
    }

    #[test]
    fn no_second_look_after_jobs_or_after_an_old_wake_up() {
        let bands = bands();
        let t0 = Instant::now();
        let mut ready = Ready::new(&bands);
        fetch_all(&mut ready, &bands, 0, t0);

        // A fetch that found jobs, but fewer than it wanted, leaves no mark.
        ready.woken(WAKE_DEFAULT_P0, &bands, t0);
        assert_eq!(fetch_all(&mut ready, &bands, 1, t0), vec![(0, 0)]);
        assert_eq!(ready.recheck_at, None);
        assert!(fetch_all(&mut ready, &bands, 0, t0).is_empty());

        // A wake-up read long before the fetch (a busy worker's slot freed
        // later): its job was counted, and another worker took it.
        ready.woken(WAKE_DEFAULT_P0, &bands, t0);
        let later = t0 + RECHECK_WINDOW + Duration::from_millis(1);
        assert_eq!(fetch_all(&mut ready, &bands, 0, later), vec![(0, 0)]);
        assert_eq!(ready.recheck_at, None);
    }
}
