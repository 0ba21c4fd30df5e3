//! Signals, cancellation, timers and recovery against a real nats-server
//! and a real SQLite registry. No worker runs here: where a worker's write
//! is needed (a `run.waiting`, a held lease), the test makes it the way a
//! worker would.

#[allow(dead_code)]
#[path = "../../tests/harness/nats.rs"]
mod nats;

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use nats::NatsServer;
use runfleet_coordinator::{Coordinator, CoordinatorConfig};
use runfleet_protocol::api::{
    CancelRequest, CancelResponse, GetRequest, ListRequest, ListResponse, Reply, RunView, SignalRequest,
    SignalResponse, SubmitRequest, SubmitResponse,
};
use runfleet_protocol::control::CancelRecord;
use runfleet_protocol::event::{Event, EventBody, RunStarted, RunWaiting};
use runfleet_protocol::job::Job;
use runfleet_protocol::lease::Lease;
use runfleet_protocol::names::{
    HEADER_CONTENT_TYPE, HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE, HEADER_MSG_ID, HEADER_SCHEDULE,
    HEADER_SCHEDULE_TARGET, VERB_CANCEL, VERB_GET, VERB_LIST, VERB_SIGNAL, VERB_SUBMIT,
};
use runfleet_protocol::signal::SignalRecord;
use runfleet_protocol::{
    codec, time, AgentName, ApiError, ErrorCode, Names, QueueName, RunId, RunState, SignalKey, TenantId,
    WorkerId,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const MAX_SIGNAL_BYTES: usize = 1024;
/// A queue no worker serves: jobs published to it stay put.
const QUEUE: &str = "nobody";
const TENANT: &str = "acme";

fn use_local_nats_server() {
    if std::env::var_os("RUNFLEET_NATS_SERVER").is_none() {
        let local = concat!(env!("CARGO_MANIFEST_DIR"), "/../.tools/venv/bin/nats-server");
        std::env::set_var("RUNFLEET_NATS_SERVER", local);
    }
}

fn ok<T, E: std::fmt::Display>(result: Result<T, E>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}

struct Fixture {
    _server: NatsServer,
    _db: tempfile::TempDir,
    client: async_nats::Client,
    js: jetstream::Context,
    names: Names,
    tenant: TenantId,
    shutdown: CancellationToken,
    coordinator: tokio::task::JoinHandle<Result<(), runfleet_coordinator::Error>>,
}

impl Fixture {
    /// A coordinator whose recovery loop never finds anything to do within
    /// a test (default interval and minimum age).
    async fn start() -> Self {
        Self::start_with(|config| config).await
    }

    /// A coordinator whose recovery loop runs every 200 ms on runs idle for 500 ms.
    async fn with_fast_recovery() -> Self {
        Self::start_with(|config| CoordinatorConfig {
            recovery_interval: Duration::from_millis(200),
            recovery_min_age: Duration::from_millis(500),
            ..config
        })
        .await
    }

    async fn start_with(configure: impl FnOnce(CoordinatorConfig) -> CoordinatorConfig) -> Self {
        use_local_nats_server();
        let server = NatsServer::start();
        Self::start_on(server, configure).await
    }

    async fn start_on(
        server: NatsServer,
        configure: impl FnOnce(CoordinatorConfig) -> CoordinatorConfig,
    ) -> Self {
        let db = ok(tempfile::tempdir());
        let config = configure(CoordinatorConfig {
            nats_url: server.url(),
            database_url: format!("sqlite:{}", db.path().join("registry.db").display()),
            max_signal_bytes: MAX_SIGNAL_BYTES,
            ..Default::default()
        });
        let coordinator = Coordinator::start(config).await.unwrap_or_else(|e| panic!("start: {e}"));
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
            tenant: ok(TenantId::new(TENANT)),
            shutdown,
            coordinator,
        }
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        verb: &str,
        request: &Req,
    ) -> Result<Resp, ApiError> {
        let payload = ok(codec::encode(request));
        let subject = self.names.api(&self.tenant, verb);
        let reply =
            tokio::time::timeout(Duration::from_secs(10), self.client.request(subject, payload.into()))
                .await
                .unwrap_or_else(|_| panic!("{verb} timed out"))
                .unwrap_or_else(|e| panic!("{verb}: {e}"));
        let reply: Reply<Resp> = ok(codec::decode(&reply.payload));
        reply.into()
    }

    /// Submits a run to a queue no worker serves.
    async fn submit(&self) -> RunId {
        let request = SubmitRequest {
            agent: "echo".into(),
            input: json!({"n": 1}),
            queue: Some(QUEUE.into()),
            priority: Some(1),
            idempotency_key: None,
            max_attempts: None,
        };
        let reply: SubmitResponse = ok(self.call(VERB_SUBMIT, &request).await);
        reply.run_id
    }

    async fn signal(
        &self,
        run: RunId,
        key: &str,
        payload: serde_json::Value,
    ) -> Result<SignalResponse, ApiError> {
        let request = SignalRequest { run_id: run.to_string(), key: key.into(), payload };
        self.call(VERB_SIGNAL, &request).await
    }

    async fn cancel(&self, run: RunId, reason: Option<&str>) -> Result<CancelResponse, ApiError> {
        let request = CancelRequest { run_id: run.to_string(), reason: reason.map(str::to_owned) };
        self.call(VERB_CANCEL, &request).await
    }

    async fn jobs(&self) -> stream::Stream {
        ok(self.js.get_stream(self.names.jobs_stream()).await)
    }

    async fn events_stream(&self) -> stream::Stream {
        ok(self.js.get_stream(self.names.events_stream()).await)
    }

    fn job_subject(&self, run: RunId) -> String {
        self.names.job(&ok(QueueName::new(QUEUE)), 1, run)
    }

    /// How many messages the jobs stream holds on `subject`.
    async fn count(&self, subject: &str) -> usize {
        let jobs = self.jobs().await;
        let mut subjects = ok(jobs.info_with_subjects(subject).await);
        let mut total = 0;
        while let Some(entry) = subjects.next().await {
            let (name, count) = ok(entry);
            if name == subject {
                total += count;
            }
        }
        total
    }

    /// The newest job message for the run, if any.
    async fn job_message(&self, run: RunId) -> Option<async_nats::jetstream::message::StreamMessage> {
        self.jobs().await.get_last_raw_message_by_subject(&self.job_subject(run)).await.ok()
    }

    /// Removes the run's job, as a worker's ack (or an operator's purge) would.
    async fn purge_job(&self, run: RunId) {
        ok(self.jobs().await.purge().filter(self.job_subject(run)).await);
        assert_eq!(self.count(&self.job_subject(run)).await, 0);
    }

    async fn events(&self, run: RunId) -> Vec<Event> {
        let stream = self.events_stream().await;
        let subject = self.names.run_events(&self.tenant, run);
        let mut events = Vec::new();
        let mut seq = 0;
        while let Ok(message) = stream.direct_get_next_for_subject(&subject, Some(seq)).await {
            seq = message.sequence + 1;
            events.extend(ok(runfleet_protocol::event::decode_log_message(&message.payload)));
        }
        events
    }

    /// Appends an event the way a worker does: next seq, message id
    /// `<run>:<seq>`, expected last subject sequence.
    async fn append(&self, run: RunId, attempt: u32, body: EventBody) -> Event {
        let stream = self.events_stream().await;
        let subject = self.names.run_events(&self.tenant, run);
        let last_message = ok(stream.direct_get_last_for_subject(&subject).await);
        let last = ok(runfleet_protocol::event::decode_last_of_log_message(&last_message.payload));
        let event = Event {
            run_id: run,
            tenant: self.tenant.clone(),
            seq: last.seq + 1,
            ts_ms: time::now_ms(),
            attempt,
            worker_id: Some(ok(WorkerId::new("w-test"))),
            trace_id: None,
            body,
        };
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_CONTENT_TYPE, codec::CONTENT_TYPE);
        headers.insert(HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE, last_message.sequence.to_string().as_str());
        let ack = ok(self.js.publish_with_headers(subject, headers, ok(codec::encode(&event)).into()).await);
        ok(ack.await);
        event
    }

    /// Parks the run as a worker does: it starts, acks its job, writes
    /// `run.waiting`. Returns the waiting event.
    async fn park(&self, run: RunId, key: Option<&str>, deadline_ms: Option<i64>) -> Event {
        self.append(run, 1, EventBody::Started(RunStarted { delivery: 1 })).await;
        self.purge_job(run).await;
        let waiting = RunWaiting { key: key.map(|k| ok(SignalKey::new(k))), deadline_ms, failures: 0 };
        self.append(run, 1, EventBody::Waiting(waiting)).await
    }

    async fn kv(&self, bucket: String) -> async_nats::jetstream::kv::Store {
        ok(self.js.get_key_value(bucket).await)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(10), self.coordinator)
            .await
            .unwrap_or_else(|_| panic!("coordinator did not stop"));
        ok(ok(result));
    }
}

fn code<T: std::fmt::Debug>(result: Result<T, ApiError>) -> (ErrorCode, Option<String>) {
    match result {
        Err(error) => (error.code, error.field),
        Ok(value) => panic!("expected an error, got {value:?}"),
    }
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `secs`.
async fn eventually<T, F, Fut>(what: &str, secs: u64, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn msg_id(message: &async_nats::jetstream::message::StreamMessage) -> Option<String> {
    message.headers.get(HEADER_MSG_ID).map(|v| v.as_str().to_owned())
}

// ---- signal ----

#[tokio::test]
async fn signal_requests_are_validated() {
    let f = Fixture::start().await;
    let run = f.submit().await;
    let request = SignalRequest { run_id: "nope".into(), key: "k".into(), payload: json!(1) };
    let result: Result<SignalResponse, _> = f.call(VERB_SIGNAL, &request).await;
    assert_eq!(code(result), (ErrorCode::InvalidArgument, Some("run_id".into())));
    for bad_key in ["a.b", "a*", "", "a b"] {
        assert_eq!(
            code(f.signal(run, bad_key, json!(1)).await),
            (ErrorCode::InvalidArgument, Some("key".into())),
            "{bad_key:?}"
        );
    }
    assert_eq!(
        code(f.signal(run, "k", json!("x".repeat(MAX_SIGNAL_BYTES + 1))).await),
        (ErrorCode::PayloadTooLarge, Some("payload".into()))
    );
    assert_eq!(code(f.signal(RunId::generate(), "k", json!(1)).await).0, ErrorCode::NotFound);
    // Another tenant's run does not exist either.
    let other = ok(TenantId::new("globex"));
    let request = SignalRequest { run_id: run.to_string(), key: "k".into(), payload: json!(1) };
    let payload = ok(codec::encode(&request));
    let reply = ok(f.client.request(f.names.api(&other, VERB_SIGNAL), payload.into()).await);
    let reply: Reply<SignalResponse> = ok(codec::decode(&reply.payload));
    assert_eq!(code(Result::from(reply)).0, ErrorCode::NotFound);
    f.stop().await;
}

#[tokio::test]
async fn first_signal_wins_and_retries_are_idempotent() {
    let f = Fixture::start().await;
    let run = f.submit().await;
    let first = ok(f.signal(run, "approval", json!({"decision": "approve"})).await);
    assert_eq!((first.run_id, first.created, first.woke, first.state), (run, true, false, RunState::Queued));
    assert_eq!(first.key.as_str(), "approval");

    let retry = ok(f.signal(run, "approval", json!({"decision": "approve"})).await);
    assert_eq!((retry.created, retry.woke), (false, false));

    let other = f.signal(run, "approval", json!({"decision": "reject"})).await;
    assert_eq!(code(other), (ErrorCode::Conflict, Some("payload".into())));

    let signals = f.kv(f.names.signals_bucket()).await;
    let key = f.names.signal_key(run, &ok(SignalKey::new("approval")));
    let stored: SignalRecord =
        ok(codec::decode(&ok(signals.get(&key).await).unwrap_or_else(|| panic!("no signal"))));
    assert_eq!(stored.payload, json!({"decision": "approve"}));

    // A signal for a run that is not waiting yet adds no job.
    assert_eq!(f.count(&f.job_subject(run)).await, 1);
    f.stop().await;
}

#[tokio::test]
async fn signal_to_an_ended_run_is_refused() {
    let f = Fixture::start().await;
    let run = f.submit().await;
    ok(f.cancel(run, None).await);
    assert_eq!(code(f.signal(run, "k", json!(null)).await).0, ErrorCode::RunTerminal);
    f.stop().await;
}

#[tokio::test]
async fn signal_wakes_a_run_waiting_on_its_key_once() {
    let f = Fixture::start().await;
    let run = f.submit().await;
    let waiting = f.park(run, Some("approval"), None).await;
    assert_eq!(f.count(&f.job_subject(run)).await, 0);

    // A signal under another key is only stored.
    let other = ok(f.signal(run, "unrelated", json!(1)).await);
    assert_eq!((other.created, other.woke, other.state), (true, false, RunState::Waiting));
    assert_eq!(f.count(&f.job_subject(run)).await, 0);

    let reply = ok(f.signal(run, "approval", json!({"decision": "approve"})).await);
    assert_eq!((reply.created, reply.woke, reply.state), (true, true, RunState::Waiting));
    assert_eq!(f.count(&f.job_subject(run)).await, 1);
    let job = f.job_message(run).await.unwrap_or_else(|| panic!("no wake job"));
    assert_eq!(msg_id(&job), Some(f.names.wake_msg_id(run, waiting.seq)));
    let job: Job = ok(codec::decode(&job.payload));
    assert_eq!((job.run_id, job.tenant.clone(), job.input), (run, f.tenant.clone(), json!({"n": 1})));
    assert_eq!((job.queue.as_str(), job.priority), (QUEUE, 1));

    // The retried signal, and the worker's own wake publish (same id), add nothing.
    let retry = ok(f.signal(run, "approval", json!({"decision": "approve"})).await);
    assert_eq!((retry.created, retry.woke), (false, true));
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_MSG_ID, f.names.wake_msg_id(run, waiting.seq).as_str());
    let ack = ok(f.js.publish_with_headers(f.job_subject(run), headers, Bytes::new()).await);
    assert!(ok(ack.await).duplicate);
    assert_eq!(f.count(&f.job_subject(run)).await, 1);

    // The registry knows the waiting state.
    let page: ListResponse = eventually("the waiting run listed", 20, || async {
        let request = ListRequest { state: Some("waiting".into()), ..Default::default() };
        let page: ListResponse = ok(f.call(VERB_LIST, &request).await);
        page.runs.iter().any(|r| r.run_id == run).then_some(page)
    })
    .await;
    assert!(page.runs.iter().all(|r| r.state == RunState::Waiting));
    f.stop().await;
}

// ---- cancel ----

#[tokio::test]
async fn cancel_ends_a_queued_run_without_a_worker() {
    let f = Fixture::start().await;
    let run = f.submit().await;
    assert_eq!(f.count(&f.job_subject(run)).await, 1);

    let reply = ok(f.cancel(run, Some("changed my mind")).await);
    assert_eq!((reply.run_id, reply.state, reply.cancelled), (run, RunState::Cancelled, true));
    assert_eq!(f.count(&f.job_subject(run)).await, 0, "the job is removed");
    let events = f.events(run).await;
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert!(
        matches!(&events[1].body, EventBody::Cancelled(c) if c.reason.as_deref() == Some("changed my mind"))
    );
    assert_eq!(events[1].worker_id, None);
    let leases = f.kv(f.names.leases_bucket()).await;
    assert_eq!(ok(leases.get(f.names.lease_key(run)).await), None, "the coordinator let go of the lease");

    // Cancelling again is a no-op that reports the end.
    let again = ok(f.cancel(run, None).await);
    assert_eq!((again.state, again.cancelled), (RunState::Cancelled, false));
    assert_eq!(f.events(run).await.len(), 2);

    // The registry and `get` show the cancellation as the run's error.
    let view: RunView = eventually("the cancelled run projected", 20, || async {
        let request = ListRequest { state: Some("cancelled".into()), ..Default::default() };
        let page: ListResponse = ok(f.call(VERB_LIST, &request).await);
        page.runs.into_iter().find(|r| r.run_id == run)
    })
    .await;
    let error = view.error.unwrap_or_else(|| panic!("no error on a cancelled run"));
    assert_eq!((error.code, error.message.as_str()), (ErrorCode::Cancelled, "cancelled: changed my mind"));
    let got: RunView = ok(f.call(VERB_GET, &GetRequest { run_id: run.to_string() }).await);
    assert_eq!(got.state, RunState::Cancelled);
    f.stop().await;
}

#[tokio::test]
async fn cancel_ends_a_waiting_run_and_its_timer() {
    let f = Fixture::start().await;
    let run = f.submit().await;
    let deadline = time::now_ms() + 3_600_000;
    f.park(run, Some("approval"), Some(deadline)).await;
    // The worker armed the run's timer when it parked it.
    publish_timer(&f, run, deadline).await;
    assert_eq!(f.count(&f.names.run_timer(run)).await, 1);

    let reply = ok(f.cancel(run, None).await);
    assert_eq!((reply.state, reply.cancelled), (RunState::Cancelled, true));
    assert_eq!(f.count(&f.names.run_timer(run)).await, 0, "the timer is removed");
    let events = f.events(run).await;
    assert_eq!(events.iter().filter(|e| e.body.is_terminal()).count(), 1);
    assert!(matches!(events.last().map(|e| &e.body), Some(EventBody::Cancelled(_))));
    f.stop().await;
}

#[tokio::test]
async fn cancel_of_an_unknown_run_is_not_found() {
    let f = Fixture::start().await;
    assert_eq!(code(f.cancel(RunId::generate(), None).await).0, ErrorCode::NotFound);
    let request = CancelRequest { run_id: "nope".into(), reason: None };
    let result: Result<CancelResponse, _> = f.call(VERB_CANCEL, &request).await;
    assert_eq!(code(result), (ErrorCode::InvalidArgument, Some("run_id".into())));
    f.stop().await;
}

/// Takes the run's lease as a worker claiming it would.
async fn hold_lease(f: &Fixture, run: RunId) -> u64 {
    let leases = f.kv(f.names.leases_bucket()).await;
    let now = time::now_ms();
    let lease = Lease {
        run_id: run,
        worker_id: ok(WorkerId::new("w-test")),
        attempt: 1,
        acquired_ms: now,
        renewed_ms: now,
    };
    ok(leases.create(f.names.lease_key(run), ok(codec::encode(&lease)).into()).await)
}

#[tokio::test]
async fn cancel_of_a_leased_run_asks_its_worker() {
    let f = Fixture::start().await;
    let run = f.submit().await;
    hold_lease(&f, run).await;

    let reply = ok(f.cancel(run, Some("stop")).await);
    assert_eq!((reply.state, reply.cancelled), (RunState::Running, true));
    let control = f.kv(f.names.control_bucket()).await;
    let record =
        ok(control.get(f.names.control_key(run)).await).unwrap_or_else(|| panic!("no control record"));
    let record: CancelRecord = ok(codec::decode(&record));
    assert_eq!(record.reason.as_deref(), Some("stop"));
    assert_eq!(f.events(run).await.len(), 1, "the worker writes run.cancelled, not the coordinator");
    assert_eq!(f.count(&f.job_subject(run)).await, 1, "the worker's job is left alone");
    f.stop().await;
}

/// Many cancels at once, racing each other: one terminal event.
#[tokio::test]
async fn concurrent_cancels_write_one_terminal_event() {
    let f = Fixture::start().await;
    let run = f.submit().await;
    let replies = futures::future::join_all((0..10).map(|_| f.cancel(run, None))).await;
    for reply in replies {
        let reply = ok(reply);
        assert!(
            matches!(reply.state, RunState::Cancelled | RunState::Running),
            "unexpected state {}",
            reply.state
        );
    }
    // A cancel that found another one's lease reports `running`; the log
    // still ends with exactly one run.cancelled.
    let events = f.events(run).await;
    assert_eq!(events.iter().filter(|e| e.body.is_terminal()).count(), 1);
    assert_eq!(events.len(), 2);
    f.stop().await;
}

// ---- timers ----

/// Publishes the run's timer the way a worker does.
async fn publish_timer(f: &Fixture, run: RunId, at_ms: i64) {
    let job = Job {
        run_id: run,
        tenant: f.tenant.clone(),
        agent: ok(AgentName::new("echo")),
        queue: ok(QueueName::new(QUEUE)),
        priority: 1,
        input: json!({"timer": true}),
        max_attempts: 3,
        created_us: 0,
        traceparent: None,
        created_seq: None,
    };
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_CONTENT_TYPE, codec::CONTENT_TYPE);
    headers.insert(HEADER_SCHEDULE, format!("@at {}", time::rfc3339_ms(at_ms)).as_str());
    headers.insert(HEADER_SCHEDULE_TARGET, f.job_subject(run).as_str());
    let ack =
        ok(f.js.publish_with_headers(f.names.run_timer(run), headers, ok(codec::encode(&job)).into()).await);
    ok(ack.await);
}

#[tokio::test]
async fn timers_fire_onto_the_job_subject_and_purging_cancels_them() {
    let f = Fixture::start().await;
    let jobs = f.jobs().await;
    assert!(jobs.cached_info().config.allow_message_schedules);

    // Seconds ahead, so that the count and the purge below come before
    // either is due even on a loaded machine.
    let fired = RunId::generate();
    publish_timer(&f, fired, time::now_ms() + 3_000).await;
    let cancelled = RunId::generate();
    let cancelled_at = time::now_ms() + 4_000;
    publish_timer(&f, cancelled, cancelled_at).await;
    assert_eq!(f.count(&f.names.run_timer(fired)).await, 1);
    ok(jobs.purge().filter(f.names.run_timer(cancelled)).await);

    let job = eventually("the timer to fire", 20, || f.job_message(fired)).await;
    let job: Job = ok(codec::decode(&job.payload));
    assert_eq!((job.run_id, job.input), (fired, json!({"timer": true})));
    assert_eq!(f.count(&f.names.run_timer(fired)).await, 0, "a fired timer is gone");

    // Well past the purged timer's time.
    let past = u64::try_from(cancelled_at + 1_500 - time::now_ms()).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(past)).await;
    assert_eq!(f.count(&f.job_subject(cancelled)).await, 0, "a purged timer never fires");
    f.stop().await;
}

#[tokio::test]
async fn an_existing_jobs_stream_gains_timers() {
    use_local_nats_server();
    let server = NatsServer::start();
    let names = Names::default();
    // The jobs stream as an earlier version created it.
    let js = jetstream::new(server.client().await);
    let mut old = runfleet_coordinator::setup::jobs_stream_config(&names);
    old.subjects = vec![names.jobs_stream_subjects()];
    old.allow_message_schedules = false;
    ok(js.create_stream(old).await);

    let f = Fixture::start_on(server, |config| config).await;
    let info = f.jobs().await.cached_info().config.clone();
    assert!(info.allow_message_schedules);
    assert!(info.subjects.contains(&f.names.timers_stream_subjects()));
    f.stop().await;
}

// ---- recovery ----

#[tokio::test]
async fn recovery_redispatches_a_run_nothing_owns() {
    let f = Fixture::with_fast_recovery().await;
    let run = f.submit().await;
    let owned = f.submit().await;
    f.purge_job(run).await;

    let job = eventually("the run to be re-dispatched", 20, || f.job_message(run)).await;
    assert_eq!(msg_id(&job), Some(f.names.recovery_msg_id(run, 1)));
    let job: Job = ok(codec::decode(&job.payload));
    assert_eq!((job.run_id, job.input), (run, json!({"n": 1})));

    // A run that has its job is left alone.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(f.count(&f.job_subject(owned)).await, 1);
    assert_eq!(f.count(&f.job_subject(run)).await, 1);
    f.stop().await;
}

#[tokio::test]
async fn recovery_moves_waiting_runs_whose_timer_or_wake_is_missing() {
    let f = Fixture::with_fast_recovery().await;
    // Due: its deadline passed and no timer fired.
    let due = f.submit().await;
    let due_wait = f.park(due, None, Some(time::now_ms() - 1_000)).await;
    // Not due yet: its timer is missing and is re-armed.
    let later = f.submit().await;
    f.park(later, None, Some(time::now_ms() + 3_600_000)).await;
    // Its signal arrived while nobody woke it.
    let signalled = f.submit().await;
    let signalled_wait = f.park(signalled, Some("go"), None).await;
    let signals = f.kv(f.names.signals_bucket()).await;
    let record = SignalRecord { payload: json!(true), received_ms: time::now_ms() };
    ok(signals
        .create(f.names.signal_key(signalled, &ok(SignalKey::new("go"))), ok(codec::encode(&record)).into())
        .await);
    // Owned by the signal it waits for.
    let parked = f.submit().await;
    f.park(parked, Some("never"), None).await;
    // Owned by its lease.
    let leased = f.submit().await;
    f.purge_job(leased).await;
    hold_lease(&f, leased).await;

    let job = eventually("the due run's job", 20, || f.job_message(due)).await;
    assert_eq!(msg_id(&job), Some(f.names.recovery_msg_id(due, due_wait.seq)));
    let job = eventually("the signalled run's wake job", 20, || f.job_message(signalled)).await;
    assert_eq!(msg_id(&job), Some(f.names.recovery_msg_id(signalled, signalled_wait.seq)));
    eventually("the re-armed timer", 20, || async {
        (f.count(&f.names.run_timer(later)).await == 1).then_some(())
    })
    .await;

    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(f.count(&f.job_subject(later)).await, 0);
    assert_eq!(f.count(&f.job_subject(parked)).await, 0);
    assert_eq!(f.count(&f.names.run_timer(parked)).await, 0);
    assert_eq!(f.count(&f.job_subject(leased)).await, 0);
    assert_eq!(f.count(&f.job_subject(due)).await, 1);
    f.stop().await;
}

#[tokio::test]
async fn recovery_finishes_a_cancel_nobody_carried_out() {
    let f = Fixture::with_fast_recovery().await;
    let run = f.submit().await;
    let revision = hold_lease(&f, run).await;
    let reply = ok(f.cancel(run, Some("stop")).await);
    assert_eq!(reply.state, RunState::Running);
    // The worker let go of the run without ending it (it parked it, or died).
    let leases = f.kv(f.names.leases_bucket()).await;
    ok(leases.delete_expect_revision(f.names.lease_key(run), Some(revision)).await);

    let events = eventually("run.cancelled", 20, || async {
        let events = f.events(run).await;
        events.last().is_some_and(|e| e.body.is_terminal()).then_some(events)
    })
    .await;
    assert!(matches!(&events[1].body, EventBody::Cancelled(c) if c.reason.as_deref() == Some("stop")));
    assert_eq!(events.len(), 2);
    f.stop().await;
}

#[tokio::test]
async fn jobs_past_max_deliveries_are_redispatched() {
    let f = Fixture::start().await;
    let run = f.submit().await;
    let jobs = f.jobs().await;
    let stuck_seq = f.job_message(run).await.unwrap_or_else(|| panic!("no job")).sequence;
    // A consumer that gives up after one delivery, as a misconfigured worker might.
    let queue = ok(QueueName::new(QUEUE));
    let consumer: consumer::PullConsumer = ok(jobs
        .create_consumer(consumer::pull::Config {
            durable_name: Some("stingy".into()),
            filter_subject: f.names.job_band_filter(&queue, 1),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_millis(300),
            max_deliver: 1,
            ..Default::default()
        })
        .await);
    let mut batch = ok(consumer.fetch().max_messages(1).messages().await);
    let message = ok(batch.next().await.unwrap_or_else(|| panic!("no delivery")));
    assert_eq!(ok(message.info()).stream_sequence, stuck_seq);
    drop(message); // never acked

    let job = eventually("the stuck job to be replaced", 20, || async {
        f.job_message(run).await.filter(|m| m.sequence != stuck_seq)
    })
    .await;
    assert_eq!(msg_id(&job), Some(f.names.recovery_msg_id(run, 1)));
    eventually("the stuck job to be deleted", 10, || async {
        jobs.get_raw_message(stuck_seq).await.is_err().then_some(())
    })
    .await;
    assert_eq!(f.count(&f.job_subject(run)).await, 1);
    f.stop().await;
}
