//! `runfleet bench` end to end at toy sizes: every scenario runs against the
//! real fleets it starts (child nats-server, coordinator, workers, worker
//! processes) and writes its part of the JSON report. The figures are not
//! judged here (the machine is shared and a debug build is slow;
//! `docs/performance.md` has the measured ones): this checks that each
//! scenario completes, measures what it says, and loses nothing.

mod harness;

use std::process::Command;

use serde_json::Value;

fn number(report: &Value, pointer: &str) -> f64 {
    report
        .pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no number at {pointer} in {report:#}"))
}

#[test]
fn every_scenario_runs_and_reports() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let output = dir.path().join("bench.json");
    let run = Command::new(harness::process::runfleet_binary())
        .args(["bench", "--repeat", "1", "--runs", "200", "--workers", "1", "--slots", "8"])
        .args(["--concurrency", "16", "--rates", "50", "--latency-duration", "1s"])
        .args(["--steps", "5", "--step-runs", "2", "--event-rate", "200", "--event-duration", "1s"])
        .args(["--ttls", "1s", "--failover-runs", "2", "--scale-runs", "40", "--scale-running", "4"])
        .args(["--simulated-leases", "200", "--signal-runs", "3", "--drain-runs", "2", "--json", "--output"])
        .arg(&output)
        .env("RUNFLEET_NATS_SERVER", harness::nats::nats_server_binary())
        .output()
        .unwrap_or_else(|e| panic!("could not run runfleet bench: {e}"));
    assert!(
        run.status.success(),
        "runfleet bench failed ({}):\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    let printed: Value = serde_json::from_slice(&run.stdout).unwrap_or_else(|e| panic!("--json output: {e}"));
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(&output).unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("--output file: {e}"));
    assert_eq!(printed, written, "--json and --output differ");

    for key in [
        "machine",
        "floor",
        "throughput",
        "latency",
        "steps",
        "events",
        "failover",
        "scale",
        "signal",
        "drain",
    ] {
        assert!(written.get(key).is_some(), "no {key} in the report: {written:#}");
    }
    assert!(number(&written, "/machine/cpus") >= 1.0);
    assert!(number(&written, "/floor/0/runs_per_sec") > 0.0);
    // Both figures are runs over elapsed time; the registry's can only be
    // later, and every run completed.
    let terminal = number(&written, "/throughput/terminal_runs_per_sec/median");
    let registry = number(&written, "/throughput/registry_runs_per_sec/median");
    assert!(terminal > 0.0 && registry > 0.0 && registry <= terminal, "{written:#}");
    assert_eq!(number(&written, "/throughput/trials/0/failed"), 0.0);
    let ratio = number(&written, "/throughput/terminal_ratio/median");
    let floor = number(&written, "/throughput/floor_runs_per_sec/median");
    assert!((ratio - terminal / floor).abs() < 1e-9, "ratio is terminal / floor");
    // nats-server's counters: the floor's lifecycle publishes at least 8
    // messages per run (job, lease, 3 events, checkpoint, lease delete, ack)
    // and is sent at least the job and an answer to each of the other 7; a
    // fleet run at least publishes its submit, reply, run.created, job and
    // ack, and is sent their deliveries and acks.
    assert!(number(&written, "/floor/0/server/messages_in_per_run") >= 8.0, "{written:#}");
    assert!(number(&written, "/floor/0/server/messages_out_per_run") >= 8.0, "{written:#}");
    assert!(number(&written, "/throughput/trials/0/server/messages_in_per_run") >= 5.0, "{written:#}");
    assert!(number(&written, "/throughput/trials/0/server/messages_out_per_run") >= 5.0, "{written:#}");
    assert!(number(&written, "/throughput/trials/0/server/bytes_out_per_run") > 0.0, "{written:#}");
    assert!(
        (number(&written, "/throughput/fleet_messages_per_run/median")
            - number(&written, "/throughput/trials/0/server/messages_in_per_run")
            - number(&written, "/throughput/trials/0/server/messages_out_per_run"))
        .abs()
            < 1e-9,
        "messages per run is in + out"
    );
    // CPU per run, from /proc: both the bench's process and nats-server
    // work for every run (a debug build's fleet costs milliseconds per run,
    // far above a clock tick over 200 runs), and the summary is the sum.
    for trial in ["/floor/0/cpu", "/throughput/trials/0/cpu", "/latency/rates/0/trials/0/cpu"] {
        assert!(number(&written, &format!("{trial}/process_ms")) > 0.0, "{written:#}");
        assert!(number(&written, &format!("{trial}/nats_server_ms")) > 0.0, "{written:#}");
    }
    assert!(
        (number(&written, "/throughput/fleet_cpu_ms_per_run/median")
            - number(&written, "/throughput/trials/0/cpu/process_ms")
            - number(&written, "/throughput/trials/0/cpu/nats_server_ms"))
        .abs()
            < 1e-9,
        "CPU per run is the process's + nats-server's"
    );
    assert_eq!(number(&written, "/latency/rates/0/percent"), 50.0);
    // The floor at the same offered rate ran every job it was offered,
    // each finishing after it started.
    let floor_runs = number(&written, "/latency/rates/0/trials/0/floor/runs");
    assert!(floor_runs >= 1.0, "{written:#}");
    assert!(
        number(&written, "/latency/rates/0/trials/0/floor/job_to_start/p50_ms")
            <= number(&written, "/latency/rates/0/trials/0/floor/job_to_complete/p50_ms"),
        "a floor job completes after it starts"
    );
    assert!(number(&written, "/latency/rates/0/trials/0/floor/cpu/nats_server_ms") > 0.0, "{written:#}");
    assert!(number(&written, "/latency/rates/0/trials/0/runs") >= 1.0);
    // The split of a submit: leaving late, then the reply, both from the
    // intended send time.
    assert!(
        number(&written, "/latency/rates/0/trials/0/send_lag/p50_ms")
            <= number(&written, "/latency/rates/0/trials/0/submit_to_reply/p50_ms"),
        "the reply comes after the submit left"
    );
    assert!(number(&written, "/latency/rates/0/trials/0/server/messages_in_per_run") >= 5.0, "{written:#}");
    assert!(
        number(&written, "/latency/rates/0/start_p99_ms/median")
            <= number(&written, "/latency/rates/0/complete_p99_ms/median")
            || number(&written, "/latency/rates/0/trials/0/runs") < 100.0,
        "a run completes after it starts"
    );
    assert!(number(&written, "/steps/trials/0/step/p50_ms") > 0.0);
    assert!(number(&written, "/steps/trials/0/atomic_batch_round_trip/p50_ms") > 0.0);
    assert!(number(&written, "/events/runfleet/emitted") > 0.0);
    assert_eq!(number(&written, "/events/runfleet/lost"), 0.0, "events lost: {:#}", written["events"]);
    assert!(written.pointer("/failover/ttls/0").is_some());
    assert_eq!(number(&written, "/scale/lease_updates_of_waiting_runs"), 0.0, "a waiting run held a lease");
    assert!(number(&written, "/scale/expected_lease_updates_per_sec") > 0.0);
    // The workers count their heap: a running run's task and state show
    // in it (a sleeping run holds well over a KiB).
    assert!(number(&written, "/scale/rss_idle_mib/workers_heap/median") > 0.0, "{:#}", written["scale"]);
    assert!(
        number(&written, "/scale/worker_heap_bytes_per_running_run/median") > 1024.0,
        "{:#}",
        written["scale"]
    );
}
