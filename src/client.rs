//! A runfleet client: the API over NATS request/reply, and live event
//! following through the API and the run's subject.
//!
//! ```no_run
//! # async fn demo() -> Result<(), runfleet::client::Error> {
//! use runfleet::client::Client;
//! use runfleet_ops::nats::NatsConfig;
//! use runfleet_protocol::{api::SubmitRequest, TenantId};
//!
//! let nats = NatsConfig { user: Some("acme".into()), password: Some("secret".into()), ..Default::default() };
//! let client =
//!     Client::connect_with("nats://127.0.0.1:4222", &nats, TenantId::default_tenant(), Default::default()).await?;
//! let reply = client
//!     .submit(SubmitRequest {
//!         agent: "echo".into(),
//!         input: serde_json::json!({"hello": "world"}),
//!         queue: None,
//!         priority: None,
//!         idempotency_key: None,
//!         max_attempts: None,
//!     })
//!     .await?;
//! let last = client.wait(reply.run_id).await?;
//! println!("{} ended with {}", reply.run_id, last.body.type_name());
//! # Ok(()) }
//! ```
//!
//! A tenant's client needs nothing but its own API subjects, its own runs'
//! event subjects and its own inbox (`_INBOX.<tenant>` unless
//! `nats.inbox_prefix` says otherwise): it never calls the JetStream API,
//! so the shipped NATS configuration (`deploy/nats/tenants.conf`) gives a
//! tenant no access to JetStream at all. Only [`Client::workers`], an
//! operator's command, reads a bucket.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{HeaderMap, RequestErrorKind};
use futures::{Stream, StreamExt};
use runfleet_ops::nats::NatsConfig;
use runfleet_protocol::api::{
    CancelRequest, CancelResponse, EventsRequest, EventsResponse, GetRequest, ListRequest, ListResponse,
    Reply, RunView, SignalRequest, SignalResponse, SubmitRequest, SubmitResponse,
};
use runfleet_protocol::event::{ApprovalRequested, Event, EventBody};
use runfleet_protocol::limits::MAX_EVENTS_PAGE_SIZE;
use runfleet_protocol::names::{self, HEADER_CONTENT_TYPE};
use runfleet_protocol::worker::WorkerInfo;
use runfleet_protocol::{codec, ApiError, Names, RunId, TenantId, CONTENT_TYPE};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::Instrument as _;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The coordinator answered with a typed error.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// No connection: unreachable, refused credentials, failed TLS or
    /// contradictory `[nats]` options (see [`runfleet_ops::nats::Error`]).
    #[error("could not connect: {0}")]
    Connect(#[from] runfleet_ops::nats::Error),
    #[error("no coordinator is serving {subject}; is `runfleet coordinator` (or `runfleet dev`) running?")]
    NoCoordinator { subject: String },
    #[error("the coordinator did not answer on {subject} in time; retry later")]
    Timeout { subject: String },
    #[error("request on {subject} failed: {reason}")]
    Request { subject: String, reason: String },
    #[error("JetStream call failed: {0}")]
    JetStream(String),
    #[error("reply could not be decoded: {0}")]
    Decode(#[from] codec::Error),
}

impl Error {
    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Api(e) => e.code.is_retryable(),
            Self::Connect(e) => e.is_retryable(),
            Self::NoCoordinator { .. } | Self::Timeout { .. } => true,
            Self::Request { .. } | Self::JetStream(_) => true,
            Self::Decode(_) => false,
        }
    }
}

/// The connection name a client shows in the server's monitoring.
const CLIENT_NAME: &str = "runfleet-client";

/// The root of NATS's default reply subjects.
const INBOX_ROOT: &str = "_INBOX";

/// The reply-subject prefix a tenant's client uses by default:
/// `_INBOX.<tenant>`, so that the NATS server can let each tenant's user
/// read its own replies and no one else's.
pub fn tenant_inbox_prefix(tenant: &TenantId) -> String {
    format!("{INBOX_ROOT}.{tenant}")
}

/// A connection to a runfleet fleet, scoped to one tenant.
#[derive(Clone)]
pub struct Client {
    nats: async_nats::Client,
    js: jetstream::Context,
    names: Names,
    tenant: TenantId,
}

impl Client {
    /// Connects to NATS anonymously (see [`Client::connect_with`]).
    pub async fn connect(url: &str, tenant: TenantId, names: Names) -> Result<Self, Error> {
        Self::connect_with(url, &NatsConfig::default(), tenant, names).await
    }

    /// Connects to NATS with the `[nats]` credentials and TLS settings, once:
    /// an unreachable server fails within seconds, and refused credentials
    /// or a failed TLS handshake fail at once, each with an error that says
    /// which settings to check. Without `nats.inbox_prefix`, replies come
    /// to `_INBOX.<tenant>` ([`tenant_inbox_prefix`]), the only inbox a
    /// tenant's user may read under the shipped NATS configuration.
    pub async fn connect_with(
        url: &str,
        nats: &NatsConfig,
        tenant: TenantId,
        names: Names,
    ) -> Result<Self, Error> {
        let mut settings = nats.clone();
        if settings.inbox_prefix.is_none() {
            settings.inbox_prefix = Some(tenant_inbox_prefix(&tenant));
        }
        let nats = runfleet_ops::nats::connect(url, &settings, CLIENT_NAME).await?;
        Ok(Self::with_client(nats, tenant, names))
    }

    /// Wraps an existing NATS connection.
    pub fn with_client(nats: async_nats::Client, tenant: TenantId, names: Names) -> Self {
        let js = jetstream::new(nats.clone());
        Self { nats, js, names, tenant }
    }

    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// Sends raw bytes to an API verb and returns the raw reply payload. For
    /// clients that build their own requests (and for protocol tests).
    pub async fn request_raw(&self, verb: &str, payload: Vec<u8>) -> Result<bytes::Bytes, Error> {
        // The request's span; its context travels in the `traceparent` header
        // so the coordinator (and the run, for a submit) join this trace.
        let span = tracing::info_span!(
            "request",
            otel.name = %format!("runfleet {verb}"),
            otel.kind = "client",
            verb,
            tenant = %self.tenant,
        );
        async {
            let subject = self.names.api(&self.tenant, verb);
            let mut headers = HeaderMap::new();
            headers.insert(HEADER_CONTENT_TYPE, CONTENT_TYPE);
            runfleet_ops::telemetry::inject(&mut headers);
            let reply =
                self.nats.request_with_headers(subject.clone(), headers, payload.into()).await.map_err(
                    |e| match e.kind() {
                        RequestErrorKind::NoResponders => Error::NoCoordinator { subject: subject.clone() },
                        RequestErrorKind::TimedOut => Error::Timeout { subject: subject.clone() },
                        _ => Error::Request { subject: subject.clone(), reason: e.to_string() },
                    },
                )?;
            Ok(reply.payload)
        }
        .instrument(span)
        .await
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        verb: &str,
        request: &Req,
    ) -> Result<Resp, Error> {
        let payload = codec::encode(request)?;
        let reply = self.request_raw(verb, payload).await?;
        let reply: Reply<Resp> = codec::decode(&reply)?;
        Result::from(reply).map_err(Error::Api)
    }

    /// Submits a run. Returns once JetStream has stored it.
    pub async fn submit(&self, request: SubmitRequest) -> Result<SubmitResponse, Error> {
        self.call(names::VERB_SUBMIT, &request).await
    }

    /// One run, fresh (read from its last event when the registry lags).
    pub async fn get(&self, run: RunId) -> Result<RunView, Error> {
        self.call(names::VERB_GET, &GetRequest { run_id: run.to_string() }).await
    }

    /// A page of runs, newest first.
    pub async fn list(&self, request: ListRequest) -> Result<ListResponse, Error> {
        self.call(names::VERB_LIST, &request).await
    }

    /// A page of a run's events with `seq > after_seq`, from the registry.
    pub async fn events(
        &self,
        run: RunId,
        after_seq: u64,
        limit: Option<u32>,
    ) -> Result<EventsResponse, Error> {
        self.call(names::VERB_EVENTS, &EventsRequest { run_id: run.to_string(), after_seq, limit }).await
    }

    /// Sends `payload` to the run under `key`. The first signal for a key
    /// wins: repeating it is harmless (`created: false`), a different
    /// payload under the same key is a `conflict`. A run waiting on `key` is
    /// woken (`woke: true`); a run not waiting on it yet reads the signal
    /// when it gets there. A run that has ended answers `run_terminal`.
    pub async fn signal(
        &self,
        run: RunId,
        key: &str,
        payload: serde_json::Value,
    ) -> Result<SignalResponse, Error> {
        let request = SignalRequest { run_id: run.to_string(), key: key.to_owned(), payload };
        self.call(names::VERB_SIGNAL, &request).await
    }

    /// Cancels the run. A queued or waiting run is cancelled at once
    /// (`state: cancelled`); a running one is stopped by its worker within
    /// moments (`state: running`, `cancelled: true`: poll [`Client::get`]
    /// for the end); a run that already ended is left as it is
    /// (`cancelled: false`).
    pub async fn cancel(&self, run: RunId, reason: Option<String>) -> Result<CancelResponse, Error> {
        self.call(names::VERB_CANCEL, &CancelRequest { run_id: run.to_string(), reason }).await
    }

    /// The run's latest `approval.requested`, if it made one: what an
    /// approver decides on, and the key the decision goes under. Reads the
    /// registry's copy of the log, which may lag the run by milliseconds.
    pub async fn latest_approval_request(&self, run: RunId) -> Result<Option<ApprovalRequested>, Error> {
        let mut after_seq = 0;
        let mut latest = None;
        loop {
            let page = self.events(run, after_seq, Some(MAX_EVENTS_PAGE_SIZE)).await?;
            for event in &page.events {
                after_seq = after_seq.max(event.seq);
                if let EventBody::ApprovalRequested(request) = &event.body {
                    latest = Some(request.clone());
                }
            }
            if !page.has_more || page.events.is_empty() {
                return Ok(latest);
            }
        }
    }

    /// Every event of the run from seq 1, then live ones as they are
    /// written, ending after the terminal event. Fails at once for a run
    /// the coordinator does not know.
    ///
    /// The events themselves come from the API (`events`, in pages), so
    /// what is shown is exactly the run's log, in seq order, with no gap
    /// and no duplicate. The run's subject is only followed, with a plain
    /// subscription made before the first read, to learn at once that
    /// there is more to read: a message there is never shown itself, since
    /// it may be a write the server refused (a fenced-off worker's), and
    /// one missed (over a reconnect) only delays the watch by
    /// [`WATCH_RECHECK`]. Transient API failures (a coordinator
    /// restarting) are retried; the watch does not end before the run.
    ///
    /// This needs no JetStream access, so a tenant's NATS user needs
    /// nothing but its API subjects and read access to its runs' subjects.
    pub async fn watch(
        &self,
        run: RunId,
    ) -> Result<impl Stream<Item = Result<Event, Error>> + Send + 'static, Error> {
        let subject = self.names.run_events(&self.tenant, run);
        let subscribe_error = |reason: String| Error::Request { subject: subject.clone(), reason };
        let announcements =
            self.nats.subscribe(subject.clone()).await.map_err(|e| subscribe_error(e.to_string()))?;
        // Once the server has the subscription, every event is either in
        // the log the reads below see or announced on the subject.
        self.nats.flush().await.map_err(|e| subscribe_error(e.to_string()))?;
        let view = self.get(run).await?;
        let follow = Follow {
            client: self.clone(),
            run,
            announcements,
            next_seq: 1,
            known_seq: view.last_seq,
            ready: VecDeque::new(),
            catch_up_delay: WATCH_CATCH_UP_MIN,
            done: false,
        };
        Ok(futures::stream::unfold(follow, |mut follow| async move {
            let item = follow.next().await?;
            Some((item, follow))
        }))
    }

    /// Waits for the run's terminal event and returns it.
    pub async fn wait(&self, run: RunId) -> Result<Event, Error> {
        let mut events = Box::pin(self.watch(run).await?);
        let mut last = None;
        while let Some(event) = events.next().await {
            last = Some(event?);
        }
        match last {
            Some(event) if event.body.is_terminal() => Ok(event),
            _ => Err(Error::JetStream(format!("event stream of run {run} ended before a terminal event"))),
        }
    }

    /// The workers currently registered (heartbeating).
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, Error> {
        let kv = self
            .js
            .get_key_value(self.names.workers_bucket())
            .await
            .map_err(|e| Error::JetStream(e.to_string()))?;
        let mut keys = kv.keys().await.map_err(|e| Error::JetStream(e.to_string()))?;
        let mut workers = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| Error::JetStream(e.to_string()))?;
            if let Some(value) = kv.get(&key).await.map_err(|e| Error::JetStream(e.to_string()))? {
                workers.push(codec::decode::<WorkerInfo>(&value)?);
            }
        }
        workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        Ok(workers)
    }
}

/// How long a watch waits without news on the run's subject before it asks
/// the coordinator whether the run moved on (an announcement can be lost
/// over a reconnect).
pub const WATCH_RECHECK: Duration = Duration::from_secs(2);
/// The first and the longest pause between reads while a watch waits for
/// events it knows exist to reach the registry (or for a coordinator).
const WATCH_CATCH_UP_MIN: Duration = Duration::from_millis(20);
const WATCH_CATCH_UP_MAX: Duration = Duration::from_millis(500);

/// The state of one [`Client::watch`].
struct Follow {
    client: Client,
    run: RunId,
    /// The plain subscription to the run's subject: announcements only.
    announcements: async_nats::Subscriber,
    /// The seq of the next event to yield.
    next_seq: u64,
    /// The highest seq known to exist in the log (from `get`, a page that
    /// had more, or an announcement).
    known_seq: u64,
    /// Events read, in seq order from `next_seq`, not yet yielded.
    ready: VecDeque<Event>,
    catch_up_delay: Duration,
    /// The terminal event (or an error) has been yielded.
    done: bool,
}

impl Follow {
    async fn next(&mut self) -> Option<Result<Event, Error>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(event) = self.ready.pop_front() {
                self.next_seq = event.seq + 1;
                self.done = event.body.is_terminal();
                return Some(Ok(event));
            }
            if self.next_seq <= self.known_seq {
                match self.read_page().await {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(error) if error.is_retryable() => {}
                    Err(error) => return Some(self.fail(error)),
                }
                // The registry has not caught up with the log yet (or the
                // coordinator is away): pause, noting announcements.
                if let Err(error) = self.listen(Some(self.catch_up_delay)).await {
                    return Some(self.fail(error));
                }
                self.catch_up_delay = (self.catch_up_delay * 2).min(WATCH_CATCH_UP_MAX);
                continue;
            }
            match self.listen(None).await {
                Ok(true) => {}
                // Nothing announced for a while: ask for the run's last seq.
                Ok(false) => match self.client.get(self.run).await {
                    Ok(view) => self.known_seq = self.known_seq.max(view.last_seq),
                    Err(error) if error.is_retryable() => {}
                    Err(error) => return Some(self.fail(error)),
                },
                Err(error) => return Some(self.fail(error)),
            }
        }
    }

    fn fail(&mut self, error: Error) -> Result<Event, Error> {
        self.done = true;
        Err(error)
    }

    /// Reads the page after `next_seq - 1` and keeps its gapless start
    /// (replicated projectors may write a later event before an earlier
    /// one). Whether it found anything.
    async fn read_page(&mut self) -> Result<bool, Error> {
        let page = self.client.events(self.run, self.next_seq - 1, Some(MAX_EVENTS_PAGE_SIZE)).await?;
        let mut expected = self.next_seq;
        for event in page.events {
            if event.seq != expected {
                break;
            }
            expected += 1;
            self.ready.push_back(event);
        }
        let read_up_to = expected - 1;
        self.known_seq = self.known_seq.max(read_up_to + u64::from(page.has_more));
        if self.ready.is_empty() {
            return Ok(false);
        }
        self.catch_up_delay = WATCH_CATCH_UP_MIN;
        Ok(true)
    }

    /// Waits for announcements on the run's subject for `pause`, or (with
    /// `None`) until the first one or [`WATCH_RECHECK`]; whether one came.
    async fn listen(&mut self, pause: Option<Duration>) -> Result<bool, Error> {
        let deadline = tokio::time::Instant::now() + pause.unwrap_or(WATCH_RECHECK);
        let mut heard = false;
        loop {
            let message = match tokio::time::timeout_at(deadline, self.announcements.next()).await {
                Err(_elapsed) => return Ok(heard),
                Ok(message) => message,
            };
            let Some(message) = message else {
                return Err(Error::Request {
                    subject: self.client.names.run_events(&self.client.tenant, self.run),
                    reason: "the subscription ended (the connection was closed)".to_owned(),
                });
            };
            if let Ok(event) = runfleet_protocol::event::decode_last_of_log_message(&message.payload) {
                if event.run_id == self.run && event.seq > self.known_seq {
                    self.known_seq = event.seq;
                    heard = true;
                }
            }
            if heard && pause.is_none() {
                return Ok(true);
            }
        }
    }
}
