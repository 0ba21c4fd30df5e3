//! Layered configuration: defaults → TOML file (`--config`) → `RUNFLEET_`
//! environment → command-line flags, then the component's `validate()`.
//!
//! The TOML file has shared top-level keys and one section per component:
//!
//! ```toml
//! nats_url = "nats://nats:4222"   # shared by every component
//! prefix = "runfleet"
//!
//! [coordinator]
//! database_url = "postgres://runfleet@db/runfleet"
//!
//! [worker]
//! slots = 16
//! queues = ["default", "gpu"]
//! ```
//!
//! The shared tables `[nats]` (credentials and TLS), `[telemetry]` (logs and
//! traces) and `[redaction]` sit at the top level too and apply to every
//! process.
//!
//! Environment: `RUNFLEET_NATS_URL`, `RUNFLEET_PREFIX`, the shared tables as
//! `RUNFLEET_<TABLE>__<KEY>` (e.g. `RUNFLEET_NATS__PASSWORD`), and
//! `RUNFLEET_<SECTION>__<KEY>` (e.g. `RUNFLEET_WORKER__SLOTS=16`).
//!
//! Every key is checked: an unknown key in the file or the environment is an
//! error naming it, so a typo never silently falls back to a default.

use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Keys every component shares at the top level of the file and environment.
const SHARED_KEYS: [&str; 5] = ["nats_url", "prefix", "nats", "telemetry", "redaction"];

/// The shared tables a client command reads (it publishes no events, so no
/// redaction).
const CLIENT_KEYS: [&str; 5] = ["nats_url", "prefix", "tenant", "nats", "telemetry"];

/// The `RUNFLEET_` environment restricted to `keys`: plain keys
/// (`RUNFLEET_NATS_URL`) and nested ones (`RUNFLEET_NATS__USER` →
/// `nats.user`).
fn shared_env(keys: &'static [&'static str]) -> Env {
    Env::prefixed("RUNFLEET_")
        .filter(move |key| {
            let key = key.as_str().to_ascii_lowercase();
            keys.iter().any(|k| key == *k || key.strip_prefix(k).is_some_and(|rest| rest.starts_with("__")))
        })
        .split("__")
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration file {path} does not exist")]
    MissingFile { path: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Every top-level key of the file and every `RUNFLEET_<TABLE>__` prefix
/// some command reads.
const KNOWN_TOP_LEVEL: [&str; 8] =
    ["nats_url", "prefix", "tenant", "nats", "telemetry", "redaction", "coordinator", "worker"];
const KNOWN_TABLES: [&str; 5] = ["nats", "telemetry", "redaction", "coordinator", "worker"];

/// Refuses a top-level key of the file, or a `RUNFLEET_<TABLE>__<KEY>`
/// variable, that no command reads: a misspelt table would otherwise be
/// ignored whole. (Single-level `RUNFLEET_*` variables are left alone:
/// other tools use that namespace too.)
fn check_unknown(file: Option<&Figment>) -> Result<(), Error> {
    if let Some(file) = file {
        if let Ok(figment::value::Value::Dict(_, dict)) = file.find_value("") {
            if let Some(key) = dict.keys().find(|k| !KNOWN_TOP_LEVEL.contains(&k.as_str())) {
                return Err(Error::Invalid(format!(
                    "unknown top-level key `{key}` in the configuration file (known: {})",
                    KNOWN_TOP_LEVEL.join(", ")
                )));
            }
        }
    }
    for (name, _) in std::env::vars() {
        let Some(rest) = name.strip_prefix("RUNFLEET_") else { continue };
        let Some((table, _)) = rest.split_once("__") else { continue };
        if !KNOWN_TABLES.contains(&table.to_ascii_lowercase().as_str()) {
            return Err(Error::Invalid(format!(
                "unknown table `{}` in environment variable {name} (known: {})",
                table.to_ascii_lowercase(),
                KNOWN_TABLES.join(", ")
            )));
        }
    }
    Ok(())
}

/// Defaults, then the file's top-level `keys`, then (for a component) the
/// file's `[section]` table. `None` when there is no file.
fn with_file<C: Serialize + Default>(
    file: Option<&Path>,
    keys: &[&str],
    section: Option<&str>,
) -> Result<Figment, Error> {
    let mut figment = Figment::from(Serialized::defaults(C::default()));
    let Some(path) = file else {
        check_unknown(None)?;
        return Ok(figment);
    };
    if !path.exists() {
        return Err(Error::MissingFile { path: path.display().to_string() });
    }
    let file = Figment::from(Toml::file(path));
    check_unknown(Some(&file))?;
    for key in keys {
        if let Ok(value) = file.find_value(key) {
            figment = figment.merge(Serialized::default(key, value));
        }
    }
    if let Some(section) = section.filter(|s| file.find_value(s).is_ok()) {
        figment = figment.merge(file.focus(section));
    }
    Ok(figment)
}

/// Loads a component's configuration from every layer. `section` is the
/// component's table in the file and its environment infix; `flags` holds only
/// the flags given on the command line (absent ones must not be serialized).
pub fn load<C, F>(section: &str, file: Option<&Path>, flags: &F) -> Result<C, Error>
where
    C: DeserializeOwned + Serialize + Default,
    F: Serialize,
{
    with_file::<C>(file, &SHARED_KEYS, Some(section))?
        .merge(shared_env(&SHARED_KEYS))
        .merge(Env::prefixed(&format!("RUNFLEET_{}__", section.to_ascii_uppercase())).split("__"))
        .merge(Serialized::defaults(flags))
        .extract()
        .map_err(|e| Error::Invalid(describe(&e)))
}

/// Loads a client command's settings: the file's top-level `nats_url`,
/// `prefix`, `tenant` and `[nats]` and `[telemetry]` tables, the same keys
/// from the `RUNFLEET_` environment, then the flags.
pub fn load_client<C, F>(file: Option<&Path>, flags: &F) -> Result<C, Error>
where
    C: DeserializeOwned + Serialize + Default,
    F: Serialize,
{
    with_file::<C>(file, &CLIENT_KEYS, None)?
        .merge(shared_env(&CLIENT_KEYS))
        .merge(Serialized::defaults(flags))
        .extract()
        .map_err(|e| Error::Invalid(describe(&e)))
}

/// figment's errors name the key and the source; keep every one of them.
fn describe(error: &figment::Error) -> String {
    error.clone().into_iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct Sample {
        nats_url: String,
        slots: u32,
        name: String,
    }

    #[derive(Serialize)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        slots: Option<u32>,
    }

    /// The shipped example stays loadable and valid.
    #[test]
    fn example_config_is_valid() {
        #[derive(Serialize)]
        struct NoFlags {}
        // In a jail: other tests set RUNFLEET_* variables, and a jail
        // serializes them and starts from a clean environment.
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            let file = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/runfleet.toml"));
            let coordinator: runfleet_coordinator::config::CoordinatorConfig =
                load("coordinator", Some(file), &NoFlags {}).map_err(|e| e.to_string())?;
            coordinator.validate().map_err(|e| e.to_string())?;
            let worker: runfleet_worker::WorkerConfig =
                load("worker", Some(file), &NoFlags {}).map_err(|e| e.to_string())?;
            worker.validate().map_err(|e| e.to_string())?;
            assert_eq!(worker.idle_poll, std::time::Duration::from_millis(500));
            Ok(())
        });
    }

    /// The shared tables come from the file's top level and from
    /// `RUNFLEET_<TABLE>__<KEY>`; a key nobody reads is an error naming it.
    #[test]
    fn shared_tables_layer_and_unknown_keys_are_refused() {
        #[derive(Serialize)]
        struct NoFlags {}
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "rf.toml",
                "[nats]\nuser = \"file-user\"\n[telemetry]\nlog_format = \"json\"\n[worker]\nslots = 2\n",
            )?;
            jail.set_env("RUNFLEET_NATS__PASSWORD", "env-secret");
            jail.set_env("RUNFLEET_TELEMETRY__SAMPLING_RATIO", "0.25");
            let worker: runfleet_worker::WorkerConfig =
                load("worker", Some(Path::new("rf.toml")), &NoFlags {}).map_err(|e| e.to_string())?;
            assert_eq!(worker.nats.user.as_deref(), Some("file-user"));
            assert_eq!(worker.nats.password.as_deref(), Some("env-secret"));
            assert_eq!(worker.telemetry.log_format, runfleet_ops::telemetry::LogFormat::Json);
            assert!((worker.telemetry.sampling_ratio - 0.25).abs() < f64::EPSILON);
            let coordinator: runfleet_coordinator::config::CoordinatorConfig =
                load("coordinator", Some(Path::new("rf.toml")), &NoFlags {}).map_err(|e| e.to_string())?;
            assert_eq!(coordinator.nats.password.as_deref(), Some("env-secret"));

            jail.set_env("RUNFLEET_NATS__PASSWROD", "typo");
            let typo =
                load::<runfleet_worker::WorkerConfig, _>("worker", Some(Path::new("rf.toml")), &NoFlags {});
            assert!(matches!(&typo, Err(Error::Invalid(m)) if m.contains("passwrod")), "{typo:?}");
            jail.clear_env();
            jail.set_env("RUNFLEET_TELEMTRY__LOG_FORMAT", "json");
            let typo =
                load::<runfleet_worker::WorkerConfig, _>("worker", Some(Path::new("rf.toml")), &NoFlags {});
            assert!(matches!(&typo, Err(Error::Invalid(m)) if m.contains("telemtry")), "{typo:?}");
            jail.clear_env();
            jail.create_file("top.toml", "[wroker]\nslots = 2\n")?;
            let typo =
                load::<runfleet_worker::WorkerConfig, _>("worker", Some(Path::new("top.toml")), &NoFlags {});
            assert!(matches!(&typo, Err(Error::Invalid(m)) if m.contains("wroker")), "{typo:?}");
            jail.create_file("bad.toml", "[coordinator]\nlease_tl = \"5s\"\n")?;
            let typo = load::<runfleet_coordinator::config::CoordinatorConfig, _>(
                "coordinator",
                Some(Path::new("bad.toml")),
                &NoFlags {},
            );
            assert!(matches!(&typo, Err(Error::Invalid(m)) if m.contains("lease_tl")), "{typo:?}");
            Ok(())
        });
    }

    #[test]
    fn layers_apply_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "rf.toml",
                "nats_url = \"nats://file:1\"\n[worker]\nslots = 2\nname = \"file\"\n",
            )?;
            jail.set_env("RUNFLEET_WORKER__NAME", "env");
            let cfg: Sample = load("worker", Some(Path::new("rf.toml")), &Flags { slots: None })
                .map_err(|e| e.to_string())?;
            assert_eq!(cfg, Sample { nats_url: "nats://file:1".into(), slots: 2, name: "env".into() });
            jail.set_env("RUNFLEET_NATS_URL", "nats://env:2");
            let cfg: Sample = load("worker", Some(Path::new("rf.toml")), &Flags { slots: Some(9) })
                .map_err(|e| e.to_string())?;
            assert_eq!(cfg, Sample { nats_url: "nats://env:2".into(), slots: 9, name: "env".into() });
            Ok(())
        });
    }

    #[test]
    fn client_settings_come_from_the_file_unless_flagged() {
        #[derive(Serialize)]
        struct ClientFlags {
            #[serde(skip_serializing_if = "Option::is_none")]
            nats_url: Option<String>,
        }
        figment::Jail::expect_with(|jail| {
            jail.create_file("rf.toml", "nats_url = \"nats://file:1\"\n[worker]\nslots = 2\n")?;
            let path = Some(Path::new("rf.toml"));
            let cfg: Sample =
                load_client(path, &ClientFlags { nats_url: None }).map_err(|e| e.to_string())?;
            assert_eq!(cfg.nats_url, "nats://file:1");
            let flags = ClientFlags { nats_url: Some("nats://flag:2".into()) };
            let cfg: Sample = load_client(path, &flags).map_err(|e| e.to_string())?;
            assert_eq!(cfg.nats_url, "nats://flag:2");
            Ok(())
        });
    }

    #[test]
    fn bad_values_name_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("RUNFLEET_SAMPLE__SLOTS", "many");
            let err =
                load::<Sample, _>("sample", None, &Flags { slots: None }).err().ok_or("expected an error")?;
            assert!(err.to_string().to_lowercase().contains("slots"), "{err}");
            Ok(())
        });
    }
}
