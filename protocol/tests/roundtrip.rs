//! Every wire type survives encode → decode unchanged.

use proptest::prelude::*;
use runfleet_protocol::api::*;
use runfleet_protocol::checkpoint::{Checkpoint, Fence, StepOutput};
use runfleet_protocol::event::*;
use runfleet_protocol::job::Job;
use runfleet_protocol::lease::Lease;
use runfleet_protocol::worker::WorkerInfo;
use runfleet_protocol::*;
use serde_json::Value;

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,64}"
}

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1.0e12f64..1.0e12).prop_map(Value::from),
        "\\PC{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("\\PC{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn run_id() -> impl Strategy<Value = RunId> {
    any::<u128>().prop_map(|_| RunId::generate())
}

fn tenant() -> impl Strategy<Value = TenantId> {
    token().prop_map(|t| TenantId::new(t).unwrap_or_else(|e| panic!("{e}")))
}

fn queue() -> impl Strategy<Value = QueueName> {
    token().prop_map(|t| QueueName::new(t).unwrap_or_else(|e| panic!("{e}")))
}

fn agent() -> impl Strategy<Value = AgentName> {
    token().prop_map(|t| AgentName::new(t).unwrap_or_else(|e| panic!("{e}")))
}

fn worker_id() -> impl Strategy<Value = WorkerId> {
    token().prop_map(|t| WorkerId::new(t).unwrap_or_else(|e| panic!("{e}")))
}

fn signal_key() -> impl Strategy<Value = SignalKey> {
    token().prop_map(|t| SignalKey::new(t).unwrap_or_else(|e| panic!("{e}")))
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::MalformedRequest),
        Just(ErrorCode::InvalidArgument),
        Just(ErrorCode::PayloadTooLarge),
        Just(ErrorCode::NotFound),
        Just(ErrorCode::Conflict),
        Just(ErrorCode::UnsupportedVersion),
        Just(ErrorCode::Unavailable),
        Just(ErrorCode::Internal),
        Just(ErrorCode::UnknownAgent),
        Just(ErrorCode::AgentFailed),
        Just(ErrorCode::AgentPanicked),
        Just(ErrorCode::InvalidInput),
        Just(ErrorCode::StepFailed),
        Just(ErrorCode::Divergence),
        Just(ErrorCode::MaxAttemptsExceeded),
        Just(ErrorCode::Cancelled),
        Just(ErrorCode::RunTerminal),
    ]
}

fn state() -> impl Strategy<Value = RunState> {
    prop::sample::select(RunState::ALL.to_vec())
}

fn run_error() -> impl Strategy<Value = RunError> {
    (error_code(), "\\PC{0,40}").prop_map(|(code, message)| RunError { code, message })
}

fn body() -> impl Strategy<Value = EventBody> {
    prop_oneof![
        (
            agent(),
            queue(),
            0u8..5,
            json(),
            1u32..100,
            proptest::option::of("\\PC{1,20}"),
            proptest::option::of("00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]"),
        )
            .prop_map(
                |(agent, queue, priority, input, max_attempts, idempotency_key, traceparent)| {
                    EventBody::Created(RunCreated {
                        agent,
                        queue,
                        priority,
                        input,
                        max_attempts,
                        idempotency_key,
                        traceparent,
                    })
                }
            ),
        any::<u64>().prop_map(|delivery| EventBody::Started(RunStarted { delivery })),
        (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(delivery, steps_replayed, failures)| {
            EventBody::Resumed(RunResumed { delivery, steps_replayed, failures })
        }),
        (any::<u32>(), "\\PC{0,20}", any::<u32>())
            .prop_map(|(index, name, attempt)| EventBody::StepStarted(StepStarted { index, name, attempt })),
        (any::<u32>(), "\\PC{0,20}", any::<u32>(), any::<u64>(), any::<bool>()).prop_map(
            |(index, name, attempt, duration_ms, blob)| EventBody::StepCompleted(StepCompleted {
                index,
                name,
                attempt,
                duration_ms,
                blob
            })
        ),
        (
            any::<u32>(),
            "\\PC{0,20}",
            any::<u32>(),
            any::<u64>(),
            "\\PC{0,20}",
            any::<bool>(),
            any::<Option<u64>>()
        )
            .prop_map(|(index, name, attempt, duration_ms, error, retryable, retry_in_ms)| {
                EventBody::StepFailed(StepFailed {
                    index,
                    name,
                    attempt,
                    duration_ms,
                    error,
                    retryable,
                    retry_in_ms,
                })
            }),
        ("\\PC{0,20}", json()).prop_map(|(name, data)| EventBody::Agent(AgentEvent { name, data })),
        json().prop_map(|output| EventBody::Completed(RunCompleted { output })),
        run_error().prop_map(|error| EventBody::Failed(RunFailed { error })),
        (run_error(), any::<u64>(), any::<u32>()).prop_map(|(error, retry_in_ms, failures)| {
            EventBody::Retrying(RunRetrying { error, retry_in_ms, failures })
        }),
        (proptest::option::of(signal_key()), proptest::option::of(any::<i64>()), any::<u32>()).prop_map(
            |(key, deadline_ms, failures)| EventBody::Waiting(RunWaiting { key, deadline_ms, failures })
        ),
        (
            signal_key(),
            "\\PC{0,20}",
            json(),
            proptest::option::of("\\PC{0,20}"),
            proptest::option::of(any::<i64>())
        )
            .prop_map(|(key, tool, arguments, reason, deadline_ms)| {
                EventBody::ApprovalRequested(ApprovalRequested { key, tool, arguments, reason, deadline_ms })
            }),
        any::<u32>().prop_map(|failures| EventBody::Handoff(RunHandoff { failures })),
        proptest::option::of("\\PC{0,40}").prop_map(|reason| EventBody::Cancelled(RunCancelled { reason })),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    (
        run_id(),
        tenant(),
        any::<u64>(),
        any::<i64>(),
        any::<u32>(),
        proptest::option::of(worker_id()),
        proptest::option::of("[0-9a-f]{32}"),
        body(),
    )
        .prop_map(|(run_id, tenant, seq, ts_ms, attempt, worker_id, trace_id, body)| Event {
            run_id,
            tenant,
            seq,
            ts_ms,
            attempt,
            worker_id,
            trace_id,
            body,
        })
}

fn run_view() -> impl Strategy<Value = RunView> {
    (
        (run_id(), tenant(), agent(), queue(), 0u8..5, state(), any::<u32>(), any::<u32>()),
        (json(), proptest::option::of(json()), proptest::option::of(run_error())),
        (
            proptest::option::of("\\PC{1,20}"),
            proptest::option::of(worker_id()),
            any::<i64>(),
            any::<i64>(),
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (run_id, tenant, agent, queue, priority, state, attempt, max_attempts),
                (input, output, error),
                (idempotency_key, worker_id, created_ms, updated_ms, last_seq),
            )| RunView {
                run_id,
                tenant,
                agent,
                queue,
                priority,
                state,
                attempt,
                max_attempts,
                input,
                output,
                error,
                idempotency_key,
                worker_id,
                created_ms,
                updated_ms,
                last_seq,
            },
        )
}

fn roundtrip<T>(value: &T) -> Result<(), TestCaseError>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = encode(value).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back: T = decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, value);
    Ok(())
}

proptest! {
    #[test]
    fn events_roundtrip(e in event()) { roundtrip(&e)?; }

    #[test]
    fn jobs_roundtrip(run_id in run_id(), tenant in tenant(), agent in agent(), queue in queue(),
                      priority in 0u8..5, input in json(), max_attempts in any::<u32>(), created_us in any::<i64>(),
                      traceparent in proptest::option::of("00-[0-9a-f]{32}-[0-9a-f]{16}-01"),
                      created_seq in proptest::option::of(any::<u64>())) {
        roundtrip(&Job { run_id, tenant, agent, queue, priority, input, max_attempts, created_us, traceparent, created_seq })?;
    }

    #[test]
    fn checkpoints_roundtrip(run_id in run_id(), worker_id in worker_id(), index in any::<u32>(),
                             name in "\\PC{0,20}", attempt in any::<u32>(), token in any::<u64>(),
                             value in json(), blob in proptest::option::of(("\\PC{0,30}", any::<u64>()))) {
        let output = match blob {
            Some((object, size)) => StepOutput::Blob { object, size, sha256: "ab".repeat(32) },
            None => StepOutput::Inline { value },
        };
        roundtrip(&Checkpoint { run_id, index, name, attempt, worker_id: worker_id.clone(), fencing_token: token,
                                ts_ms: 5, duration_ms: 7, output })?;
        roundtrip(&Fence { run_id, attempt, worker_id, fencing_token: token, ts_ms: 9 })?;
    }

    #[test]
    fn leases_roundtrip(run_id in run_id(), worker_id in worker_id(), attempt in any::<u32>(),
                        acquired_ms in any::<i64>(), renewed_ms in any::<i64>()) {
        roundtrip(&Lease { run_id, worker_id, attempt, acquired_ms, renewed_ms })?;
    }

    #[test]
    fn worker_info_roundtrip(worker_id in worker_id(), queues in prop::collection::vec(queue(), 0..4),
                             agents in prop::collection::vec(token(), 0..4), slots in any::<u32>(),
                             running in any::<u32>(), version in "\\PC{0,10}", hostname in "\\PC{0,10}",
                             pid in any::<u32>(), started_ms in any::<i64>(), heartbeat_ms in any::<i64>()) {
        roundtrip(&WorkerInfo { worker_id, queues, agents, slots, running, version, hostname, pid, started_ms, heartbeat_ms })?;
    }

    #[test]
    fn api_requests_roundtrip(agent in "\\PC{0,20}", input in json(), queue in proptest::option::of("\\PC{0,10}"),
                              priority in proptest::option::of(any::<u8>()), key in proptest::option::of("\\PC{0,10}"),
                              max_attempts in proptest::option::of(any::<u32>()), run in "\\PC{0,40}",
                              after_seq in any::<u64>(), limit in proptest::option::of(any::<u32>())) {
        roundtrip(&SubmitRequest { agent, input, queue: queue.clone(), priority, idempotency_key: key.clone(), max_attempts })?;
        roundtrip(&GetRequest { run_id: run.clone() })?;
        roundtrip(&ListRequest { state: key, queue, agent: None, limit, cursor: Some(run.clone()) })?;
        roundtrip(&EventsRequest { run_id: run, after_seq, limit })?;
    }

    #[test]
    fn api_replies_roundtrip(view in run_view(), events in prop::collection::vec(event(), 0..4),
                             run_id in run_id(), state in state(), created in any::<bool>(),
                             code in error_code(), message in "\\PC{0,40}", field in proptest::option::of(token()),
                             cursor in proptest::option::of(token()), has_more in any::<bool>()) {
        roundtrip(&Reply::Ok(view.clone()))?;
        roundtrip(&Reply::<RunView>::Err(ApiError { code, message, field }))?;
        roundtrip(&Reply::Ok(SubmitResponse { run_id, state, created }))?;
        roundtrip(&Reply::Ok(ListResponse { runs: vec![view], next_cursor: cursor }))?;
        roundtrip(&Reply::Ok(EventsResponse { events, has_more }))?;
        roundtrip(&Reply::Ok(CancelResponse { run_id, state, cancelled: created }))?;
    }

    #[test]
    fn signals_and_control_roundtrip(run in "\\PC{0,40}", key in token(), key2 in signal_key(), payload in json(),
                                     reason in proptest::option::of("\\PC{0,40}"), ms in any::<i64>(),
                                     run_id in run_id(), state in state(), flags in any::<(bool, bool)>()) {
        roundtrip(&SignalRequest { run_id: run.clone(), key, payload: payload.clone() })?;
        roundtrip(&CancelRequest { run_id: run, reason: reason.clone() })?;
        roundtrip(&Reply::Ok(SignalResponse { run_id, key: key2, created: flags.0, woke: flags.1, state }))?;
        roundtrip(&signal::SignalRecord { payload: payload.clone(), received_ms: ms })?;
        roundtrip(&control::CancelRecord { reason: reason.clone(), requested_ms: ms })?;
        roundtrip(&signal::ApprovalDecision::Edit { input: payload })?;
        roundtrip(&signal::ApprovalDecision::Reject { reason })?;
    }
}

#[test]
fn event_wire_shape_is_flat_with_type_and_data() {
    let event = Event {
        run_id: RunId::generate(),
        tenant: TenantId::default_tenant(),
        seq: 3,
        ts_ms: 1,
        attempt: 1,
        worker_id: None,
        trace_id: None,
        body: EventBody::Completed(RunCompleted { output: serde_json::json!({"x": 1}) }),
    };
    let bytes = encode(&event).unwrap_or_else(|e| panic!("{e}"));
    let value: Value = rmp_serde::from_slice(&bytes).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(value["data"]["type"], "run.completed");
    assert_eq!(value["data"]["data"]["output"]["x"], 1);
    assert_eq!(value["data"]["seq"], 3);
}
