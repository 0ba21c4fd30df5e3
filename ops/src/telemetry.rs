//! Logs and traces.
//!
//! - Logs go to stderr as text or, with `log_format = "json"`, as one JSON
//!   object per line whose top-level fields include those of every enclosing
//!   span: `run_id`, `tenant`, `attempt`, `worker_id` and `agent` on
//!   anything logged while a run executes.
//! - With `otlp_endpoint` set, spans are exported over OTLP (gRPC or
//!   HTTP/protobuf), sampled by `sampling_ratio` and respecting the parent's
//!   sampling decision.
//! - W3C trace context crosses NATS in the `traceparent`/`tracestate`
//!   headers of API requests ([`inject`], [`set_parent_from_headers`]) and
//!   inside each job ([`traceparent`], [`set_parent`]), so that a run's
//!   attempts on any worker join the trace of its submission.

use std::collections::HashMap;
use std::fmt;

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use runfleet_protocol::semconv::{HEADER_TRACEPARENT, HEADER_TRACESTATE};
use serde::{Deserialize, Serialize};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    /// OTLP/gRPC, usually port 4317.
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies, usually port 4318 (`/v1/traces` is
    /// appended to an endpoint without a path).
    Http,
}

/// The shared `[telemetry]` section. Environment: `RUNFLEET_TELEMETRY__<KEY>`.
/// The log filter is `RUST_LOG` (default `info`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `text` (default) or `json`.
    pub log_format: LogFormat,
    /// OTLP collector endpoint, e.g. `http://otel-collector:4317`. Tracing
    /// export is off when unset (the default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// `grpc` (default) or `http`.
    pub otlp_protocol: OtlpProtocol,
    /// Fraction of new traces recorded, 0.0 ..= 1.0; a run's spans follow
    /// its submission's decision. Default `1.0`.
    pub sampling_ratio: f64,
    /// `service.name` of the exported spans. Default: `runfleet-<component>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::Grpc,
            sampling_ratio: 1.0,
            service_name: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("telemetry.{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("telemetry: cannot build the OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
}

impl TelemetryConfig {
    /// Rejects values that make no sense, naming the key.
    pub fn validate(&self) -> Result<(), Error> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(Error::Invalid {
                key: "sampling_ratio",
                reason: format!("{} is outside 0.0..=1.0", self.sampling_ratio),
            });
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(Error::Invalid {
                    key: "otlp_endpoint",
                    reason: format!("{endpoint:?} is not an http:// or https:// URL"),
                });
            }
        }
        if self.service_name.as_deref().is_some_and(str::is_empty) {
            return Err(Error::Invalid { key: "service_name", reason: "must not be empty".into() });
        }
        Ok(())
    }
}

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes it.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter. Call before
    /// the process exits, or short-lived commands lose their spans.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else { return };
        let result = tokio::task::spawn_blocking(move || {
            let _ = provider.force_flush();
            provider.shutdown()
        })
        .await;
        if let Ok(Err(error)) = result {
            eprintln!("telemetry: flushing spans failed: {error}");
        }
    }
}

/// What the trace exporter records, independent of `RUST_LOG`.
const TRACE_FILTER: &str =
    "warn,runfleet=info,runfleet_coordinator=info,runfleet_worker=info,runfleet_ops=info";

/// Installs the global subscriber: the `RUST_LOG` filter (default
/// `default_filter`, e.g. `info` for servers and `warn` for the CLI),
/// text or JSON logs on stderr and, when an endpoint is set, the OTLP span
/// exporter. `default_service` names the service when the config does not.
/// A second call (several components in one process) keeps the first
/// subscriber and returns an inert [`Telemetry`].
pub fn init(
    config: &TelemetryConfig,
    default_service: &str,
    default_filter: &str,
) -> Result<Telemetry, Error> {
    config.validate()?;
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let logs = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(FlatJson)
            .boxed(),
    };
    let provider = match &config.otlp_endpoint {
        Some(endpoint) => Some(provider(config, endpoint, default_service)?),
        None => None,
    };
    // Spans are exported whatever the log level: runfleet's own at info and
    // above, other crates' only from warn.
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("runfleet"))
            .with_filter(EnvFilter::new(TRACE_FILTER))
    });
    let installed =
        tracing_subscriber::registry().with(logs.with_filter(filter())).with(traces).try_init().is_ok();
    Ok(Telemetry { provider: if installed { provider } else { None } })
}

fn provider(
    config: &TelemetryConfig,
    endpoint: &str,
    default_service: &str,
) -> Result<SdkTracerProvider, Error> {
    let failed =
        |e: &dyn fmt::Display| Error::Exporter { endpoint: endpoint.to_owned(), reason: e.to_string() };
    let exporter = match config.otlp_protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| failed(&e))?,
        OtlpProtocol::Http => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(http_traces_url(endpoint))
            .build()
            .map_err(|e| failed(&e))?,
    };
    let service = config.service_name.clone().unwrap_or_else(|| default_service.to_owned());
    let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
        exporter,
        opentelemetry_sdk::runtime::Tokio,
    )
    .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sampling_ratio))))
        .with_resource(
            Resource::builder()
                .with_service_name(service)
                .with_attribute(opentelemetry::KeyValue::new("process.pid", i64::from(std::process::id())))
                .build(),
        )
        .build())
}

/// `http://host:4318` → `http://host:4318/v1/traces`; an explicit path is kept.
fn http_traces_url(endpoint: &str) -> String {
    let after_scheme = endpoint.split_once("://").map_or(endpoint, |(_, rest)| rest);
    match after_scheme.find('/') {
        Some(at) if after_scheme.len() > at + 1 => endpoint.to_owned(),
        _ => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        [HEADER_TRACEPARENT, HEADER_TRACESTATE].into_iter().filter(|k| self.0.get(*k).is_some()).collect()
    }
}

/// Writes the current span's trace context into `headers` (nothing when
/// tracing export is off or the span is disabled).
pub fn inject(headers: &mut HeaderMap) {
    let context = Span::current().context();
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
    }
}

/// Makes the trace context in `headers`, if any, the parent of `span`.
pub fn set_parent_from_headers(span: &Span, headers: Option<&HeaderMap>) {
    let Some(headers) = headers else { return };
    if headers.get(HEADER_TRACEPARENT).is_none() {
        return;
    }
    let context = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let _ = span.set_parent(context);
}

/// The current span's context as a W3C `traceparent` value, for carrying
/// inside a message body (jobs).
pub fn traceparent() -> Option<String> {
    let context = Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(HEADER_TRACEPARENT)
}

/// Makes a `traceparent` value the parent of `span`.
pub fn set_parent(span: &Span, traceparent: Option<&str>) {
    let Some(value) = traceparent else { return };
    let carrier = HashMap::from([(HEADER_TRACEPARENT.to_owned(), value.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(context);
}

/// The trace id inside a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`).
pub fn trace_id_of(traceparent: &str) -> Option<String> {
    traceparent.split('-').nth(1).map(str::to_owned)
}

/// The trace id of `span` as 32 hex digits, when it is being traced.
pub fn trace_id(span: &Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then(|| span_context.trace_id().to_string())
}

/// A JSON event formatter that lifts the fields of every enclosing span to
/// the top level (outermost first, inner spans win), so log pipelines can
/// filter on `run_id` without digging into nested span lists.
struct FlatJson;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for FlatJson
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let mut object = serde_json::Map::new();
        object.insert("timestamp".into(), runfleet_protocol::time::rfc3339_ms(now_ms()).into());
        object.insert("level".into(), event.metadata().level().as_str().into());
        object.insert("target".into(), event.metadata().target().into());
        if let Some(scope) = ctx.event_scope() {
            let mut spans = Vec::new();
            for span in scope.from_root() {
                spans.push(span.name());
                let extensions = span.extensions();
                let Some(fields) = extensions.get::<tracing_subscriber::fmt::FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(fields)
                {
                    // `otel.*` fields steer the exporter, not the reader.
                    object.extend(map.into_iter().filter(|(key, _)| !key.starts_with("otel.")));
                }
            }
            if !spans.is_empty() {
                object.insert("spans".into(), spans.join(":").into());
            }
        }
        let mut visitor = JsonVisitor(&mut object);
        event.record(&mut visitor);
        let line = serde_json::to_string(&object).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

struct JsonVisitor<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_endpoint_gets_the_traces_path() {
        assert_eq!(http_traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(http_traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(http_traces_url("http://c:4318/custom/path"), "http://c:4318/custom/path");
    }

    #[test]
    fn rejects_nonsense_naming_the_key() {
        let bad = [
            ("sampling_ratio", TelemetryConfig { sampling_ratio: 1.5, ..Default::default() }),
            (
                "otlp_endpoint",
                TelemetryConfig { otlp_endpoint: Some("collector:4317".into()), ..Default::default() },
            ),
        ];
        for (key, config) in bad {
            match config.validate() {
                Err(Error::Invalid { key: got, .. }) => assert_eq!(got, key),
                other => panic!("{key}: {other:?}"),
            }
        }
    }

    #[test]
    fn traceparent_round_trips_through_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_TRACEPARENT, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        let context = TraceContextPropagator::new().extract(&HeaderExtractor(&headers));
        let sc = context.span().span_context().clone();
        assert!(sc.is_valid());
        assert_eq!(sc.trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
        let mut out = HeaderMap::new();
        TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(&mut out));
        assert_eq!(
            out.get(HEADER_TRACEPARENT).map(|v| v.as_str()),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
    }
}
