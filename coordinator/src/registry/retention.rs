//! What the retention sweep ([`crate::retention`]) asks the registry: the
//! ended runs whose JetStream leftovers are due for removal, the steps whose
//! outputs went to the object store, and the record that a run was purged
//! (`runs.purged_ms`, migration `0004`).

use runfleet_protocol::event::EventBody;
use runfleet_protocol::{RunId, TenantId};
use sqlx::Row;

use super::{event_from_row, query_error, Error, Registry, RunRow};

/// The terminal states, spelled as SQL literals (not bound) so the partial
/// index `runs_ended_unpurged` applies on both backends.
const ENDED_STATES_SQL: &str = "('completed', 'failed', 'cancelled')";

/// An ended run whose JetStream leftovers have not been removed yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndedRun {
    pub run_id: RunId,
    pub tenant: TenantId,
    /// When the run ended (its terminal event's time), ms since the Unix epoch.
    pub ended_ms: i64,
}

impl Registry {
    /// Up to `limit` runs that ended before `ended_before_ms` and are not
    /// marked purged, the longest-ended first.
    pub async fn ended_unpurged(&self, ended_before_ms: i64, limit: u32) -> Result<Vec<EndedRun>, Error> {
        let sql = format!(
            "SELECT run_id, tenant, updated_ms FROM runs \
             WHERE purged_ms IS NULL AND state IN {ENDED_STATES_SQL} AND updated_ms < $1 \
             ORDER BY updated_ms LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(ended_before_ms)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("listing ended runs to purge"))?;
        rows.iter()
            .map(|row| {
                let r = RunRow::of(row)?;
                Ok(EndedRun {
                    run_id: r.parsed("run_id")?,
                    tenant: r.parsed("tenant")?,
                    ended_ms: r.int("updated_ms")?,
                })
            })
            .collect()
    }

    /// The step indexes of `run` whose output went to the object store
    /// (`step.completed` with `blob`), from the registry's copy of its events.
    pub async fn blob_steps(&self, run: RunId) -> Result<Vec<u32>, Error> {
        let rows = sqlx::query("SELECT body FROM run_events WHERE run_id = $1 AND type = 'step.completed'")
            .bind(run.to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("reading a run's completed steps"))?;
        let mut steps = Vec::new();
        for row in &rows {
            if let EventBody::StepCompleted(step) = event_from_row(row, run)?.body {
                if step.blob {
                    steps.push(step.index);
                }
            }
        }
        Ok(steps)
    }

    /// Records that `runs`' JetStream leftovers were removed at `now_ms`.
    pub async fn mark_purged(&self, runs: &[RunId], now_ms: i64) -> Result<(), Error> {
        let mut tx = self.pool.begin().await.map_err(query_error("marking runs purged"))?;
        for run in runs {
            sqlx::query("UPDATE runs SET purged_ms = $1 WHERE run_id = $2")
                .bind(now_ms)
                .bind(run.to_string())
                .execute(&mut *tx)
                .await
                .map_err(query_error("marking runs purged"))?;
        }
        tx.commit().await.map_err(query_error("marking runs purged"))
    }

    /// When `run` was marked purged, if it was (`None` also for a run the
    /// registry does not hold).
    pub async fn purged_ms(&self, run: RunId) -> Result<Option<i64>, Error> {
        let row = sqlx::query("SELECT purged_ms FROM runs WHERE run_id = $1")
            .bind(run.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading a run's purge time"))?;
        Ok(row.and_then(|row| row.try_get::<Option<i64>, _>("purged_ms").ok().flatten()))
    }
}

#[cfg(test)]
mod tests {
    use runfleet_protocol::RunState;

    use super::*;

    #[test]
    fn ended_states_are_the_terminal_ones() {
        for state in RunState::ALL {
            let quoted = format!("'{}'", state.as_str());
            assert_eq!(ENDED_STATES_SQL.contains(&quoted), state.is_terminal(), "{state}");
        }
    }
}
