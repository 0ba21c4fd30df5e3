//! The SQL registry: the queryable history of runs, fed by the projector.
//!
//! One [`Registry`] serves SQLite (embedded, the default) and PostgreSQL
//! (fleets), chosen by the URL. Queries go through sqlx's `Any` driver so each
//! is written once; only connecting and migrating differ per backend (see
//! [`sqlite`] and [`postgres`]).
//!
//! The registry is never on a run's path from submit to finish: JetStream is
//! the source of truth and the registry may lag it by the projector's delay.
//! [`Registry::apply`] is idempotent and order-independent, so replaying or
//! redelivering events (even out of order) converges to the same rows.
//!
//! Tenants are isolated: every read filters on the tenant, so a run of one
//! tenant does not exist for another.

mod postgres;
mod sqlite;

use std::collections::BTreeSet;

use runfleet_protocol::api::{EventsResponse, ListFilter, ListResponse, RunView};
use runfleet_protocol::event::{Event, EventBody, RunCreated, RunError};
use runfleet_protocol::{ErrorCode, RunId, RunState, TenantId};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Row, Transaction};
use tracing::info;

/// A registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL names no supported database.
    #[error("unsupported database url {0:?}: use sqlite:PATH or postgres://…")]
    UnsupportedUrl(String),
    /// The database could not be reached or opened. Retryable.
    #[error("could not connect to the {backend} registry: {source}")]
    Connect {
        backend: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// Applying the schema migrations failed.
    #[error("could not migrate the {backend} registry: {source}")]
    Migrate {
        backend: &'static str,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// A query failed. Usually retryable (the database is unreachable or busy).
    #[error("registry query failed while {what}: {source}")]
    Query {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// A stored row does not decode: a bug or a hand-edited database.
    #[error("registry row for run {run_id} is corrupt: {reason}")]
    Corrupt { run_id: String, reason: String },
}

impl Error {
    /// Whether the same call may succeed later (the database was unreachable
    /// or busy). `false` means retrying cannot help: the URL, the schema or
    /// the data itself is wrong.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Query { .. } => true,
            Self::UnsupportedUrl(_) | Self::Migrate { .. } | Self::Corrupt { .. } => false,
        }
    }
}

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend of `url`: `sqlite:` or `postgres://` / `postgresql://`.
    pub fn of(url: &str) -> Result<Self, Error> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else {
            Err(Error::UnsupportedUrl(redact(url)))
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// Keeps passwords out of errors and logs: `scheme://user:***@host/db`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// A non-terminal run the registry has not seen move for a while: what the
/// recovery loop examines (see [`Registry::stale_runs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleRun {
    pub run_id: RunId,
    pub tenant: TenantId,
    /// The state the registry last projected (JetStream may be newer).
    pub state: RunState,
    pub updated_ms: i64,
}

/// The states a run can stay in without a worker making progress, which is
/// what the recovery loop checks. Spelled as SQL literals (not bound) so the
/// partial index `runs_active` applies on both backends.
const ACTIVE_STATES_SQL: &str = "('queued', 'running', 'waiting')";

/// The output and error a run's row carries after `event`: set by the
/// terminal events, cleared by every other.
pub(crate) fn outcome_of(event: &Event) -> (Option<serde_json::Value>, Option<RunError>) {
    match &event.body {
        EventBody::Completed(done) => (Some(done.output.clone()), None),
        EventBody::Failed(failed) => (None, Some(failed.error.clone())),
        EventBody::Cancelled(cancelled) => {
            let message = match &cancelled.reason {
                Some(reason) => format!("cancelled: {reason}"),
                None => "cancelled".to_owned(),
            };
            (None, Some(RunError { code: ErrorCode::Cancelled, message }))
        }
        _ => (None, None),
    }
}

/// The run registry. Cheap to clone (a connection pool).
#[derive(Clone, Debug)]
pub struct Registry {
    pool: AnyPool,
    backend: Backend,
}

const RUN_COLUMNS: &str = "run_id, tenant, agent, queue, priority, state, attempt, max_attempts, \
     input, output, error, idempotency_key, worker_id, created_ms, updated_ms, last_seq";

fn query_error(what: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |source| Error::Query { what, source }
}

impl Registry {
    /// Connects to `url` (`sqlite:PATH`, created if missing, or
    /// `postgres://…`) and applies pending migrations. On PostgreSQL the
    /// migration runs under an advisory lock, so replicas starting together
    /// migrate once.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let backend = Backend::of(url)?;
        match backend {
            Backend::Sqlite => sqlite::prepare(url).await?,
            Backend::Postgres => postgres::migrate(url).await?,
        }
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(pool_size(backend))
            .connect(url)
            .await
            .map_err(|source| Error::Connect { backend: backend.name(), source })?;
        info!(backend = backend.name(), url = %redact(url), "registry connected");
        Ok(Self { pool, backend })
    }

    /// Which database this registry runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// `Ok` when the database answers and holds every migration this build
    /// knows, else why not (for `/readyz`).
    pub async fn ready(&self) -> Result<(), String> {
        let expected = match self.backend {
            Backend::Sqlite => sqlite::MIGRATOR.iter().count(),
            Backend::Postgres => postgres::MIGRATOR.iter().count(),
        };
        let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| format!("registry database: {e}"))?;
        if usize::try_from(applied).unwrap_or(0) < expected {
            return Err(format!("registry database has {applied} of {expected} migrations applied"));
        }
        Ok(())
    }

    /// Records `events` in one transaction.
    ///
    /// Idempotent and order-independent: an event already stored is ignored,
    /// a run's row appears once its `run.created` event is stored, and the row
    /// then reflects the highest-seq event stored for the run, whatever order
    /// the events arrived in.
    pub async fn apply(&self, events: &[Event]) -> Result<(), Error> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(query_error("starting a transaction"))?;
        for event in events {
            insert_event(&mut tx, event).await?;
        }
        let runs: BTreeSet<RunId> = events.iter().map(|e| e.run_id).collect();
        for run in runs {
            project_run(&mut tx, run).await?;
        }
        tx.commit().await.map_err(query_error("committing events"))
    }

    /// One run of `tenant`, or `None` if the registry does not know it (yet).
    pub async fn get(&self, tenant: &TenantId, run: RunId) -> Result<Option<RunView>, Error> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE tenant = $1 AND run_id = $2");
        let row = sqlx::query(&sql)
            .bind(tenant.as_str())
            .bind(run.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading a run"))?;
        row.as_ref().map(run_view).transpose()
    }

    /// One page of `tenant`'s runs matching `filter`, newest first.
    /// `next_cursor` (the last run id of the page) is set only if more follow.
    pub async fn list(&self, tenant: &TenantId, filter: &ListFilter) -> Result<ListResponse, Error> {
        let mut conditions = vec!["tenant = $1".to_owned()];
        let mut binds = vec![tenant.to_string()];
        let mut filter_on = |column: &str, value: String| {
            binds.push(value);
            conditions.push(format!("{column} = ${}", binds.len()));
        };
        if let Some(state) = filter.state {
            filter_on("state", state.as_str().to_owned());
        }
        if let Some(queue) = &filter.queue {
            filter_on("queue", queue.to_string());
        }
        if let Some(agent) = &filter.agent {
            filter_on("agent", agent.to_string());
        }
        if let Some(before) = filter.before {
            binds.push(before.to_string());
            conditions.push(format!("run_id < ${}", binds.len()));
        }
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE {} ORDER BY run_id DESC LIMIT ${}",
            conditions.join(" AND "),
            binds.len() + 1
        );
        let mut query = sqlx::query(&sql);
        for bind in binds {
            query = query.bind(bind);
        }
        let rows = query
            .bind(i64::from(filter.limit) + 1)
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("listing runs"))?;
        let mut runs = rows.iter().map(run_view).collect::<Result<Vec<_>, _>>()?;
        let limit = usize::try_from(filter.limit).unwrap_or(usize::MAX);
        let next_cursor = if runs.len() > limit {
            runs.truncate(limit);
            runs.last().map(|run| run.run_id.to_string())
        } else {
            None
        };
        Ok(ListResponse { runs, next_cursor })
    }

    /// Up to `limit` events of `tenant`'s run with `seq > after_seq`, in seq
    /// order, or `None` if the registry knows no event of the run (yet).
    ///
    /// The registry lags the stream by the projector's delay (usually
    /// milliseconds): the newest events may be missing from a page.
    pub async fn events(
        &self,
        tenant: &TenantId,
        run: RunId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Option<EventsResponse>, Error> {
        let rows = sqlx::query(
            "SELECT body FROM run_events WHERE tenant = $1 AND run_id = $2 AND seq > $3 \
             ORDER BY seq LIMIT $4",
        )
        .bind(tenant.as_str())
        .bind(run.to_string())
        .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("reading events"))?;
        if rows.is_empty() && !self.has_events(tenant, run).await? {
            return Ok(None);
        }
        let mut events = rows.iter().map(|row| event_from_row(row, run)).collect::<Result<Vec<_>, _>>()?;
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let has_more = events.len() > limit;
        events.truncate(limit);
        Ok(Some(EventsResponse { events, has_more }))
    }

    /// Up to `limit` runs of any tenant that are queued, running or waiting
    /// and whose row was last updated before `updated_before_ms`, in run id
    /// order after `after` (keyset paging: pass the last run id of the
    /// previous page). Feeds the recovery loop, which checks each against
    /// JetStream; the registry may lag, so a run listed here may have moved.
    pub async fn stale_runs(
        &self,
        updated_before_ms: i64,
        after: Option<RunId>,
        limit: u32,
    ) -> Result<Vec<StaleRun>, Error> {
        let sql = format!(
            "SELECT run_id, tenant, state, updated_ms FROM runs \
             WHERE state IN {ACTIVE_STATES_SQL} AND updated_ms < $1 AND run_id > $2 \
             ORDER BY run_id LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(updated_before_ms)
            .bind(after.map(|run| run.to_string()).unwrap_or_default())
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("listing stale runs"))?;
        rows.iter()
            .map(|row| {
                let run_id: String = row
                    .try_get("run_id")
                    .map_err(|e| Error::Corrupt { run_id: "?".to_owned(), reason: e.to_string() })?;
                let r = RunRow { row, run_id };
                Ok(StaleRun {
                    run_id: r.parsed("run_id")?,
                    tenant: r.parsed("tenant")?,
                    state: r.parsed("state")?,
                    updated_ms: r.int("updated_ms")?,
                })
            })
            .collect()
    }

    async fn has_events(&self, tenant: &TenantId, run: RunId) -> Result<bool, Error> {
        let row = sqlx::query("SELECT seq FROM run_events WHERE tenant = $1 AND run_id = $2 LIMIT 1")
            .bind(tenant.as_str())
            .bind(run.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading events"))?;
        Ok(row.is_some())
    }
}

/// SQLite serializes writers, so a small pool suffices; PostgreSQL serves
/// concurrent API reads.
fn pool_size(backend: Backend) -> u32 {
    match backend {
        Backend::Sqlite => 8,
        Backend::Postgres => 16,
    }
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn json_text(value: &impl serde::Serialize, run: RunId) -> Result<String, Error> {
    serde_json::to_string(value)
        .map_err(|e| Error::Corrupt { run_id: run.to_string(), reason: e.to_string() })
}

async fn insert_event(tx: &mut Transaction<'_, Any>, event: &Event) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO run_events (run_id, seq, tenant, type, ts_ms, attempt, worker_id, body) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (run_id, seq) DO NOTHING",
    )
    .bind(event.run_id.to_string())
    .bind(to_i64(event.seq))
    .bind(event.tenant.as_str())
    .bind(event.body.type_name())
    .bind(event.ts_ms)
    .bind(i64::from(event.attempt))
    .bind(event.worker_id.as_ref().map(ToString::to_string))
    .bind(json_text(event, event.run_id)?)
    .execute(&mut **tx)
    .await
    .map_err(query_error("inserting an event"))?;
    Ok(())
}

/// Brings `run`'s row in line with its stored events: creates it from the
/// `run.created` event, then applies the highest-seq event if it is newer.
async fn project_run(tx: &mut Transaction<'_, Any>, run: RunId) -> Result<(), Error> {
    let Some(created) = stored_event(tx, run, EventQuery::First).await? else {
        // The row appears once run.created is stored.
        return Ok(());
    };
    let EventBody::Created(body) = &created.body else {
        return Err(Error::Corrupt {
            run_id: run.to_string(),
            reason: format!("event 1 is {}, not run.created", created.body.type_name()),
        });
    };
    insert_run(tx, &created, body).await?;
    let Some(latest) = stored_event(tx, run, EventQuery::Last(&created.tenant)).await? else {
        return Ok(());
    };
    if latest.seq > created.seq {
        update_run(tx, &latest).await?;
    }
    Ok(())
}

enum EventQuery<'a> {
    First,
    Last(&'a TenantId),
}

async fn stored_event(
    tx: &mut Transaction<'_, Any>,
    run: RunId,
    which: EventQuery<'_>,
) -> Result<Option<Event>, Error> {
    let query = match which {
        EventQuery::First => {
            sqlx::query("SELECT body FROM run_events WHERE run_id = $1 AND seq = 1").bind(run.to_string())
        }
        EventQuery::Last(tenant) => sqlx::query(
            "SELECT body FROM run_events WHERE run_id = $1 AND tenant = $2 ORDER BY seq DESC LIMIT 1",
        )
        .bind(run.to_string())
        .bind(tenant.as_str()),
    };
    let row = query.fetch_optional(&mut **tx).await.map_err(query_error("reading stored events"))?;
    row.as_ref().map(|row| event_from_row(row, run)).transpose()
}

async fn insert_run(tx: &mut Transaction<'_, Any>, event: &Event, body: &RunCreated) -> Result<(), Error> {
    let sql = format!(
        "INSERT INTO runs ({RUN_COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, NULL, $10, NULL, $11, $11, $12) \
         ON CONFLICT (run_id) DO NOTHING"
    );
    sqlx::query(&sql)
        .bind(event.run_id.to_string())
        .bind(event.tenant.as_str())
        .bind(body.agent.as_str())
        .bind(body.queue.as_str())
        .bind(i64::from(body.priority))
        .bind(RunState::Queued.as_str())
        .bind(i64::from(event.attempt))
        .bind(i64::from(body.max_attempts))
        .bind(json_text(&body.input, event.run_id)?)
        .bind(body.idempotency_key.clone())
        .bind(event.ts_ms)
        .bind(to_i64(event.seq))
        .execute(&mut **tx)
        .await
        .map_err(query_error("inserting a run"))?;
    Ok(())
}

async fn update_run(tx: &mut Transaction<'_, Any>, latest: &Event) -> Result<(), Error> {
    let (output, error) = outcome_of(latest);
    let output = output.map(|output| json_text(&output, latest.run_id)).transpose()?;
    let error = error.map(|error| json_text(&error, latest.run_id)).transpose()?;
    sqlx::query(
        "UPDATE runs SET state = $1, attempt = $2, output = $3, error = $4, worker_id = $5, \
         updated_ms = $6, last_seq = $7 WHERE run_id = $8 AND last_seq < $7",
    )
    .bind(latest.state_after().as_str())
    .bind(i64::from(latest.attempt))
    .bind(output)
    .bind(error)
    .bind(latest.worker_id.as_ref().map(ToString::to_string))
    .bind(latest.ts_ms)
    .bind(to_i64(latest.seq))
    .bind(latest.run_id.to_string())
    .execute(&mut **tx)
    .await
    .map_err(query_error("updating a run"))?;
    Ok(())
}

fn event_from_row(row: &AnyRow, run: RunId) -> Result<Event, Error> {
    let corrupt = |reason: String| Error::Corrupt { run_id: run.to_string(), reason };
    let body: String = row.try_get("body").map_err(|e| corrupt(e.to_string()))?;
    serde_json::from_str(&body).map_err(|e| corrupt(format!("stored event does not decode: {e}")))
}

/// Reads typed columns of one `runs` row, reporting any mismatch as corrupt.
struct RunRow<'a> {
    row: &'a AnyRow,
    run_id: String,
}

impl RunRow<'_> {
    fn corrupt(&self, column: &str, reason: impl std::fmt::Display) -> Error {
        Error::Corrupt { run_id: self.run_id.clone(), reason: format!("{column}: {reason}") }
    }

    fn text(&self, column: &str) -> Result<String, Error> {
        self.row.try_get(column).map_err(|e| self.corrupt(column, e))
    }

    fn opt_text(&self, column: &str) -> Result<Option<String>, Error> {
        self.row.try_get(column).map_err(|e| self.corrupt(column, e))
    }

    fn int<T: TryFrom<i64>>(&self, column: &str) -> Result<T, Error>
    where
        T::Error: std::fmt::Display,
    {
        let value: i64 = self.row.try_get(column).map_err(|e| self.corrupt(column, e))?;
        T::try_from(value).map_err(|e| self.corrupt(column, e))
    }

    fn parsed<T: std::str::FromStr>(&self, column: &str) -> Result<T, Error>
    where
        T::Err: std::fmt::Display,
    {
        self.text(column)?.parse().map_err(|e| self.corrupt(column, e))
    }

    fn opt_json<T: serde::de::DeserializeOwned>(&self, column: &str) -> Result<Option<T>, Error> {
        self.opt_text(column)?
            .map(|text| serde_json::from_str(&text).map_err(|e| self.corrupt(column, e)))
            .transpose()
    }
}

fn run_view(row: &AnyRow) -> Result<RunView, Error> {
    let run_id: String = row
        .try_get("run_id")
        .map_err(|e| Error::Corrupt { run_id: "?".to_owned(), reason: e.to_string() })?;
    let r = RunRow { row, run_id };
    Ok(RunView {
        run_id: r.parsed("run_id")?,
        tenant: r.parsed("tenant")?,
        agent: r.parsed("agent")?,
        queue: r.parsed("queue")?,
        priority: r.int("priority")?,
        state: r.parsed("state")?,
        attempt: r.int("attempt")?,
        max_attempts: r.int("max_attempts")?,
        input: r.opt_json("input")?.unwrap_or_default(),
        output: r.opt_json("output")?,
        error: r.opt_json("error")?,
        idempotency_key: r.opt_text("idempotency_key")?,
        worker_id: r
            .opt_text("worker_id")?
            .map(|w| w.parse())
            .transpose()
            .map_err(|e| r.corrupt("worker_id", e))?,
        created_ms: r.int("created_ms")?,
        updated_ms: r.int("updated_ms")?,
        last_seq: r.int("last_seq")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_is_chosen_by_url() {
        assert_eq!(Backend::of("sqlite:x.db").ok(), Some(Backend::Sqlite));
        assert_eq!(Backend::of("postgres://u:p@h/db").ok(), Some(Backend::Postgres));
        assert!(matches!(Backend::of("mysql://u:p@h/db"), Err(Error::UnsupportedUrl(_))));
    }

    #[test]
    fn cancelled_runs_carry_a_cancelled_error() {
        use runfleet_protocol::event::RunCancelled;
        let event = |reason: Option<&str>| Event {
            run_id: RunId::generate(),
            tenant: TenantId::default_tenant(),
            seq: 3,
            ts_ms: 1,
            attempt: 1,
            worker_id: None,
            trace_id: None,
            body: EventBody::Cancelled(RunCancelled { reason: reason.map(str::to_owned) }),
        };
        let (output, error) = outcome_of(&event(Some("operator said so")));
        assert_eq!(output, None);
        assert_eq!(
            error,
            Some(RunError { code: ErrorCode::Cancelled, message: "cancelled: operator said so".to_owned() })
        );
        let (_, error) = outcome_of(&event(None));
        assert_eq!(error.map(|e| e.message), Some("cancelled".to_owned()));
    }

    #[test]
    fn active_states_are_the_non_terminal_ones() {
        for state in RunState::ALL {
            let quoted = format!("'{}'", state.as_str());
            assert_eq!(ACTIVE_STATES_SQL.contains(&quoted), !state.is_terminal(), "{state}");
        }
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("sqlite:a.db"), "sqlite:a.db");
    }
}
