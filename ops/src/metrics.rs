//! The process's Prometheus metrics, registered once from the definitions in
//! `runfleet_protocol::semconv` and reached through [`get`].
//!
//! Every process registers every metric; a coordinator simply never moves the
//! worker's. Counters labelled by queue and agent start at zero for a label
//! set the first time it is used.

use std::sync::LazyLock;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use runfleet_protocol::semconv::{self as sc, Kind, Metric};

/// Latency buckets, in seconds: 0.25 ms … 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Every metric of the process. A labelled metric appears in `/metrics`
/// once a label set has been used.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub build_info: IntGaugeVec,
    pub runs_submitted: IntCounterVec,
    pub runs_started: IntCounterVec,
    pub runs_completed: IntCounterVec,
    pub runs_failed: IntCounterVec,
    pub runs_cancelled: IntCounterVec,
    pub runs_resumed: IntCounterVec,
    pub jobs_pending: IntGaugeVec,
    pub submit_to_start: HistogramVec,
    pub step_duration: HistogramVec,
    pub worker_running: IntGauge,
    pub worker_free_slots: IntGauge,
    pub lease_renewals: IntCounter,
    pub lease_losses: IntCounter,
    pub projector_lag: IntGauge,
    pub events_redacted: IntCounter,
    pub heap_bytes: IntGauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The component this process serves metrics for, once set.
static COMPONENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

fn opts(m: &Metric, kind: Kind) -> Opts {
    assert_eq!(m.kind, kind, "{} is declared as a {:?}", m.name, m.kind);
    Opts::new(m.name, m.help)
}

impl Metrics {
    // The definitions are constants checked by protocol's tests, so a failure
    // here is a programming error caught by every test run.
    #[allow(clippy::expect_used)]
    fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |m: &Metric| {
            let c = IntCounterVec::new(opts(m, Kind::Counter), m.labels).expect("valid counter");
            registry.register(Box::new(c.clone())).expect("registered once");
            c
        };
        let counter = |m: &Metric| {
            let c = IntCounter::with_opts(opts(m, Kind::Counter)).expect("valid counter");
            registry.register(Box::new(c.clone())).expect("registered once");
            c
        };
        let gauge_vec = |m: &Metric| {
            let g = IntGaugeVec::new(opts(m, Kind::Gauge), m.labels).expect("valid gauge");
            registry.register(Box::new(g.clone())).expect("registered once");
            g
        };
        let gauge = |m: &Metric| {
            let g = IntGauge::with_opts(opts(m, Kind::Gauge)).expect("valid gauge");
            registry.register(Box::new(g.clone())).expect("registered once");
            g
        };
        let histogram_vec = |m: &Metric| {
            assert_eq!(m.kind, Kind::Histogram, "{} is declared as a {:?}", m.name, m.kind);
            let h = HistogramVec::new(
                HistogramOpts::new(m.name, m.help).buckets(LATENCY_BUCKETS.to_vec()),
                m.labels,
            )
            .expect("valid histogram");
            registry.register(Box::new(h.clone())).expect("registered once");
            h
        };
        Self {
            build_info: gauge_vec(&sc::BUILD_INFO),
            runs_submitted: counter_vec(&sc::RUNS_SUBMITTED),
            runs_started: counter_vec(&sc::RUNS_STARTED),
            runs_completed: counter_vec(&sc::RUNS_COMPLETED),
            runs_failed: counter_vec(&sc::RUNS_FAILED),
            runs_cancelled: counter_vec(&sc::RUNS_CANCELLED),
            runs_resumed: counter_vec(&sc::RUNS_RESUMED),
            jobs_pending: gauge_vec(&sc::JOBS_PENDING),
            submit_to_start: histogram_vec(&sc::SUBMIT_TO_START),
            step_duration: histogram_vec(&sc::STEP_DURATION),
            worker_running: gauge(&sc::WORKER_RUNNING),
            worker_free_slots: gauge(&sc::WORKER_FREE_SLOTS),
            lease_renewals: counter(&sc::LEASE_RENEWALS),
            lease_losses: counter(&sc::LEASE_LOSSES),
            projector_lag: gauge(&sc::PROJECTOR_LAG),
            events_redacted: counter(&sc::EVENTS_REDACTED),
            heap_bytes: gauge(&sc::HEAP_BYTES),
            registry,
        }
    }

    /// Records which component this process is (`runfleet_build_info`):
    /// `coordinator` or `worker`. [`Metrics::render`] then leaves out the
    /// other component's metrics.
    pub fn set_component(&self, component: &str) {
        self.build_info.with_label_values(&[component, env!("CARGO_PKG_VERSION")]).set(1);
        let _ = COMPONENT.set(component.to_owned());
    }

    /// The component's metrics (every metric before [`Metrics::set_component`])
    /// in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut families = self.registry.gather();
        if let Some(component) = COMPONENT.get() {
            families.retain(|family| {
                sc::ALL.iter().any(|m| {
                    m.name == family.name() && (m.served_by == "both" || m.served_by == component.as_str())
                })
            });
        }
        let mut out = String::new();
        if let Err(error) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
            tracing::error!(%error, "encoding metrics failed");
        }
        out
    }
}

/// Observes a duration in seconds on a histogram.
pub fn observe(histogram: &Histogram, elapsed: std::time::Duration) {
    histogram.observe(elapsed.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_defined_metric_is_registered_and_rendered() {
        let m = get();
        // Not `set_component`: that would hide other components' metrics.
        m.build_info.with_label_values(&["test", "0"]).set(1);
        for counter in [
            &m.runs_submitted,
            &m.runs_started,
            &m.runs_completed,
            &m.runs_failed,
            &m.runs_cancelled,
            &m.runs_resumed,
        ] {
            counter.with_label_values(&["default", "echo"]).inc();
        }
        m.submit_to_start.with_label_values(&["default", "echo"]).observe(0.003);
        m.step_duration.with_label_values(&["echo"]).observe(0.001);
        m.jobs_pending.with_label_values(&["default", "0"]).set(2);
        let text = m.render();
        for metric in sc::ALL {
            assert!(
                text.contains(&format!("# TYPE {} ", metric.name)),
                "{} missing from\n{text}",
                metric.name
            );
        }
    }
}
