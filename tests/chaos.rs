//! `runfleet chaos` at CI size, as a real process: 200 multi-step runs on
//! four worker processes while 20 workers are SIGKILLed, two are SIGSTOPped
//! past the lease TTL and nats-server restarts once; then every run's
//! invariants are checked from the event log, the checkpoints and the
//! side-effect journal (the checker itself is unit-tested in `src/chaos/check.rs`
//! against hand-made violating logs).

use std::io::Read as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Far above the expected minute or two: only a hang should hit it.
const DEADLINE: Duration = Duration::from_secs(15 * 60);

/// Stops the chaos process if the test fails before it exits: SIGTERM first
/// (it then kills its fleet), SIGKILL if it does not exit within 10 s.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else { return };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn chaos_keeps_every_invariant() {
    let stdout = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("{e}"));
    let stderr = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("{e}"));
    let args = [
        "chaos",
        "--runs",
        "200",
        "--kills",
        "20",
        "--pauses",
        "2",
        "--server-restarts",
        "1",
        "--workers",
        "4",
        "--slots",
        "8",
        "--steps",
        "10",
        "--step-ms",
        "500",
        "--lease-ttl",
        "2s",
        "--json",
    ];
    let child = Command::new(env!("CARGO_BIN_EXE_runfleet"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout.reopen().unwrap_or_else(|e| panic!("{e}")))
        .stderr(stderr.reopen().unwrap_or_else(|e| panic!("{e}")))
        .spawn()
        .unwrap_or_else(|e| panic!("could not start runfleet chaos: {e}"));
    let mut guard = Guard(Some(child));

    let started = Instant::now();
    let status = loop {
        let child = guard.0.as_mut().unwrap_or_else(|| panic!("child gone"));
        if let Some(status) = child.try_wait().unwrap_or_else(|e| panic!("{e}")) {
            break status;
        }
        assert!(started.elapsed() < DEADLINE, "runfleet chaos still running after {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    guard.0 = None;

    let read = |file: &tempfile::NamedTempFile| {
        let mut text = String::new();
        let _ = file.reopen().and_then(|mut f| f.read_to_string(&mut text));
        text
    };
    let (out, err) = (read(&stdout), read(&stderr));
    // The progress log; shown with --nocapture or when the test fails.
    eprintln!("{err}\n{out}");
    assert!(status.success(), "runfleet chaos failed ({status}):\nstdout:\n{out}\nstderr:\n{err}");

    let summary: Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("summary is not JSON ({e}): {out}"));
    assert_eq!(summary["violations"], serde_json::json!([]), "{summary:#}");
    assert_eq!(summary["problems"], serde_json::json!([]), "{summary:#}");
    assert_eq!(summary["runs"], 200, "{summary:#}");
    assert_eq!(summary["completed"], 200, "{summary:#}");
    assert_eq!(summary["kills"], 20, "{summary:#}");
    assert_eq!(summary["pauses"], 2, "{summary:#}");
    assert_eq!(summary["server_restarts"], 1, "{summary:#}");
    assert!(summary["resumes"].as_u64().unwrap_or(0) > 0, "no run was resumed: {summary:#}");
    assert!(
        summary["resumes_from_killed"].as_u64().unwrap_or(0) > 0,
        "no run was taken over from a killed worker: {summary:#}"
    );
}
