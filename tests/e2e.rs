//! End to end through real processes: `runfleet coordinator` and `runfleet
//! worker` against a real nats-server and a real registry database, driven by
//! the `runfleet` command line exactly as a user would.

mod harness;

use std::time::Duration;

use harness::stream::{by_run, check_run_log, eventually, tenant_events};
use harness::{Fleet, TestDb};
use runfleet_protocol::event::EventBody;
use runfleet_protocol::{ErrorCode, RunId, TenantId};
use serde_json::{json, Value};

fn stdout_json(output: &std::process::Output) -> Value {
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!("not JSON ({e}): {text}\nstderr: {}", String::from_utf8_lossy(&output.stderr))
    })
}

fn stdout_lines(output: &std::process::Output) -> Vec<Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

async fn run_path_end_to_end(db: TestDb) {
    harness::init_tracing();
    let fleet = Fleet::start(db, 1, 4).await;

    // submit --wait --json: the terminal state and the output.
    let out =
        fleet.cli(&["submit", "--agent", "echo", "--input", r#"{"hello":"world"}"#, "--wait", "--json"]);
    assert!(out.status.success(), "submit failed: {}", String::from_utf8_lossy(&out.stderr));
    let reply = stdout_json(&out);
    assert_eq!(reply["state"], "completed");
    assert_eq!(reply["output"], json!({"hello": "world"}));
    let run_id = reply["run_id"].as_str().unwrap_or_else(|| panic!("no run_id: {reply}")).to_owned();

    // watch replays the whole log: seq 1..n with no gap, created → started → completed.
    let out = fleet.cli(&["watch", &run_id, "--json"]);
    assert!(out.status.success(), "watch failed: {}", String::from_utf8_lossy(&out.stderr));
    let events = stdout_lines(&out);
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap_or(0)).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap_or("")).collect();
    assert_eq!(types, ["run.created", "run.started", "run.completed"]);
    assert!(events.iter().all(|e| e["run_id"] == run_id.as_str()));

    // The registry (projected from the stream) shows the final state and output.
    let nats_url = fleet.nats_url();
    let view = eventually(Duration::from_secs(30), "registry to show the run completed", || {
        let run_id = run_id.clone();
        let nats_url = nats_url.clone();
        async move {
            let out = harness::process::run_cli(&[
                "list".into(),
                "--json".into(),
                "--state".into(),
                "completed".into(),
                "--nats-url".into(),
                nats_url,
            ]);
            let runs = stdout_json(&out);
            runs.as_array()?.iter().find(|r| r["run_id"] == run_id.as_str()).cloned()
        }
    })
    .await;
    assert_eq!(view["output"], json!({"hello": "world"}));
    assert_eq!(view["agent"], "echo");
    assert_eq!(view["last_seq"], 3);
    let out = fleet.cli(&["get", &run_id, "--json"]);
    assert_eq!(stdout_json(&out)["state"], "completed");

    // A failing agent: --wait exits non-zero and reports the typed error.
    let out =
        fleet.cli(&["submit", "--agent", "fail", "--input", r#"{"message":"boom"}"#, "--wait", "--json"]);
    assert!(!out.status.success(), "a failed run must exit non-zero");
    let reply = stdout_json(&out);
    assert_eq!(reply["state"], "failed");
    assert_eq!(reply["error"]["code"], "agent_failed");
    assert!(reply["error"]["message"].as_str().unwrap_or("").contains("boom"));

    // An agent no worker has fails the run with an error naming agent and worker.
    let out = fleet.cli(&["submit", "--agent", "nope", "--wait", "--json"]);
    assert!(!out.status.success());
    let reply = stdout_json(&out);
    assert_eq!(reply["error"]["code"], "unknown_agent");
    let message = reply["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("nope") && message.contains("w-"), "{message}");

    // sleep streams progress events while it runs.
    let out =
        fleet.cli(&["submit", "--agent", "sleep", "--input", r#"{"steps":3,"ms":50}"#, "--wait", "--json"]);
    assert!(out.status.success());
    let run_id = stdout_json(&out)["run_id"].as_str().unwrap_or("").to_owned();
    let events = stdout_lines(&fleet.cli(&["watch", &run_id, "--json"]));
    let progress =
        events.iter().filter(|e| e["type"] == "agent.event" && e["data"]["name"] == "progress").count();
    assert_eq!(progress, 3);

    // The worker registry lists the live worker with its slots.
    let workers = stdout_json(&fleet.cli(&["workers", "--json"]));
    let workers = workers.as_array().unwrap_or_else(|| panic!("workers: {workers}"));
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0]["slots"], 4);

    // Every run's log in the stream satisfies the invariants.
    let client = fleet.nats.client().await;
    for (run, events) in by_run(&tenant_events(&client, &TenantId::default_tenant()).await) {
        check_run_log(run, &events).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn run_path_end_to_end_sqlite() {
    run_path_end_to_end(TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn run_path_end_to_end_postgres() {
    run_path_end_to_end(TestDb::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_errors_are_one_line_and_non_zero() {
    let fleet = Fleet::start(TestDb::sqlite(), 0, 1).await;
    let cases: [&[&str]; 4] = [
        &["get", "not-a-uuid"],
        &["get", &RunId::generate().to_string()],
        &["submit", "--agent", "bad.agent"],
        &["submit", "--agent", "echo", "--input", "{not json"],
    ];
    for args in cases {
        let out = fleet.cli(args);
        assert!(!out.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: one-line error expected, got {stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
    }
    let out = fleet.cli(&["get", &RunId::generate().to_string()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains(ErrorCode::NotFound.as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn client_commands_fail_fast_without_a_server() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        l.local_addr().unwrap_or_else(|e| panic!("{e}")).port()
    };
    let out =
        harness::process::run_cli(&["list".into(), "--nats-url".into(), format!("nats://127.0.0.1:{port}")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("could not connect"));
}

#[test]
fn terminal_body_helper_matches_wire_types() {
    // Guards the harness's own invariant checker against silently passing.
    let run = RunId::generate();
    let created = runfleet_protocol::event::Event {
        run_id: run,
        tenant: TenantId::default_tenant(),
        seq: 1,
        ts_ms: 0,
        attempt: 0,
        worker_id: None,
        trace_id: None,
        body: EventBody::Completed(runfleet_protocol::event::RunCompleted { output: Value::Null }),
    };
    assert!(check_run_log(run, &[created]).is_err(), "a log without run.created must be rejected");
}
