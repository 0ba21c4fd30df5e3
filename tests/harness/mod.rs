//! The integration-test harness: real `nats-server` processes, real SQLite
//! and PostgreSQL databases, and real `runfleet` processes. Nothing is faked.
#![allow(dead_code, unused_imports)]

pub mod db;
pub mod http;
pub mod nats;
pub mod process;
pub mod stream;
pub mod tls;

pub use db::TestDb;
pub use nats::NatsServer;
pub use process::{Fleet, FleetOptions, RunfleetProcess};

/// Initializes test logging once (RUST_LOG controls it).
pub fn init_tracing() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
    });
}
