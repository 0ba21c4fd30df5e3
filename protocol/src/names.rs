//! Every subject, stream, consumer, bucket, key, message id and header name.
//!
//! All names derive from one configurable [`Prefix`] (default `runfleet`), so
//! several fleets can share one NATS account. Nothing outside this module
//! spells a subject.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::ids::{self, QueueName, RunId, SignalKey, TenantId, WorkerId};

/// Header carrying the payload's content type on every runfleet message.
pub const HEADER_CONTENT_TYPE: &str = "Content-Type";
/// JetStream de-duplication header.
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
/// JetStream optimistic-concurrency header: the publish is refused unless the
/// last message on the subject has this stream sequence (0 = no message).
pub const HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
/// Redirects the expected-last-subject-sequence check to another subject
/// or wildcard (nats-server ≥ 2.11): the check then compares the last stream
/// sequence of any message on the matching subjects. Checkpoint writes use
/// it to chain every key of a run.
pub const HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT: &str = "Nats-Expected-Last-Subject-Sequence-Subject";
/// The subject prefix of every KV bucket's keys (`$KV.<bucket>.<key>`).
pub const KV_SUBJECT_PREFIX: &str = "$KV";
/// JetStream message schedules (nats-server ≥ 2.12): a message carrying
/// this header (`@at <RFC 3339>`) is a schedule; at that time the server
/// publishes its body to [`HEADER_SCHEDULE_TARGET`] and removes it.
pub const HEADER_SCHEDULE: &str = "Nats-Schedule";
/// The subject a schedule publishes to (in the same stream).
pub const HEADER_SCHEDULE_TARGET: &str = "Nats-Schedule-Target";
/// Set on API replies that carry an error, with the [`crate::ErrorCode`] string.
pub const HEADER_ERROR_CODE: &str = "Runfleet-Error-Code";

/// The last token of a run's checkpoint fence key.
const CHECKPOINT_FENCE: &str = "fence";

/// The name of the NATS micro-service the coordinator registers.
pub const SERVICE_NAME: &str = "runfleet";
/// The queue group coordinator replicas share the API in.
pub const API_QUEUE_GROUP: &str = "runfleet-coordinator";

/// The API verbs served on `<prefix>.api.<tenant>.<verb>`.
pub const API_VERBS: &[&str] = &[VERB_SUBMIT, VERB_GET, VERB_LIST, VERB_EVENTS, VERB_SIGNAL, VERB_CANCEL];
pub const VERB_SUBMIT: &str = "submit";
pub const VERB_GET: &str = "get";
pub const VERB_LIST: &str = "list";
pub const VERB_EVENTS: &str = "events";
pub const VERB_SIGNAL: &str = "signal";
pub const VERB_CANCEL: &str = "cancel";

/// The first token of every runfleet subject and the stem of stream and bucket
/// names. Lowercase letters, digits, `-` and `_`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Prefix(String);

impl Prefix {
    pub fn new(value: impl Into<String>) -> Result<Self, ids::Error> {
        let value = value.into();
        // Reuse the token rules, then forbid uppercase so that stream names
        // (uppercased) and bucket names (as is) cannot collide across prefixes.
        ids::TenantId::new(value.clone()).map_err(|e| match e {
            ids::Error::Empty { .. } => ids::Error::Empty { kind: "prefix" },
            ids::Error::TooLong { len, max, .. } => ids::Error::TooLong { kind: "prefix", len, max },
            ids::Error::InvalidChar { value, found, .. } => {
                ids::Error::InvalidChar { kind: "prefix", value, found }
            }
            other => other,
        })?;
        if let Some(found) = value.chars().find(char::is_ascii_uppercase) {
            return Err(ids::Error::InvalidChar { kind: "prefix", value, found });
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Prefix {
    fn default() -> Self {
        Self("runfleet".to_owned())
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Builds every name for one prefix.
#[derive(Clone, Debug)]
pub struct Names {
    prefix: Prefix,
    upper: String,
}

impl Default for Names {
    fn default() -> Self {
        Self::new(Prefix::default())
    }
}

impl Names {
    pub fn new(prefix: Prefix) -> Self {
        let upper = prefix.as_str().to_ascii_uppercase();
        Self { prefix, upper }
    }

    pub fn prefix(&self) -> &Prefix {
        &self.prefix
    }

    // ---- API ----

    /// `<prefix>.api.<tenant>.<verb>`
    pub fn api(&self, tenant: &TenantId, verb: &str) -> String {
        format!("{}.api.{tenant}.{verb}", self.prefix)
    }

    /// `<prefix>.api.*.<verb>`: what a coordinator endpoint subscribes to.
    pub fn api_endpoint(&self, verb: &str) -> String {
        format!("{}.api.*.{verb}", self.prefix)
    }

    /// The tenant token of an API subject, unvalidated; `None` if the subject
    /// is not `<prefix>.api.<tenant>.<verb>`.
    pub fn api_tenant_token<'a>(&self, subject: &'a str) -> Option<&'a str> {
        let rest = subject.strip_prefix(self.prefix.as_str())?.strip_prefix(".api.")?;
        let (tenant, _verb) = rest.split_once('.')?;
        Some(tenant)
    }

    // ---- jobs ----

    /// The work-queue stream holding job messages.
    pub fn jobs_stream(&self) -> String {
        format!("{}_JOBS", self.upper)
    }

    /// `<prefix>.jobs.>`: the jobs stream's subjects.
    pub fn jobs_stream_subjects(&self) -> String {
        format!("{}.jobs.>", self.prefix)
    }

    /// `<prefix>.timers.>`: the jobs stream's schedule subjects.
    pub fn timers_stream_subjects(&self) -> String {
        format!("{}.timers.>", self.prefix)
    }

    /// `<prefix>.timers.<run_id>`: a run's one timer, a JetStream message
    /// schedule in the jobs stream whose body is the run's job and whose
    /// target is the run's job subject. A new schedule on the subject
    /// replaces the old one; purging the subject cancels it.
    pub fn run_timer(&self, run: RunId) -> String {
        format!("{}.timers.{run}", self.prefix)
    }

    /// `<prefix>.jobs.<queue>.p<band>.<run_id>`
    pub fn job(&self, queue: &QueueName, band: u8, run: RunId) -> String {
        format!("{}.jobs.{queue}.p{band}.{run}", self.prefix)
    }

    /// `<prefix>.jobs.<queue>.p<band>.*`: the filter of one band's consumer.
    pub fn job_band_filter(&self, queue: &QueueName, band: u8) -> String {
        format!("{}.jobs.{queue}.p{band}.*", self.prefix)
    }

    /// `<prefix>.wake.>`: where the jobs stream republishes the *headers* of
    /// every job it stores (JetStream `republish`, headers only). Idle
    /// workers subscribe to it as a wake-up signal instead of polling, and
    /// never receive job payloads that way.
    pub fn job_wakeups(&self) -> String {
        format!("{}.wake.>", self.prefix)
    }

    /// `<prefix>.wake.<queue>.p<band>.<run_id>`: where the jobs stream
    /// republishes the headers of the job [`Names::job`] names. A worker
    /// that NAKs a job for immediate redelivery (a hand-off) publishes here
    /// too, since a redelivery stores nothing and so wakes no idle worker.
    pub fn job_wakeup(&self, queue: &QueueName, band: u8, run: RunId) -> String {
        format!("{}.wake.{queue}.p{band}.{run}", self.prefix)
    }

    /// `<prefix>.wake.<queue>.>`: the wake-ups of one queue.
    pub fn job_wakeup_filter(&self, queue: &QueueName) -> String {
        format!("{}.wake.{queue}.>", self.prefix)
    }

    /// `<prefix>.workers.<queue>`: the queue group in which workers with a
    /// free slot subscribe to [`Names::job_wakeup_filter`], so each wake-up
    /// reaches one of them instead of every worker of the queue.
    pub fn job_wakeup_group(&self, queue: &QueueName) -> String {
        format!("{}.workers.{queue}", self.prefix)
    }

    /// The durable pull consumer of one (queue, band).
    pub fn job_consumer(&self, queue: &QueueName, band: u8) -> String {
        format!("jobs-{queue}-p{band}")
    }

    /// The queue and band of a [`Names::job_consumer`] name.
    pub fn parse_job_consumer(&self, name: &str) -> Option<(QueueName, u8)> {
        let (queue, band) = name.strip_prefix("jobs-")?.rsplit_once("-p")?;
        let band = band.parse().ok()?;
        Some((QueueName::new(queue.to_owned()).ok()?, band))
    }

    /// The de-duplication id of a job publish. `dispatch` distinguishes
    /// deliberate re-dispatches of the same run from retried publishes.
    pub fn job_msg_id(&self, run: RunId, dispatch: u32) -> String {
        format!("{run}:job:{dispatch}")
    }

    /// The de-duplication id of the job that wakes a run parked by the
    /// `run.waiting` event at `waiting_seq`: the coordinator (on a signal)
    /// and the worker (finding the signal already there) publish the same
    /// id, so a wake is dispatched once.
    pub fn wake_msg_id(&self, run: RunId, waiting_seq: u64) -> String {
        format!("{run}:wake:{waiting_seq}")
    }

    /// The de-duplication id of a job the recovery loop re-dispatches for a
    /// run whose last event has `seq`.
    pub fn recovery_msg_id(&self, run: RunId, seq: u64) -> String {
        format!("{run}:recover:{seq}")
    }

    // ---- events ----

    /// The stream holding every run's event log.
    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.upper)
    }

    /// `<prefix>.runs.>`: the events stream's subjects.
    pub fn events_stream_subjects(&self) -> String {
        format!("{}.runs.>", self.prefix)
    }

    /// `<prefix>.runs.<tenant>.<run_id>.events`
    pub fn run_events(&self, tenant: &TenantId, run: RunId) -> String {
        format!("{}.runs.{tenant}.{run}.events", self.prefix)
    }

    /// `<prefix>.runs.<tenant>.*.events`: every run of one tenant.
    pub fn tenant_events(&self, tenant: &TenantId) -> String {
        format!("{}.runs.{tenant}.*.events", self.prefix)
    }

    /// The durable consumer that projected events into the SQL registry
    /// before the projector kept its position in SQL: the coordinator now
    /// only seeds its position from this consumer's ack floor and deletes it.
    pub fn projector_consumer(&self) -> String {
        "projector".to_owned()
    }

    // ---- KV buckets and object store ----

    pub fn leases_bucket(&self) -> String {
        format!("{}-leases", self.prefix)
    }
    pub fn checkpoints_bucket(&self) -> String {
        format!("{}-checkpoints", self.prefix)
    }
    pub fn signals_bucket(&self) -> String {
        format!("{}-signals", self.prefix)
    }
    pub fn control_bucket(&self) -> String {
        format!("{}-control", self.prefix)
    }
    pub fn idempotency_bucket(&self) -> String {
        format!("{}-idempotency", self.prefix)
    }
    /// The real job of each run whose `run.created` input was redacted, key
    /// `<run_id>`: what the coordinator re-dispatches (wakes, recovery) so
    /// the agent never gets a redacted input.
    pub fn inputs_bucket(&self) -> String {
        format!("{}-inputs", self.prefix)
    }
    pub fn workers_bucket(&self) -> String {
        format!("{}-workers", self.prefix)
    }
    pub fn blobs_bucket(&self) -> String {
        format!("{}-blobs", self.prefix)
    }

    /// A run's lease key: `<run_id>`.
    pub fn lease_key(&self, run: RunId) -> String {
        run.to_string()
    }

    /// A step checkpoint key: `<run_id>.<step_index>`.
    pub fn checkpoint_key(&self, run: RunId, step: u32) -> String {
        format!("{run}.{step}")
    }

    /// The key of a run's checkpoint fence (see [`crate::checkpoint::Fence`]).
    pub fn checkpoint_fence_key(&self, run: RunId) -> String {
        format!("{run}.{CHECKPOINT_FENCE}")
    }

    /// The subject a checkpoint key is stored on: `$KV.<bucket>.<key>`.
    pub fn checkpoint_subject(&self, key: &str) -> String {
        format!("{KV_SUBJECT_PREFIX}.{}.{key}", self.checkpoints_bucket())
    }

    /// Every checkpoint subject of one run (the chain the writes are checked
    /// against): `$KV.<bucket>.<run_id>.>`.
    pub fn checkpoint_run_filter(&self, run: RunId) -> String {
        format!("{KV_SUBJECT_PREFIX}.{}.{run}.>", self.checkpoints_bucket())
    }

    /// The key a checkpoint subject (`$KV.<bucket>.<key>`) stores.
    pub fn checkpoint_key_of<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(KV_SUBJECT_PREFIX)?
            .strip_prefix('.')?
            .strip_prefix(&self.checkpoints_bucket())?
            .strip_prefix('.')
    }

    /// Parses a checkpoint key's step index; `None` for the fence or a
    /// foreign key.
    pub fn parse_checkpoint_step(&self, run: RunId, key: &str) -> Option<u32> {
        let rest = key.strip_prefix(&run.to_string())?.strip_prefix('.')?;
        if rest.is_empty()
            || !rest.bytes().all(|b| b.is_ascii_digit())
            || (rest.len() > 1 && rest.starts_with('0'))
        {
            return None;
        }
        rest.parse().ok()
    }

    /// The object holding a large step output, named after the writer's
    /// fencing token so a stale writer never overwrites the owner's object:
    /// `checkpoints/<run_id>/<step_index>/<fencing_token>`.
    pub fn checkpoint_blob(&self, run: RunId, step: u32, fencing_token: u64) -> String {
        format!("checkpoints/{run}/{step}/{fencing_token}")
    }

    /// An idempotency key's KV key: `<tenant>.<sha256(key) hex>`. Hashing
    /// keeps arbitrary client strings out of subjects.
    pub fn idempotency_key(&self, tenant: &TenantId, key: &ids::IdempotencyKey) -> String {
        let digest = Sha256::digest(key.as_str().as_bytes());
        format!("{tenant}.{}", hex::encode(digest))
    }

    /// A signal's key in the signals bucket: `<run_id>.<key>`.
    pub fn signal_key(&self, run: RunId, key: &SignalKey) -> String {
        format!("{run}.{key}")
    }

    /// A run's key in the control bucket: `<run_id>`.
    pub fn control_key(&self, run: RunId) -> String {
        run.to_string()
    }

    /// The run a control key belongs to.
    pub fn parse_control_key(&self, key: &str) -> Option<RunId> {
        key.parse().ok()
    }

    /// JetStream's advisory when a consumer's message reached its
    /// `max_deliver`, for every consumer of the jobs stream.
    pub fn jobs_max_deliveries_advisory(&self) -> String {
        format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.*", self.jobs_stream())
    }

    /// A worker's key in the worker registry.
    pub fn worker_key(&self, worker: &WorkerId) -> String {
        worker.to_string()
    }
}

/// Parses `<prefix>.runs.<tenant>.<run_id>.events` into its tenant and run.
pub fn parse_run_events_subject(names: &Names, subject: &str) -> Option<(TenantId, RunId)> {
    let rest = subject.strip_prefix(names.prefix.as_str())?.strip_prefix(".runs.")?;
    let mut parts = rest.split('.');
    let tenant = TenantId::new(parts.next()?).ok()?;
    let run = parts.next()?.parse().ok()?;
    (parts.next()? == "events" && parts.next().is_none()).then_some((tenant, run))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_names() {
        let n = Names::default();
        let run = RunId::generate();
        assert_eq!(n.checkpoint_key(run, 7), format!("{run}.7"));
        assert_eq!(
            n.checkpoint_subject(&n.checkpoint_key(run, 7)),
            format!("$KV.runfleet-checkpoints.{run}.7")
        );
        assert_eq!(n.checkpoint_run_filter(run), format!("$KV.runfleet-checkpoints.{run}.>"));
        assert_eq!(n.parse_checkpoint_step(run, &n.checkpoint_key(run, 12)), Some(12));
        let subject = n.checkpoint_subject(&n.checkpoint_fence_key(run));
        assert_eq!(n.checkpoint_key_of(&subject), Some(n.checkpoint_fence_key(run).as_str()));
        assert_eq!(n.checkpoint_key_of("$KV.runfleet-leases.x"), None);
        assert_eq!(n.parse_checkpoint_step(run, &n.checkpoint_fence_key(run)), None);
        assert_eq!(n.parse_checkpoint_step(run, &format!("{run}.07")), None);
        assert_eq!(n.parse_checkpoint_step(RunId::generate(), &n.checkpoint_key(run, 1)), None);
    }

    #[test]
    fn default_names() {
        let n = Names::default();
        let tenant = TenantId::new("acme").unwrap_or_else(|e| panic!("{e}"));
        let queue = QueueName::new("gpu").unwrap_or_else(|e| panic!("{e}"));
        let run = RunId::generate();
        assert_eq!(n.api(&tenant, VERB_SUBMIT), "runfleet.api.acme.submit");
        let pool = QueueName::new("gpu-pool").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n.parse_job_consumer(&n.job_consumer(&pool, 3)), Some((pool, 3)));
        assert_eq!(n.parse_job_consumer("projector"), None);
        assert_eq!(n.api_tenant_token("runfleet.api.acme.submit"), Some("acme"));
        assert_eq!(n.api_tenant_token("other.api.acme.submit"), None);
        assert_eq!(n.job(&queue, 2, run), format!("runfleet.jobs.gpu.p2.{run}"));
        assert_eq!(n.jobs_stream(), "RUNFLEET_JOBS");
        assert_eq!(n.job_wakeup_filter(&queue), "runfleet.wake.gpu.>");
        assert_eq!(n.job_wakeup_group(&queue), "runfleet.workers.gpu");
        assert_eq!(n.job_wakeup(&queue, 2, run), format!("runfleet.wake.gpu.p2.{run}"));
        assert_eq!(n.events_stream(), "RUNFLEET_EVENTS");
        assert_eq!(n.leases_bucket(), "runfleet-leases");
        let subject = n.run_events(&tenant, run);
        assert_eq!(subject, format!("runfleet.runs.acme.{run}.events"));
        assert_eq!(parse_run_events_subject(&n, &subject), Some((tenant, run)));
        assert_eq!(parse_run_events_subject(&n, "runfleet.runs.acme.x.events"), None);
    }

    #[test]
    fn prefix_is_validated() {
        assert!(Prefix::new("fleet-b").is_ok());
        assert!(Prefix::new("Fleet").is_err());
        assert!(Prefix::new("a.b").is_err());
        let n = Names::new(Prefix::new("fleet-b").unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(n.jobs_stream(), "FLEET-B_JOBS");
        assert_eq!(n.workers_bucket(), "fleet-b-workers");
    }
}
