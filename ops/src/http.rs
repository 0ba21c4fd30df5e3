//! The operations endpoint every long-running process serves on
//! `--metrics-addr`:
//!
//! - `GET /metrics`: Prometheus text format;
//! - `GET /healthz`: 200 while the process runs (liveness: restart on failure);
//! - `GET /readyz`: 200 when the process can do its work (connected to NATS,
//!   streams and buckets in place and, for a coordinator, the registry
//!   reachable and migrated), else 503 with the reason.
//!
//! The server starts before the process connects to anything, so `/readyz`
//! can say "not yet" while NATS is unreachable.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

/// What a component tells the endpoint about itself.
pub trait Probe: Send + Sync + 'static {
    /// `Ok` when ready to serve, else why not.
    fn ready(&self) -> BoxFuture<'_, Result<(), String>>;
    /// Refreshes gauges sampled at scrape time (e.g. consumer lag) before
    /// `/metrics` renders.
    fn refresh(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// A cloneable handle the component sets its probe on once it has started,
/// and marks as stopping on shutdown.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<RwLock<State_>>,
}

#[derive(Default)]
struct State_ {
    probe: Option<Arc<dyn Probe>>,
    stopping: bool,
    starting: Option<String>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").finish_non_exhaustive()
    }
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// What the process is doing while it has no probe yet (shown by `/readyz`).
    pub fn starting(&self, what: impl Into<String>) {
        if let Ok(mut state) = self.inner.write() {
            state.starting = Some(what.into());
        }
    }

    /// The component is up: readiness is now its probe's answer.
    pub fn set_probe(&self, probe: Arc<dyn Probe>) {
        if let Ok(mut state) = self.inner.write() {
            state.probe = Some(probe);
        }
    }

    /// The process is shutting down: not ready any more.
    pub fn stopping(&self) {
        if let Ok(mut state) = self.inner.write() {
            state.stopping = true;
        }
    }

    fn snapshot(&self) -> (Option<Arc<dyn Probe>>, bool, Option<String>) {
        match self.inner.read() {
            Ok(state) => (state.probe.clone(), state.stopping, state.starting.clone()),
            Err(_) => (None, true, None),
        }
    }

    /// `Ok` when ready, else the reason.
    pub async fn ready(&self) -> Result<(), String> {
        match self.snapshot() {
            (_, true, _) => Err("shutting down".to_owned()),
            (None, false, starting) => Err(starting.unwrap_or_else(|| "starting".to_owned())),
            (Some(probe), false, _) => probe.ready().await,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on metrics_addr {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("the operations endpoint failed: {0}")]
    Serve(std::io::Error),
}

/// A bound endpoint; [`Server::run`] serves it.
#[derive(Debug)]
pub struct Server {
    listener: tokio::net::TcpListener,
    health: Health,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port), so a taken port fails at startup.
    pub async fn bind(addr: SocketAddr, health: Health) -> Result<Self, Error> {
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
        Ok(Self { listener, health })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .with_state(self.health);
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .map_err(Error::Serve)
    }
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    if let (Some(probe), _, _) = health.snapshot() {
        probe.refresh().await;
    }
    if let Some(bytes) = crate::heap::live_bytes() {
        crate::metrics::get().heap_bytes.set(bytes);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], crate::metrics::get().render())
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    match health.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}
