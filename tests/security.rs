//! NATS security through real processes: every runfleet process (coordinator,
//! worker, CLI) reaches a nats-server that demands user/password or mutual
//! TLS, and fails at once (no hang) with an error naming the problem when its
//! credentials or certificates are wrong; tokens, NKeys and credentials
//! (JWT) files at the connection level; and the shipped multi-tenant
//! configuration (`deploy/nats/tenants.conf`), where a tenant reaches only
//! its own API and events while the coordinator and workers complete runs
//! as their own restricted users.

mod harness;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures::StreamExt;
use harness::process::runfleet_binary;
use harness::tls::TestCa;
use harness::{NatsServer, RunfleetProcess, TestDb};
use runfleet_ops::nats::{self as ops_nats, NatsConfig};
use runfleet_protocol::api::{ListRequest, SubmitRequest};
use runfleet_protocol::{codec, Names, TenantId};
use serde_json::{json, Value};

/// A process that cannot connect must have exited by then: a "does not
/// hang" check, not a timing assertion.
const NO_HANG: Duration = Duration::from_secs(30);
/// How long a run (or a fleet starting) may take.
const DEADLINE: Duration = Duration::from_secs(120);
/// What `runfleet_ops::nats::Error::Auth` says, as a process prints it.
const AUTH_REFUSED: &str = "refused the credentials";
/// What `runfleet_ops::nats::Error::Tls` says, as a process prints it.
const TLS_FAILED: &str = "TLS with NATS at";

// ---- helpers ----

/// A temp dir for configuration files.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new() -> Self {
        Self(tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}")))
    }

    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.path().join(name);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }
}

/// The settings of `nats` that are set, as (key, value) pairs.
fn nats_pairs(nats: &NatsConfig) -> Vec<(String, Value)> {
    match serde_json::to_value(nats).unwrap_or_else(|e| panic!("{e}")) {
        Value::Object(map) => map.into_iter().filter(|(_, v)| v != &Value::Bool(false)).collect(),
        other => panic!("NatsConfig serialized as {other}"),
    }
}

/// A runfleet TOML file with `nats` as its `[nats]` table.
fn nats_toml(nats: &NatsConfig) -> String {
    let mut toml = String::from("[nats]\n");
    for (key, value) in nats_pairs(nats) {
        // A JSON string or boolean is a TOML basic string or boolean.
        toml.push_str(&format!("{key} = {value}\n"));
    }
    toml
}

/// `nats` as `RUNFLEET_NATS__<KEY>` environment variables.
fn nats_env(nats: &NatsConfig) -> Vec<(String, String)> {
    nats_pairs(nats)
        .into_iter()
        .map(|(key, value)| {
            let value = match value {
                Value::String(s) => s,
                other => other.to_string(),
            };
            (format!("RUNFLEET_NATS__{}", key.to_ascii_uppercase()), value)
        })
        .collect()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// A coordinator reading `[nats]` from a config file.
fn coordinator(name: &str, server: &NatsServer, db: &TestDb, config: &Path) -> RunfleetProcess {
    coordinator_with(name, server, db, config, &[], &[])
}

fn coordinator_with(
    name: &str,
    server: &NatsServer,
    db: &TestDb,
    config: &Path,
    extra: &[&str],
    env: &[(String, String)],
) -> RunfleetProcess {
    let config = config.display().to_string();
    let url = server.url();
    let mut args =
        strings(&["--config", &config, "coordinator", "--nats-url", &url, "--database-url", &db.url]);
    args.extend(strings(extra));
    RunfleetProcess::spawn_with_env(name, &args, env)
}

/// A worker reading `[nats]` from the environment.
fn worker(name: &str, server: &NatsServer, env: &[(String, String)]) -> RunfleetProcess {
    worker_with(name, server, &[], env)
}

fn worker_with(name: &str, server: &NatsServer, extra: &[&str], env: &[(String, String)]) -> RunfleetProcess {
    let url = server.url();
    let mut args = strings(&["worker", "--nats-url", &url, "--slots", "4"]);
    args.extend(strings(extra));
    RunfleetProcess::spawn_with_env(name, &args, env)
}

/// Runs a CLI command with extra environment; panics if it is still running
/// after `within`.
async fn cli(args: &[&str], env: &[(String, String)], within: Duration) -> Output {
    let child = tokio::process::Command::new(runfleet_binary())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(within, child).await {
        Ok(output) => output.unwrap_or_else(|e| panic!("runfleet {args:?}: {e}")),
        Err(_) => panic!("runfleet {args:?} still running after {within:?}"),
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A CLI command that must succeed; retried while no coordinator answers
/// yet (it may still be starting).
async fn cli_ok(args: &[&str], env: &[(String, String)]) -> Output {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let out = cli(args, env, DEADLINE).await;
        if out.status.success() {
            return out;
        }
        let starting = stderr(&out).contains("no coordinator is serving");
        if !starting || tokio::time::Instant::now() > deadline {
            panic!("runfleet {args:?} failed: {}{}", stdout(&out), stderr(&out));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Submits `agent` with `input` and waits for the end through the CLI;
/// returns `submit --wait --json`'s object, which must say `completed`.
async fn run_to_completion(url: &str, env: &[(String, String)], agent: &str, input: &Value) -> Value {
    let input = input.to_string();
    let out =
        cli_ok(&["submit", "--agent", agent, "--input", &input, "--wait", "--json", "--nats-url", url], env)
            .await;
    let reply: Value = serde_json::from_str(stdout(&out).trim())
        .unwrap_or_else(|e| panic!("submit --wait --json printed {:?}: {e}", stdout(&out)));
    assert_eq!(reply["state"], "completed", "{reply}");
    reply
}

/// Waits for a process that cannot connect to exit non-zero, naming `why`.
fn expect_exit_naming(process: &mut RunfleetProcess, why: &str) {
    let status = process
        .wait_exit(NO_HANG)
        .unwrap_or_else(|| panic!("{} still running after {NO_HANG:?}: {}", process.name, process.logs()));
    assert!(!status.success(), "{} exited successfully: {}", process.name, process.logs());
    assert!(process.logs().contains(why), "{} did not say {why:?}: {}", process.name, process.logs());
}

/// Expects a CLI command to fail, naming `why`.
async fn expect_cli_failure(args: &[&str], env: &[(String, String)], why: &str) {
    let out = cli(args, env, NO_HANG).await;
    assert!(!out.status.success(), "runfleet {args:?} succeeded: {}", stdout(&out));
    assert!(stderr(&out).contains(why), "runfleet {args:?} did not say {why:?}: {}", stderr(&out));
}

// ---- user and password ----

#[tokio::test(flavor = "multi_thread")]
async fn user_and_password_reach_the_fleet_and_wrong_ones_fail_fast() {
    harness::init_tracing();
    let scratch = Scratch::new();
    let conf = scratch.file(
        "nats.conf",
        "authorization {\n  users: [\n    { user: runfleet, password: \"pw-0f9c2b\" }\n  ]\n}\n",
    );
    let server = NatsServer::start_with_config(&conf, &[]);
    let good = NatsConfig {
        user: Some("runfleet".into()),
        password: Some("pw-0f9c2b".into()),
        ..Default::default()
    };
    let bad = NatsConfig { password: Some("not-the-password".into()), ..good.clone() };

    // The coordinator reads [nats] from its file, the worker and the CLI
    // from RUNFLEET_NATS__USER / RUNFLEET_NATS__PASSWORD.
    let db = TestDb::sqlite();
    let _coordinator =
        coordinator("coordinator", &server, &db, &scratch.file("good.toml", &nats_toml(&good)));
    let _worker = worker("worker", &server, &nats_env(&good));
    let reply =
        run_to_completion(&server.url(), &nats_env(&good), "echo", &json!({"auth": "password"})).await;
    assert_eq!(reply["output"], json!({"auth": "password"}));

    // Wrong password: each process stops at once and says why.
    let bad_db = TestDb::sqlite();
    let mut bad_coordinator =
        coordinator("bad-coordinator", &server, &bad_db, &scratch.file("bad.toml", &nats_toml(&bad)));
    let mut bad_worker = worker("bad-worker", &server, &nats_env(&bad));
    expect_exit_naming(&mut bad_coordinator, AUTH_REFUSED);
    expect_exit_naming(&mut bad_worker, AUTH_REFUSED);
    let url = server.url();
    expect_cli_failure(&["submit", "--agent", "echo", "--nats-url", &url], &nats_env(&bad), AUTH_REFUSED)
        .await;
    // No credentials at all.
    expect_cli_failure(&["list", "--nats-url", &url], &[], AUTH_REFUSED).await;
}

// ---- TLS ----

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_reaches_the_fleet_and_bad_certificates_fail_fast() {
    harness::init_tracing();
    let scratch = Scratch::new();
    let ca = TestCa::new("fleet");
    let server_cert = ca.server("nats");
    let conf = scratch.file(
        "nats.conf",
        &format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 5\n}}\n",
            server_cert.cert_file, server_cert.key_file, ca.ca_file
        ),
    );
    let server = NatsServer::start_with_config(&conf, &[]);
    let with_cert = |name: &str| {
        let cert = ca.client(name);
        NatsConfig {
            tls_ca_file: Some(ca.ca_file.clone()),
            tls_cert_file: Some(cert.cert_file),
            tls_key_file: Some(cert.key_file),
            ..Default::default()
        }
    };

    let db = TestDb::sqlite();
    let coordinator_tls = with_cert("coordinator");
    let _coordinator = coordinator(
        "coordinator",
        &server,
        &db,
        &scratch.file("coordinator.toml", &nats_toml(&coordinator_tls)),
    );
    let _worker = worker("worker", &server, &nats_env(&with_cert("worker")));
    let reply =
        run_to_completion(&server.url(), &nats_env(&with_cert("cli")), "echo", &json!({"tls": true})).await;
    assert_eq!(reply["output"], json!({"tls": true}));

    let url = server.url();
    // Trusting the server but presenting no certificate: the server refuses.
    let no_cert = NatsConfig { tls_ca_file: Some(ca.ca_file.clone()), ..Default::default() };
    expect_cli_failure(&["list", "--nats-url", &url], &nats_env(&no_cert), TLS_FAILED).await;
    let mut bad_worker = worker("worker-without-cert", &server, &nats_env(&no_cert));
    expect_exit_naming(&mut bad_worker, TLS_FAILED);
    // A client of another CA: its certificate is unknown to the server, and
    // the server's is unknown to it.
    let other = TestCa::new("other");
    let stranger = other.client("stranger");
    let foreign = NatsConfig {
        tls_ca_file: Some(other.ca_file.clone()),
        tls_cert_file: Some(stranger.cert_file),
        tls_key_file: Some(stranger.key_file),
        ..Default::default()
    };
    expect_cli_failure(&["list", "--nats-url", &url], &nats_env(&foreign), TLS_FAILED).await;
    let bad_db = TestDb::sqlite();
    let mut bad_coordinator = coordinator(
        "foreign-coordinator",
        &server,
        &bad_db,
        &scratch.file("foreign.toml", &nats_toml(&foreign)),
    );
    expect_exit_naming(&mut bad_coordinator, TLS_FAILED);
    // Plaintext to a TLS-only server.
    expect_cli_failure(&["list", "--nats-url", &url], &[], "TLS").await;
}

// ---- token, NKey, credentials file (connection level) ----

async fn expect_auth_error(url: &str, nats: &NatsConfig) {
    match ops_nats::connect(url, nats, "security-test").await {
        Err(ops_nats::Error::Auth { .. }) => {}
        Err(other) => panic!("expected Error::Auth, got {other:?}"),
        Ok(_) => panic!("connected with wrong credentials {nats:?}"),
    }
}

async fn expect_connects(url: &str, nats: &NatsConfig) {
    let client =
        ops_nats::connect(url, nats, "security-test").await.unwrap_or_else(|e| panic!("{nats:?}: {e}"));
    client.flush().await.unwrap_or_else(|e| panic!("flush: {e}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn token_authenticates_and_a_wrong_token_is_an_auth_error() {
    let scratch = Scratch::new();
    let server = NatsServer::start_with_config(
        &scratch.file("nats.conf", "authorization {\n  token: \"tok-5e1d7a\"\n}\n"),
        &[],
    );
    let url = server.url();
    expect_connects(&url, &NatsConfig { token: Some("tok-5e1d7a".into()), ..Default::default() }).await;
    expect_auth_error(&url, &NatsConfig { token: Some("tok-wrong".into()), ..Default::default() }).await;
    expect_auth_error(&url, &NatsConfig::default()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nkey_seed_authenticates_and_an_unknown_key_is_an_auth_error() {
    let scratch = Scratch::new();
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap_or_else(|e| panic!("seed: {e}"));
    let server = NatsServer::start_with_config(
        &scratch.file(
            "nats.conf",
            &format!("authorization {{\n  users: [\n    {{ nkey: {} }}\n  ]\n}}\n", user.public_key()),
        ),
        &[],
    );
    let url = server.url();
    expect_connects(&url, &NatsConfig { nkey_seed: Some(seed.clone()), ..Default::default() }).await;
    let seed_file = scratch.file("user.nk", &format!("{seed}\n"));
    expect_connects(&url, &NatsConfig { nkey_seed_file: Some(seed_file), ..Default::default() }).await;
    let stranger = nkeys::KeyPair::new_user().seed().unwrap_or_else(|e| panic!("seed: {e}"));
    expect_auth_error(&url, &NatsConfig { nkey_seed: Some(stranger), ..Default::default() }).await;
}

/// A NATS JWT (`ed25519-nkey`) with `claims`, issued and signed by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let header = json!({"typ": "JWT", "alg": "ed25519-nkey"});
    let claims = json!({
        "jti": format!("{subject}-{now}"),
        "iat": now,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signing_input = format!("{}.{}", b64.encode(header.to_string()), b64.encode(claims.to_string()));
    let signature = issuer.sign(signing_input.as_bytes()).unwrap_or_else(|e| panic!("sign: {e}"));
    format!("{signing_input}.{}", b64.encode(signature))
}

/// Operator mode with a memory resolver: operator → account → user, as
/// `nsc` would make them, and the user's credentials file.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_file_authenticates_and_a_foreign_one_is_an_auth_error() {
    let scratch = Scratch::new();
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let system = nkeys::KeyPair::new_account();
    let unlimited = json!({"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                           "wildcards": true, "conn": -1, "leaf": -1});
    let operator_jwt =
        jwt(&operator, &operator.public_key(), "runfleet-test", json!({"type": "operator", "version": 2}));
    let account_claims = json!({"limits": unlimited, "default_permissions": {"pub": {}, "sub": {}},
                                "type": "account", "version": 2});
    let account_jwt = jwt(&operator, &account.public_key(), "RUNFLEET", account_claims.clone());
    let system_jwt = jwt(&operator, &system.public_key(), "SYS", account_claims);
    let user_claims = json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                             "type": "user", "version": 2});
    let creds = |signer: &nkeys::KeyPair, name: &str| {
        let user = nkeys::KeyPair::new_user();
        let user_jwt = jwt(signer, &user.public_key(), name, user_claims.clone());
        let seed = user.seed().unwrap_or_else(|e| panic!("seed: {e}"));
        scratch.file(
            &format!("{name}.creds"),
            &format!(
                "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
                 -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
            ),
        )
    };
    let conf = scratch.file(
        "nats.conf",
        &format!(
            "operator: {operator_jwt}\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {acc}: {account_jwt}\n  {sys}: {system_jwt}\n}}\n",
            sys = system.public_key(),
            acc = account.public_key(),
        ),
    );
    let server = NatsServer::start_with_config(&conf, &[]);
    let url = server.url();
    let good = creds(&account, "runfleet-user");
    expect_connects(&url, &NatsConfig { creds_file: Some(good), ..Default::default() }).await;
    // Signed by an account the operator never issued.
    let rogue = creds(&nkeys::KeyPair::new_account(), "rogue-user");
    expect_auth_error(&url, &NatsConfig { creds_file: Some(rogue), ..Default::default() }).await;
}

// ---- the shipped multi-tenant configuration ----

/// The shipped `deploy/nats/tenants.conf`, unchanged but for the
/// monitoring port (several servers run at once) and the store dir (the
/// harness's command line gives one, as it gives the listen address); the
/// passwords come from the environment, as in production.
fn shipped_tenants_conf(scratch: &Scratch) -> PathBuf {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nats/tenants.conf");
    let text = std::fs::read_to_string(&shipped).unwrap_or_else(|e| panic!("{}: {e}", shipped.display()));
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| !["http:", "store_dir:"].iter().any(|key| line.trim_start().starts_with(key)))
        .collect();
    assert_eq!(
        kept.len() + 2,
        text.lines().count(),
        "tenants.conf no longer sets `http` and `store_dir` once each"
    );
    scratch.file("tenants.conf", &kept.join("\n"))
}

fn password_user(user: &str, password: &str) -> NatsConfig {
    NatsConfig { user: Some(user.into()), password: Some(password.into()), ..Default::default() }
}

/// The subjects `stream` holds messages on under `filter`.
async fn stored_subjects(js: &async_nats::jetstream::Context, stream: &str, filter: &str) -> Vec<String> {
    let stream = js.get_stream(stream).await.unwrap_or_else(|e| panic!("stream {stream}: {e}"));
    let mut info = stream.info_with_subjects(filter).await.unwrap_or_else(|e| panic!("subjects: {e}"));
    let mut subjects = Vec::new();
    while let Some(item) = info.next().await {
        subjects.push(item.unwrap_or_else(|e| panic!("subjects: {e}")).0);
    }
    subjects
}

/// A raw connection that reports the server's errors (permission
/// violations) on a channel.
async fn observed(
    url: &str,
    nats: &NatsConfig,
) -> (async_nats::Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let options =
        nats.options("security-test").await.unwrap_or_else(|e| panic!("{e}")).event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(error) = event {
                    let _ = tx.send(error.to_string());
                }
            }
        });
    let client = options.connect(url).await.unwrap_or_else(|e| panic!("connect {nats:?}: {e}"));
    (client, rx)
}

/// Waits for the server to report a permissions violation for `operation`
/// (`Publish` or `Subscription`) on `subject`.
async fn expect_violation(
    errors: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    operation: &str,
    subject: &str,
) {
    let wanted = format!("permissions violation for {operation} to \"{subject}\"").to_lowercase();
    let found = tokio::time::timeout(NO_HANG, async {
        while let Some(error) = errors.recv().await {
            if error.to_lowercase().contains(&wanted) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "the server did not report {wanted:?}");
}

/// The JSON lines of `runfleet watch --json`.
fn watch_lines(out: &Output) -> Vec<Value> {
    stdout(out)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("watch printed {line:?}: {e}")))
        .collect()
}

/// Submits without waiting; the run id.
async fn submit_json(url: &str, env: &[(String, String)], agent: &str, input: &Value) -> String {
    let input = input.to_string();
    let out =
        cli_ok(&["submit", "--agent", agent, "--input", &input, "--json", "--nats-url", url], env).await;
    let reply: Value = serde_json::from_str(stdout(&out).trim()).unwrap_or_else(|e| panic!("{e}"));
    reply["run_id"].as_str().unwrap_or_else(|| panic!("no run id in {reply}")).to_owned()
}

async fn wait_for_state(url: &str, env: &[(String, String)], run: &str, state: &str) {
    harness::stream::eventually(DEADLINE, &format!("run {run} to be {state}"), || async move {
        let out = cli(&["get", run, "--json", "--nats-url", url], env, DEADLINE).await;
        let view: Value = serde_json::from_str(stdout(&out).trim()).ok()?;
        (view["state"] == state).then_some(())
    })
    .await;
}

/// The event types `runfleet watch` prints for the run, to its end.
async fn watch_types(url: &str, env: &[(String, String)], run: &str) -> Vec<String> {
    let out = cli_ok(&["watch", run, "--json", "--nats-url", url], env).await;
    watch_lines(&out).iter().filter_map(|e| e["type"].as_str().map(str::to_owned)).collect()
}

fn submit_request(agent: &str, input: Value) -> SubmitRequest {
    SubmitRequest {
        agent: agent.into(),
        input,
        queue: None,
        priority: None,
        idempotency_key: None,
        max_attempts: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shipped_tenant_config_isolates_tenants_and_suffices_for_the_fleet() {
    harness::init_tracing();
    let scratch = Scratch::new();
    let secrets = [
        ("RUNFLEET_COORDINATOR_PASSWORD", "coord-pw-31c7"),
        ("RUNFLEET_WORKER_PASSWORD", "worker-pw-82ad"),
        ("RUNFLEET_ACME_PASSWORD", "acme-pw-4be0"),
        ("RUNFLEET_GLOBEX_PASSWORD", "globex-pw-9f15"),
    ];
    let server = NatsServer::start_with_config(&shipped_tenants_conf(&scratch), &secrets);
    let url = server.url();
    let coordinator_nats = password_user("coordinator", "coord-pw-31c7");
    let worker_nats = password_user("worker", "worker-pw-82ad");
    let acme_nats = password_user("acme", "acme-pw-4be0");
    let globex_nats = password_user("globex", "globex-pw-9f15");
    let mut acme_env = nats_env(&acme_nats);
    acme_env.push(("RUNFLEET_TENANT".into(), "acme".into()));
    let mut globex_env = nats_env(&globex_nats);
    globex_env.push(("RUNFLEET_TENANT".into(), "globex".into()));

    // The fleet as its own users, in configurations that make every path
    // run within the test: short leases (crash resume), an eager recovery
    // loop, and every checkpoint in the object store (the smallest inline
    // limit).
    let db = TestDb::sqlite();
    let recovery_env = [
        ("RUNFLEET_COORDINATOR__RECOVERY_INTERVAL".to_owned(), "1s".to_owned()),
        ("RUNFLEET_COORDINATOR__RECOVERY_MIN_AGE".to_owned(), "1s".to_owned()),
        ("RUNFLEET_COORDINATOR__ENDED_RUN_RETENTION".to_owned(), "1s".to_owned()),
    ];
    // Their operations endpoints too: readiness and the sampled gauges need
    // JetStream calls the shipped permissions must allow.
    let (coordinator_ops, worker_ops) = (harness::http::free_addr(), harness::http::free_addr());
    let coordinator_metrics = coordinator_ops.to_string();
    let _coordinator = coordinator_with(
        "coordinator",
        &server,
        &db,
        &scratch.file("coordinator.toml", &nats_toml(&coordinator_nats)),
        &["--lease-ttl", "2s", "--metrics-addr", &coordinator_metrics],
        &recovery_env,
    );
    let mut worker_env = nats_env(&worker_nats);
    worker_env.push(("RUNFLEET_WORKER__CHECKPOINT_INLINE_LIMIT".into(), "1024".into()));
    let mut first_env = worker_env.clone();
    first_env.push(("RUNFLEET_WORKER__METRICS_ADDR".into(), worker_ops.to_string()));
    let drain = ["--shutdown-grace", "200ms", "--handoff-timeout", "5s", "--test-agents"];
    let mut first_worker = worker_with("worker-1", &server, &drain, &first_env);

    // acme submits, waits, watches and reads its runs through the CLI.
    let echo = run_to_completion(&url, &acme_env, "echo", &json!({"tenant": "acme"})).await;
    assert_eq!(echo["output"], json!({"tenant": "acme"}));
    let echo_run = echo["run_id"].as_str().unwrap_or_else(|| panic!("{echo}")).to_owned();
    let watched = cli_ok(&["watch", &echo_run, "--json", "--nats-url", &url], &acme_env).await;
    let events = watch_lines(&watched);
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "watch: {events:?}");
    assert_eq!(events.last().map(|e| e["type"].clone()), Some(json!("run.completed")), "{events:?}");
    for (who, addr) in [("coordinator", coordinator_ops), ("worker", worker_ops)] {
        let ready = harness::http::get(addr, "/readyz");
        assert_eq!(ready.as_ref().map(|(status, _)| *status), Some(200), "{who} /readyz: {ready:?}");
    }
    let metrics = harness::http::get(coordinator_ops, "/metrics").map(|(_, body)| body).unwrap_or_default();
    assert!(metrics.contains("runfleet_jobs_pending{"), "jobs pending not sampled:\n{metrics}");
    let stepped =
        run_to_completion(&url, &acme_env, "steps", &json!({"steps": 3, "ms": 10, "output_bytes": 4096}))
            .await;
    let stepped = stepped["run_id"].as_str().unwrap_or_else(|| panic!("{stepped}")).to_owned();
    run_to_completion(&url, &acme_env, "timer", &json!({"sleep_ms": 200})).await;

    // An approval: the run waits, acme approves, the run completes.
    let approval_run = submit_json(&url, &acme_env, "approval", &json!({"action": "deploy"})).await;
    wait_for_state(&url, &acme_env, &approval_run, "waiting").await;
    cli_ok(&["approve", &approval_run, "--nats-url", &url], &acme_env).await;
    let types = watch_types(&url, &acme_env, &approval_run).await;
    assert_eq!(types.last().map(String::as_str), Some("run.completed"), "{types:?}");

    // The retention sweep, under the coordinator's shipped permissions: a
    // second after it ended, the `steps` run's checkpoints and the objects
    // of its large outputs are gone.
    let (coordinator_client, _) = observed(&url, &coordinator_nats).await;
    let js = async_nats::jetstream::new(coordinator_client);
    harness::stream::eventually(Duration::from_secs(60), "the ended run's leftovers to be purged", || {
        let (js, run) = (js.clone(), stepped.clone());
        async move {
            let checkpoints =
                stored_subjects(&js, "KV_runfleet-checkpoints", &format!("$KV.runfleet-checkpoints.{run}.>"))
                    .await;
            let objects = stored_subjects(&js, "OBJ_runfleet-blobs", "$O.runfleet-blobs.M.>").await;
            let named = base64::engine::general_purpose::URL_SAFE;
            let prefix = format!("checkpoints/{run}/");
            let ours = objects
                .iter()
                .filter_map(|subject| subject.rsplit('.').next())
                .filter_map(|name| named.decode(name).ok())
                .filter(|name| name.starts_with(prefix.as_bytes()))
                .count();
            (checkpoints.is_empty() && ours == 0).then_some(())
        }
    })
    .await;

    // A signal wakes a run waiting on it before its deadline (the worker
    // disarms its timer); a waiting run cancelled (the coordinator purges
    // its timer).
    let awaiting = submit_json(&url, &acme_env, "await", &json!({"key": "go", "timeout_ms": 600_000})).await;
    wait_for_state(&url, &acme_env, &awaiting, "waiting").await;
    cli_ok(&["signal", &awaiting, "go", "--payload", r#"{"ok":true}"#, "--nats-url", &url], &acme_env).await;
    let types = watch_types(&url, &acme_env, &awaiting).await;
    assert_eq!(types.last().map(String::as_str), Some("run.completed"), "{types:?}");
    let parked = submit_json(&url, &acme_env, "await", &json!({"key": "never", "timeout_ms": 600_000})).await;
    wait_for_state(&url, &acme_env, &parked, "waiting").await;
    let out = cli_ok(&["cancel", &parked, "--wait", "--json", "--nats-url", &url], &acme_env).await;
    let cancelled: Value = serde_json::from_str(stdout(&out).trim()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");

    // A running run cancelled.
    let sleeping = submit_json(&url, &acme_env, "sleep", &json!({"steps": 100, "ms": 100})).await;
    wait_for_state(&url, &acme_env, &sleeping, "running").await;
    let out = cli_ok(&["cancel", &sleeping, "--wait", "--json", "--nats-url", &url], &acme_env).await;
    let cancelled: Value = serde_json::from_str(stdout(&out).trim()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");

    // A worker killed mid-run: another resumes the run from its checkpoints.
    let crashing =
        submit_json(&url, &acme_env, "steps", &json!({"steps": 40, "ms": 100, "output_bytes": 2048})).await;
    wait_for_state(&url, &acme_env, &crashing, "running").await;
    first_worker.signal(9);
    first_worker.wait_exit(NO_HANG);
    let mut second_worker = worker_with("worker-2", &server, &drain, &worker_env);
    let types = watch_types(&url, &acme_env, &crashing).await;
    assert!(types.contains(&"run.resumed".to_owned()), "no resume after the crash: {types:?}");
    assert_eq!(types.last().map(String::as_str), Some("run.completed"), "{types:?}");

    // A worker drained mid-run hands the run off to another.
    let handed = submit_json(&url, &acme_env, "steps", &json!({"steps": 40, "ms": 100})).await;
    wait_for_state(&url, &acme_env, &handed, "running").await;
    let _third_worker = worker_with("worker-3", &server, &drain, &worker_env);
    second_worker.signal(15);
    let types = watch_types(&url, &acme_env, &handed).await;
    assert!(types.contains(&"run.handoff".to_owned()), "no hand-off on drain: {types:?}");
    assert_eq!(types.last().map(String::as_str), Some("run.completed"), "{types:?}");
    second_worker.wait_exit(NO_HANG);

    // globex's own run, and what acme cannot see of it.
    let globex_run = run_to_completion(&url, &globex_env, "echo", &json!({"tenant": "globex"})).await
        ["run_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no run id"))
        .to_owned();
    expect_cli_failure(&["get", &globex_run, "--nats-url", &url], &acme_env, "not_found").await;

    // acme may not publish on globex's API: the server says so and the
    // coordinator never sees it (globex has no new run).
    let (acme, mut acme_errors) =
        observed(&url, &NatsConfig { inbox_prefix: Some("_INBOX.acme".into()), ..acme_nats.clone() }).await;
    let globex_submit =
        Names::default().api(&TenantId::new("globex").unwrap_or_else(|e| panic!("{e}")), "submit");
    let payload =
        codec::encode(&submit_request("echo", json!({"from": "acme"}))).unwrap_or_else(|e| panic!("{e}"));
    let request = async_nats::Request::new().payload(payload.into()).timeout(Some(Duration::from_secs(2)));
    assert!(
        acme.send_request(globex_submit.clone(), request).await.is_err(),
        "acme got an answer from globex's API"
    );
    expect_violation(&mut acme_errors, "Publish", &globex_submit).await;
    let globex = runfleet::client::Client::connect_with(
        &url,
        &globex_nats,
        TenantId::new("globex").unwrap_or_else(|e| panic!("{e}")),
        Names::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let globex_runs = globex.list(ListRequest::default()).await.unwrap_or_else(|e| panic!("{e}")).runs;
    assert_eq!(globex_runs.len(), 1, "globex's runs: {globex_runs:?}");

    // acme may not read globex's events: refused, and nothing arrives while
    // a globex run writes its log; acme's own events do arrive (control).
    let mut spy = acme.subscribe("runfleet.runs.globex.>").await.unwrap_or_else(|e| panic!("{e}"));
    expect_violation(&mut acme_errors, "Subscription", "runfleet.runs.globex.>").await;
    let mut own = acme.subscribe("runfleet.runs.acme.>").await.unwrap_or_else(|e| panic!("{e}"));
    acme.flush().await.unwrap_or_else(|e| panic!("{e}"));
    run_to_completion(&url, &globex_env, "echo", &json!({"second": true})).await;
    run_to_completion(&url, &acme_env, "echo", &json!({"second": true})).await;
    let own_event = tokio::time::timeout(NO_HANG, own.next()).await;
    assert!(matches!(own_event, Ok(Some(_))), "acme saw none of its own events");
    let leaked = tokio::time::timeout(Duration::from_millis(500), spy.next()).await;
    assert!(!matches!(leaked, Ok(Some(_))), "acme received globex's event: {leaked:?}");

    // acme has no JetStream: not even reading the events stream's info.
    acme.publish("$JS.API.STREAM.INFO.RUNFLEET_EVENTS", "".into()).await.unwrap_or_else(|e| panic!("{e}"));
    acme.flush().await.unwrap_or_else(|e| panic!("{e}"));
    expect_violation(&mut acme_errors, "Publish", "$JS.API.STREAM.INFO.RUNFLEET_EVENTS").await;

    // acme has seen each refusal, but the server's log line for it can come
    // later (and the harness reads the log on a thread of its own): wait
    // for the three to be in the log before reading it for anyone else's.
    let server = &server;
    harness::stream::eventually(NO_HANG, "the server to log acme's three refusals", || async move {
        let logged = server.log().iter().filter(|line| line.contains("Violation")).count();
        (logged >= 3).then_some(())
    })
    .await;

    // The coordinator and the worker did all of the above within their
    // permissions: the server logged no violation of theirs.
    let violations: Vec<String> = server
        .log()
        .into_iter()
        .filter(|line| line.contains("Violation") && !line.contains("\"ACME/user:acme\""))
        .collect();
    assert!(violations.is_empty(), "fleet users hit permission violations:\n{}", violations.join("\n"));
    let acme_violations = server.log().iter().filter(|line| line.contains("Violation")).count();
    assert_eq!(acme_violations, 3, "the server logged acme's three refusals");
}

// ---- watch shows the log, never a refused write ----

/// `watch` follows the run's subject only to learn that there is more to
/// read: a write JetStream refused (here a forged `run.completed` with a
/// wrong expected sequence, as a fenced-off worker's would be) reaches every
/// plain subscriber of the subject, but must never be shown as the run's.
#[tokio::test(flavor = "multi_thread")]
async fn watch_shows_the_log_and_never_a_refused_write() {
    harness::init_tracing();
    let fleet = harness::Fleet::start_with(
        TestDb::sqlite(),
        harness::FleetOptions { workers: 1, slots: 2, test_agents: true, ..Default::default() },
    )
    .await;
    let client = fleet.client("default").await;
    let run = client
        .submit(submit_request("await", json!({"key": "go"})))
        .await
        .unwrap_or_else(|e| panic!("submit: {e}"))
        .run_id;
    let mut watch = Box::pin(client.watch(run).await.unwrap_or_else(|e| panic!("watch: {e}")));
    let mut shown = Vec::new();
    while let Some(event) =
        tokio::time::timeout(DEADLINE, watch.next()).await.unwrap_or_else(|_| panic!("watch stalled"))
    {
        let event = event.unwrap_or_else(|e| panic!("watch: {e}"));
        let waiting = event.body.type_name() == "run.waiting";
        shown.push(event);
        if waiting {
            break;
        }
    }

    // Forge the next event from the last one, and publish it with a wrong
    // expected sequence: JetStream refuses it, plain subscribers get it.
    let nats = fleet.nats.client().await;
    let subject = Names::default().run_events(&TenantId::default_tenant(), run);
    let mut plain = nats.subscribe(subject.clone()).await.unwrap_or_else(|e| panic!("{e}"));
    nats.flush().await.unwrap_or_else(|e| panic!("{e}"));
    let last = shown.last().unwrap_or_else(|| panic!("no event shown"));
    let mut forged = serde_json::to_value(last).unwrap_or_else(|e| panic!("{e}"));
    forged["seq"] = json!(last.seq + 1);
    forged["type"] = json!("run.completed");
    forged["data"] = json!({"output": "forged"});
    let forged: runfleet_protocol::event::Event =
        serde_json::from_value(forged).unwrap_or_else(|e| panic!("{e}"));
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(runfleet_protocol::names::HEADER_CONTENT_TYPE, runfleet_protocol::CONTENT_TYPE);
    headers.insert(runfleet_protocol::names::HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE, "1");
    let payload = codec::encode(&forged).unwrap_or_else(|e| panic!("{e}"));
    let js = async_nats::jetstream::new(nats.clone());
    let ack =
        js.publish_with_headers(subject, headers, payload.into()).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(ack.await.is_err(), "JetStream stored the forged event");
    let seen = tokio::time::timeout(NO_HANG, plain.next()).await;
    assert!(matches!(seen, Ok(Some(_))), "a plain subscriber did not see the refused write");

    // The run goes on; the watch shows its real log to the real end.
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.signal(run, "go", json!("real")).await.unwrap_or_else(|e| panic!("signal: {e}"));
    while let Some(event) =
        tokio::time::timeout(DEADLINE, watch.next()).await.unwrap_or_else(|_| panic!("watch stalled"))
    {
        shown.push(event.unwrap_or_else(|e| panic!("watch: {e}")));
    }
    let log = client.events(run, 0, None).await.unwrap_or_else(|e| panic!("events: {e}")).events;
    let describe = |events: &[runfleet_protocol::event::Event]| -> Vec<(u64, String)> {
        events.iter().map(|e| (e.seq, e.body.type_name().to_owned())).collect()
    };
    assert_eq!(describe(&shown), describe(&log), "watch showed something other than the log");
    assert_eq!(shown.last().map(|e| e.body.type_name()), Some("run.completed"));
    assert_ne!(serde_json::to_value(shown.last()).unwrap_or_default()["data"]["output"], json!("forged"));
}
