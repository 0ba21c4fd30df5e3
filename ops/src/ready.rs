//! The readiness checks every process shares: the NATS connection is up and
//! every stream and bucket of the fleet exists.

use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream;
use runfleet_protocol::Names;

/// How long the whole JetStream check may take before it counts as not ready.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// What a component needs in place to be ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Every stream, bucket and object store of the fleet.
    Coordinator,
    /// Only what workers use (the shipped NATS permissions let a worker see
    /// nothing else).
    Worker,
}

/// `Ok` when `client` is connected and every stream, KV bucket and object
/// store the component needs exists; else what is missing.
pub async fn nats(client: &async_nats::Client, names: &Names, needs: Needs) -> Result<(), String> {
    if client.connection_state() != State::Connected {
        return Err(format!("not connected to NATS ({})", client.connection_state()));
    }
    let js = jetstream::new(client.clone());
    let streams = [names.jobs_stream(), names.events_stream()];
    let mut buckets = vec![
        names.leases_bucket(),
        names.workers_bucket(),
        names.checkpoints_bucket(),
        names.signals_bucket(),
        names.control_bucket(),
    ];
    if needs == Needs::Coordinator {
        buckets.extend([names.idempotency_bucket(), names.inputs_bucket()]);
    }
    let check = async {
        for stream in &streams {
            js.get_stream(stream).await.map_err(|e| format!("stream {stream}: {e}"))?;
        }
        for bucket in &buckets {
            js.get_key_value(bucket).await.map_err(|e| format!("bucket {bucket}: {e}"))?;
        }
        let blobs = names.blobs_bucket();
        js.get_object_store(&blobs).await.map_err(|e| format!("object store {blobs}: {e}"))?;
        Ok(())
    };
    tokio::time::timeout(CHECK_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err(format!("JetStream did not answer within {CHECK_TIMEOUT:?}")))
}

/// Runs `check`, or says it took longer than the readiness budget.
pub async fn within<F: std::future::Future<Output = Result<(), String>>>(
    what: &str,
    check: F,
) -> Result<(), String> {
    tokio::time::timeout(CHECK_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err(format!("{what} did not answer within {CHECK_TIMEOUT:?}")))
}
