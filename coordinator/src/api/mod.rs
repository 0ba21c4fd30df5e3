//! The API service: `<prefix>.api.<tenant>.<verb>` over NATS request/reply.
//!
//! The coordinator registers a NATS micro-service ([`SERVICE_NAME`]) in the
//! [`API_QUEUE_GROUP`], so replicas share the load and `nats micro` tools see
//! it. Every request gets a reply, an envelope around [`Reply`], even when
//! the tenant, the payload or a field is invalid; replies always carry the
//! `Content-Type` header, and error replies also carry
//! [`HEADER_ERROR_CODE`] so a client can branch without decoding.
//!
//! Requests are handled concurrently, at most `api_concurrency` at a time per
//! replica; when that many are in flight the replica stops reading its
//! subscription until one finishes.

mod control;
mod read;
mod submit;

use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::{self, kv};
use async_nats::service::{Request, ServiceExt};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use runfleet_ops::redact::Redactor;
use runfleet_ops::telemetry;
use runfleet_protocol::api::{self, Reply};
use runfleet_protocol::names::{
    API_QUEUE_GROUP, API_VERBS, HEADER_CONTENT_TYPE, HEADER_ERROR_CODE, SERVICE_NAME, VERB_CANCEL,
    VERB_EVENTS, VERB_GET, VERB_LIST, VERB_SIGNAL, VERB_SUBMIT,
};
use runfleet_protocol::{codec, ApiError, ErrorCode, Names, TenantId};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::registry::Registry;
use crate::runs::{self, Runs};
use crate::setup::Topology;

/// The API service could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not start the {SERVICE_NAME} API service: {0}")]
    Service(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("could not add the API endpoint {subject}: {source}")]
    Endpoint {
        subject: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("nats-server did not confirm the API subscriptions: {0}")]
    Confirm(#[from] runfleet_ops::nats::RoundTripError),
}

/// The API's subscriptions, in place at nats-server: what [`Api::listen`]
/// returns and [`Api::run`] serves.
pub struct Listening {
    service: async_nats::service::Service,
    endpoints: Vec<(&'static str, async_nats::service::endpoint::Endpoint)>,
}

impl std::fmt::Debug for Listening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verbs: Vec<_> = self.endpoints.iter().map(|(verb, _)| *verb).collect();
        f.debug_struct("Listening").field("verbs", &verbs).finish_non_exhaustive()
    }
}

/// How long [`Api::listen`] waits for nats-server to confirm the
/// subscriptions.
const ROUND_TRIP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Limits and defaults the API applies to requests.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Largest accepted run input, in encoded bytes.
    pub max_input_bytes: usize,
    /// `max_attempts` of a run whose submitter names none.
    pub default_max_attempts: u32,
    /// Largest accepted signal payload, in encoded bytes.
    pub max_signal_bytes: usize,
    /// Most requests handled at once.
    pub concurrency: usize,
}

/// The API service. Cheap to clone; [`Api::listen`] subscribes and
/// [`Api::run`] serves until cancelled.
#[derive(Clone, Debug)]
pub struct Api {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    names: Names,
    runs: Runs,
    idempotency: kv::Store,
    /// Real jobs of runs whose `run.created` input was redacted.
    inputs: kv::Store,
    registry: Registry,
    limits: ApiLimits,
    redactor: Redactor,
}

impl Api {
    /// `redactor` cleans the run inputs in `run.created` events (the job
    /// keeps the real input for the worker).
    pub fn new(
        client: async_nats::Client,
        names: Names,
        topology: &Topology,
        registry: Registry,
        limits: ApiLimits,
        redactor: Redactor,
    ) -> Self {
        let js = jetstream::new(client.clone());
        let runs = Runs::new(js.clone(), names.clone(), topology);
        let inner = Inner {
            client,
            js,
            names,
            runs,
            idempotency: topology.idempotency.clone(),
            inputs: topology.inputs.clone(),
            registry,
            limits,
            redactor,
        };
        Self { inner: Arc::new(inner) }
    }

    /// Registers the service and subscribes to every verb, then waits for a
    /// round trip, so when this returns nats-server routes requests to this
    /// replica (they queue until [`Api::run`] reads them). A caller that
    /// starts a coordinator and sends a request at once gets an answer,
    /// never "no responders".
    pub async fn listen(&self) -> Result<Listening, Error> {
        let service = self
            .inner
            .client
            .service_builder()
            .description("runfleet coordinator API")
            .queue_group(API_QUEUE_GROUP)
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(Error::Service)?;
        let mut endpoints = Vec::with_capacity(API_VERBS.len());
        for verb in API_VERBS.iter().copied() {
            let subject = self.inner.names.api_endpoint(verb);
            let endpoint = service
                .endpoint_builder()
                .name(verb)
                .add(subject.clone())
                .await
                .map_err(|source| Error::Endpoint { subject, source })?;
            endpoints.push((verb, endpoint));
        }
        runfleet_ops::nats::round_trip(&self.inner.client, ROUND_TRIP_TIMEOUT).await?;
        Ok(Listening { service, endpoints })
    }

    /// Serves every verb of `listening` until `shutdown` is cancelled, then
    /// unsubscribes (queued requests go to other replicas), stops the
    /// service and waits for the requests in flight to be answered.
    pub async fn run(self, listening: Listening, shutdown: CancellationToken) -> Result<(), Error> {
        let Listening { service, endpoints } = listening;
        let endpoints =
            endpoints.into_iter().map(|(verb, endpoint)| endpoint.map(move |request| (verb, request)));
        info!(verbs = ?API_VERBS, concurrency = self.inner.limits.concurrency, "api serving");
        let in_flight = self.serve(futures::stream::select_all(endpoints), &shutdown).await;
        if let Err(error) = service.stop().await {
            debug!(error = %error, "api service stop reported an error");
        }
        wait_for(in_flight).await;
        info!("api stopped");
        Ok(())
    }

    /// Reads requests and spawns a handler per request, bounded by the
    /// concurrency limit. Returns the handlers still running at shutdown;
    /// the subscriptions are dropped (unsubscribed) on return.
    async fn serve(
        &self,
        mut requests: impl futures::Stream<Item = (&'static str, Request)> + Unpin,
        shutdown: &CancellationToken,
    ) -> JoinSet<()> {
        let permits = Arc::new(Semaphore::new(self.inner.limits.concurrency));
        let mut tasks = JoinSet::new();
        loop {
            let permit = tokio::select! {
                () = shutdown.cancelled() => break,
                permit = permits.clone().acquire_owned() => permit,
            };
            let Ok(permit) = permit else { break };
            let next = tokio::select! {
                () = shutdown.cancelled() => break,
                next = requests.next() => next,
            };
            let Some((verb, request)) = next else {
                warn!("api subscriptions ended");
                break;
            };
            let api = self.clone();
            tasks.spawn(async move {
                api.handle(verb, request).await;
                drop(permit);
            });
            // Reap finished handlers; a panic is a bug worth a log line, as in
            // `wait_for` (the request itself got no reply).
            while let Some(result) = tasks.try_join_next() {
                if let Err(error) = result {
                    warn!(error = %error, "api request handler panicked");
                }
            }
        }
        tasks
    }

    /// Answers one request; never fails (a failure to send the reply is
    /// logged). The request's span joins the caller's trace when the request
    /// carries a `traceparent` header.
    async fn handle(&self, verb: &'static str, request: Request) {
        let token = self.inner.names.api_tenant_token(request.message.subject.as_str()).unwrap_or_default();
        let span = info_span!("api", otel.name = %format!("runfleet.api.{verb}"), otel.kind = "server", verb, tenant = token);
        telemetry::set_parent_from_headers(&span, request.message.headers.as_ref());
        // Boxed: inline, the verbs' futures made every request's task about
        // 6 KB, which tokio copies whole when it spawns the task and again
        // when it ends.
        Box::pin(self.answer(verb, request)).instrument(span).await;
    }

    async fn answer(&self, verb: &'static str, request: Request) {
        let started = Instant::now();
        let subject = request.message.subject.as_str();
        let token = self.inner.names.api_tenant_token(subject).unwrap_or_default();
        let payload = &request.message.payload;
        let (body, code) = match verb {
            VERB_SUBMIT => encode_reply(self.decode_then(verb, token, payload, Self::submit).await),
            VERB_GET => encode_reply(self.decode_then(verb, token, payload, Self::get).await),
            VERB_LIST => encode_reply(self.decode_then(verb, token, payload, Self::list).await),
            VERB_EVENTS => encode_reply(self.decode_then(verb, token, payload, Self::events).await),
            VERB_SIGNAL => encode_reply(self.decode_then(verb, token, payload, Self::signal).await),
            VERB_CANCEL => encode_reply(self.decode_then(verb, token, payload, Self::cancel).await),
            other => encode_reply::<()>(Err(ApiError::new(
                ErrorCode::Internal,
                format!("verb {other} has no handler"),
            ))),
        };
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_CONTENT_TYPE, codec::CONTENT_TYPE);
        if let Some(code) = code {
            headers.insert(HEADER_ERROR_CODE, code.as_str());
        }
        let elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        match code {
            Some(code) => {
                debug!(verb, tenant = token, error_code = %code, elapsed_us, "api request failed")
            }
            None => debug!(verb, tenant = token, elapsed_us, "api request served"),
        }
        if let Err(error) = request.respond_with_headers(Ok(body), headers).await {
            warn!(verb, tenant = token, error = %error, "could not send api reply");
        }
    }

    /// Validates the tenant token, decodes the request and runs `action`.
    async fn decode_then<'a, Req, Resp, F, Fut>(
        &'a self,
        verb: &str,
        tenant_token: &str,
        payload: &[u8],
        action: F,
    ) -> Result<Resp, ApiError>
    where
        Req: DeserializeOwned,
        F: FnOnce(&'a Self, TenantId, Req) -> Fut,
        Fut: std::future::Future<Output = Result<Resp, ApiError>>,
    {
        let tenant = api::validate_tenant(tenant_token)?;
        let request = codec::decode::<Req>(payload).map_err(|e| api::request_decode_error(verb, e))?;
        action(self, tenant, request).await
    }
}

/// Encodes a reply envelope, returning the error code it carries, if any.
fn encode_reply<T: Serialize>(result: Result<T, ApiError>) -> (Bytes, Option<ErrorCode>) {
    let code = result.as_ref().err().map(|e| e.code);
    match codec::encode(&Reply::from(result)) {
        Ok(bytes) => (Bytes::from(bytes), code),
        Err(error) => {
            let internal = ApiError::new(ErrorCode::Internal, format!("reply could not be encoded: {error}"));
            let bytes = codec::encode(&Reply::<()>::Err(internal)).unwrap_or_default();
            (Bytes::from(bytes), Some(ErrorCode::Internal))
        }
    }
}

/// Maps a JetStream or registry failure to the `unavailable` reply.
fn unavailable(what: impl std::fmt::Display, error: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, format!("{what}: {error}; retry later"))
}

/// Maps a failure reading or writing a run's JetStream state to a reply:
/// `unavailable` when retrying may help, `internal` when it cannot.
fn runs_error(error: runs::Error) -> ApiError {
    if error.is_retryable() {
        unavailable("jetstream", error)
    } else {
        ApiError::new(ErrorCode::Internal, error.to_string())
    }
}

async fn wait_for(mut tasks: JoinSet<()>) {
    while let Some(result) = tasks.join_next().await {
        if let Err(error) = result {
            warn!(error = %error, "api request handler panicked");
        }
    }
}
