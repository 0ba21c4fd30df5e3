//! Metric names, their labels and help, and trace attribute keys: defined
//! once here, documented in `docs/observability.md` (a test keeps the two in
//! step), and registered by `runfleet-ops`.

/// What kind of Prometheus metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric: its name, kind, labels, the process that serves it and what it counts.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    /// `coordinator`, `worker` or `both`.
    pub served_by: &'static str,
    pub help: &'static str,
}

pub const LABEL_QUEUE: &str = "queue";
pub const LABEL_AGENT: &str = "agent";
pub const LABEL_BAND: &str = "band";
pub const LABEL_COMPONENT: &str = "component";
pub const LABEL_VERSION: &str = "version";

const QA: &[&str] = &[LABEL_QUEUE, LABEL_AGENT];

pub const BUILD_INFO: Metric = Metric {
    name: "runfleet_build_info",
    kind: Kind::Gauge,
    labels: &[LABEL_COMPONENT, LABEL_VERSION],
    served_by: "both",
    help: "Always 1; the component and its version (the wire protocol version is in docs/protocol.md).",
};
pub const RUNS_SUBMITTED: Metric = Metric {
    name: "runfleet_runs_submitted_total",
    kind: Kind::Counter,
    labels: QA,
    served_by: "coordinator",
    help: "Runs accepted by the submit API (idempotent repeats of a run are not counted again).",
};
pub const RUNS_STARTED: Metric = Metric {
    name: "runfleet_runs_started_total",
    kind: Kind::Counter,
    labels: QA,
    served_by: "worker",
    help: "Runs whose first attempt started (run.started).",
};
pub const RUNS_COMPLETED: Metric = Metric {
    name: "runfleet_runs_completed_total",
    kind: Kind::Counter,
    labels: QA,
    served_by: "worker",
    help: "Runs that completed (run.completed).",
};
pub const RUNS_FAILED: Metric = Metric {
    name: "runfleet_runs_failed_total",
    kind: Kind::Counter,
    labels: QA,
    served_by: "worker",
    help: "Runs that failed for good (run.failed).",
};
pub const RUNS_CANCELLED: Metric = Metric {
    name: "runfleet_runs_cancelled_total",
    kind: Kind::Counter,
    labels: QA,
    served_by: "both",
    help: "Runs cancelled (run.cancelled): by a worker when the run was executing, by the coordinator when it was queued or waiting.",
};
pub const RUNS_RESUMED: Metric = Metric {
    name: "runfleet_runs_resumed_total",
    kind: Kind::Counter,
    labels: QA,
    served_by: "worker",
    help: "Attempts that resumed a run from its checkpoints (run.resumed): after a crash, a lost lease, a wait or a hand-off.",
};
pub const JOBS_PENDING: Metric = Metric {
    name: "runfleet_jobs_pending",
    kind: Kind::Gauge,
    labels: &[LABEL_QUEUE, LABEL_BAND],
    served_by: "coordinator",
    help: "Jobs waiting in the jobs stream for a worker, per queue and priority band (the consumer's pending count, sampled at scrape).",
};
pub const SUBMIT_TO_START: Metric = Metric {
    name: "runfleet_submit_to_start_seconds",
    kind: Kind::Histogram,
    labels: QA,
    served_by: "worker",
    help: "From a run's creation to the start of its first attempt, in seconds (clocks of coordinator and worker hosts).",
};
pub const STEP_DURATION: Metric = Metric {
    name: "runfleet_step_duration_seconds",
    kind: Kind::Histogram,
    labels: &[LABEL_AGENT],
    served_by: "worker",
    help: "Executed steps (not replayed ones), from start to durable checkpoint, in seconds.",
};
pub const WORKER_RUNNING: Metric = Metric {
    name: "runfleet_worker_running_runs",
    kind: Kind::Gauge,
    labels: &[],
    served_by: "worker",
    help: "Runs this worker is executing now.",
};
pub const WORKER_FREE_SLOTS: Metric = Metric {
    name: "runfleet_worker_free_slots",
    kind: Kind::Gauge,
    labels: &[],
    served_by: "worker",
    help: "Slots of this worker free for another run.",
};
pub const LEASE_RENEWALS: Metric = Metric {
    name: "runfleet_lease_renewals_total",
    kind: Kind::Counter,
    labels: &[],
    served_by: "worker",
    help: "Lease renewals (heartbeats) that succeeded.",
};
pub const LEASE_LOSSES: Metric = Metric {
    name: "runfleet_lease_losses_total",
    kind: Kind::Counter,
    labels: &[],
    served_by: "worker",
    help: "Leases this worker lost (expired or taken over): the run was stopped here and resumes elsewhere.",
};
pub const PROJECTOR_LAG: Metric = Metric {
    name: "runfleet_projector_lag_events",
    kind: Kind::Gauge,
    labels: &[],
    served_by: "coordinator",
    help: "Events in the events stream not yet projected into the SQL registry (sampled at scrape).",
};
pub const EVENTS_REDACTED: Metric = Metric {
    name: "runfleet_events_redacted_total",
    kind: Kind::Counter,
    labels: &[],
    served_by: "both",
    help: "Events published with at least one value redacted by the [redaction] key patterns.",
};

pub const HEAP_BYTES: Metric = Metric {
    name: "runfleet_heap_bytes",
    kind: Kind::Gauge,
    labels: &[],
    served_by: "both",
    help: "Bytes this process's allocator has handed out and not taken back (sampled at scrape); 0 unless started with RUNFLEET_HEAP_ACCOUNTING=1.",
};

/// Every metric, in documentation order.
pub const ALL: &[Metric] = &[
    BUILD_INFO,
    RUNS_SUBMITTED,
    RUNS_STARTED,
    RUNS_COMPLETED,
    RUNS_FAILED,
    RUNS_CANCELLED,
    RUNS_RESUMED,
    JOBS_PENDING,
    SUBMIT_TO_START,
    STEP_DURATION,
    WORKER_RUNNING,
    WORKER_FREE_SLOTS,
    LEASE_RENEWALS,
    LEASE_LOSSES,
    PROJECTOR_LAG,
    EVENTS_REDACTED,
    HEAP_BYTES,
];

/// Span fields (and so OpenTelemetry attributes and JSON log fields) on
/// every span that concerns a run: `run_id`, `tenant`, `attempt`,
/// `worker_id`, `agent`, and `step` on step spans. tracing needs them as
/// literal identifiers, so they are listed here rather than defined.
pub const RUN_SPAN_FIELDS: &[&str] = &["run_id", "tenant", "attempt", "worker_id", "agent"];

/// The W3C trace context header carried by API requests and jobs.
pub const HEADER_TRACEPARENT: &str = "traceparent";
pub const HEADER_TRACESTATE: &str = "tracestate";

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/observability.md documents every metric with its type, labels
    /// and process, and no metric that does not exist.
    #[test]
    fn the_metrics_table_matches_the_definitions() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/observability.md"))
            .unwrap_or_else(|e| panic!("docs/observability.md: {e}"));
        let rows: Vec<Vec<String>> = doc
            .lines()
            .filter(|l| l.starts_with("| `runfleet_"))
            .map(|l| l.split('|').map(|c| c.trim().to_owned()).collect())
            .collect();
        assert_eq!(rows.len(), ALL.len(), "one row per metric");
        for m in ALL {
            let row = rows
                .iter()
                .find(|r| r[1] == format!("`{}`", m.name))
                .unwrap_or_else(|| panic!("{} is not documented", m.name));
            let kind = match m.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            let labels: Vec<String> = m.labels.iter().map(|l| format!("`{l}`")).collect();
            assert_eq!(
                (row[2].as_str(), row[3].clone(), row[4].as_str()),
                (kind, labels.join(", "), m.served_by),
                "{}",
                m.name
            );
        }
    }

    #[test]
    fn names_are_unique_and_prometheus_valid() {
        let mut seen = std::collections::HashSet::new();
        for m in ALL {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(m.name.starts_with("runfleet_"));
            assert!(m.name.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            assert_eq!(m.kind == Kind::Counter, m.name.ends_with("_total"), "{}", m.name);
        }
    }
}
