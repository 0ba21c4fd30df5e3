//! The JetStream topology: streams, KV buckets and the object store.
//!
//! [`ensure`] creates what is missing and updates what exists, so it is safe
//! on every start and when several replicas start at once (a create that
//! loses a race to another replica is retried as an update). Workers create
//! their own per-(queue, band) job consumers; the coordinator only creates the
//! projector's consumer (see [`crate::projector`]).
//!
//! Run timers (durable sleeps, wait deadlines, retry backoff) are JetStream
//! message schedules stored in the jobs stream, so the jobs stream needs
//! nats-server 2.12 or newer; [`ensure`] refuses older servers with an error
//! that says so rather than failing the first time a run sleeps.

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

/// The oldest nats-server (major, minor) that supports message schedules.
pub const MIN_SCHEDULES_SERVER: (u64, u64) = (2, 12);

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
    /// The server cannot store run timers. Not retryable: upgrade the server.
    #[error(
        "nats-server {server_version} cannot hold run timers in stream {stream}: JetStream message \
         schedules need nats-server {}.{} or newer; upgrade the server{}",
        MIN_SCHEDULES_SERVER.0,
        MIN_SCHEDULES_SERVER.1,
        .detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default()
    )]
    SchedulesUnsupported { stream: String, server_version: String, detail: Option<String> },
}

/// The handles the rest of the coordinator works with.
#[derive(Clone, Debug)]
pub struct Topology {
    /// The per-run event log (direct get enabled).
    pub events: stream::Stream,
    /// The work-queue stream of jobs, which also holds the run timers.
    pub jobs: stream::Stream,
    /// The idempotency-key bucket.
    pub idempotency: kv::Store,
    /// One lease per running run.
    pub leases: kv::Store,
    /// Signals and approvals, first write wins.
    pub signals: kv::Store,
    /// Cancel requests, watched by every worker.
    pub control: kv::Store,
    /// The real job of each run whose `run.created` input was redacted.
    pub inputs: kv::Store,
}

/// Creates or updates every stream and bucket runfleet uses.
pub async fn ensure(
    js: &jetstream::Context,
    names: &Names,
    config: &CoordinatorConfig,
) -> Result<Topology, Error> {
    let replicas = config.stream_replicas;
    let bucket =
        |name: String, description: &str| kv::Config { num_replicas: replicas, ..bucket(name, description) };
    let jobs = ensure_jobs_stream(js, names, replicas).await?;
    let events = ensure_stream(js, events_stream_config(names, config)).await?;
    let leases = ensure_leases_bucket(js, names, config.lease_ttl, replicas).await?;
    ensure_bucket(js, bucket(names.checkpoints_bucket(), "completed step checkpoints")).await?;
    let signals = ensure_bucket(js, bucket(names.signals_bucket(), "signals and approvals")).await?;
    let control = ensure_bucket(js, bucket(names.control_bucket(), "cancel requests")).await?;
    let inputs =
        ensure_bucket(js, bucket(names.inputs_bucket(), "real jobs of runs whose input events are redacted"))
            .await?;
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
    ensure_object_store(js, names.blobs_bucket(), replicas).await?;
    info!(prefix = %names.prefix(), "jetstream topology ready");
    Ok(Topology { events, jobs, idempotency, leases, signals, control, inputs })
}

/// The work-queue stream of job messages, which also holds each run's timer
/// (a message schedule on `<prefix>.timers.<run_id>` whose body is the run's
/// job): a timer that fires stores the run's next job in the same stream.
pub fn jobs_stream_config(names: &Names) -> stream::Config {
    stream::Config {
        name: names.jobs_stream(),
        description: Some("runfleet jobs: one message per dispatch of a run, and run timers".to_owned()),
        subjects: vec![names.jobs_stream_subjects(), names.timers_stream_subjects()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        duplicate_window: DUPLICATE_WINDOW,
        allow_message_schedules: true,
        // Workers wake on these headers-only copies of every stored job
        // rather than polling (and never get the payload twice). Timers are
        // not jobs until they fire, so only `jobs.>` is republished.
        republish: Some(stream::Republish {
            source: names.jobs_stream_subjects(),
            destination: names.job_wakeups(),
            headers_only: true,
        }),
        ..Default::default()
    }
}

/// Creates or updates the jobs stream, refusing servers that cannot store
/// message schedules: a server too old to know the setting may otherwise
/// accept the stream without it and drop every timer.
async fn ensure_jobs_stream(
    js: &jetstream::Context,
    names: &Names,
    replicas: usize,
) -> Result<stream::Stream, Error> {
    let config = stream::Config { num_replicas: replicas, ..jobs_stream_config(names) };
    let server_version = js.client().server_info().version;
    let unsupported = |detail: Option<String>| Error::SchedulesUnsupported {
        stream: config.name.clone(),
        server_version: server_version.clone(),
        detail,
    };
    if parse_version(&server_version).is_some_and(|version| version < MIN_SCHEDULES_SERVER) {
        return Err(unsupported(None));
    }
    let stream = ensure_stream(js, config.clone()).await?;
    if stream.cached_info().config.allow_message_schedules {
        Ok(stream)
    } else {
        Err(unsupported(Some("the server stored the stream without allow_msg_schedules".to_owned())))
    }
}

/// `(major, minor)` of a server version such as `2.12.1` or `2.14.0-beta.2`.
fn parse_version(version: &str) -> Option<(u64, u64)> {
    let mut parts = version.trim_start_matches('v').split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    Some((major, minor))
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
        num_replicas: config.stream_replicas,
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
    replicas: usize,
) -> Result<kv::Store, Error> {
    let plain = kv::Config {
        max_age: lease_ttl,
        num_replicas: replicas,
        ..bucket(names.leases_bucket(), "run leases")
    };
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

/// Creates the object store if missing; an existing one gets its stream's
/// replica count updated (object stores have no create-or-update).
async fn ensure_object_store(js: &jetstream::Context, name: String, replicas: usize) -> Result<(), Error> {
    with_retries("object store", &name, || async {
        match js.get_object_store(&name).await {
            Ok(store) => Ok(store),
            Err(_) => {
                js.create_object_store(object_store::Config {
                    bucket: name.clone(),
                    description: Some("runfleet large inputs and step outputs".to_owned()),
                    storage: stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
            }
        }
    })
    .await?;
    // async-nats keeps an object store in the stream `OBJ_<bucket>`.
    let stream_name = format!("OBJ_{name}");
    let mut stream = with_retries("object store", &name, || js.get_stream(&stream_name)).await?;
    let current = stream.cached_info().config.clone();
    if current.num_replicas.max(1) != replicas {
        info!(stream = %stream_name, from = current.num_replicas, to = replicas, "changing the object store's replicas");
        let wanted = stream::Config { num_replicas: replicas, ..current };
        with_retries("object store", &name, || js.update_stream(wanted.clone())).await?;
        stream.info().await.map_err(|e| Error::Resource {
            what: "object store",
            name: name.clone(),
            source: Box::new(e),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions() {
        assert_eq!(parse_version("2.12.1"), Some((2, 12)));
        assert_eq!(parse_version("v2.14.0-beta.2"), Some((2, 14)));
        assert_eq!(parse_version("2.10"), Some((2, 10)));
        assert_eq!(parse_version("nightly"), None);
        assert!(parse_version("2.11.9").is_some_and(|v| v < MIN_SCHEDULES_SERVER));
        assert!(parse_version("3.0.0").is_some_and(|v| v >= MIN_SCHEDULES_SERVER));
    }

    #[test]
    fn too_old_server_error_says_what_to_do() {
        let error = Error::SchedulesUnsupported {
            stream: "RUNFLEET_JOBS".into(),
            server_version: "2.11.4".into(),
            detail: None,
        };
        let message = error.to_string();
        assert!(message.contains("2.11.4") && message.contains("2.12 or newer"), "{message}");
    }
}
