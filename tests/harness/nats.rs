//! A real `nats-server` with JetStream on a random port and a temp store dir,
//! killed on drop, restartable on the same port and store.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// Where the nats-server binary is: `$RUNFLEET_NATS_SERVER`, the project's
/// `.tools/venv/bin/nats-server` (installed by scripts/install-deps.sh), or PATH.
pub fn nats_server_binary() -> PathBuf {
    if let Ok(path) = std::env::var("RUNFLEET_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/venv/bin/nats-server");
    if local.exists() {
        return local;
    }
    PathBuf::from("nats-server")
}

pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: tempfile::TempDir,
    extra_args: Vec<String>,
    /// Extra environment of the server process (e.g. the `$VARIABLES` a
    /// configuration file refers to).
    env: Vec<(String, String)>,
    /// Everything the server wrote to stderr (its log), across restarts.
    log: Arc<Mutex<Vec<String>>>,
}

/// The most log lines kept per server.
const MAX_LOG_LINES: usize = 100_000;

impl NatsServer {
    /// Starts a JetStream-enabled server on a random loopback port.
    pub fn start() -> Self {
        Self::start_with_args(&[])
    }

    /// Starts with extra command-line arguments.
    pub fn start_with_args(extra: &[&str]) -> Self {
        let store = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        let mut server = Self {
            child: None,
            port: 0,
            store,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            log: Arc::default(),
        };
        server.spawn(None);
        server
    }

    /// Starts with a configuration file (`-c config`) and environment
    /// variables for the `$VARIABLES` it refers to. The command line still
    /// sets JetStream, the loopback address, a random port and a temp store
    /// dir, which override the file's `listen` and `store_dir`.
    pub fn start_with_config(config: &Path, env: &[(&str, &str)]) -> Self {
        let store = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        let mut server = Self {
            child: None,
            port: 0,
            store,
            extra_args: vec!["-c".to_owned(), config.display().to_string()],
            env: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            log: Arc::default(),
        };
        server.spawn(None);
        server
    }

    fn spawn(&mut self, port: Option<u16>) {
        let port_arg = port.map(|p| p.to_string()).unwrap_or_else(|| "-1".to_owned());
        let mut child = Command::new(nats_server_binary())
            .args(["-js", "-a", "127.0.0.1", "-p", &port_arg, "-sd"])
            .arg(self.store.path())
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "could not start {}: {e}; run scripts/install-deps.sh or set RUNFLEET_NATS_SERVER",
                    nats_server_binary().display()
                )
            });
        let stderr = child.stderr.take().unwrap_or_else(|| panic!("nats-server stderr"));
        let (tx, rx) = mpsc::channel();
        let log = Arc::clone(&self.log);
        std::thread::spawn(move || {
            let mut ready_port = None;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("RUNFLEET_TEST_NATS_LOG").is_some() {
                    eprintln!("[nats] {line}");
                }
                if let Ok(mut log) = log.lock() {
                    if log.len() < MAX_LOG_LINES {
                        log.push(line.clone());
                    }
                }
                if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                    ready_port = rest.rsplit(':').next().and_then(|p| p.trim().parse::<u16>().ok());
                }
                if line.contains("Server is ready") {
                    let _ = tx.send(ready_port);
                }
            }
        });
        let ready = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("nats-server did not become ready: {e}\n{}", self.log().join("\n")));
        self.port = ready.unwrap_or_else(|| panic!("nats-server did not report its port"));
        self.child = Some(child);
    }

    /// The server's log so far (stderr lines, across restarts).
    pub fn log(&self) -> Vec<String> {
        self.log.lock().map(|log| log.clone()).unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// Stops the server (SIGKILL) without removing its store.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends the server process a signal by name (`STOP` pauses it with
    /// its sockets open, `CONT` lets it go on).
    pub fn signal(&self, name: &str) {
        let Some(child) = &self.child else { panic!("nats-server is not running") };
        let status = Command::new("kill")
            .args(["-s", name, &child.id().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("kill -s {name}: {e}"));
        assert!(status.success(), "kill -s {name} failed: {status}");
    }

    /// Kills the server and starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port;
        self.spawn(Some(port));
    }

    /// A connected client, for tests that publish or inspect directly.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.unwrap_or_else(|e| panic!("connect: {e}"))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
