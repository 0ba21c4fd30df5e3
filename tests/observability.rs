//! Operating a fleet: `/metrics` counters and histograms move by exactly what
//! a batch of runs did, `/readyz` follows NATS, JSON logs carry the run's
//! fields, redacted inputs still reach the agent, and one trace spans the client, the
//! coordinator and every worker a run touched. Real nats-server, real
//! `runfleet` processes, a real OTLP/HTTP receiver.

mod harness;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use harness::stream::eventually;
use harness::{NatsServer, RunfleetProcess, TestDb};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(60);

use harness::http::{free_addr, get as http_get};

/// Every sample of a Prometheus text exposition, keyed by `name{labels}`
/// exactly as written.
fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let (status, body) = http_get(addr, "/metrics").unwrap_or_else(|| panic!("no /metrics at {addr}"));
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn sample(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, series: &str) -> f64 {
    sample(after, series) - sample(before, series)
}

fn cli(nats: &NatsServer, args: &[&str]) -> std::process::Output {
    let mut all = args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
    all.extend(["--nats-url".to_owned(), nats.url()]);
    harness::process::run_cli(&all)
}

fn submit_and_wait(nats: &NatsServer, agent: &str, input: &Value) {
    let out = cli(nats, &["submit", "--agent", agent, "--input", &input.to_string(), "--wait"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("run.") || out.status.success(),
        "submit {agent}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn metrics_move_by_what_runs_did_and_readiness_follows_nats() {
    let mut nats = NatsServer::start();
    // NATS goes away before the fleet starts: both processes must come up,
    // serve their endpoints and say they are not ready.
    nats.kill();
    let db = TestDb::sqlite();
    let (coordinator_addr, worker_addr) = (free_addr(), free_addr());
    let coordinator = RunfleetProcess::spawn(
        "coordinator",
        &[
            "coordinator".into(),
            "--nats-url".into(),
            nats.url(),
            "--database-url".into(),
            db.url.clone(),
            "--metrics-addr".into(),
            coordinator_addr.to_string(),
        ],
    );
    let worker = RunfleetProcess::spawn_with_env(
        "worker",
        &[
            "worker".into(),
            "--nats-url".into(),
            nats.url(),
            "--slots".into(),
            "3".into(),
            "--metrics-addr".into(),
            worker_addr.to_string(),
        ],
        &[("RUNFLEET_TELEMETRY__LOG_FORMAT".into(), "json".into())],
    );
    for addr in [coordinator_addr, worker_addr] {
        let (status, body) =
            eventually(DEADLINE, "the endpoint to answer", || async move { http_get(addr, "/readyz") }).await;
        assert_eq!(status, 503, "ready without NATS: {body}");
        assert!(body.contains("NATS"), "{body}");
        assert_eq!(http_get(addr, "/healthz").map(|(s, _)| s), Some(200));
    }

    nats.restart();
    for addr in [coordinator_addr, worker_addr] {
        eventually(DEADLINE, "/readyz to turn ready", || async move {
            http_get(addr, "/readyz").filter(|(status, _)| *status == 200)
        })
        .await;
    }

    let (c0, w0) = (scrape(coordinator_addr), scrape(worker_addr));
    for i in 0..4 {
        submit_and_wait(&nats, "echo", &json!({"i": i}));
    }
    for _ in 0..2 {
        submit_and_wait(&nats, "steps", &json!({"steps": 3}));
    }
    submit_and_wait(&nats, "fail", &json!({"message": "no"}));

    // The worker counts as it writes the terminal event, the coordinator's
    // gauges as it scrapes: wait for the projector to catch up.
    let c1 = eventually(DEADLINE, "the projector to catch up", || async move {
        let samples = scrape(coordinator_addr);
        (sample(&samples, "runfleet_projector_lag_events") == 0.0).then_some(samples)
    })
    .await;
    let echo = r#"{agent="echo",queue="default"}"#;
    let steps = r#"{agent="steps",queue="default"}"#;
    let fail = r#"{agent="fail",queue="default"}"#;
    // The CLI's --wait returns once the terminal event is stored, before
    // the worker sees its append's ack (counters) and its next pull-loop
    // pass (gauges): wait until they got there, then check exact values.
    let mut reached = vec![
        (format!("runfleet_runs_completed_total{echo}"), 4.0),
        (format!("runfleet_runs_completed_total{steps}"), 2.0),
        (format!("runfleet_runs_failed_total{fail}"), 1.0),
        (r#"runfleet_step_duration_seconds_count{agent="steps"}"#.to_owned(), 6.0),
    ];
    for (labels, n) in [(echo, 4.0), (steps, 2.0), (fail, 1.0)] {
        reached.push((format!("runfleet_runs_started_total{labels}"), n));
        reached.push((format!("runfleet_submit_to_start_seconds_count{labels}"), n));
    }
    let reached = &reached;
    let before = &w0;
    let w1 = eventually(DEADLINE, "the worker's metrics to settle", || async move {
        let samples = scrape(worker_addr);
        let settled = reached.iter().all(|(series, n)| delta(before, &samples, series) >= *n)
            && sample(&samples, "runfleet_worker_running_runs") == 0.0
            && sample(&samples, "runfleet_worker_free_slots") == 3.0;
        settled.then_some(samples)
    })
    .await;
    for (labels, n) in [(echo, 4.0), (steps, 2.0), (fail, 1.0)] {
        assert_eq!(delta(&c0, &c1, &format!("runfleet_runs_submitted_total{labels}")), n, "{labels}");
        assert_eq!(delta(&w0, &w1, &format!("runfleet_runs_started_total{labels}")), n, "{labels}");
        assert_eq!(delta(&w0, &w1, &format!("runfleet_submit_to_start_seconds_count{labels}")), n);
    }
    assert_eq!(delta(&w0, &w1, &format!("runfleet_runs_completed_total{echo}")), 4.0);
    assert_eq!(delta(&w0, &w1, &format!("runfleet_runs_completed_total{steps}")), 2.0);
    assert_eq!(delta(&w0, &w1, &format!("runfleet_runs_failed_total{fail}")), 1.0);
    assert_eq!(delta(&w0, &w1, &format!("runfleet_runs_completed_total{fail}")), 0.0);
    assert_eq!(delta(&w0, &w1, r#"runfleet_step_duration_seconds_count{agent="steps"}"#), 6.0);
    assert_eq!(delta(&w0, &w1, r#"runfleet_step_duration_seconds_bucket{agent="steps",le="+Inf"}"#), 6.0);
    assert!(delta(&w0, &w1, r#"runfleet_step_duration_seconds_sum{agent="steps"}"#) > 0.0);
    assert_eq!(sample(&w1, "runfleet_worker_running_runs"), 0.0);
    assert_eq!(sample(&w1, "runfleet_worker_free_slots"), 3.0);
    assert_eq!(sample(&c1, r#"runfleet_jobs_pending{band="2",queue="default"}"#), 0.0);
    assert!(c1.contains_key(r#"runfleet_jobs_pending{band="2",queue="default"}"#), "{c1:?}");
    // Each process serves its own metrics only.
    assert!(!c1.keys().any(|k| k.starts_with("runfleet_worker_")), "{c1:?}");
    assert!(!w1.keys().any(|k| k.starts_with("runfleet_runs_submitted")), "{w1:?}");

    // JSON logs carry the run's fields at the top level.
    let logs = worker.logs();
    let claimed: Value = logs
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| line["message"] == "run claimed" && line["agent"] == "steps")
        .unwrap_or_else(|| panic!("no JSON 'run claimed' line in:\n{logs}"));
    for field in ["run_id", "tenant", "attempt", "worker_id", "agent", "timestamp", "level"] {
        assert!(claimed.get(field).is_some(), "{field} missing from {claimed}");
    }
    assert_eq!(claimed["tenant"], "default");

    // Not ready once NATS is gone again; live all along.
    nats.kill();
    eventually(DEADLINE, "/readyz to turn not ready", || async move {
        http_get(worker_addr, "/readyz").filter(|(status, _)| *status == 503)
    })
    .await;
    assert_eq!(http_get(worker_addr, "/healthz").map(|(s, _)| s), Some(200));
    drop(coordinator);
}

/// One span as an OTLP receiver got it.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    service: String,
    pid: i64,
    trace_id: String,
    name: String,
}

/// A real OTLP/HTTP trace receiver: decodes `ExportTraceServiceRequest`
/// protobuf bodies posted to `/v1/traces`.
struct OtlpReceiver {
    addr: SocketAddr,
    spans: std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>,
}

impl OtlpReceiver {
    async fn start() -> Self {
        use opentelemetry_proto::tonic::collector::trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
        };
        use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
        use prost::Message;

        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::<ReceivedSpan>::new()));
        let sink = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    let request = ExportTraceServiceRequest::decode(body.as_ref())
                        .unwrap_or_else(|e| panic!("undecodable OTLP request: {e}"));
                    let mut received = Vec::new();
                    for resource_spans in request.resource_spans {
                        let attributes = resource_spans.resource.map(|r| r.attributes).unwrap_or_default();
                        let value = |key: &str| {
                            attributes.iter().find(|a| a.key == key).and_then(|a| a.value.clone()?.value)
                        };
                        let service = match value("service.name") {
                            Some(Any::StringValue(s)) => s,
                            _ => String::new(),
                        };
                        let pid = match value("process.pid") {
                            Some(Any::IntValue(i)) => i,
                            _ => 0,
                        };
                        for scope in resource_spans.scope_spans {
                            for span in scope.spans {
                                received.push(ReceivedSpan {
                                    service: service.clone(),
                                    pid,
                                    trace_id: span.trace_id.iter().map(|b| format!("{b:02x}")).collect(),
                                    name: span.name,
                                });
                            }
                        }
                    }
                    if let Ok(mut spans) = sink.lock() {
                        spans.extend(received);
                    }
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
            }),
        );
        let listener =
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("addr: {e}"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, spans }
    }

    fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// What every process needs to export here quickly.
    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("RUNFLEET_TELEMETRY__OTLP_ENDPOINT".into(), format!("http://{}", self.addr)),
            ("RUNFLEET_TELEMETRY__OTLP_PROTOCOL".into(), "http".into()),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ]
    }
}

/// One submitted run, crashed half-way and resumed on another worker, is
/// one trace: spans from the client, the coordinator and both workers share
/// its trace id, and so does every event of the run. Multi-threaded: the
/// receiver must answer the CLI's export while the test waits for the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_covers_client_coordinator_and_both_workers_across_a_crash() {
    let receiver = OtlpReceiver::start().await;
    let nats = NatsServer::start();
    let db = TestDb::sqlite();
    let env = receiver.env();
    let coordinator = RunfleetProcess::spawn_with_env(
        "coordinator",
        &[
            "coordinator".into(),
            "--nats-url".into(),
            nats.url(),
            "--database-url".into(),
            db.url.clone(),
            "--lease-ttl".into(),
            "2s".into(),
        ],
        &env,
    );
    let worker_args = ["worker".to_owned(), "--nats-url".to_owned(), nats.url(), "--test-agents".to_owned()];
    let first = RunfleetProcess::spawn_with_env("worker-1", &worker_args, &env);

    eventually(DEADLINE, "the coordinator to serve", || async {
        cli(&nats, &["list"]).status.success().then_some(())
    })
    .await;
    let mut submit = vec!["submit".to_owned(), "--nats-url".to_owned(), nats.url()];
    // 9 s of steps: long enough that the crash, late under load, still
    // comes before the first worker could finish the run.
    submit.extend(["--agent", "steps", "--input", r#"{"steps": 30, "ms": 300}"#].map(str::to_owned));
    let out = std::process::Command::new(harness::process::runfleet_binary())
        .args(&submit)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap_or_else(|e| panic!("submit: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let run_id = stdout.split_whitespace().next().unwrap_or_default().to_owned();
    assert_eq!(run_id.len(), 36, "{stdout}");

    // Crash the first worker once it has exported finished step spans.
    let first_pid = i64::from(first.pid());
    let trace = eventually(DEADLINE, "step spans from the first worker", || {
        let spans = receiver.spans();
        async move {
            let steps: Vec<_> =
                spans.iter().filter(|s| s.pid == first_pid && s.name.starts_with("step")).collect();
            (steps.len() >= 2).then(|| steps[0].trace_id.clone())
        }
    })
    .await;
    first.signal(9);
    let second = RunfleetProcess::spawn_with_env("worker-2", &worker_args, &env);
    let second_pid = i64::from(second.pid());

    let client = nats.client().await;
    let tenant = runfleet_protocol::TenantId::default_tenant();
    let events = eventually(DEADLINE, "the run to complete on the second worker", || {
        let (client, tenant) = (client.clone(), tenant.clone());
        async move {
            let events = harness::stream::tenant_events(&client, &tenant).await;
            events.last().is_some_and(|(_, e)| e.body.is_terminal()).then_some(events)
        }
    })
    .await;
    let kinds: Vec<_> = events.iter().map(|(_, e)| e.body.clone()).collect();
    assert!(matches!(kinds.last(), Some(runfleet_protocol::event::EventBody::Completed(_))), "{kinds:?}");
    assert!(kinds.iter().any(|b| matches!(b, runfleet_protocol::event::EventBody::Resumed(_))), "{kinds:?}");
    for (_, event) in &events {
        assert_eq!(event.run_id.to_string(), run_id);
        assert_eq!(event.trace_id.as_deref(), Some(trace.as_str()), "{event:?}");
    }

    let spans = eventually(DEADLINE, "spans from every process in the run's trace", || {
        let spans: Vec<_> = receiver.spans().into_iter().filter(|s| s.trace_id == trace).collect();
        async move {
            let from = |pred: &dyn Fn(&ReceivedSpan) -> bool| spans.iter().any(pred);
            let complete = from(&|s| s.service == "runfleet-cli")
                && from(&|s| s.service == "runfleet-coordinator")
                && from(&|s| s.pid == first_pid)
                && from(&|s| s.pid == second_pid && s.name.starts_with("run "));
            if !complete {
                let seen: std::collections::BTreeSet<_> =
                    spans.iter().map(|s| format!("{}:{}:{}", s.service, s.pid, s.name)).collect();
                eprintln!("spans so far in the trace (worker pids {first_pid}, {second_pid}): {seen:?}");
            }
            complete.then_some(spans)
        }
    })
    .await;
    let names: Vec<_> = spans.iter().map(|s| format!("{}:{}:{}", s.service, s.pid, s.name)).collect();
    assert!(
        spans.iter().any(|s| s.service == "runfleet-coordinator" && s.name == "runfleet.api.submit"),
        "{names:?}"
    );
    assert!(spans.iter().any(|s| s.pid == second_pid && s.name.starts_with("step")), "{names:?}");
    drop((coordinator, second));
}

/// A redacted input is redacted in events (and so in `get`), but the agent
/// gets the real value on every attempt, including one the coordinator
/// dispatched after an approval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redacted_inputs_reach_the_agent_after_a_wake() {
    let nats = NatsServer::start();
    let db = TestDb::sqlite();
    let _coordinator = RunfleetProcess::spawn_with_env(
        "coordinator",
        &["coordinator".into(), "--nats-url".into(), nats.url(), "--database-url".into(), db.url.clone()],
        &[("RUNFLEET_REDACTION__KEYS".into(), r#"["action"]"#.into())],
    );
    // The worker redacts nothing, so the output shows what the agent got.
    let _worker = RunfleetProcess::spawn_with_env(
        "worker",
        &["worker".into(), "--nats-url".into(), nats.url()],
        &[("RUNFLEET_REDACTION__KEYS".into(), "[]".into())],
    );
    eventually(DEADLINE, "the coordinator to serve", || async {
        cli(&nats, &["list"]).status.success().then_some(())
    })
    .await;
    let out = cli(&nats, &["submit", "--agent", "approval", "--input", r#"{"action": "deploy"}"#]);
    let run = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(out.status.success(), "{run}{}", String::from_utf8_lossy(&out.stderr));
    eventually(DEADLINE, "the approval to be asked", || {
        let out = cli(&nats, &["approve", &run]);
        async move { out.status.success().then_some(()) }
    })
    .await;
    let view: Value = eventually(DEADLINE, "the run to complete", || {
        let out = cli(&nats, &["get", &run, "--json"]);
        async move {
            let view: Value = serde_json::from_slice(&out.stdout).ok()?;
            (view["state"] == "completed").then_some(view)
        }
    })
    .await;
    assert_eq!(view["input"], json!({"action": "[REDACTED]"}), "{view}");
    assert_eq!(view["output"], json!({"action": "deploy", "decision": "approve"}), "{view}");
}
