//! SQLite batch writes on the calling thread, without sqlx.
//!
//! sqlx runs each SQLite connection on a worker thread of its own and hands
//! it every statement, every row and the commit as a message: a batch of the
//! projector's was about fifteen round trips between two threads, and its
//! `Any` driver converted every bound value on the way. The projector's
//! thread exists to write batches (`Projector::spawn_thread`), so on SQLite
//! it runs them itself through this writer: one connection of its own, the
//! same statements ([`Tx`](super::tx::Tx)), prepared once and kept in the
//! connection's cache. Reads and everything else still go through the pool.
//!
//! A write blocks the calling thread for one transaction (milliseconds):
//! the projector's thread, or a test's. Writers of the same registry queue
//! on the connection; other processes' writers on SQLite's write lock, with
//! the pool's busy timeout.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use sqlx::sqlite::SqliteConnectOptions;
use tokio::sync::{Mutex, MutexGuard};

use super::tx::{Fetched, Value};
use super::{sqlite, Error};

/// Statement shapes a connection keeps prepared: four statements of the
/// batch, each in up to ten power-of-two sizes, and the position's.
const STATEMENT_CACHE: usize = 64;

/// The writer's page cache: SQLite's default 2 MB, not the pool's 64 MiB.
/// Every commit ends by dropping pages past the end of the database from
/// the cache, and on this connection that walked the whole cache each
/// time: with 64 MiB it was 14 % of the projector thread's samples
/// (`pcache1TruncateUnsafe`, under `pager_end_transaction`), and the
/// thread's CPU per trial was a tenth to a third higher than with 2 MB.
/// The pages a batch changes (the right edges of the tables and indexes,
/// run ids being time-ordered) fit in 2 MB many times over; other pages are
/// read through the memory map.
const WRITER_CACHE: &str = "PRAGMA cache_size = -2000";

/// The registry's native writer: one connection, opened at its first write
/// (a database that is missing fails that write, not the registry's open).
#[derive(Debug)]
pub(super) struct Writer {
    path: PathBuf,
    conn: Mutex<Option<rusqlite::Connection>>,
}

impl Writer {
    /// A writer for the database file `url` names, or `None` if it names an
    /// in-memory database (each connection of which is a database of its
    /// own, so only the pool's connections may write it).
    pub(super) fn for_url(url: &str) -> Option<Self> {
        let options = SqliteConnectOptions::from_str(url).ok()?;
        let path = options.get_filename();
        let name = path.to_string_lossy();
        if url.contains(":memory:") || url.contains("mode=memory") || name.starts_with("file:sqlx-in-memory")
        {
            return None;
        }
        Some(Self { path: path.to_owned(), conn: Mutex::new(None) })
    }

    /// The connection, opened if it is not, at the start of a transaction
    /// (`BEGIN IMMEDIATE`: the write lock is taken at once, waiting up to
    /// the busy timeout, rather than at the first write of a read
    /// transaction, which SQLite refuses without waiting if another writer
    /// committed in between).
    pub(super) async fn begin(&self) -> Result<Connection<'_>, Error> {
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            *guard = Some(open(&self.path).map_err(sqlite_error("opening the registry for writes"))?);
        }
        let mut held = Connection { guard };
        let conn = held.get();
        // A transaction left open (a write dropped between its statements,
        // which the executor's never-suspending calls rule out) is undone.
        if !conn.is_autocommit() {
            conn.execute_batch("ROLLBACK").map_err(sqlite_error("rolling back an abandoned batch"))?;
        }
        conn.execute_batch("BEGIN IMMEDIATE").map_err(sqlite_error("starting a transaction"))?;
        Ok(held)
    }
}

/// The writer's connection, held for one transaction.
pub(super) struct Connection<'w> {
    guard: MutexGuard<'w, Option<rusqlite::Connection>>,
}

impl Connection<'_> {
    pub(super) fn get(&mut self) -> &mut rusqlite::Connection {
        self.guard
            .as_mut()
            .unwrap_or_else(|| unreachable!("begin opens the connection before handing it out"))
    }
}

impl Drop for Connection<'_> {
    /// A transaction not committed (a statement failed) is rolled back
    /// before the next writer gets the connection.
    fn drop(&mut self) {
        if let Some(conn) = self.guard.as_mut() {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
        }
    }
}

fn open(path: &Path) -> Result<rusqlite::Connection, rusqlite::Error> {
    use rusqlite::OpenFlags;
    // No create: the pool's `prepare` created and migrated the file.
    let conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
    )?;
    conn.busy_timeout(sqlite::BUSY_TIMEOUT)?;
    conn.execute_batch(sqlite::TUNING)?;
    conn.execute_batch(WRITER_CACHE)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

fn sqlite_error(what: &'static str) -> impl FnOnce(rusqlite::Error) -> Error {
    move |source| Error::Sqlite { what, source }
}

fn bind(
    stmt: &mut rusqlite::CachedStatement<'_>,
    what: &'static str,
    values: &[Value<'_>],
) -> Result<(), Error> {
    if stmt.parameter_count() != values.len() {
        return Err(Error::Sqlite {
            what,
            source: rusqlite::Error::InvalidParameterCount(values.len(), stmt.parameter_count()),
        });
    }
    for (index, value) in values.iter().enumerate() {
        let bound = match value {
            Value::Null => stmt.raw_bind_parameter(index + 1, rusqlite::types::Null),
            Value::Int(value) => stmt.raw_bind_parameter(index + 1, value),
            Value::Text(text) => stmt.raw_bind_parameter(index + 1, text.as_ref()),
        };
        bound.map_err(sqlite_error(what))?;
    }
    Ok(())
}

/// Runs one statement; the number of rows it changed.
pub(super) fn execute(
    conn: &rusqlite::Connection,
    what: &'static str,
    sql: &str,
    values: &[Value<'_>],
) -> Result<u64, Error> {
    let mut stmt = conn.prepare_cached(sql).map_err(sqlite_error(what))?;
    bind(&mut stmt, what, values)?;
    let changed = stmt.raw_execute().map_err(sqlite_error(what))?;
    Ok(u64::try_from(changed).unwrap_or(u64::MAX))
}

/// Runs one query; its rows.
pub(super) fn fetch(
    conn: &rusqlite::Connection,
    what: &'static str,
    sql: &str,
    values: &[Value<'_>],
) -> Result<Vec<Fetched>, Error> {
    use rusqlite::types::ValueRef;
    let mut stmt = conn.prepare_cached(sql).map_err(sqlite_error(what))?;
    bind(&mut stmt, what, values)?;
    let columns = stmt.column_count();
    let mut rows = stmt.raw_query();
    let mut fetched = Vec::new();
    while let Some(row) = rows.next().map_err(sqlite_error(what))? {
        let mut values = Vec::with_capacity(columns);
        for index in 0..columns {
            values.push(match row.get_ref(index).map_err(sqlite_error(what))? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(value) => Value::Int(value),
                ValueRef::Text(bytes) => Value::text(
                    std::str::from_utf8(bytes)
                        .map_err(|e| sqlite_error(what)(rusqlite::Error::Utf8Error(e)))?
                        .to_owned(),
                ),
                other => {
                    return Err(Error::Sqlite {
                        what,
                        source: rusqlite::Error::InvalidColumnType(
                            index,
                            format!("column {index}"),
                            other.data_type(),
                        ),
                    })
                }
            });
        }
        fetched.push(values);
    }
    Ok(fetched)
}

/// Commits the connection's transaction.
pub(super) fn commit(conn: &rusqlite::Connection, what: &'static str) -> Result<(), Error> {
    conn.execute_batch("COMMIT").map_err(sqlite_error(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_connection_is_tuned() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("registry.db");
        rusqlite::Connection::open(&path)?.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (x)")?;
        let conn = open(&path)?;
        let pragma = |name: &str| conn.query_row(&format!("PRAGMA {name}"), [], |row| row.get::<_, i64>(0));
        assert_eq!(pragma("synchronous")?, 1, "NORMAL");
        assert_eq!(pragma("cache_size")?, -2000);
        assert_eq!(pragma("mmap_size")?, 1_073_741_824);
        assert_eq!(pragma("temp_store")?, 2, "MEMORY");
        assert_eq!(pragma("busy_timeout")?, 5_000);
        Ok(())
    }

    #[test]
    fn writes_go_native_only_for_a_database_file() {
        let file = Writer::for_url("sqlite:/var/lib/runfleet/registry.db").map(|writer| writer.path);
        assert_eq!(file, Some(PathBuf::from("/var/lib/runfleet/registry.db")));
        let with_options = Writer::for_url("sqlite://data/registry.db?mode=rwc").map(|writer| writer.path);
        assert_eq!(with_options, Some(PathBuf::from("data/registry.db")));
        for memory in
            ["sqlite::memory:", "sqlite://:memory:", "sqlite://?mode=memory", "sqlite:x.db?mode=memory"]
        {
            assert!(Writer::for_url(memory).is_none(), "{memory}");
        }
    }
}
