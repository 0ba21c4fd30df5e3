//! PostgreSQL: migrate under an advisory lock, since replicas start together.

use sqlx::{Connection, PgConnection};
use tracing::debug;

use super::Error;

/// The schema migrations this build applies.
pub(super) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// The advisory lock key held while migrating ("runfleet" in ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x7275_6e66_6c65_6574;

/// Applies pending migrations while holding [`MIGRATION_LOCK_KEY`], so that
/// of several replicas starting at once one migrates and the others wait and
/// then find nothing to do.
pub(super) async fn migrate(url: &str) -> Result<(), Error> {
    let connect_error = |source| Error::Connect { backend: "postgres", source };
    let mut conn = PgConnection::connect(url).await.map_err(connect_error)?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut conn)
        .await
        .map_err(|source| Error::Query { what: "taking the migration lock", source })?;
    debug!("holding the registry migration lock");
    let migrated =
        MIGRATOR.run(&mut conn).await.map_err(|source| Error::Migrate { backend: "postgres", source });
    // Closing the session releases the lock even if the unlock fails.
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut conn)
        .await
        .map_err(|source| Error::Query { what: "releasing the migration lock", source });
    let closed = conn.close().await.map_err(connect_error);
    migrated.and(unlocked).and(closed)
}
