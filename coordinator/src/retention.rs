//! The retention sweep: removes what an ended run left in JetStream.
//!
//! A run that has ended never reads its checkpoints, its signals, its cancel
//! request or its real input again (terminal states are final, and the API
//! refuses signals and cancels for them). Until this sweep they stayed for
//! good: every run kept a subject in the checkpoints bucket, with its index
//! entry in nats-server's memory, and its step outputs on disk. Every
//! `recovery_interval`, the replica that holds the projection asks the
//! registry for runs that ended more than `ended_run_retention` ago and are
//! not marked purged (a partial index, `runs_ended_unpurged`), and for each:
//!
//! 1. purges the objects of its steps whose output went to the blobs object
//!    store, chunks then metadata (the registry's `step.completed` events
//!    say which steps; each step's checkpoint names its object);
//! 2. purges its subjects in the checkpoints, signals, control and inputs
//!    buckets (a stream purge by subject: no tombstone stays behind);
//! 3. marks it purged in the registry (`runs.purged_ms`).
//!
//! Each step is idempotent, and the mark comes last, so a replica that dies
//! mid-sweep leaves runs the next pass (its own or a successor's) purges
//! again. The run's events stay: they are its history, in the stream until
//! `events_max_age` and in the registry for good. `ended_run_retention = "0s"`
//! keeps everything, as before this sweep existed.

use std::time::Duration;

use async_nats::jetstream::object_store::{self, InfoErrorKind};
use async_nats::jetstream::{self, kv, stream};
use base64::Engine as _;
use futures::StreamExt;
use runfleet_protocol::checkpoint::{Checkpoint, StepOutput};
use runfleet_protocol::names::KV_SUBJECT_PREFIX;
use runfleet_protocol::{codec, time, Names, RunId};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::registry::{self, EndedRun, Registry};
use crate::setup::Topology;

/// Ended runs read from the registry per query.
const PAGE: u32 = 200;
/// Runs purged at once: each is four requests to nats-server (four more per
/// large output), which it answers independently.
const CONCURRENCY: usize = 16;

/// The sweep could not start, or one run could not be purged.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bucket or the object store the sweep purges is missing.
    #[error("could not open {what} {name}: {reason}")]
    Open { what: &'static str, name: String, reason: String },
    #[error(transparent)]
    Registry(#[from] registry::Error),
    /// A purge or a read in JetStream failed; the run is tried again next pass.
    #[error("could not purge {what} of run {run_id}: {reason}")]
    Purge { run_id: RunId, what: String, reason: String },
}

/// The sweep's settings (see `CoordinatorConfig::ended_run_retention`).
#[derive(Debug, Clone, Copy)]
pub struct RetentionConfig {
    /// How long after its end a run's JetStream leftovers are kept; zero
    /// keeps them for good.
    pub retention: Duration,
    /// Time between passes.
    pub interval: Duration,
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Runs purged and marked.
    pub purged: u64,
    /// Runs whose purge failed (tried again next pass).
    pub failed: u64,
}

/// The retention sweep. [`Retention::run`] runs it until cancelled.
pub struct Retention {
    names: Names,
    registry: Registry,
    /// The projection whose holder sweeps, and this replica's projector id.
    projection: String,
    owner: String,
    /// Boxed: each handle carries its stream's cached info, and the sweep is
    /// moved into its task (and the coordinator around) by value.
    stores: Box<Stores>,
    config: RetentionConfig,
}

/// What the sweep purges.
struct Stores {
    checkpoints: kv::Store,
    signals: kv::Store,
    control: kv::Store,
    inputs: kv::Store,
    blobs: object_store::ObjectStore,
    blobs_stream: stream::Stream,
}

impl std::fmt::Debug for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retention").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Retention {
    /// Opens the buckets the sweep purges; `owner` is this replica's
    /// projector id: the sweep runs only while that projector holds the
    /// projection, so one replica sweeps at a time.
    pub async fn open(
        js: &jetstream::Context,
        names: Names,
        topology: &Topology,
        registry: Registry,
        owner: String,
        config: RetentionConfig,
    ) -> Result<Self, Error> {
        let checkpoints_bucket = names.checkpoints_bucket();
        let checkpoints = js
            .get_key_value(&checkpoints_bucket)
            .await
            .map_err(|e| open_error("bucket", &checkpoints_bucket, e))?;
        let blobs_bucket = names.blobs_bucket();
        let blobs = js
            .get_object_store(&blobs_bucket)
            .await
            .map_err(|e| open_error("object store", &blobs_bucket, e))?;
        // async-nats keeps an object store in the stream `OBJ_<bucket>`.
        let blobs_stream_name = format!("OBJ_{blobs_bucket}");
        let blobs_stream = js
            .get_stream(&blobs_stream_name)
            .await
            .map_err(|e| open_error("stream", &blobs_stream_name, e))?;
        Ok(Self {
            projection: names.events_stream(),
            names,
            registry,
            owner,
            stores: Box::new(Stores {
                checkpoints,
                signals: topology.signals.clone(),
                control: topology.control.clone(),
                inputs: topology.inputs.clone(),
                blobs,
                blobs_stream,
            }),
            config,
        })
    }

    /// Runs a pass every interval until `shutdown`; a pass in progress stops
    /// between two pages. A failed pass is logged and tried again.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        if self.config.retention.is_zero() {
            info!("retention sweep off (ended_run_retention 0s): ended runs keep their checkpoints");
            shutdown.cancelled().await;
            return Ok(());
        }
        let mut ticks = tokio::time::interval(self.config.interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        info!(
            retention_s = self.config.retention.as_secs(),
            interval_ms = u64::try_from(self.config.interval.as_millis()).unwrap_or(u64::MAX),
            "retention sweep started"
        );
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                _ = ticks.tick() => {}
            }
            match self.pass(&shutdown).await {
                Ok(pass) if pass.purged + pass.failed > 0 => {
                    info!(purged = pass.purged, failed = pass.failed, "retention sweep pass")
                }
                Ok(_) => {}
                Err(error) => {
                    warn!(error = %error, "retention sweep pass failed; trying again next interval")
                }
            }
        }
    }

    /// One pass: if this replica holds the projection, purges every run that
    /// ended more than the retention ago, page by page.
    pub async fn pass(&self, shutdown: &CancellationToken) -> Result<Pass, Error> {
        let mut pass = Pass::default();
        let holder = self.registry.projection(&self.projection).await?.and_then(|p| p.owner);
        if holder.as_deref() != Some(self.owner.as_str()) {
            debug!(holder = ?holder, "retention sweep skipped: another replica projects");
            return Ok(pass);
        }
        let retention_ms = i64::try_from(self.config.retention.as_millis()).unwrap_or(i64::MAX);
        let ended_before = time::now_ms().saturating_sub(retention_ms);
        while !shutdown.is_cancelled() {
            let runs = self.registry.ended_unpurged(ended_before, PAGE).await?;
            let page = runs.len();
            let results: Vec<_> = futures::stream::iter(runs)
                .map(|run| self.purge(run))
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
            let mut done = Vec::with_capacity(page);
            for result in results {
                match result {
                    Ok(run) => done.push(run),
                    Err(error) => {
                        warn!(error = %error, "retention sweep could not purge a run; next pass tries again");
                        pass.failed += 1;
                    }
                }
            }
            self.registry.mark_purged(&done, time::now_ms()).await?;
            pass.purged += done.len() as u64;
            // A short page is the last. Runs that failed stay unmarked and
            // come back in the next page, so go on only while pages make
            // progress (with nats-server unreachable, none does).
            if page < PAGE as usize || done.is_empty() {
                break;
            }
        }
        Ok(pass)
    }

    /// Removes one ended run's leftovers; its id when done.
    async fn purge(&self, run: EndedRun) -> Result<RunId, Error> {
        let run_id = run.run_id;
        for step in self.registry.blob_steps(run_id).await? {
            self.delete_blob(run_id, step).await?;
        }
        let names = &self.names;
        let subject = |bucket: String, rest: String| format!("{KV_SUBJECT_PREFIX}.{bucket}.{rest}");
        purge(run_id, &self.stores.checkpoints.stream, names.checkpoint_run_filter(run_id)).await?;
        purge(run_id, &self.stores.signals.stream, subject(names.signals_bucket(), format!("{run_id}.>")))
            .await?;
        purge(
            run_id,
            &self.stores.control.stream,
            subject(names.control_bucket(), names.control_key(run_id)),
        )
        .await?;
        purge(run_id, &self.stores.inputs.stream, subject(names.inputs_bucket(), run_id.to_string())).await?;
        debug!(run_id = %run_id, tenant = %run.tenant, ended_ms = run.ended_ms, "ended run purged");
        Ok(run_id)
    }

    /// Removes the object holding step `step`'s output, named in its
    /// checkpoint: its chunks, then its metadata, both by purge (no delete
    /// marker stays, and the coordinator needs no publish permission on the
    /// object store). A checkpoint or object already gone (an earlier,
    /// interrupted pass) leaves nothing to find.
    async fn delete_blob(&self, run_id: RunId, step: u32) -> Result<(), Error> {
        let fail = |what: &str, e: &dyn std::fmt::Display| Error::Purge {
            run_id,
            what: format!("{what} of step {step}"),
            reason: e.to_string(),
        };
        let key = self.names.checkpoint_key(run_id, step);
        let Some(bytes) = self.stores.checkpoints.get(&key).await.map_err(|e| fail("the checkpoint", &e))?
        else {
            return Ok(());
        };
        let checkpoint: Checkpoint = match codec::decode(&bytes) {
            Ok(checkpoint) => checkpoint,
            Err(error) => {
                // Decoding again will not help: leave the object (if any)
                // rather than keep the run, and everything else it left, for good.
                warn!(run_id = %run_id, step, error = %error, "retention sweep cannot read a checkpoint; its output object, if any, stays");
                return Ok(());
            }
        };
        let StepOutput::Blob { object, .. } = checkpoint.output else { return Ok(()) };
        let bucket = self.names.blobs_bucket();
        match self.stores.blobs.info(&object).await {
            Ok(info) => {
                purge(run_id, &self.stores.blobs_stream, format!("$O.{bucket}.C.{}", info.nuid)).await?
            }
            Err(error) if error.kind() == InfoErrorKind::NotFound => {}
            Err(error) => return Err(fail("the output object", &error)),
        }
        let meta = base64::engine::general_purpose::URL_SAFE.encode(&object);
        purge(run_id, &self.stores.blobs_stream, format!("$O.{bucket}.M.{meta}")).await
    }
}

fn open_error(what: &'static str, name: &str, error: impl std::fmt::Display) -> Error {
    Error::Open { what, name: name.to_owned(), reason: error.to_string() }
}

/// Purges every message on `subject` (a filter) from `stream`.
async fn purge(run_id: RunId, stream: &stream::Stream, subject: String) -> Result<(), Error> {
    match stream.purge().filter(subject.as_str()).await {
        Ok(_) => Ok(()),
        Err(error) => Err(Error::Purge { run_id, what: subject, reason: error.to_string() }),
    }
}
