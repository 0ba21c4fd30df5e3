//! Test fixtures: a real nats-server with the streams and buckets the
//! coordinator creates, job submission as the coordinator does it, and a
//! worker running in the background.

#![allow(dead_code)]

#[path = "../../../tests/harness/nats.rs"]
pub mod nats;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Once};
use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, kv, stream};
use async_nats::HeaderMap;
use futures::StreamExt;
use runfleet_protocol::checkpoint::Checkpoint;
use runfleet_protocol::event::{Event, EventBody, RunCreated};
use runfleet_protocol::job::Job;
use runfleet_protocol::names::{HEADER_CONTENT_TYPE, HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE, HEADER_MSG_ID};
use runfleet_protocol::{codec, time, AgentName, Names, QueueName, RunId, TenantId};
use runfleet_worker::runtime::checkpoints;
use runfleet_worker::{Agents, Worker, WorkerConfig};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use nats::NatsServer;

/// A generous deadline for anything a test waits for.
pub const DEADLINE: Duration = Duration::from_secs(60);

static INIT: Once = Once::new();

fn init() {
    INIT.call_once(|| {
        if std::env::var_os("RUNFLEET_NATS_SERVER").is_none() {
            let local = concat!(env!("CARGO_MANIFEST_DIR"), "/../.tools/venv/bin/nats-server");
            if std::path::Path::new(local).exists() {
                std::env::set_var("RUNFLEET_NATS_SERVER", local);
            }
        }
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "runfleet_worker=info".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

/// A server with the coordinator's streams and buckets.
pub struct Env {
    pub server: NatsServer,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub names: Names,
    pub jobs: stream::Stream,
    pub events: stream::Stream,
    pub leases: kv::Store,
    pub workers: kv::Store,
    pub tenant: TenantId,
}

impl Env {
    /// Starts a server and creates the streams and buckets as the coordinator
    /// does, with leases living `lease_ttl`.
    pub async fn start(lease_ttl: Duration) -> anyhow::Result<Self> {
        init();
        let server = NatsServer::start();
        let client = server.client().await;
        let js = jetstream::new(client.clone());
        let names = Names::default();
        // Exactly the coordinator's topology, with leases living `lease_ttl`.
        let config = runfleet_coordinator::config::CoordinatorConfig {
            lease_ttl,
            worker_ttl: Duration::from_secs(30),
            ..Default::default()
        };
        let topology = runfleet_coordinator::setup::ensure(&js, &names, &config).await.context("topology")?;
        let events = topology.events;
        let jobs = js.get_stream(names.jobs_stream()).await.context("jobs stream")?;
        let leases = js.get_key_value(names.leases_bucket()).await.context("leases bucket")?;
        let workers = js.get_key_value(names.workers_bucket()).await.context("workers bucket")?;
        Ok(Self {
            server,
            client,
            js,
            names,
            jobs,
            events,
            leases,
            workers,
            tenant: TenantId::default_tenant(),
        })
    }

    /// A worker configuration for this server with short delays.
    pub fn config(&self, slots: u32) -> WorkerConfig {
        WorkerConfig {
            nats_url: self.server.url(),
            slots,
            idle_poll: Duration::from_millis(200),
            lease_held_delay: Duration::from_millis(500),
            shutdown_grace: Duration::from_secs(5),
            ..WorkerConfig::default()
        }
    }

    /// Starts a worker and runs it in the background.
    pub async fn worker(&self, config: WorkerConfig, agents: Agents) -> anyhow::Result<RunningWorker> {
        let worker = Worker::start(config, agents).await.context("worker start")?;
        let id = worker.id().clone();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(worker.run(shutdown.clone()));
        Ok(RunningWorker { id, shutdown, handle })
    }

    /// Publishes `run.created` (seq 1) and the job, as the coordinator does.
    pub async fn submit(&self, agent: &str, input: Value, priority: u8) -> anyhow::Result<RunId> {
        let job = self.create_run(agent, input, priority).await?;
        self.publish_job(&job).await?;
        Ok(job.run_id)
    }

    /// Publishes `run.created` (seq 1) with 3 attempts and returns the job to publish.
    pub async fn create_run(&self, agent: &str, input: Value, priority: u8) -> anyhow::Result<Job> {
        self.create_run_with(agent, input, priority, 3).await
    }

    /// Creates and dispatches a run with `max_attempts`.
    pub async fn submit_with(&self, agent: &str, input: Value, max_attempts: u32) -> anyhow::Result<RunId> {
        let job = self.create_run_with(agent, input, 2, max_attempts).await?;
        self.publish_job(&job).await?;
        Ok(job.run_id)
    }

    /// Publishes `run.created` (seq 1) and returns the job to publish, which
    /// names the event's stream sequence as a submission's job does.
    pub async fn create_run_with(
        &self,
        agent: &str,
        input: Value,
        priority: u8,
        max_attempts: u32,
    ) -> anyhow::Result<Job> {
        let run_id = RunId::generate();
        let agent = AgentName::new(agent)?;
        let queue = QueueName::default_queue();
        let created = Event {
            run_id,
            tenant: self.tenant.clone(),
            seq: 1,
            ts_ms: time::now_ms(),
            attempt: 0,
            worker_id: None,
            trace_id: None,
            body: EventBody::Created(RunCreated {
                agent: agent.clone(),
                queue: queue.clone(),
                priority,
                input: input.clone(),
                max_attempts,
                idempotency_key: None,
                traceparent: None,
            }),
        };
        let created_seq = self.append_event(&created, 0).await?;
        Ok(Job {
            run_id,
            tenant: self.tenant.clone(),
            agent,
            queue,
            priority,
            input,
            max_attempts,
            created_us: time::now_us(),
            traceparent: None,
            created_seq: Some(created_seq),
        })
    }

    /// Publishes a job message.
    pub async fn publish_job(&self, job: &Job) -> anyhow::Result<()> {
        self.dispatch_job(job, 0).await
    }

    /// Publishes a job message as dispatch number `dispatch` of its run (a
    /// deliberate re-dispatch when greater than 0, as the coordinator's
    /// recovery does).
    pub async fn dispatch_job(&self, job: &Job, dispatch: u32) -> anyhow::Result<()> {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_CONTENT_TYPE, codec::CONTENT_TYPE);
        headers.insert(HEADER_MSG_ID, self.names.job_msg_id(job.run_id, dispatch).as_str());
        self.js
            .publish_with_headers(
                self.names.job(&job.queue, job.priority, job.run_id),
                headers,
                codec::encode(job)?.into(),
            )
            .await?
            .await
            .context("job publish")?;
        Ok(())
    }

    /// Appends an event to a run's log with the expected last stream seq.
    pub async fn append_event(&self, event: &Event, expected_last: u64) -> anyhow::Result<u64> {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_CONTENT_TYPE, codec::CONTENT_TYPE);
        headers.insert(HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE, expected_last.to_string().as_str());
        let ack = self
            .js
            .publish_with_headers(
                self.names.run_events(&event.tenant, event.run_id),
                headers,
                codec::encode(event)?.into(),
            )
            .await?
            .await
            .context("event publish")?;
        Ok(ack.sequence)
    }

    /// A run's events with their stream sequences, in order.
    pub async fn events(&self, run_id: RunId) -> anyhow::Result<Vec<(u64, Event)>> {
        let subject = self.names.run_events(&self.tenant, run_id);
        let mut out = Vec::new();
        let mut from = 1;
        loop {
            match self.events.direct_get_next_for_subject(subject.clone(), Some(from)).await {
                Ok(message) => {
                    let events = runfleet_protocol::event::decode_log_message(&message.payload)?;
                    out.extend(events.into_iter().map(|event| (message.sequence, event)));
                    from = message.sequence + 1;
                }
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Waits until the run has a terminal event; returns all its events.
    pub async fn wait_terminal(&self, run_id: RunId) -> anyhow::Result<Vec<Event>> {
        wait_until(DEADLINE, || async {
            let events = self.events(run_id).await?;
            Ok(events
                .last()
                .is_some_and(|(_, e)| e.body.is_terminal())
                .then(|| events.into_iter().map(|(_, e)| e).collect()))
        })
        .await
        .with_context(|| format!("run {run_id} did not reach a terminal event"))
    }

    /// A run's step checkpoints by index.
    pub async fn checkpoints(&self, run_id: RunId) -> anyhow::Result<BTreeMap<u32, Checkpoint>> {
        let bucket = self.js.get_key_value(self.names.checkpoints_bucket()).await?;
        let mut keys = bucket.keys().await?;
        let mut out = BTreeMap::new();
        while let Some(key) = keys.next().await {
            let key = key?;
            if let Some(index) = self.names.parse_checkpoint_step(run_id, &key) {
                let value = bucket.get(&key).await?.context("listed checkpoint vanished")?;
                out.insert(index, codec::decode::<Checkpoint>(&value)?);
            }
        }
        Ok(out)
    }

    /// Where the worker keeps checkpoints, for driving a checkpoint log directly.
    pub async fn checkpoint_stores(&self, inline_limit: usize) -> anyhow::Result<Arc<checkpoints::Stores>> {
        let bucket = self.js.get_key_value(self.names.checkpoints_bucket()).await?;
        Ok(Arc::new(checkpoints::Stores {
            js: self.js.clone(),
            names: self.names.clone(),
            stream: bucket.stream,
            blobs: self.js.get_object_store(self.names.blobs_bucket()).await?,
            inline_limit,
        }))
    }

    /// Messages still in the jobs stream.
    pub async fn jobs_in_stream(&self) -> anyhow::Result<u64> {
        let mut jobs = self.js.get_stream(self.names.jobs_stream()).await?;
        Ok(jobs.info().await?.state.messages)
    }
}

/// A worker running in a background task.
pub struct RunningWorker {
    pub id: runfleet_protocol::WorkerId,
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<Result<(), runfleet_worker::Error>>,
}

impl RunningWorker {
    /// Cancels the worker and waits for its drain to end.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.handle).await.context("worker did not stop")???;
        Ok(())
    }
}

/// Polls `check` until it returns `Some`, or fails after `deadline`.
pub async fn wait_until<T, F, Fut>(deadline: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if start.elapsed() > deadline {
            bail!("condition not met within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The event type names of a log, for readable assertions.
pub fn types(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.body.type_name()).collect()
}

/// Asserts seq 1..n without a gap.
pub fn assert_gapless(events: &[Event]) {
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    let expected: Vec<u64> = (1..=events.len() as u64).collect();
    assert_eq!(seqs, expected, "event seqs must be 1..n without gaps");
}
