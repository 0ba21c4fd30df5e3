//! The tokio runtime every runfleet process runs on (the `runfleet` binary,
//! and worker binaries built from `runfleet-worker`, see
//! `worker/examples/custom_worker.rs`): tokio's default multi-threaded
//! runtime, without its LIFO slot.
//!
//! **Why.** When a task wakes another, tokio's LIFO slot runs the woken task
//! next on the same thread. A run's task that publishes wakes its NATS
//! connection's task, which then runs at once and writes that one message
//! in a `writev` of its own; the tasks queued behind it publish next, each
//! in its own `writev` again. Without the slot the connection's task waits
//! its turn in the queue, so under load it finds the messages of every task
//! that ran before it and writes them in one call. Below load the queue is
//! empty and nothing waits longer. Measured in the throughput scenario
//! (`docs/performance.md`): 4.6 `writev` calls per run with the slot, 0.9
//! without; nats-server reads fewer, larger chunks too.
//!
//! Disabling the slot is one of tokio's unstable options, compiled only with
//! `--cfg tokio_unstable`, which `.cargo/config.toml` sets for this
//! workspace. A build without it (say, `RUSTFLAGS` set in the environment,
//! which replaces the config's flags) keeps the slot and still works, only
//! slower; [`lifo_slot`] tells which, `runfleet coordinator` and `runfleet
//! worker` log a warning, and `runfleet bench` records it. A worker binary
//! built in another workspace needs the same flag in its own
//! `.cargo/config.toml`.

use std::ffi::OsStr;

/// Set to `1` to keep tokio's LIFO slot (for comparison), `0` or unset for
/// the default, without it.
pub const LIFO_SLOT_ENV: &str = "RUNFLEET_TOKIO_LIFO_SLOT";

/// The runtime could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{LIFO_SLOT_ENV} is {value:?}; use 1 to keep tokio's LIFO slot, 0 (or leave it unset) to disable it"
    )]
    LifoSlotSetting { value: String },
    #[error("could not start the tokio runtime: {0}")]
    Build(#[from] std::io::Error),
}

/// Whether the runtime [`build`] makes keeps tokio's LIFO slot: only if this
/// binary was built without `--cfg tokio_unstable`, or
/// [`LIFO_SLOT_ENV`] asks for it.
pub fn lifo_slot() -> Result<bool, Error> {
    let asked = lifo_slot_setting(std::env::var_os(LIFO_SLOT_ENV).as_deref())?;
    Ok(asked || !cfg!(tokio_unstable))
}

/// Reads [`LIFO_SLOT_ENV`]'s value: whether it asks to keep the slot.
fn lifo_slot_setting(value: Option<&OsStr>) -> Result<bool, Error> {
    let Some(value) = value else { return Ok(false) };
    match value.to_str() {
        Some("0") => Ok(false),
        Some("1") => Ok(true),
        _ => Err(Error::LifoSlotSetting { value: value.to_string_lossy().into_owned() }),
    }
}

/// tokio's multi-threaded runtime (one worker thread per CPU, I/O and
/// timers), without the LIFO slot unless [`lifo_slot`] says otherwise.
pub fn build() -> Result<tokio::runtime::Runtime, Error> {
    let keep_lifo_slot = lifo_slot()?;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    #[cfg(tokio_unstable)]
    if !keep_lifo_slot {
        builder.disable_lifo_slot();
    }
    #[cfg(not(tokio_unstable))]
    let _ = keep_lifo_slot;
    Ok(builder.build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lifo_slot_setting_is_0_1_or_unset() {
        assert!(!lifo_slot_setting(None).unwrap_or(true));
        assert!(!lifo_slot_setting(Some(OsStr::new("0"))).unwrap_or(true));
        assert!(lifo_slot_setting(Some(OsStr::new("1"))).unwrap_or(false));
        for bad in ["yes", "", "true", " 1"] {
            match lifo_slot_setting(Some(OsStr::new(bad))) {
                Err(Error::LifoSlotSetting { value }) => assert_eq!(value, bad),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    /// The workspace builds with `--cfg tokio_unstable` (`.cargo/config.toml`),
    /// so the runtime runs without the slot; a build that lost the flag
    /// fails here rather than only running slower.
    #[test]
    fn this_build_runs_without_the_lifo_slot() {
        if std::env::var_os(LIFO_SLOT_ENV).is_none() {
            let kept = lifo_slot().unwrap_or(true);
            assert!(!kept, "the LIFO slot is kept: built without --cfg tokio_unstable (is RUSTFLAGS set?)");
        }
    }
}
