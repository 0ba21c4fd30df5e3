//! Where a projection stands, and who may move it: one row of
//! `projector_positions` per projection (migration `0003`).
//!
//! The row holds the last stream sequence projected, which only a batch
//! written with [`Registry::apply_at`] moves, by compare-and-set in the
//! batch's own transaction, and an owner with a lease, which decides which
//! of several projectors consumes the stream. Correctness rests on the
//! compare-and-set alone: two projectors that both believe they own the
//! projection (a paused owner whose lease ran out, clocks that disagree)
//! cannot both move the position from the same value, so every stream
//! sequence is projected once. The lease only keeps the others from
//! consuming for nothing.
//!
//! Times are the caller's wall clock in ms since the Unix epoch ([`Lease`]),
//! compared across replicas: a clock that runs ahead takes over early, one
//! that runs behind late, and neither breaks the compare-and-set. The same
//! SQL runs on SQLite and PostgreSQL.

use sqlx::Row;

use super::tx::{Tx, Value};
use super::{query_error, to_i64, Error, Registry};

/// A projector's claim on a projection: who holds it, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The projection's name (the row's key).
    pub projection: String,
    /// The projector claiming it; unique per projector process.
    pub owner: String,
    /// The caller's clock now, ms since the Unix epoch. Another owner's
    /// lease ending before it has expired.
    pub now_ms: i64,
    /// When the claim ends unless renewed, ms since the Unix epoch.
    pub until_ms: i64,
}

/// One projection as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projection {
    /// The last stream sequence projected; 0 when nothing was.
    pub position: u64,
    /// The projector holding it, `None` when released.
    pub owner: Option<String>,
    /// When the owner's lease ends, ms since the Unix epoch.
    pub lease_until_ms: i64,
    /// When the row last changed, ms since the Unix epoch.
    pub updated_ms: i64,
}

/// What [`Registry::take_projection`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Takeover {
    /// The caller owns the projection now (it was free, its owner's lease
    /// had expired, or it was the caller's already), at this position.
    Taken { position: u64 },
    /// Another projector holds an unexpired lease on it.
    Held { owner: String, until_ms: i64 },
    /// There is no row yet: create it with [`Registry::create_projection`].
    Missing,
}

impl Registry {
    /// The stored state of `projection`, or `None` if it has no row yet.
    pub async fn projection(&self, projection: &str) -> Result<Option<Projection>, Error> {
        let row = sqlx::query(
            "SELECT position, owner, lease_until_ms, updated_ms FROM projector_positions WHERE name = $1",
        )
        .bind(projection)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("reading the projector position"))?;
        row.map(|row| {
            let corrupt = |e: sqlx::Error| Error::CorruptPosition {
                projection: projection.to_owned(),
                reason: e.to_string(),
            };
            let position: i64 = row.try_get("position").map_err(corrupt)?;
            Ok(Projection {
                position: u64::try_from(position).map_err(|e| Error::CorruptPosition {
                    projection: projection.to_owned(),
                    reason: format!("position {position}: {e}"),
                })?,
                owner: row.try_get("owner").map_err(corrupt)?,
                lease_until_ms: row.try_get("lease_until_ms").map_err(corrupt)?,
                updated_ms: row.try_get("updated_ms").map_err(corrupt)?,
            })
        })
        .transpose()
    }

    /// Creates `lease.projection` at `position`, owned by `lease.owner`.
    /// Returns `false` (and changes nothing) if the row exists already,
    /// e.g. because another projector created it at the same moment.
    pub async fn create_projection(&self, lease: &Lease, position: u64) -> Result<bool, Error> {
        let done = sqlx::query(
            "INSERT INTO projector_positions (name, position, owner, lease_until_ms, updated_ms) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&lease.projection)
        .bind(to_i64(position))
        .bind(&lease.owner)
        .bind(lease.until_ms)
        .bind(lease.now_ms)
        .execute(&self.pool)
        .await
        .map_err(query_error("creating the projector position"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Takes `lease.projection` for `lease.owner` if nobody holds it, its
    /// owner's lease ended before `lease.now_ms`, or the caller holds it
    /// already (then this renews it). A standby polls with this: while the
    /// owner's lease runs it only reads, so it does not contend with the
    /// owner's writes.
    pub async fn take_projection(&self, lease: &Lease) -> Result<Takeover, Error> {
        let Some(current) = self.projection(&lease.projection).await? else {
            return Ok(Takeover::Missing);
        };
        if let Some(owner) = current.owner.filter(|owner| *owner != lease.owner) {
            if current.lease_until_ms >= lease.now_ms {
                return Ok(Takeover::Held { owner, until_ms: current.lease_until_ms });
            }
        }
        let row = sqlx::query(
            "UPDATE projector_positions SET owner = $1, lease_until_ms = $2, updated_ms = $3 \
             WHERE name = $4 AND (owner IS NULL OR owner = $5 OR lease_until_ms < $6) RETURNING position",
        )
        .bind(&lease.owner)
        .bind(lease.until_ms)
        .bind(lease.now_ms)
        .bind(&lease.projection)
        .bind(&lease.owner)
        .bind(lease.now_ms)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("taking over the projection"))?;
        if let Some(row) = row {
            let position: i64 = row.try_get("position").map_err(query_error("taking over the projection"))?;
            return Ok(Takeover::Taken { position: u64::try_from(position).unwrap_or(0) });
        }
        // Another projector took it between the read and the update.
        Ok(match self.projection(&lease.projection).await? {
            None => Takeover::Missing,
            Some(now) => {
                Takeover::Held { owner: now.owner.unwrap_or_default(), until_ms: now.lease_until_ms }
            }
        })
    }

    /// Extends `lease.owner`'s lease to `lease.until_ms`. Returns `false`
    /// if it no longer owns the projection (another projector took over
    /// after its lease ran out, or the row was deleted).
    pub async fn renew_projection(&self, lease: &Lease) -> Result<bool, Error> {
        let done = sqlx::query(
            "UPDATE projector_positions SET lease_until_ms = $1, updated_ms = $2 WHERE name = $3 AND owner = $4",
        )
        .bind(lease.until_ms)
        .bind(lease.now_ms)
        .bind(&lease.projection)
        .bind(&lease.owner)
        .execute(&self.pool)
        .await
        .map_err(query_error("renewing the projector lease"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives up `owner`'s hold on `projection` (at shutdown), so a standby
    /// takes over at its next poll instead of after the lease. Returns
    /// `false` if `owner` did not hold it.
    pub async fn release_projection(
        &self,
        projection: &str,
        owner: &str,
        now_ms: i64,
    ) -> Result<bool, Error> {
        let done = sqlx::query(
            "UPDATE projector_positions SET owner = NULL, lease_until_ms = 0, updated_ms = $1 \
             WHERE name = $2 AND owner = $3",
        )
        .bind(now_ms)
        .bind(projection)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(query_error("releasing the projection"))?;
        Ok(done.rows_affected() == 1)
    }
}

/// Moves the position from `from` to `to` and renews the lease, inside the
/// caller's transaction, only if the position is still `from` and
/// `lease.owner` still owns the projection (or nobody does, or the owner's
/// lease expired). Anything else is [`Error::Superseded`]: the caller must
/// roll back.
pub(super) async fn advance(tx: &mut Tx<'_>, lease: &Lease, from: u64, to: u64) -> Result<(), Error> {
    let moved = tx
        .execute(
            "moving the projector position",
            "UPDATE projector_positions SET position = $1, owner = $2, lease_until_ms = $3, updated_ms = $4 \
             WHERE name = $5 AND position = $6 AND (owner = $7 OR owner IS NULL OR lease_until_ms < $8)",
            &[
                Value::Int(to_i64(to)),
                Value::text(lease.owner.as_str()),
                Value::Int(lease.until_ms),
                Value::Int(lease.now_ms),
                Value::text(lease.projection.as_str()),
                Value::Int(to_i64(from)),
                Value::text(lease.owner.as_str()),
                Value::Int(lease.now_ms),
            ],
        )
        .await?;
    if moved == 1 {
        Ok(())
    } else {
        Err(Error::Superseded { projection: lease.projection.clone(), from })
    }
}
