//! Run events: the per-run log on `<prefix>.runs.<tenant>.<run_id>.events`.
//!
//! Each run's events have `seq` 1..n with no gap. Every append is published
//! with `Nats-Expected-Last-Subject-Sequence` set to the stream sequence of
//! the run's previous message, so only the holder of the run's lease can
//! extend its log, and a second copy of an append is refused like any other
//! write that lost the race (appends carry no `Nats-Msg-Id`).
//!
//! A message of the log carries one event (envelope version 1, `data` an
//! [`Event`]) or several consecutive ones (envelope version
//! [`MULTI_EVENT_VERSION`], `data` an array of events in seq order): a
//! step's `step.completed` travels with the run's next event, one round trip
//! for both. Read log messages with [`decode_log_message`]; older readers
//! refuse a multi-event message as an unsupported version instead of
//! misreading it.

use serde::de::{DeserializeSeed, Error as _, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::codec;
use crate::error::ErrorCode;
use crate::ids::{AgentName, QueueName, RunId, SignalKey, TenantId, WorkerId};
use crate::state::RunState;

/// One event of a run's log.
///
/// Decoded field by field (see the `Deserialize` impl below) rather than
/// through `#[serde(flatten)]`, which buffers the whole map before decoding
/// it: events are decoded on every run's hot path (projector, claims,
/// subscribers).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub run_id: RunId,
    pub tenant: TenantId,
    /// Position in the run's log, from 1, no gaps.
    pub seq: u64,
    /// When the event was written, ms since the Unix epoch.
    pub ts_ms: i64,
    /// The execution attempt that wrote the event (0 for `run.created`).
    pub attempt: u32,
    /// The worker that wrote the event, if a worker did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<WorkerId>,
    /// The OpenTelemetry trace of the run (W3C trace id, 32 lowercase hex
    /// digits): every event of a run carries the trace id of its submission,
    /// whichever worker wrote it. Absent when tracing is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(flatten)]
    pub body: EventBody,
}

/// The envelope version of a run-log message that carries several events.
pub const MULTI_EVENT_VERSION: u16 = 2;

/// Encodes the events of one log message: a single event as any other
/// message (version 1), several as an array (version
/// [`MULTI_EVENT_VERSION`]).
pub fn encode_log_message(events: &[&Event]) -> Result<Vec<u8>, codec::Error> {
    match events {
        [event] => codec::encode(*event),
        events => codec::encode_as(MULTI_EVENT_VERSION, &events),
    }
}

/// The events of one message of a run's log, in seq order (never empty).
pub fn decode_log_message(bytes: &[u8]) -> Result<Vec<Event>, codec::Error> {
    decode_log_message_as(bytes)
}

/// [`decode_log_message`] into another view of an event (for readers that
/// need only some of its fields).
pub fn decode_log_message_as<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<Vec<T>, codec::Error> {
    match codec::decode::<T>(bytes) {
        Ok(event) => Ok(vec![event]),
        Err(codec::Error::UnsupportedVersion { found: MULTI_EVENT_VERSION, .. }) => {
            let events: Vec<T> = codec::decode_as(MULTI_EVENT_VERSION, bytes)?;
            if events.is_empty() {
                return Err(codec::Error::Decode("a log message with no event".to_owned()));
            }
            Ok(events)
        }
        Err(e) => Err(e),
    }
}

/// The last event of one message of a run's log.
pub fn decode_last_of_log_message(bytes: &[u8]) -> Result<Event, codec::Error> {
    let mut events = decode_log_message(bytes)?;
    events.pop().ok_or_else(|| codec::Error::Decode("a log message with no event".to_owned()))
}

impl Event {
    /// The free-form JSON this event carries (run input, tool arguments,
    /// agent event data, run output), for redaction before publishing.
    pub fn payload_mut(&mut self) -> Option<&mut Value> {
        match &mut self.body {
            EventBody::Created(created) => Some(&mut created.input),
            EventBody::ApprovalRequested(request) => Some(&mut request.arguments),
            EventBody::Agent(agent) => Some(&mut agent.data),
            EventBody::Completed(completed) => Some(&mut completed.output),
            _ => None,
        }
    }

    /// The run's state after this event.
    pub fn state_after(&self) -> RunState {
        self.body.state_after()
    }
}

/// What happened. On the wire: `"type": "<name>"` and `"data": {…}` beside
/// the common fields.
///
/// Decoding is tolerant: a type this version does not know becomes
/// [`EventBody::Unknown`] (its data is skipped), so an older reader keeps
/// going when a newer writer adds event types.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", content = "data")]
pub enum EventBody {
    /// The coordinator accepted the run. Always seq 1.
    #[serde(rename = "run.created")]
    Created(RunCreated),
    /// A worker claimed the run and started the agent (first attempt).
    #[serde(rename = "run.started")]
    Started(RunStarted),
    /// A worker claimed a run an earlier attempt had started (after a crash,
    /// a lost lease or a hand-off) and replays its checkpoints.
    #[serde(rename = "run.resumed")]
    Resumed(RunResumed),
    /// A durable step began executing (once per try).
    #[serde(rename = "step.started")]
    StepStarted(StepStarted),
    /// A durable step finished and its checkpoint is stored.
    #[serde(rename = "step.completed")]
    StepCompleted(StepCompleted),
    /// A try of a durable step failed (and is retried if `retry_in_ms` is set).
    #[serde(rename = "step.failed")]
    StepFailed(StepFailed),
    /// An attempt failed with a retryable error; the run is dispatched again
    /// after `retry_in_ms` and the next attempt resumes from its checkpoints.
    #[serde(rename = "run.retrying")]
    Retrying(RunRetrying),
    /// The run is parked until a signal arrives or a deadline passes; its
    /// job is acked and its lease released. Next: a `run.resumed` when a
    /// signal or timer wakes it, or `run.cancelled`.
    #[serde(rename = "run.waiting")]
    Waiting(RunWaiting),
    /// The agent asks a person to decide on an action (see
    /// [`crate::signal::ApprovalDecision`]); a `run.waiting` on `key` follows
    /// unless the decision is already there.
    #[serde(rename = "approval.requested")]
    ApprovalRequested(ApprovalRequested),
    /// The worker handed the run off (it is shutting down): the lease is
    /// released and the job nak'd for immediate redelivery. Does not count
    /// against `max_attempts`.
    #[serde(rename = "run.handoff")]
    Handoff(RunHandoff),
    /// An event the agent emitted through its run context.
    #[serde(rename = "agent.event")]
    Agent(AgentEvent),
    /// The agent returned an output. Terminal.
    #[serde(rename = "run.completed")]
    Completed(RunCompleted),
    /// The run failed for good. Terminal.
    #[serde(rename = "run.failed")]
    Failed(RunFailed),
    /// The run was cancelled. Terminal.
    #[serde(rename = "run.cancelled")]
    Cancelled(RunCancelled),
    /// An event type this version does not know (written by a newer peer).
    /// Readers skip it; it never changes a run's state. Never written.
    #[serde(rename = "unknown")]
    Unknown,
}

impl<'de> Deserialize<'de> for EventBody {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            #[serde(rename = "type")]
            kind: String,
            #[serde(default)]
            data: Value,
        }
        let Wire { kind, data } = Wire::deserialize(deserializer)?;
        EventBody::from_value(&kind, data)
    }
}

impl EventBody {
    /// The body of a `kind` event whose `data` was decoded on its own (it came
    /// before its `type` on the wire, or the body is decoded standalone).
    fn from_value<E: serde::de::Error>(kind: &str, data: Value) -> Result<Self, E> {
        BodySeed(kind).deserialize(data).map_err(E::custom)
    }
}

/// Decodes the `data` of a `type` already known straight into its struct.
struct BodySeed<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for BodySeed<'_> {
    type Value = EventBody;

    fn deserialize<D: serde::Deserializer<'de>>(self, data: D) -> Result<EventBody, D::Error> {
        let kind = self.0;
        fn typed<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
            kind: &str,
            data: D,
        ) -> Result<T, D::Error> {
            T::deserialize(data).map_err(|e| D::Error::custom(format_args!("invalid {kind} data: {e}")))
        }
        Ok(match kind {
            "run.created" => EventBody::Created(typed(kind, data)?),
            "run.started" => EventBody::Started(typed(kind, data)?),
            "run.resumed" => EventBody::Resumed(typed(kind, data)?),
            "step.started" => EventBody::StepStarted(typed(kind, data)?),
            "step.completed" => EventBody::StepCompleted(typed(kind, data)?),
            "step.failed" => EventBody::StepFailed(typed(kind, data)?),
            "run.retrying" => EventBody::Retrying(typed(kind, data)?),
            "run.waiting" => EventBody::Waiting(typed(kind, data)?),
            "approval.requested" => EventBody::ApprovalRequested(typed(kind, data)?),
            "run.handoff" => EventBody::Handoff(typed(kind, data)?),
            "run.cancelled" => EventBody::Cancelled(typed(kind, data)?),
            "agent.event" => EventBody::Agent(typed(kind, data)?),
            "run.completed" => EventBody::Completed(typed(kind, data)?),
            "run.failed" => EventBody::Failed(typed(kind, data)?),
            _ => {
                IgnoredAny::deserialize(data)?;
                EventBody::Unknown
            }
        })
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(EventVisitor)
    }
}

/// The fields of an event on the wire; any other key is skipped.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum EventField {
    RunId,
    Tenant,
    Seq,
    TsMs,
    Attempt,
    WorkerId,
    TraceId,
    Type,
    Data,
    #[serde(other)]
    Other,
}

struct EventVisitor;

impl<'de> Visitor<'de> for EventVisitor {
    type Value = Event;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a run event (a map with run_id, tenant, seq, ts_ms, attempt, type and data)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Event, A::Error> {
        let (mut run_id, mut tenant, mut seq, mut ts_ms, mut attempt) = (None, None, None, None, None);
        let (mut worker_id, mut trace_id) = (None, None);
        let mut kind: Option<String> = None;
        let mut body = None;
        // `data` before `type` (another encoder's field order) is kept as a
        // value until the type is known.
        let mut early_data: Option<Value> = None;
        while let Some(field) = map.next_key::<EventField>()? {
            match field {
                EventField::RunId => run_id = Some(map.next_value()?),
                EventField::Tenant => tenant = Some(map.next_value()?),
                EventField::Seq => seq = Some(map.next_value()?),
                EventField::TsMs => ts_ms = Some(map.next_value()?),
                EventField::Attempt => attempt = Some(map.next_value()?),
                EventField::WorkerId => worker_id = map.next_value()?,
                EventField::TraceId => trace_id = map.next_value()?,
                EventField::Type => kind = Some(map.next_value()?),
                EventField::Data => match &kind {
                    Some(kind) => body = Some(map.next_value_seed(BodySeed(kind))?),
                    None => early_data = Some(map.next_value()?),
                },
                EventField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let kind = kind.ok_or_else(|| A::Error::missing_field("type"))?;
        let body = match body {
            Some(body) => body,
            None => EventBody::from_value(&kind, early_data.unwrap_or(Value::Null))?,
        };
        Ok(Event {
            run_id: run_id.ok_or_else(|| A::Error::missing_field("run_id"))?,
            tenant: tenant.ok_or_else(|| A::Error::missing_field("tenant"))?,
            seq: seq.ok_or_else(|| A::Error::missing_field("seq"))?,
            ts_ms: ts_ms.ok_or_else(|| A::Error::missing_field("ts_ms"))?,
            attempt: attempt.ok_or_else(|| A::Error::missing_field("attempt"))?,
            worker_id,
            trace_id,
            body,
        })
    }
}

impl EventBody {
    /// The wire name of the event type.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Created(_) => "run.created",
            Self::Started(_) => "run.started",
            Self::Resumed(_) => "run.resumed",
            Self::StepStarted(_) => "step.started",
            Self::StepCompleted(_) => "step.completed",
            Self::StepFailed(_) => "step.failed",
            Self::Retrying(_) => "run.retrying",
            Self::Waiting(_) => "run.waiting",
            Self::ApprovalRequested(_) => "approval.requested",
            Self::Handoff(_) => "run.handoff",
            Self::Cancelled(_) => "run.cancelled",
            Self::Agent(_) => "agent.event",
            Self::Completed(_) => "run.completed",
            Self::Failed(_) => "run.failed",
            Self::Unknown => "unknown",
        }
    }

    /// The run's state after an event of this kind. An unknown event type
    /// is reported as `running`: only known types end or create a run.
    pub fn state_after(&self) -> RunState {
        match self {
            Self::Created(_) | Self::Retrying(_) | Self::Handoff(_) => RunState::Queued,
            Self::Waiting(_) => RunState::Waiting,
            Self::Started(_)
            | Self::ApprovalRequested(_)
            | Self::Resumed(_)
            | Self::StepStarted(_)
            | Self::StepCompleted(_)
            | Self::StepFailed(_)
            | Self::Agent(_)
            | Self::Unknown => RunState::Running,
            Self::Completed(_) => RunState::Completed,
            Self::Failed(_) => RunState::Failed,
            Self::Cancelled(_) => RunState::Cancelled,
        }
    }

    pub fn is_terminal(&self) -> bool {
        self.state_after().is_terminal()
    }

    /// For an event that ends an attempt without ending the run
    /// (`run.waiting`, `run.handoff`, `run.retrying`): how many attempts have
    /// failed so far, this one included. `None` for every other event.
    pub fn failures(&self) -> Option<u32> {
        match self {
            Self::Waiting(e) => Some(e.failures),
            Self::Handoff(e) => Some(e.failures),
            Self::Retrying(e) => Some(e.failures),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunCreated {
    pub agent: AgentName,
    pub queue: QueueName,
    /// Priority band, 0 = highest.
    pub priority: u8,
    pub input: Value,
    pub max_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The submission's W3C `traceparent` (sampling flag included), so a job
    /// rebuilt from this event joins the run's trace as the original did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStarted {
    /// How many times the job had been delivered when this attempt claimed it.
    pub delivery: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResumed {
    /// How many times the job had been delivered when this attempt claimed it.
    pub delivery: u64,
    /// How many completed steps the attempt found checkpointed (and replays
    /// without executing them).
    pub steps_replayed: u32,
    /// How many earlier attempts failed (crashed, lost the lease or failed
    /// retryably); waits and hand-offs are not failures. A run fails with
    /// `max_attempts_exceeded` once this reaches `max_attempts`.
    #[serde(default)]
    pub failures: u32,
}

/// A step try began. `index` is the step's position in the run (from 0),
/// `attempt` the try of this step within the run attempt (from 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepStarted {
    pub index: u32,
    pub name: String,
    pub attempt: u32,
}

/// A step finished; its checkpoint was stored before this event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepCompleted {
    pub index: u32,
    pub name: String,
    /// The try that succeeded (from 1).
    pub attempt: u32,
    /// How long the successful try took, closure only.
    pub duration_ms: u64,
    /// Whether the output went to the object store (over the inline limit).
    #[serde(default)]
    pub blob: bool,
}

/// A step try failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepFailed {
    pub index: u32,
    pub name: String,
    pub attempt: u32,
    pub duration_ms: u64,
    pub error: String,
    /// Whether the error was marked retryable (timeouts are).
    pub retryable: bool,
    /// When set, the step is tried again after this delay; when absent the
    /// step failed for good and the error goes to the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRetrying {
    pub error: RunError,
    pub retry_in_ms: u64,
    /// Failed attempts so far, this one included.
    #[serde(default)]
    pub failures: u32,
}

impl RunRetrying {
    /// When the retry is due, given the event's timestamp.
    pub fn due_ms(&self, ts_ms: i64) -> i64 {
        ts_ms.saturating_add(i64::try_from(self.retry_in_ms).unwrap_or(i64::MAX))
    }
}

/// What a parked run waits for: a signal under `key`, a deadline, or both
/// (whichever comes first). A durable sleep has only a deadline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunWaiting {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<SignalKey>,
    /// When the wait ends without a signal, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<i64>,
    /// Failed attempts so far (carried over; waiting is not a failure).
    #[serde(default)]
    pub failures: u32,
}

/// A request for a human decision, complete enough to decide from the
/// event stream alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRequested {
    /// The signal key the decision is expected under.
    pub key: SignalKey,
    /// The tool (or action) the agent wants to run.
    pub tool: String,
    /// Its arguments.
    #[serde(default)]
    pub arguments: Value,
    /// Why the agent wants to run it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the request expires, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunHandoff {
    /// Failed attempts so far (carried over; a hand-off is not a failure).
    #[serde(default)]
    pub failures: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunCancelled {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentEvent {
    /// Agent-chosen event name, e.g. `progress`.
    pub name: String,
    pub data: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunCompleted {
    pub output: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunFailed {
    pub error: RunError,
}

/// Why a run failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunError {
    pub code: ErrorCode,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, body: EventBody) -> Event {
        Event {
            run_id: RunId::generate(),
            tenant: TenantId::new("acme").unwrap_or_else(|e| panic!("{e}")),
            seq,
            ts_ms: 1,
            attempt: 1,
            worker_id: None,
            trace_id: None,
            body,
        }
    }

    /// One event is a version-1 message as before; several are a version-2
    /// array that a version-1 reader refuses by its version.
    #[test]
    fn log_messages_carry_one_or_several_events() {
        let completed = event(
            4,
            EventBody::StepCompleted(StepCompleted {
                index: 0,
                name: "a".into(),
                attempt: 1,
                duration_ms: 2,
                blob: false,
            }),
        );
        let started =
            event(5, EventBody::StepStarted(StepStarted { index: 1, name: "b".into(), attempt: 1 }));

        let one = encode_log_message(&[&completed]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(one, codec::encode(&completed).unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(decode_log_message(&one).unwrap_or_else(|e| panic!("{e}")), vec![completed.clone()]);

        let two = encode_log_message(&[&completed, &started]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            decode_log_message(&two).unwrap_or_else(|e| panic!("{e}")),
            vec![completed, started.clone()]
        );
        assert_eq!(decode_last_of_log_message(&two).unwrap_or_else(|e| panic!("{e}")), started);
        assert!(matches!(
            codec::decode::<Event>(&two),
            Err(codec::Error::UnsupportedVersion { found: MULTI_EVENT_VERSION, supported: 1 })
        ));

        let empty =
            codec::encode_as(MULTI_EVENT_VERSION, &Vec::<Event>::new()).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(decode_log_message(&empty), Err(codec::Error::Decode(_))));
        assert!(matches!(decode_log_message(b"garbage"), Err(codec::Error::Decode(_))));
    }

    /// A newer peer's event type or error code decodes as `Unknown` instead
    /// of failing, so rolling upgrades do not stall older readers.
    #[test]
    fn unknown_types_and_codes_decode() {
        let json = serde_json::json!({
            "run_id": RunId::generate(), "tenant": "acme", "seq": 3, "ts_ms": 1, "attempt": 1,
            "type": "run.teleported", "data": { "where": "mars" }
        });
        let event: Event = serde_json::from_value(json.clone()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(event.body, EventBody::Unknown);
        assert_eq!(event.state_after(), RunState::Running);
        let bytes = rmp_serde::to_vec_named(&json).unwrap_or_else(|e| panic!("{e}"));
        let event: Event = rmp_serde::from_slice(&bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(event.body, EventBody::Unknown);

        let error: RunError =
            serde_json::from_value(serde_json::json!({"code": "quota_exceeded", "message": "m"}))
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(error.code, ErrorCode::Unknown);
        let _ = codec::CONTENT_TYPE;
    }

    /// Events decode whatever the order of their keys (`data` before or
    /// after `type`), skip keys they do not know, and name what is wrong.
    #[test]
    fn events_decode_in_any_key_order_and_name_their_errors() {
        let run_id = RunId::generate();
        /// A map in exactly this key order.
        struct Ordered<'a>(&'a [(&'a str, Value)]);
        impl Serialize for Ordered<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeMap;
                let mut map = serializer.serialize_map(Some(self.0.len()))?;
                for (key, value) in self.0 {
                    map.serialize_entry(key, value)?;
                }
                map.end()
            }
        }
        let decode = |pairs: &[(&str, Value)]| {
            let bytes = rmp_serde::to_vec_named(&Ordered(pairs)).unwrap_or_else(|e| panic!("{e}"));
            rmp_serde::from_slice::<Event>(&bytes).map_err(|e| e.to_string())
        };
        let common = |rest: &[(&'static str, Value)]| {
            let mut pairs = vec![
                ("run_id", serde_json::json!(run_id)),
                ("tenant", serde_json::json!("acme")),
                ("seq", serde_json::json!(4)),
                ("ts_ms", serde_json::json!(7)),
                ("attempt", serde_json::json!(2)),
            ];
            pairs.extend(rest.iter().cloned());
            pairs
        };
        let kind = ("type", serde_json::json!("step.completed"));
        let data = ("data", serde_json::json!({"index": 1, "name": "fetch", "attempt": 1, "duration_ms": 5}));
        let extra = ("from_the_future", serde_json::json!({"nested": [1, 2]}));
        let expected = EventBody::StepCompleted(StepCompleted {
            index: 1,
            name: "fetch".to_owned(),
            attempt: 1,
            duration_ms: 5,
            blob: false,
        });
        for pairs in [
            common(&[kind.clone(), data.clone()]),
            common(&[data.clone(), kind.clone()]),
            common(&[extra.clone(), data.clone(), extra.clone(), kind.clone()]),
        ] {
            let event = decode(&pairs).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(event.body, expected);
            assert_eq!((event.run_id, event.seq, event.attempt, event.ts_ms), (run_id, 4, 2, 7));
            assert_eq!(event.tenant.as_str(), "acme");
            assert_eq!(event.worker_id, None);
        }

        let no_type = decode(&common(std::slice::from_ref(&data))).err().unwrap_or_default();
        assert!(no_type.contains("type"), "{no_type}");
        let no_seq = decode(&[("run_id", serde_json::json!(run_id)), kind.clone(), data.clone()])
            .err()
            .unwrap_or_default();
        assert!(no_seq.contains("tenant") || no_seq.contains("seq"), "{no_seq}");
        for pairs in [
            common(&[kind.clone(), ("data", serde_json::json!({"index": "one"}))]),
            common(&[("data", serde_json::json!({"index": "one"})), kind.clone()]),
        ] {
            let bad = decode(&pairs).err().unwrap_or_default();
            assert!(bad.contains("invalid step.completed data"), "{bad}");
        }
    }
}
