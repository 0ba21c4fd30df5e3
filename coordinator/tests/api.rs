//! The API against a real nats-server and a real SQLite registry.

#[allow(dead_code)]
#[path = "../../tests/harness/nats.rs"]
mod nats;

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::future::join_all;
use nats::NatsServer;
use runfleet_coordinator::{projector, Coordinator, CoordinatorConfig};
use runfleet_protocol::api::{
    EventsRequest, EventsResponse, GetRequest, ListRequest, ListResponse, Reply, RunView, SubmitRequest,
    SubmitResponse,
};
use runfleet_protocol::event::{Event, EventBody};
use runfleet_protocol::job::Job;
use runfleet_protocol::names::{
    API_VERBS, HEADER_CONTENT_TYPE, HEADER_ERROR_CODE, HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE, HEADER_MSG_ID,
    VERB_EVENTS, VERB_GET, VERB_LIST, VERB_SUBMIT,
};
use runfleet_protocol::{codec, ApiError, ErrorCode, Names, RunId, RunState, TenantId};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const MAX_INPUT_BYTES: usize = 1024;

struct Fixture {
    _server: NatsServer,
    _db: tempfile::TempDir,
    client: async_nats::Client,
    js: jetstream::Context,
    names: Names,
    registry: runfleet_coordinator::registry::Registry,
    shutdown: CancellationToken,
    coordinator: tokio::task::JoinHandle<Result<(), runfleet_coordinator::Error>>,
}

impl Fixture {
    async fn start() -> Self {
        if std::env::var_os("RUNFLEET_NATS_SERVER").is_none() {
            let local = concat!(env!("CARGO_MANIFEST_DIR"), "/../.tools/venv/bin/nats-server");
            std::env::set_var("RUNFLEET_NATS_SERVER", local);
        }
        let server = NatsServer::start();
        let db = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let config = CoordinatorConfig {
            nats_url: server.url(),
            database_url: format!("sqlite:{}", db.path().join("registry.db").display()),
            max_input_bytes: MAX_INPUT_BYTES,
            ..Default::default()
        };
        let coordinator = Coordinator::start(config).await.unwrap_or_else(|e| panic!("start: {e}"));
        let registry = coordinator.registry().clone();
        let shutdown = CancellationToken::new();
        let coordinator = tokio::spawn(coordinator.run(shutdown.clone()));
        let client = server.client().await;
        let js = jetstream::new(client.clone());
        Self {
            _server: server,
            _db: db,
            client,
            js,
            names: Names::default(),
            registry,
            shutdown,
            coordinator,
        }
    }

    fn subject(&self, tenant: &str, verb: &str) -> String {
        // Built by hand on purpose: tests send tenants that TenantId rejects.
        format!("{}.api.{tenant}.{verb}", self.names.prefix())
    }

    async fn raw(&self, tenant: &str, verb: &str, payload: Bytes) -> async_nats::Message {
        let request = self.client.request(self.subject(tenant, verb), payload);
        tokio::time::timeout(Duration::from_secs(10), request)
            .await
            .unwrap_or_else(|_| panic!("{verb} timed out"))
            .unwrap_or_else(|e| panic!("{verb}: {e}"))
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        tenant: &str,
        verb: &str,
        request: &Req,
    ) -> Result<Resp, ApiError> {
        let payload = codec::encode(request).unwrap_or_else(|e| panic!("{e}"));
        let reply = self.raw(tenant, verb, payload.into()).await;
        decode_reply(&reply)
    }

    async fn submit(&self, tenant: &str, request: &SubmitRequest) -> Result<SubmitResponse, ApiError> {
        self.call(tenant, VERB_SUBMIT, request).await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(10), self.coordinator)
            .await
            .unwrap_or_else(|_| panic!("coordinator did not stop"));
        result.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Decodes a reply, checking the headers every reply must carry.
fn decode_reply<Resp: DeserializeOwned>(reply: &async_nats::Message) -> Result<Resp, ApiError> {
    let headers = reply.headers.clone().unwrap_or_else(|| panic!("reply has no headers"));
    let content_type = headers.get(HEADER_CONTENT_TYPE).map(|v| v.as_str().to_owned());
    assert_eq!(content_type.as_deref(), Some(codec::CONTENT_TYPE));
    let reply: Reply<Resp> = codec::decode(&reply.payload).unwrap_or_else(|e| panic!("reply: {e}"));
    let result: Result<Resp, ApiError> = reply.into();
    let code_header = headers.get(HEADER_ERROR_CODE).map(|v| v.as_str().to_owned());
    assert_eq!(code_header, result.as_ref().err().map(|e| e.code.as_str().to_owned()));
    result
}

fn submit_request(input: serde_json::Value) -> SubmitRequest {
    SubmitRequest {
        agent: "echo".into(),
        input,
        queue: None,
        priority: None,
        idempotency_key: None,
        max_attempts: None,
    }
}

fn code<T: std::fmt::Debug>(result: Result<T, ApiError>) -> (ErrorCode, Option<String>) {
    match result {
        Err(error) => (error.code, error.field),
        Ok(value) => panic!("expected an error, got {value:?}"),
    }
}

fn tenant(name: &str) -> TenantId {
    TenantId::new(name).unwrap_or_else(|e| panic!("{e}"))
}

async fn events_of(fixture: &Fixture, subject: &str) -> Vec<Event> {
    let stream = fixture.js.get_stream(fixture.names.events_stream()).await.unwrap_or_else(|e| panic!("{e}"));
    let mut events = Vec::new();
    let mut seq = 0;
    while let Ok(message) = stream.direct_get_next_for_subject(subject, Some(seq)).await {
        seq = message.sequence + 1;
        events.extend(
            runfleet_protocol::event::decode_log_message(&message.payload).unwrap_or_else(|e| panic!("{e}")),
        );
    }
    events
}

async fn jobs_count(fixture: &Fixture) -> u64 {
    let mut stream =
        fixture.js.get_stream(fixture.names.jobs_stream()).await.unwrap_or_else(|e| panic!("{e}"));
    stream.info().await.unwrap_or_else(|e| panic!("{e}")).state.messages
}

#[tokio::test]
async fn submit_publishes_run_created_then_job() {
    let f = Fixture::start().await;
    let mut request = submit_request(json!({"text": "hello"}));
    request.queue = Some("gpu".into());
    request.priority = Some(1);
    let reply = f.submit("acme", &request).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(reply.created);
    assert_eq!(reply.state, RunState::Queued);

    let t = tenant("acme");
    let events = events_of(&f, &f.names.run_events(&t, reply.run_id)).await;
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].seq, events[0].attempt, events[0].worker_id.clone()), (1, 0, None));
    assert!(
        matches!(&events[0].body, EventBody::Created(c) if c.input == json!({"text": "hello"}) && c.priority == 1)
    );

    let queue = runfleet_protocol::QueueName::new("gpu").unwrap_or_else(|e| panic!("{e}"));
    let jobs = f.js.get_stream(f.names.jobs_stream()).await.unwrap_or_else(|e| panic!("{e}"));
    let job_msg = jobs
        .get_last_raw_message_by_subject(&f.names.job(&queue, 1, reply.run_id))
        .await
        .unwrap_or_else(|e| panic!("job: {e}"));
    let job: Job = codec::decode(&job_msg.payload).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((job.run_id, job.tenant, job.max_attempts), (reply.run_id, t.clone(), 3));
    let msg_id = job_msg.headers.get(HEADER_MSG_ID).map(|v| v.as_str().to_owned());
    assert_eq!(msg_id, Some(f.names.job_msg_id(reply.run_id, 0)));
    // The event is fenced on an empty log and carries no msg id: the fence
    // alone refuses a second `run.created`.
    let log = f.js.get_stream(f.names.events_stream()).await.unwrap_or_else(|e| panic!("{e}"));
    let created_msg = log
        .get_last_raw_message_by_subject(&f.names.run_events(&t, reply.run_id))
        .await
        .unwrap_or_else(|e| panic!("run.created: {e}"));
    assert!(created_msg.headers.get(HEADER_MSG_ID).is_none(), "{:?}", created_msg.headers);
    let fence = created_msg.headers.get(HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE).map(|v| v.as_str().to_owned());
    assert_eq!(fence.as_deref(), Some("0"));
    f.stop().await;
}

#[tokio::test]
async fn concurrent_identical_submits_make_one_run() {
    let f = Fixture::start().await;
    let mut request = submit_request(json!({"order": 42}));
    request.idempotency_key = Some("order-42".into());
    let replies = join_all((0..20).map(|_| f.submit("acme", &request))).await;
    let replies: Vec<SubmitResponse> =
        replies.into_iter().map(|r| r.unwrap_or_else(|e| panic!("{e}"))).collect();
    let run = replies[0].run_id;
    assert!(replies.iter().all(|r| r.run_id == run));
    assert_eq!(replies.iter().filter(|r| r.created).count(), 1);
    assert_eq!(events_of(&f, &f.names.run_events(&tenant("acme"), run)).await.len(), 1);
    assert_eq!(jobs_count(&f).await, 1);

    // A later retry answers with the same run and publishes nothing new.
    let again = f.submit("acme", &request).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((again.run_id, again.created), (run, false));
    assert_eq!(jobs_count(&f).await, 1);

    // The same key in another tenant is another run.
    let other = f.submit("globex", &request).await.unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(other.run_id, run);
    assert!(other.created);
    f.stop().await;
}

#[tokio::test]
async fn same_key_different_request_conflicts() {
    let f = Fixture::start().await;
    let mut first = submit_request(json!({"n": 1}));
    first.idempotency_key = Some("k".into());
    f.submit("acme", &first).await.unwrap_or_else(|e| panic!("{e}"));
    let mut second = first.clone();
    second.input = json!({"n": 2});
    assert_eq!(code(f.submit("acme", &second).await).0, ErrorCode::Conflict);
    let mut third = first.clone();
    third.priority = Some(0);
    assert_eq!(code(f.submit("acme", &third).await).0, ErrorCode::Conflict);
    f.stop().await;
}

#[tokio::test]
async fn malformed_requests_get_typed_replies_and_service_continues() {
    let f = Fixture::start().await;
    for verb in API_VERBS {
        for garbage in [&b"\xc1 not msgpack"[..], b"", b"\x93\x01\x02\x03"] {
            let reply = f.raw("acme", verb, Bytes::copy_from_slice(garbage)).await;
            let result: Result<serde_json::Value, ApiError> = decode_reply(&reply);
            assert_eq!(code(result).0, ErrorCode::MalformedRequest, "{verb} {garbage:?}");
        }
        // A valid envelope of the wrong shape is malformed too.
        let wrong = codec::encode(&json!({"nothing": true})).unwrap_or_else(|e| panic!("{e}"));
        let reply = f.raw("acme", verb, wrong.into()).await;
        let result: Result<serde_json::Value, ApiError> = decode_reply(&reply);
        if *verb != VERB_LIST {
            assert_eq!(code(result).0, ErrorCode::MalformedRequest, "{verb}");
        }
    }
    let ok = f.submit("acme", &submit_request(json!(null))).await;
    assert!(ok.is_ok(), "the coordinator keeps serving: {ok:?}");
    f.stop().await;
}

#[tokio::test]
async fn invalid_identifiers_are_invalid_arguments_naming_the_field() {
    let f = Fixture::start().await;
    let long = "x".repeat(65);
    for bad_tenant in [long.as_str(), "a*b", "t%nt", "é"] {
        let result = f.submit(bad_tenant, &submit_request(json!(1))).await;
        assert_eq!(code(result), (ErrorCode::InvalidArgument, Some("tenant".into())), "{bad_tenant}");
    }
    for bad in ["a.b", "a*", "a>", "", "a b", long.as_str()] {
        let mut request = submit_request(json!(1));
        request.queue = Some(bad.into());
        assert_eq!(
            code(f.submit("acme", &request).await),
            (ErrorCode::InvalidArgument, Some("queue".into()))
        );
        let mut request = submit_request(json!(1));
        request.agent = bad.into();
        assert_eq!(
            code(f.submit("acme", &request).await),
            (ErrorCode::InvalidArgument, Some("agent".into()))
        );
    }
    let result: Result<RunView, _> = f.call("acme", VERB_GET, &GetRequest { run_id: "nope".into() }).await;
    assert_eq!(code(result), (ErrorCode::InvalidArgument, Some("run_id".into())));
    let list = ListRequest { queue: Some("a.b".into()), ..Default::default() };
    let result: Result<ListResponse, _> = f.call("acme", VERB_LIST, &list).await;
    assert_eq!(code(result), (ErrorCode::InvalidArgument, Some("queue".into())));
    f.stop().await;
}

#[tokio::test]
async fn input_over_the_limit_is_payload_too_large() {
    let f = Fixture::start().await;
    let result = f.submit("acme", &submit_request(json!("x".repeat(MAX_INPUT_BYTES + 1)))).await;
    assert_eq!(code(result).0, ErrorCode::PayloadTooLarge);
    assert_eq!(jobs_count(&f).await, 0);
    f.stop().await;
}

#[tokio::test]
async fn unknown_runs_are_not_found() {
    let f = Fixture::start().await;
    let run_id = RunId::generate().to_string();
    let result: Result<RunView, _> = f.call("acme", VERB_GET, &GetRequest { run_id: run_id.clone() }).await;
    assert_eq!(code(result).0, ErrorCode::NotFound);
    let events = EventsRequest { run_id, after_seq: 0, limit: None };
    let result: Result<EventsResponse, _> = f.call("acme", VERB_EVENTS, &events).await;
    assert_eq!(code(result).0, ErrorCode::NotFound);

    // Another tenant's run does not exist either.
    let submitted = f.submit("acme", &submit_request(json!(1))).await.unwrap_or_else(|e| panic!("{e}"));
    let get = GetRequest { run_id: submitted.run_id.to_string() };
    let result: Result<RunView, _> = f.call("globex", VERB_GET, &get).await;
    assert_eq!(code(result).0, ErrorCode::NotFound);
    let view: RunView = f.call("acme", VERB_GET, &get).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((view.run_id, view.state), (submitted.run_id, RunState::Queued));
    f.stop().await;
}

/// Polls `list` until `run` shows up (the projector is asynchronous).
async fn wait_listed(f: &Fixture, tenant: &str, run: RunId) -> ListResponse {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let page: ListResponse =
            f.call(tenant, VERB_LIST, &ListRequest::default()).await.unwrap_or_else(|e| panic!("{e}"));
        if page.runs.iter().any(|r| r.run_id == run) {
            return page;
        }
        assert!(tokio::time::Instant::now() < deadline, "run {run} was never projected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn projector_projects_runs_and_skips_garbage() {
    let f = Fixture::start().await;
    let first = f.submit("acme", &submit_request(json!({"a": 1}))).await.unwrap_or_else(|e| panic!("{e}"));
    let page = wait_listed(&f, "acme", first.run_id).await;
    assert_eq!(page.runs[0].input, json!({"a": 1}));

    // Garbage on a run's event subject, and on a subject that is not one.
    let t = tenant("acme");
    let garbage_subject = f.names.run_events(&t, RunId::generate());
    for subject in [garbage_subject, format!("{}.runs.x", f.names.prefix())] {
        let ack =
            f.js.publish(subject, Bytes::from_static(b"\xc1garbage")).await.unwrap_or_else(|e| panic!("{e}"));
        ack.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let second = f.submit("acme", &submit_request(json!({"b": 2}))).await.unwrap_or_else(|e| panic!("{e}"));
    let page = wait_listed(&f, "acme", second.run_id).await;
    assert_eq!(page.runs.len(), 2);

    let events = EventsRequest { run_id: second.run_id.to_string(), after_seq: 0, limit: None };
    let events: EventsResponse = f.call("acme", VERB_EVENTS, &events).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(events.events.len(), 1);
    assert!(!events.has_more);

    // Garbage last in the stream: the stored position still moves past it,
    // so nothing is left to project.
    let ack =
        f.js.publish(f.names.run_events(&t, RunId::generate()), Bytes::from_static(b"\xc1garbage")).await;
    ack.unwrap_or_else(|e| panic!("{e}")).await.unwrap_or_else(|e| panic!("{e}"));
    let stream = f.js.get_stream(f.names.events_stream()).await.unwrap_or_else(|e| panic!("{e}"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let lag = projector::lag(&stream, &f.registry, &f.names).await.unwrap_or_else(|e| panic!("{e}"));
        if lag == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "projector stuck {lag} events behind");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f.stop().await;
}

#[tokio::test]
async fn two_coordinators_start_together() {
    if std::env::var_os("RUNFLEET_NATS_SERVER").is_none() {
        let local = concat!(env!("CARGO_MANIFEST_DIR"), "/../.tools/venv/bin/nats-server");
        std::env::set_var("RUNFLEET_NATS_SERVER", local);
    }
    let server = NatsServer::start();
    let db = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = |name: &str| CoordinatorConfig {
        nats_url: server.url(),
        database_url: format!("sqlite:{}", db.path().join(name).display()),
        ..Default::default()
    };
    let (a, b) = tokio::join!(Coordinator::start(config("a.db")), Coordinator::start(config("b.db")));
    a.unwrap_or_else(|e| panic!("{e}"));
    b.unwrap_or_else(|e| panic!("{e}"));
}

/// Once `start` returns, nats-server routes API requests to the replica: a
/// request sent before `run` begins waits for it instead of failing with "no
/// responders" (a caller that starts a coordinator and submits at once).
#[tokio::test]
async fn a_request_sent_right_after_start_is_answered() {
    if std::env::var_os("RUNFLEET_NATS_SERVER").is_none() {
        let local = concat!(env!("CARGO_MANIFEST_DIR"), "/../.tools/venv/bin/nats-server");
        std::env::set_var("RUNFLEET_NATS_SERVER", local);
    }
    let server = NatsServer::start();
    let db = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = CoordinatorConfig {
        nats_url: server.url(),
        database_url: format!("sqlite:{}", db.path().join("registry.db").display()),
        ..Default::default()
    };
    let coordinator = Coordinator::start(config).await.unwrap_or_else(|e| panic!("start: {e}"));
    let client = server.client().await;
    let names = Names::default();
    let payload = codec::encode(&submit_request(json!({"early": true}))).unwrap_or_else(|e| panic!("{e}"));
    let request = client.request(names.api(&tenant("acme"), VERB_SUBMIT), payload.into());
    let shutdown = CancellationToken::new();
    let run = async {
        // The request is at nats-server (queued for the replica) before the
        // replica reads anything.
        tokio::time::sleep(Duration::from_millis(300)).await;
        coordinator.run(shutdown.clone()).await
    };
    let answered = async {
        let reply = tokio::time::timeout(Duration::from_secs(10), request)
            .await
            .unwrap_or_else(|_| panic!("submit timed out"))
            .unwrap_or_else(|e| panic!("submit: {e}"));
        shutdown.cancel();
        reply
    };
    let (stopped, reply) = tokio::join!(run, answered);
    stopped.unwrap_or_else(|e| panic!("{e}"));
    let submitted: SubmitResponse = decode_reply(&reply).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(submitted.state, RunState::Queued);
}

/// An event that decodes and matches its subject but that the registry
/// refuses (here: seq 1 that is not `run.created`) must not stall the
/// projector, nor hold back the good events fetched in the same batch.
#[tokio::test]
async fn projector_skips_events_the_registry_refuses() {
    use runfleet_protocol::event::{RunCreated, RunStarted};
    use runfleet_protocol::{AgentName, QueueName};

    if std::env::var_os("RUNFLEET_NATS_SERVER").is_none() {
        let local = concat!(env!("CARGO_MANIFEST_DIR"), "/../.tools/venv/bin/nats-server");
        std::env::set_var("RUNFLEET_NATS_SERVER", local);
    }
    let server = NatsServer::start();
    let db = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = CoordinatorConfig {
        nats_url: server.url(),
        database_url: format!("sqlite:{}", db.path().join("registry.db").display()),
        ..Default::default()
    };
    // Start (topology and registry exist) but do not run yet, so the poison
    // and the good event are in the stream together and delivered in one
    // batch.
    let coordinator = Coordinator::start(config).await.unwrap_or_else(|e| panic!("start: {e}"));
    let registry = coordinator.registry().clone();
    let client = server.client().await;
    let js = jetstream::new(client);
    let names = Names::default();
    let t = tenant("acme");
    let event = |run_id: RunId, body: EventBody| Event {
        run_id,
        tenant: t.clone(),
        seq: 1,
        ts_ms: 1,
        attempt: 0,
        worker_id: None,
        trace_id: None,
        body,
    };
    let poison = event(RunId::generate(), EventBody::Started(RunStarted { delivery: 1 }));
    let good = event(
        RunId::generate(),
        EventBody::Created(RunCreated {
            agent: AgentName::new("echo").unwrap_or_else(|e| panic!("{e}")),
            queue: QueueName::default_queue(),
            priority: 2,
            input: json!({"ok": true}),
            max_attempts: 3,
            idempotency_key: None,
            traceparent: None,
        }),
    );
    for e in [&poison, &good] {
        let payload = codec::encode(e).unwrap_or_else(|e| panic!("{e}"));
        let ack = js.publish(names.run_events(&t, e.run_id), payload.into()).await;
        ack.unwrap_or_else(|e| panic!("{e}")).await.unwrap_or_else(|e| panic!("{e}"));
    }

    let shutdown = CancellationToken::new();
    let running = tokio::spawn(coordinator.run(shutdown.clone()));
    let events = js.get_stream(names.events_stream()).await.unwrap_or_else(|e| panic!("{e}"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let view = registry.get(&t, good.run_id).await.unwrap_or_else(|e| panic!("{e}"));
        // Settled: the stored position reached the stream's end.
        let lag = projector::lag(&events, &registry, &names).await.unwrap_or_else(|e| panic!("{e}"));
        if view.is_some() && lag == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "projector stalled: {view:?}, lag {lag}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(registry.get(&t, poison.run_id).await.unwrap_or_else(|e| panic!("{e}")).is_none());
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(10), running).await;
    stopped
        .unwrap_or_else(|_| panic!("coordinator did not stop"))
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
}
