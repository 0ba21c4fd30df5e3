//! The deployment files (`deploy/`): the Kubernetes manifests render, match
//! the Kubernetes schemas and pass the security scan
//! (`scripts/check-manifests.sh`), and every configuration the manifests give
//! a container is one the `runfleet` binary accepts: the container's
//! arguments, its `RUNFLEET_*` environment and the ConfigMap's
//! `runfleet.toml`, run through `runfleet <args> --check`. Unknown keys are
//! errors there, so a key the binaries do not read fails this test.
//!
//! The manifests are rendered by `scripts/check-manifests.sh --render`, which
//! installs its Python tools from PyPI on first use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::Figment;
use runfleet_protocol::limits::PRIORITY_BANDS;
use runfleet_protocol::names::{Names, Prefix};
use runfleet_protocol::QueueName;
use serde::Deserialize;
use serde_yaml::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The script installs into one venv; two tests installing at once would race.
static SCRIPT: Mutex<()> = Mutex::new(());

fn check_manifests(args: &[&str]) -> Output {
    let _guard = SCRIPT.lock().unwrap_or_else(|e| e.into_inner());
    let output = Command::new(Path::new(ROOT).join("scripts/check-manifests.sh"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/check-manifests.sh: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() && stderr.contains("could not install") {
        panic!(
            "scripts/check-manifests.sh could not install its tools (checkov, kubernetes-validate) \
             from PyPI: this test needs network access to PyPI once (CI has it); afterwards it runs \
             offline.\n{stderr}"
        );
    }
    output
}

#[test]
fn manifests_validate_against_the_schemas_and_pass_the_scanners() {
    let output = check_manifests(&[]);
    assert!(
        output.status.success(),
        "scripts/check-manifests.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// One kustomization's rendered objects.
struct Rendered {
    name: String,
    objects: Vec<Value>,
}

fn render() -> Vec<Rendered> {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let out = dir.path().to_str().unwrap_or_else(|| panic!("temp dir is not UTF-8"));
    let output = check_manifests(&["--render", out]);
    assert!(output.status.success(), "rendering failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let mut rendered = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap_or_else(|e| panic!("{e}"))
        .map(|entry| entry.unwrap_or_else(|e| panic!("{e}")).path())
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{e}"));
        let objects = serde_yaml::Deserializer::from_str(&text)
            .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display())))
            .filter(|doc| !doc.is_null())
            .collect();
        let name = file.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
        rendered.push(Rendered { name, objects });
    }
    let names: Vec<&str> = rendered.iter().map(|r| r.name.as_str()).collect();
    for expected in ["base", "example", "example-hpa"] {
        assert!(names.contains(&expected), "{expected} was not rendered (got {names:?})");
    }
    rendered
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut node = value;
    for key in path {
        node = node.get(key)?;
    }
    node.as_str()
}

fn seq<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value.get(key).and_then(Value::as_sequence).map(Vec::as_slice).unwrap_or_default()
}

fn of_kind<'a>(objects: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    objects.iter().filter(move |o| str_at(o, &["kind"]) == Some(kind))
}

fn name(object: &Value) -> &str {
    str_at(object, &["metadata", "name"]).unwrap_or("?")
}

/// What a container of runfleet's image is started with, made runnable here:
/// the ConfigMaps it mounts written to a temp dir, its arguments and
/// environment pointed at them, Secret values replaced by placeholders.
struct Container {
    what: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    /// The container's mount path → where its ConfigMap's files are here.
    mounts: Vec<(String, PathBuf)>,
    /// Port of the container's port named `metrics`.
    metrics_port: Option<u64>,
    termination_grace: Option<u64>,
    _files: tempfile::TempDir,
}

impl Container {
    fn from_deployment(
        kustomization: &str,
        objects: &[Value],
        deployment: &Value,
        container: &Value,
    ) -> Self {
        let what = format!(
            "{kustomization}: Deployment {} container {}",
            name(deployment),
            str_at(container, &["name"]).unwrap_or("?")
        );
        let pod = &deployment["spec"]["template"]["spec"];
        assert!(
            container.get("command").is_none(),
            "{what}: sets a command; the image's entrypoint is runfleet"
        );
        assert!(container.get("envFrom").is_none(), "{what}: envFrom is not checked by this test yet");
        let files = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut mounts = Vec::new();
        for mount in seq(container, "volumeMounts") {
            let volume = seq(pod, "volumes")
                .iter()
                .find(|v| v.get("name") == mount.get("name"))
                .unwrap_or_else(|| panic!("{what}: no volume for mount {mount:?}"));
            let Some(config_map) = str_at(volume, &["configMap", "name"]) else { continue };
            let data = of_kind(objects, "ConfigMap")
                .find(|c| name(c) == config_map)
                .unwrap_or_else(|| panic!("{what}: ConfigMap {config_map} is not in the manifests"))
                .get("data")
                .and_then(Value::as_mapping)
                .unwrap_or_else(|| panic!("{what}: ConfigMap {config_map} has no data"));
            let here = files.path().join(mounts.len().to_string());
            std::fs::create_dir_all(&here).unwrap_or_else(|e| panic!("{e}"));
            for (key, value) in data {
                let (Some(key), Some(value)) = (key.as_str(), value.as_str()) else { continue };
                std::fs::write(here.join(key), value).unwrap_or_else(|e| panic!("{e}"));
            }
            let path = str_at(mount, &["mountPath"]).unwrap_or_else(|| panic!("{what}: mount without path"));
            mounts.push((path.trim_end_matches('/').to_owned(), here));
        }
        let mut this = Self {
            what,
            args: Vec::new(),
            env: BTreeMap::new(),
            mounts,
            metrics_port: None,
            termination_grace: pod.get("terminationGracePeriodSeconds").and_then(Value::as_u64),
            _files: files,
        };
        this.args = seq(container, "args")
            .iter()
            .map(|a| this.local(a.as_str().unwrap_or_else(|| panic!("{}: non-string arg", this.what))))
            .collect();
        for var in seq(container, "env") {
            let key = str_at(var, &["name"]).unwrap_or_default().to_owned();
            let value = if let Some(value) = str_at(var, &["value"]) {
                this.local(value)
            } else if var["valueFrom"].get("secretKeyRef").is_some() {
                secret_placeholder(&key)
            } else {
                panic!(
                    "{}: env {key} takes its value from {:?}, which this test cannot check",
                    this.what, var["valueFrom"]
                )
            };
            this.env.insert(key, value);
        }
        this.metrics_port = seq(container, "ports")
            .iter()
            .find(|p| str_at(p, &["name"]) == Some("metrics"))
            .and_then(|p| p.get("containerPort"))
            .and_then(Value::as_u64);
        this
    }

    /// A path inside the container as it is here (inside a mounted ConfigMap).
    fn local(&self, value: &str) -> String {
        for (mount, here) in &self.mounts {
            if let Some(rest) = value.strip_prefix(mount.as_str()).and_then(|r| r.strip_prefix('/')) {
                return here.join(rest).display().to_string();
            }
        }
        value.to_owned()
    }

    /// The subcommand: `coordinator` or `worker` for the containers checked here.
    fn component(&self) -> &str {
        self.args.first().map(String::as_str).unwrap_or_default()
    }

    /// The configuration file the container reads (`--config` or
    /// `RUNFLEET_CONFIG`), as it is here.
    fn config_file(&self) -> Option<PathBuf> {
        let flag = self.args.iter().position(|a| a == "--config").and_then(|i| self.args.get(i + 1));
        flag.or_else(|| self.env.get("RUNFLEET_CONFIG")).map(PathBuf::from)
    }

    /// Runs `runfleet <args> --check` with the container's environment only.
    fn check(&self, config_file: Option<&Path>) -> Output {
        let mut env = self.env.clone();
        if let Some(file) = config_file {
            env.insert("RUNFLEET_CONFIG".into(), file.display().to_string());
        }
        Command::new(env!("CARGO_BIN_EXE_runfleet"))
            .args(&self.args)
            .arg("--check")
            .env_clear()
            .envs(&env)
            .output()
            .unwrap_or_else(|e| panic!("cannot run runfleet: {e}"))
    }

    /// The effective value of a key as the binary layers it: the flag, then
    /// the environment (`RUNFLEET_<KEY>` for the shared top-level keys,
    /// `RUNFLEET_<SECTION>__<KEY>` for the component's), then the file.
    /// Only for the handful of keys this test compares with the manifests.
    fn setting(&self, key: &str) -> Option<String> {
        let shared = ["nats_url", "prefix"].contains(&key);
        let section = self.component();
        let flag = format!("--{}", key.replace('_', "-"));
        if let Some(i) = self.args.iter().position(|a| *a == flag) {
            return self.args.get(i + 1).cloned();
        }
        let env = if shared {
            format!("RUNFLEET_{}", key.to_uppercase())
        } else {
            format!("RUNFLEET_{}__{}", section.to_uppercase(), key.to_uppercase())
        };
        if let Some(value) = self.env.get(&env) {
            return Some(value.clone());
        }
        let figment = Figment::from(Toml::file(self.config_file()?));
        let path = if shared { key.to_owned() } else { format!("{section}.{key}") };
        let text = figment.extract_inner::<String>(&path).ok();
        text.or_else(|| figment.extract_inner::<i64>(&path).ok().map(|n| n.to_string()))
    }

    fn duration(&self, key: &str, default: Duration) -> Duration {
        self.setting(key).map_or(default, |value| {
            humantime_serde::re::humantime::parse_duration(&value)
                .unwrap_or_else(|e| panic!("{}: {key} = {value:?}: {e}", self.what))
        })
    }

    fn queues(&self) -> Vec<String> {
        let flags: Vec<String> =
            self.args.windows(2).filter(|w| w[0] == "--queue").map(|w| w[1].clone()).collect();
        if !flags.is_empty() {
            return flags;
        }
        assert!(
            !self.env.contains_key("RUNFLEET_WORKER__QUEUES"),
            "{}: RUNFLEET_WORKER__QUEUES is not understood by this test yet",
            self.what
        );
        self.config_file()
            .and_then(|file| {
                Figment::from(Toml::file(file)).extract_inner::<Vec<String>>("worker.queues").ok()
            })
            .unwrap_or_else(|| vec!["default".into()])
    }
}

/// A value of the right shape for a Secret the manifests reference.
fn secret_placeholder(env: &str) -> String {
    if env.ends_with("DATABASE_URL") {
        "postgres://runfleet:placeholder@postgres.invalid:5432/runfleet".to_owned()
    } else {
        "placeholder-secret".to_owned()
    }
}

/// Every container running runfleet's image, in every kustomization.
fn runfleet_containers(rendered: &[Rendered]) -> Vec<(String, Container, Value)> {
    let mut found = Vec::new();
    for r in rendered {
        for deployment in of_kind(&r.objects, "Deployment") {
            for container in seq(&deployment["spec"]["template"]["spec"], "containers") {
                let image = str_at(container, &["image"]).unwrap_or_default();
                let repository = image.split(['@', ':']).next().unwrap_or_default();
                if repository.rsplit('/').next() == Some("runfleet") {
                    let c = Container::from_deployment(&r.name, &r.objects, deployment, container);
                    found.push((r.name.clone(), c, deployment.clone()));
                }
            }
        }
    }
    found
}

#[test]
fn every_container_configuration_is_one_the_binary_accepts() {
    let rendered = render();
    let containers = runfleet_containers(&rendered);
    let mut components: Vec<(String, String)> =
        containers.iter().map(|(k, c, _)| (k.clone(), c.component().to_owned())).collect();
    components.dedup();
    for r in &rendered {
        for component in ["coordinator", "worker"] {
            assert!(
                components.contains(&(r.name.clone(), component.to_owned())),
                "{}: no {component} container found",
                r.name
            );
        }
    }
    for (_, container, _) in &containers {
        assert!(
            container.config_file().is_some_and(|f| f.is_file()),
            "{}: its configuration file is not a mounted ConfigMap key",
            container.what
        );
        let output = container.check(None);
        assert!(
            output.status.success(),
            "{}: `runfleet {} --check` refused the configuration the manifests give it:\n{}\n{}",
            container.what,
            container.args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // The probes and the Service use the port named `metrics`: the
        // process must listen on it.
        let addr = container
            .setting("metrics_addr")
            .unwrap_or_else(|| panic!("{}: no metrics_addr, so no /healthz for the probes", container.what));
        let port = addr.rsplit(':').next().and_then(|p| p.parse::<u64>().ok());
        assert_eq!(
            port, container.metrics_port,
            "{}: metrics_addr {addr} vs the metrics port",
            container.what
        );
    }
}

#[test]
fn a_misspelt_configuration_key_is_refused() {
    let rendered = render();
    let containers = runfleet_containers(&rendered);
    for component in ["coordinator", "worker"] {
        let (_, container, _) = containers
            .iter()
            .find(|(k, c, _)| k == "base" && c.component() == component)
            .unwrap_or_else(|| panic!("no {component} in the base"));
        let file = container.config_file().unwrap_or_else(|| panic!("{}: no config file", container.what));
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{e}"));
        let header = format!("[{component}]\n");
        assert!(text.contains(&header), "{}: runfleet.toml has no {header}", container.what);
        let misspelt = text.replacen(&header, &format!("{header}lease_tll = \"15s\"\n"), 1);
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let copy = dir.path().join("runfleet.toml");
        std::fs::write(&copy, misspelt).unwrap_or_else(|e| panic!("{e}"));
        let output = container.check(Some(&copy));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{}: --check accepted a misspelt key", container.what);
        assert!(
            stderr.contains("lease_tll"),
            "{}: the error does not name the misspelt key:\n{stderr}",
            container.what
        );
    }
}

/// The worker's termination grace covers its drain (docs/operations.md,
/// "Stopping workers"), and the autoscalers target its slots and consume its
/// consumers (names from `protocol`).
#[test]
fn worker_manifests_agree_with_the_worker_configuration() {
    let rendered = render();
    for (kustomization, worker, deployment) in runfleet_containers(&rendered) {
        if worker.component() != "worker" {
            continue;
        }
        let drain = worker.duration("shutdown_grace", Duration::from_secs(10))
            + worker.duration("handoff_timeout", Duration::from_secs(10));
        let grace = Duration::from_secs(worker.termination_grace.unwrap_or(30));
        assert!(
            grace >= drain + Duration::from_secs(5),
            "{}: terminationGracePeriodSeconds {grace:?} leaves no margin after shutdown_grace + \
             handoff_timeout = {drain:?}: pods would be killed mid-drain",
            worker.what
        );

        let slots = worker.setting("slots").unwrap_or_else(|| "4".into());
        let prefix = Prefix::new(worker.setting("prefix").unwrap_or_else(|| "runfleet".into()))
            .unwrap_or_else(|e| panic!("{e}"));
        let names = Names::new(prefix);
        let objects = &rendered.iter().find(|r| r.name == kustomization).map(|r| &r.objects);
        let objects = objects.unwrap_or_else(|| panic!("{kustomization} vanished"));
        let targets = |o: &&Value| str_at(o, &["spec", "scaleTargetRef", "name"]) == Some(name(&deployment));

        for scaled in of_kind(objects, "ScaledObject").filter(targets) {
            let target = str_at(scaled, &["spec", "advanced", "scalingModifiers", "target"]);
            assert_eq!(target, Some(slots.as_str()), "{kustomization}: ScaledObject target vs worker slots");
            let mut consumers: Vec<String> = seq(&scaled["spec"], "triggers")
                .iter()
                .map(|t| {
                    assert_eq!(str_at(t, &["type"]), Some("nats-jetstream"));
                    assert_eq!(str_at(t, &["metadata", "stream"]), Some(names.jobs_stream().as_str()));
                    str_at(t, &["metadata", "consumer"]).unwrap_or_default().to_owned()
                })
                .collect();
            consumers.sort();
            let mut expected = Vec::new();
            for queue in worker.queues() {
                let queue = QueueName::new(queue).unwrap_or_else(|e| panic!("{e}"));
                expected.extend((0..PRIORITY_BANDS).map(|band| names.job_consumer(&queue, band)));
            }
            expected.sort();
            assert_eq!(
                consumers, expected,
                "{kustomization}: the ScaledObject must watch every job consumer"
            );
        }
        for hpa in of_kind(objects, "HorizontalPodAutoscaler").filter(targets) {
            for metric in seq(&hpa["spec"], "metrics") {
                if let Some(value) = str_at(metric, &["external", "target", "averageValue"]) {
                    assert_eq!(value, slots, "{kustomization}: HPA target vs worker slots");
                }
            }
        }
    }
}
