//! `runfleet dev`: the embedded fleet starts from one command, serves runs,
//! and stops everything it started on SIGINT.

mod harness;

use std::process::{Command, Stdio};
use std::time::Duration;

use harness::process::{run_cli, runfleet_binary, RunfleetProcess};
use serde_json::Value;

const SIGINT: i32 = 2;

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    listener.local_addr().unwrap_or_else(|e| panic!("{e}")).port()
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_serves_runs_and_stops_everything_on_sigint() {
    let data = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let args: Vec<String> = vec![
        "dev".into(),
        "--data-dir".into(),
        data.path().display().to_string(),
        "--nats-port".into(),
        port.to_string(),
        "--workers".into(),
        "2".into(),
    ];
    let mut dev = RunfleetProcess::spawn("dev", &args);

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = run_cli(&["workers".into(), "--json".into(), "--nats-url".into(), url.clone()]);
        let live = serde_json::from_slice::<Value>(&out.stdout).ok().and_then(|v| v.as_array().map(Vec::len));
        if live == Some(2) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "dev did not come up: {}", dev.logs());
        std::thread::sleep(Duration::from_millis(200));
    }

    // The child nats-server collects garbage less often than Go's default
    // (runfleet's own `GOGC`, if the suite runs with one, reaches it as is).
    let server = child_nats_server(port).unwrap_or_else(|| panic!("no nats-server on port {port}"));
    let expected = std::env::var("GOGC").unwrap_or_else(|_| "400".to_owned());
    assert_eq!(
        environ_var(server, "GOGC").as_deref(),
        Some(expected.as_str()),
        "the child nats-server's GOGC"
    );

    let out = run_cli(&[
        "submit".into(),
        "--agent".into(),
        "echo".into(),
        "--input".into(),
        r#"{"dev": true}"#.into(),
        "--wait".into(),
        "--json".into(),
        "--nats-url".into(),
        url.clone(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reply["state"], "completed");
    assert!(data.path().join("runfleet.db").exists(), "the SQLite registry lives in the data dir");

    dev.signal(SIGINT);
    let status =
        dev.wait_exit(Duration::from_secs(60)).unwrap_or_else(|| panic!("dev did not stop: {}", dev.logs()));
    assert!(status.success(), "dev exited with {status}: {}", dev.logs());
    // The child nats-server is gone with it.
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nats-server still accepts connections after dev stopped"
    );
}

/// The pid of the nats-server process started with `-p <port>`.
fn child_nats_server(port: u16) -> Option<u32> {
    let port = port.to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_server = args.first().is_some_and(|exe| exe.ends_with(b"nats-server"));
        let on_port = args.windows(2).any(|pair| pair[0] == b"-p" && pair[1] == port.as_bytes());
        (is_server && on_port).then_some(pid)
    })
}

/// One variable of a process's environment, as it was started.
fn environ_var(pid: u32, name: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{name}=");
    environ.split(|b| *b == 0).find_map(|entry| {
        let entry = std::str::from_utf8(entry).ok()?;
        entry.strip_prefix(prefix.as_str()).map(str::to_owned)
    })
}

#[test]
fn dev_without_nats_server_says_how_to_install_it() {
    let cwd = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(runfleet_binary())
        .args(["dev", "--nats-port", &free_port().to_string()])
        .current_dir(cwd.path())
        .env_remove("RUNFLEET_NATS_SERVER")
        .env("PATH", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nats-server") && stderr.contains("install-deps.sh"), "{stderr}");
}
