//! One run's step checkpoints in the checkpoints KV bucket, fenced like its
//! event log.
//!
//! The keys of a run (`<run_id>.<step_index>` and `<run_id>.fence`) form one
//! chain: every write is published to the key's `$KV` subject with
//! `Nats-Expected-Last-Subject-Sequence` set to the stream sequence of the
//! run's last checkpoint write, evaluated against the wildcard
//! `$KV.<bucket>.<run_id>.>` (`Nats-Expected-Last-Subject-Sequence-Subject`).
//! A resuming attempt loads the chain and writes the fence before it
//! executes anything, so an earlier attempt that lost its lease (paused,
//! partitioned) is refused by the server on its next checkpoint, and a step
//! can be written only once, like a KV `create`.
//!
//! Outputs whose encoded checkpoint exceeds the inline limit go to the blobs
//! object store under a name that carries the writer's fencing token; the
//! checkpoint holds the reference, size and SHA-256.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, object_store, stream};
use async_nats::HeaderMap;
use futures::StreamExt;
use runfleet_protocol::checkpoint::{Checkpoint, Fence, StepOutput};
use runfleet_protocol::names::{
    HEADER_CONTENT_TYPE, HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE, HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT,
};
use runfleet_protocol::{codec, time, Names, RunId, WorkerId};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

/// How long loading a run's checkpoints may take before it counts as failed.
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a resuming attempt reloads the chain when an earlier attempt
/// keeps writing between the load and the fence.
const FENCE_ROUNDS: u32 = 5;
/// The KV header that marks deletes and purges.
const KV_OPERATION: &str = "KV-Operation";

/// Why a checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Someone else extended the run's checkpoint chain (a newer attempt
    /// fenced it): this worker no longer owns the run.
    #[error("checkpoint of run {run_id} was refused: a newer attempt owns the run")]
    Fenced { run_id: RunId },
    /// An earlier write failed, so the chain's head is unknown.
    #[error("checkpoints of run {run_id} are closed after an earlier failure")]
    Closed { run_id: RunId },
    #[error("checkpoint of run {run_id} could not be encoded: {source}")]
    Encode { run_id: RunId, source: codec::Error },
    /// The write failed or was not acknowledged in time; it may or may not
    /// have been stored.
    #[error("checkpoint of run {run_id} could not be written: {source}")]
    Publish { run_id: RunId, source: jetstream::context::PublishError },
    /// A large output could not be stored in or read from the object store.
    #[error("step output object {object} of run {run_id}: {message}")]
    Blob { run_id: RunId, object: String, message: String },
    /// The run's checkpoints could not be listed.
    #[error("checkpoints of run {run_id} could not be loaded: {message}")]
    Load { run_id: RunId, message: String },
    /// A stored checkpoint does not decode or does not match its object.
    #[error("checkpoint {key} of run {run_id} is corrupt: {reason}")]
    Corrupt { run_id: RunId, key: String, reason: String },
}

impl Error {
    /// Whether this error means the run belongs to someone else now.
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Self::Fenced { .. })
    }
}

/// Who writes: the attempt that holds the run's lease.
#[derive(Debug, Clone)]
pub struct Writer {
    pub worker_id: WorkerId,
    pub attempt: u32,
    /// The lease revision at claim: higher than any earlier owner's.
    pub fencing_token: u64,
}

/// Where a run's checkpoints live.
#[derive(Clone)]
pub struct Stores {
    pub js: jetstream::Context,
    pub names: Names,
    /// The checkpoints bucket's stream (`KV_<bucket>`).
    pub stream: stream::Stream,
    pub blobs: object_store::ObjectStore,
    /// Encoded checkpoints larger than this keep their output in `blobs`.
    pub inline_limit: usize,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").field("inline_limit", &self.inline_limit).finish_non_exhaustive()
    }
}

/// The checkpoints of one run as this attempt knows them, and the append
/// side of its chain. Not shared: owned by the attempt's `RunContext`.
#[derive(Debug)]
pub struct CheckpointLog {
    stores: Arc<Stores>,
    run_id: RunId,
    writer: Writer,
    filter: String,
    recorded: BTreeMap<u32, Checkpoint>,
    /// Stream sequence of the run's last checkpoint write (0 = none).
    head: u64,
    closed: bool,
    lost: bool,
}

impl CheckpointLog {
    /// The log of a run no attempt has started: the chain is empty.
    pub fn fresh(stores: Arc<Stores>, run_id: RunId, writer: Writer) -> Self {
        let filter = stores.names.checkpoint_run_filter(run_id);
        Self {
            stores,
            run_id,
            writer,
            filter,
            recorded: BTreeMap::new(),
            head: 0,
            closed: false,
            lost: false,
        }
    }

    /// Loads a run's checkpoints and fences out every earlier attempt by
    /// writing `<run_id>.fence` at the head of the chain. If an earlier
    /// attempt writes between the load and the fence, reloads and tries
    /// again; what it wrote before the fence stays valid.
    pub async fn resume(stores: Arc<Stores>, run_id: RunId, writer: Writer) -> Result<Self, Error> {
        let mut log = Self::fresh(stores, run_id, writer);
        for _ in 0..FENCE_ROUNDS {
            let (recorded, head) = log.load().await?;
            log.recorded = recorded;
            log.head = head;
            let fence = Fence {
                run_id,
                attempt: log.writer.attempt,
                worker_id: log.writer.worker_id.clone(),
                fencing_token: log.writer.fencing_token,
                ts_ms: time::now_ms(),
            };
            let payload = codec::encode(&fence).map_err(|source| Error::Encode { run_id, source })?;
            let key = log.stores.names.checkpoint_fence_key(run_id);
            match log.publish(&key, payload).await {
                Ok(()) => return Ok(log),
                Err(Error::Fenced { .. }) => {
                    log.lost = false;
                    log.closed = false;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Load { run_id, message: format!("the chain kept moving for {FENCE_ROUNDS} rounds") })
    }

    /// The recorded checkpoint at `index`, if any.
    pub fn recorded(&self, index: u32) -> Option<&Checkpoint> {
        self.recorded.get(&index)
    }

    /// How many steps are recorded.
    pub fn recorded_count(&self) -> u32 {
        u32::try_from(self.recorded.len()).unwrap_or(u32::MAX)
    }

    /// The fencing token of this attempt.
    pub fn fencing_token(&self) -> u64 {
        self.writer.fencing_token
    }

    /// Whether a write found that a newer attempt owns the run.
    pub fn is_lost(&self) -> bool {
        self.lost
    }

    /// Reads a recorded step's output (from the object store for large ones).
    pub async fn output(&self, checkpoint: &Checkpoint) -> Result<Value, Error> {
        let run_id = self.run_id;
        match &checkpoint.output {
            StepOutput::Inline { value } => Ok(value.clone()),
            StepOutput::Blob { object, size, sha256 } => {
                let blob_error = |message: String| Error::Blob { run_id, object: object.clone(), message };
                let mut reader =
                    self.stores.blobs.get(object).await.map_err(|e| blob_error(e.to_string()))?;
                let mut bytes = Vec::with_capacity(usize::try_from(*size).unwrap_or(0));
                reader.read_to_end(&mut bytes).await.map_err(|e| blob_error(e.to_string()))?;
                let key = self.stores.names.checkpoint_key(run_id, checkpoint.index);
                let corrupt = |reason: String| Error::Corrupt { run_id, key: key.clone(), reason };
                let digest = hex::encode(Sha256::digest(&bytes));
                if bytes.len() as u64 != *size || &digest != sha256 {
                    return Err(corrupt(format!(
                        "object {object} has {} bytes with sha256 {digest}, the checkpoint recorded {size} bytes with sha256 {sha256}",
                        bytes.len()
                    )));
                }
                codec::decode(&bytes).map_err(|e| corrupt(format!("object {object} does not decode: {e}")))
            }
        }
    }

    /// Records step `index` with `output`. Returns whether the output went
    /// to the object store. After an error nothing more can be written.
    pub async fn write(
        &mut self,
        index: u32,
        name: &str,
        output: Value,
        duration: Duration,
    ) -> Result<bool, Error> {
        let run_id = self.run_id;
        if self.lost {
            return Err(Error::Fenced { run_id });
        }
        if self.closed {
            return Err(Error::Closed { run_id });
        }
        let mut checkpoint = Checkpoint {
            run_id,
            index,
            name: name.to_owned(),
            attempt: self.writer.attempt,
            worker_id: self.writer.worker_id.clone(),
            fencing_token: self.writer.fencing_token,
            ts_ms: time::now_ms(),
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            output: StepOutput::Inline { value: output },
        };
        let mut payload = codec::encode(&checkpoint).map_err(|source| Error::Encode { run_id, source })?;
        let blob = payload.len() > self.stores.inline_limit;
        if blob {
            let StepOutput::Inline { value } = &checkpoint.output else {
                return Err(Error::Closed { run_id });
            };
            let bytes = codec::encode(value).map_err(|source| Error::Encode { run_id, source })?;
            let object = self.stores.names.checkpoint_blob(run_id, index, self.writer.fencing_token);
            let sha256 = hex::encode(Sha256::digest(&bytes));
            let size = bytes.len() as u64;
            self.stores.blobs.put(object.as_str(), &mut bytes.as_slice()).await.map_err(|e| Error::Blob {
                run_id,
                object: object.clone(),
                message: e.to_string(),
            })?;
            checkpoint.output = StepOutput::Blob { object, size, sha256 };
            payload = codec::encode(&checkpoint).map_err(|source| Error::Encode { run_id, source })?;
        }
        let key = self.stores.names.checkpoint_key(run_id, index);
        let result = self.publish(&key, payload).await;
        if let Err(e) = &result {
            // A refused write leaves our object unreferenced: remove it.
            if let (true, StepOutput::Blob { object, .. }) = (e.is_lease_lost(), &checkpoint.output) {
                let _ = self.stores.blobs.delete(object).await;
            }
        }
        result?;
        self.recorded.insert(index, checkpoint);
        Ok(blob)
    }

    /// Publishes one value at the head of the chain.
    async fn publish(&mut self, key: &str, payload: Vec<u8>) -> Result<(), Error> {
        let run_id = self.run_id;
        // Closed until acknowledged: a dropped publish leaves the head unknown.
        self.closed = true;
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_CONTENT_TYPE, codec::CONTENT_TYPE);
        headers.insert(HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE, self.head.to_string().as_str());
        headers.insert(HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT, self.filter.as_str());
        let subject = self.stores.names.checkpoint_subject(key);
        let ack =
            async { self.stores.js.publish_with_headers(subject, headers, payload.into()).await?.await }
                .await;
        match ack {
            Ok(ack) => {
                self.head = ack.sequence;
                self.closed = false;
                Ok(())
            }
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                self.lost = true;
                Err(Error::Fenced { run_id })
            }
            Err(source) => Err(Error::Publish { run_id, source }),
        }
    }

    /// Reads every checkpoint of the run and the chain's head, through a
    /// short-lived consumer filtered on the run's keys.
    async fn load(&self) -> Result<(BTreeMap<u32, Checkpoint>, u64), Error> {
        let run_id = self.run_id;
        let load_error = |message: String| Error::Load { run_id, message };
        let work = async {
            let mut consumer = self
                .stores
                .stream
                .create_consumer(pull::Config {
                    filter_subject: self.filter.clone(),
                    deliver_policy: DeliverPolicy::All,
                    ack_policy: AckPolicy::None,
                    memory_storage: true,
                    inactive_threshold: Duration::from_secs(30),
                    ..Default::default()
                })
                .await
                .map_err(|e| load_error(e.to_string()))?;
            let pending = consumer.info().await.map_err(|e| load_error(e.to_string()))?.num_pending;
            let mut recorded = BTreeMap::new();
            let mut head = 0;
            let mut remaining = pending;
            while remaining > 0 {
                let want = usize::try_from(remaining).unwrap_or(usize::MAX).min(1000);
                let mut batch = consumer
                    .fetch()
                    .max_messages(want)
                    .expires(Duration::from_secs(2))
                    .messages()
                    .await
                    .map_err(|e| load_error(e.to_string()))?;
                let mut got = 0;
                while let Some(message) = batch.next().await {
                    let message = message.map_err(|e| load_error(e.to_string()))?;
                    got += 1;
                    let info = message.info().map_err(|e| load_error(e.to_string()))?;
                    head = head.max(info.stream_sequence);
                    if message.headers.as_ref().is_some_and(|h| h.get(KV_OPERATION).is_some()) {
                        continue;
                    }
                    let names = &self.stores.names;
                    let Some(key) = names.checkpoint_key_of(message.subject.as_str()).map(str::to_owned)
                    else {
                        continue;
                    };
                    let Some(index) = names.parse_checkpoint_step(run_id, &key) else {
                        continue;
                    };
                    let checkpoint: Checkpoint = codec::decode(&message.payload)
                        .map_err(|e| Error::Corrupt { run_id, key: key.clone(), reason: e.to_string() })?;
                    if checkpoint.index != index || checkpoint.run_id != run_id {
                        return Err(Error::Corrupt {
                            run_id,
                            key,
                            reason: format!("it records run {} step {}", checkpoint.run_id, checkpoint.index),
                        });
                    }
                    recorded.insert(index, checkpoint);
                }
                if got == 0 {
                    return Err(load_error(format!("{remaining} checkpoints announced but not delivered")));
                }
                remaining = remaining.saturating_sub(got);
            }
            let name = consumer.cached_info().name.clone();
            let _ = self.stores.stream.delete_consumer(&name).await;
            Ok((recorded, head))
        };
        tokio::time::timeout(LOAD_TIMEOUT, work)
            .await
            .unwrap_or_else(|_| Err(load_error(format!("timed out after {LOAD_TIMEOUT:?}"))))
    }
}
