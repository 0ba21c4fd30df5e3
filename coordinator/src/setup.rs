//! The JetStream topology: streams, KV buckets and the object store.
//!
//! [`ensure`] creates what is missing and updates what exists, so it is safe
//! on every start and when several replicas start at once (a create that
//! loses a race to another replica is retried as an update). Workers create
//! their own per-(queue, band) job consumers; the coordinator only creates the
//! projector's consumer (see [`crate::projector`]).

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::context::CreateKeyValueErrorKind;
use async_nats::jetstream::{self, kv, object_store, stream};
use runfleet_protocol::Names;
use tracing::{debug, info, warn};

use crate::config::CoordinatorConfig;

/// How long JetStream remembers a `Nats-Msg-Id` to drop duplicate publishes.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Attempts at creating or updating one resource before giving up.
const ATTEMPTS: u32 = 5;

/// A stream or bucket could not be created or updated.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not create or update {what} {name}: {source}")]
    Resource {
        what: &'static str,
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The handles the rest of the coordinator works with.
#[derive(Clone, Debug)]
pub struct Topology {
    /// The per-run event log (direct get enabled).
    pub events: stream::Stream,
    /// The idempotency-key bucket.
    pub idempotency: kv::Store,
}

/// Creates or updates every stream and bucket runfleet uses.
pub async fn ensure(
    js: &jetstream::Context,
    names: &Names,
    config: &CoordinatorConfig,
) -> Result<Topology, Error> {
    ensure_stream(js, jobs_stream_config(names)).await?;
    let events = ensure_stream(js, events_stream_config(names, config)).await?;
    ensure_leases_bucket(js, names, config.lease_ttl).await?;
    ensure_bucket(js, bucket(names.checkpoints_bucket(), "completed step checkpoints")).await?;
    ensure_bucket(js, bucket(names.signals_bucket(), "signals and approvals")).await?;
    ensure_bucket(js, bucket(names.control_bucket(), "cancel requests")).await?;
    let idempotency = ensure_bucket(
        js,
        kv::Config {
            max_age: config.idempotency_ttl,
            ..bucket(names.idempotency_bucket(), "idempotency keys")
        },
    )
    .await?;
    ensure_bucket(
        js,
        kv::Config { max_age: config.worker_ttl, ..bucket(names.workers_bucket(), "worker registry") },
    )
    .await?;
    ensure_object_store(js, names.blobs_bucket()).await?;
    info!(prefix = %names.prefix(), "jetstream topology ready");
    Ok(Topology { events, idempotency })
}

/// The work-queue stream of job messages.
pub fn jobs_stream_config(names: &Names) -> stream::Config {
    stream::Config {
        name: names.jobs_stream(),
        description: Some("runfleet jobs: one message per dispatch of a run".to_owned()),
        subjects: vec![names.jobs_stream_subjects()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        duplicate_window: DUPLICATE_WINDOW,
        // Workers wake on these headers-only copies of every stored job
        // rather than polling (and never get the payload twice).
        republish: Some(stream::Republish {
            source: names.jobs_stream_subjects(),
            destination: names.job_wakeups(),
            headers_only: true,
        }),
        ..Default::default()
    }
}

/// The per-run event log stream.
pub fn events_stream_config(names: &Names, config: &CoordinatorConfig) -> stream::Config {
    stream::Config {
        name: names.events_stream(),
        description: Some("runfleet run events: one subject per run".to_owned()),
        subjects: vec![names.events_stream_subjects()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        allow_direct: true,
        duplicate_window: DUPLICATE_WINDOW,
        max_age: config.events_max_age,
        ..Default::default()
    }
}

fn bucket(name: String, description: &str) -> kv::Config {
    kv::Config {
        bucket: name,
        description: format!("runfleet {description}"),
        history: 1,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// Retries `op` when it fails, which covers losing a create race to another
/// replica (the retry then finds the resource and updates it).
async fn with_retries<T, E, F, Fut>(what: &'static str, name: &str, mut op: F) -> Result<T, Error>
where
    E: std::error::Error + Send + Sync + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(value) => return Ok(value),
            Err(error) if attempt < ATTEMPTS => {
                debug!(what, name, attempt, error = %error, "create or update failed, retrying");
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                attempt += 1;
            }
            Err(error) => {
                return Err(Error::Resource { what, name: name.to_owned(), source: Box::new(error) })
            }
        }
    }
}

async fn ensure_stream(js: &jetstream::Context, config: stream::Config) -> Result<stream::Stream, Error> {
    let name = config.name.clone();
    with_retries("stream", &name, || js.create_or_update_stream(config.clone())).await?;
    with_retries("stream", &name, || js.get_stream(&name)).await
}

async fn ensure_bucket(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, Error> {
    let name = config.bucket.clone();
    with_retries("bucket", &name, || js.create_or_update_key_value(config.clone())).await
}

/// The leases bucket: `max_age` is the lease TTL, so an unrenewed lease ages
/// out. On servers that support it (≥ 2.11) limit markers make expiries
/// visible to watchers; older servers get the bucket without them.
async fn ensure_leases_bucket(
    js: &jetstream::Context,
    names: &Names,
    lease_ttl: Duration,
) -> Result<kv::Store, Error> {
    let plain = kv::Config { max_age: lease_ttl, ..bucket(names.leases_bucket(), "run leases") };
    let marked = kv::Config { limit_markers: Some(lease_ttl), ..plain.clone() };
    match js.create_or_update_key_value(marked).await {
        Ok(store) => Ok(store),
        Err(error) if error.kind() == CreateKeyValueErrorKind::LimitMarkersNotSupported => {
            warn!(bucket = %plain.bucket, "server does not support limit markers; lease expiries will not appear in watches");
            ensure_bucket(js, plain).await
        }
        Err(error) => {
            debug!(bucket = %plain.bucket, error = %error, "leases bucket create failed, retrying");
            ensure_bucket(js, kv::Config { limit_markers: Some(lease_ttl), ..plain }).await
        }
    }
}

async fn ensure_object_store(js: &jetstream::Context, name: String) -> Result<(), Error> {
    with_retries("object store", &name, || async {
        match js.get_object_store(&name).await {
            Ok(store) => Ok(store),
            Err(_) => {
                js.create_object_store(object_store::Config {
                    bucket: name.clone(),
                    description: Some("runfleet large inputs and step outputs".to_owned()),
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
            }
        }
    })
    .await
    .map(|_| ())
}
