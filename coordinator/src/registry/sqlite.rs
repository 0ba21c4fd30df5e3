//! SQLite: create the file if missing, switch it to WAL, migrate.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{ConnectOptions, Connection};

use tokio::sync::Mutex;
use tracing::debug;

use super::Error;

/// The schema migrations this build applies.
pub(super) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// How long a connection waits for another writer before failing.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Serializes migrations within this process. SQLite has no advisory lock
/// and the migrator's transactions do not exclude each other, so two
/// registries opening one fresh file at once would both create the tables.
static MIGRATING: Mutex<()> = Mutex::const_new(());

/// Attempts at migrating; a retry covers another process that migrated the
/// same file at the same moment (the retry then finds nothing to do).
const MIGRATE_ATTEMPTS: u32 = 3;

/// Per-connection settings: in WAL mode, `synchronous = NORMAL` syncs the
/// WAL at checkpoints instead of at every commit. A committed batch survives
/// a crash of the coordinator; a power loss may lose the last commits, as
/// JetStream's own periodic fsync may lose the last writes
/// (`docs/operations.md`). The registry is a projection of the events
/// stream and can be rebuilt from it.
///
/// The page cache (64 MiB instead of 2 MiB) and memory-mapped reads (up to
/// 1 GiB of address space, not memory) keep the indexes' pages out of
/// `pread` calls: under a steady projection, 14 % of the SQLite thread's
/// time went to reading pages back that the small cache had dropped.
/// Statement journals (multi-row statements inside a transaction keep one
/// to undo a failed statement) live in memory rather than in temp files.
pub(super) async fn tune(conn: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
    sqlx::Executor::execute(conn, TUNING).await.map(drop)
}

/// The settings [`tune`] applies, also to the native writer's connection.
pub(super) const TUNING: &str = "PRAGMA synchronous = NORMAL; PRAGMA cache_size = -65536; \
     PRAGMA mmap_size = 1073741824; PRAGMA temp_store = MEMORY";

/// Creates the database file if missing, sets WAL journaling (persistent in
/// the file, so the pool's connections inherit it) and applies migrations.
pub(super) async fn prepare(url: &str) -> Result<(), Error> {
    let _guard = MIGRATING.lock().await;
    let mut attempt = 1;
    loop {
        match migrate_once(url).await {
            Err(Error::Migrate { source, .. }) if attempt < MIGRATE_ATTEMPTS => {
                debug!(attempt, error = %source, "sqlite migration failed, retrying");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

async fn migrate_once(url: &str) -> Result<(), Error> {
    let connect_error = |source| Error::Connect { backend: "sqlite", source };
    let options = SqliteConnectOptions::from_str(url)
        .map_err(connect_error)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(BUSY_TIMEOUT);
    let mut conn = options.connect().await.map_err(connect_error)?;
    MIGRATOR.run(&mut conn).await.map_err(|source| Error::Migrate { backend: "sqlite", source })?;
    conn.close().await.map_err(connect_error)
}
