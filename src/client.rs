//! A runfleet client: the API over NATS request/reply, and live event
//! following straight from the run's subject in JetStream.
//!
//! ```no_run
//! # async fn demo() -> Result<(), runfleet::client::Error> {
//! use runfleet::client::Client;
//! use runfleet_protocol::{api::SubmitRequest, TenantId};
//!
//! let client = Client::connect("nats://127.0.0.1:4222", TenantId::default_tenant(), Default::default()).await?;
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

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::push::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::{HeaderMap, RequestErrorKind};
use futures::{Stream, StreamExt, TryStreamExt};
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

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The coordinator answered with a typed error.
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("could not connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
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
            Self::Connect { .. } | Self::NoCoordinator { .. } | Self::Timeout { .. } => true,
            Self::Request { .. } | Self::JetStream(_) => true,
            Self::Decode(_) => false,
        }
    }
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
    /// Connects to NATS. Fails fast (a few seconds) when the server is unreachable.
    pub async fn connect(url: &str, tenant: TenantId, names: Names) -> Result<Self, Error> {
        let nats = async_nats::ConnectOptions::new()
            .name("runfleet-client")
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(Duration::from_secs(10)))
            .connect(url)
            .await
            .map_err(|e| Error::Connect { url: url.to_owned(), reason: e.to_string() })?;
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
        let subject = self.names.api(&self.tenant, verb);
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_CONTENT_TYPE, CONTENT_TYPE);
        let reply =
            self.nats.request_with_headers(subject.clone(), headers, payload.into()).await.map_err(|e| {
                match e.kind() {
                    RequestErrorKind::NoResponders => Error::NoCoordinator { subject: subject.clone() },
                    RequestErrorKind::TimedOut => Error::Timeout { subject: subject.clone() },
                    _ => Error::Request { subject: subject.clone(), reason: e.to_string() },
                }
            })?;
        Ok(reply.payload)
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
    /// written, ending after the terminal event. Reads the run's subject in
    /// the events stream through an ordered consumer, so nothing between
    /// replay and live delivery is missed.
    pub async fn watch(
        &self,
        run: RunId,
    ) -> Result<impl Stream<Item = Result<Event, Error>> + Send + 'static, Error> {
        let stream = self
            .js
            .get_stream(self.names.events_stream())
            .await
            .map_err(|e| Error::JetStream(e.to_string()))?;
        let consumer = stream
            .create_consumer(OrderedConfig {
                deliver_subject: self.nats.new_inbox(),
                filter_subject: self.names.run_events(&self.tenant, run),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::JetStream(e.to_string()))?;
        let messages = consumer.messages().await.map_err(|e| Error::JetStream(e.to_string()))?;
        let events = messages
            .map_err(|e| Error::JetStream(e.to_string()))
            .and_then(|message| async move { Ok(codec::decode::<Event>(&message.payload)?) });
        // Yield the terminal event, then end without waiting for another message.
        let events = Box::pin(events);
        Ok(futures::stream::unfold(Some(events), |state| async move {
            let mut events = state?;
            let item = events.next().await?;
            let terminal = matches!(&item, Ok(event) if event.body.is_terminal());
            Some((item, (!terminal).then_some(events)))
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
