//! The SQL registry: the queryable history of runs, fed by the projector.
//!
//! One [`Registry`] serves SQLite (embedded, the default) and PostgreSQL
//! (fleets), chosen by the URL. Queries go through sqlx's `Any` driver so each
//! is written once; only connecting and migrating differ per backend (see
//! [`sqlite`] and [`postgres`]). The projector's batches are also written
//! once ([`tx`]) and, on a SQLite file, run through rusqlite on the calling
//! thread rather than through sqlx's connection thread ([`native`]).
//!
//! The registry is never on a run's path from submit to finish: JetStream is
//! the source of truth and the registry may lag it by the projector's delay.
//! [`Registry::apply`] is idempotent and order-independent, so replaying or
//! redelivering events (even out of order) converges to the same rows.
//!
//! [`Registry::apply_at`] also records how far the projector got in the
//! events stream, in the same transaction and by compare-and-set; the
//! projection's owner and [`Lease`] decide which projector consumes.
//!
//! Tenants are isolated: every read filters on the tenant, so a run of one
//! tenant does not exist for another.

mod native;
mod position;
mod postgres;
mod retention;
mod sqlite;
mod tx;

pub use position::{Lease, Projection, Takeover};
pub use retention::EndedRun;

use std::sync::Arc;

use runfleet_protocol::api::{EventsResponse, ListFilter, ListResponse, RunView};
use runfleet_protocol::event::{Event, EventBody, RunCreated, RunError};
use runfleet_protocol::{ErrorCode, RunId, RunState, TenantId};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use tracing::info;

use tx::{Tx, Value};

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
    /// A statement of the native SQLite writer failed (see
    /// [`Registry::apply`]). Usually retryable (the file is locked or
    /// unreadable).
    #[error("registry query failed while {what}: {source}")]
    Sqlite {
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    /// A stored row does not decode: a bug or a hand-edited database.
    #[error("registry row for run {run_id} is corrupt: {reason}")]
    Corrupt { run_id: String, reason: String },
    /// A batch written with [`Registry::apply_at`] was rolled back because
    /// the projection is no longer at the position the batch started from,
    /// or another projector owns it: re-read the position and go on from
    /// there. Not retryable as it is.
    #[error(
        "projection {projection} is no longer at stream sequence {from} or is owned by another projector; \
         batch rolled back"
    )]
    Superseded { projection: String, from: u64 },
    /// The projection's stored row does not decode: a hand-edited database.
    #[error("registry position of projection {projection} is corrupt: {reason}")]
    CorruptPosition { projection: String, reason: String },
}

impl Error {
    /// Whether the same call may succeed later (the database was unreachable
    /// or busy). `false` means retrying cannot help: the URL, the schema or
    /// the data itself is wrong.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Query { .. } | Self::Sqlite { .. } => true,
            Self::UnsupportedUrl(_)
            | Self::Migrate { .. }
            | Self::Corrupt { .. }
            | Self::Superseded { .. }
            | Self::CorruptPosition { .. } => false,
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
#[derive(Clone)]
pub struct Registry {
    pool: AnyPool,
    backend: Backend,
    /// On a SQLite file, the connection batches are written through
    /// ([`native`]); shared by clones, not by [`reopen`](Self::reopen)ed
    /// registries.
    native: Option<Arc<native::Writer>>,
    /// The database's URL, for [`reopen`](Self::reopen); may hold a
    /// password, so `Debug` prints it redacted.
    url: Arc<str>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("backend", &self.backend)
            .field("url", &redact(&self.url))
            .field("pool", &self.pool)
            .finish()
    }
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
        let pool = pool_options(backend, pool_size(backend))
            .connect(url)
            .await
            .map_err(|source| Error::Connect { backend: backend.name(), source })?;
        info!(backend = backend.name(), url = %redact(url), "registry connected");
        Ok(Self { pool, backend, native: native_writer(backend, url), url: url.into() })
    }

    /// A registry of its own on the same database, of at most `connections`
    /// connections, opened as they are needed (a database that is down
    /// fails the first query, not this call). Connections belong to the
    /// tokio runtime that opens them (a PostgreSQL socket is driven by that
    /// runtime's I/O driver), so a component that runs on a runtime of its
    /// own calls this from that runtime rather than share this pool.
    pub fn reopen(&self, connections: u32) -> Result<Self, Error> {
        let pool = pool_options(self.backend, connections.max(1))
            .connect_lazy(&self.url)
            .map_err(|source| Error::Connect { backend: self.backend.name(), source })?;
        Ok(Self {
            pool,
            backend: self.backend,
            native: native_writer(self.backend, &self.url),
            url: self.url.clone(),
        })
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
    ///
    /// A batch costs a handful of statements whatever its size: multi-row
    /// inserts of the events, inserts of the new runs (already at the
    /// batch's latest event of each), one lookup of events stored before
    /// their run's `run.created` arrived (only for runs created in this
    /// batch), and multi-row updates of the rows whose run moved; each in
    /// statements of power-of-two sizes ([`statement_chunks`]).
    ///
    /// On a SQLite file the batch runs on the calling thread, which it
    /// blocks for the transaction: SQLite's own work, without sqlx's hop to
    /// a connection thread per statement ([`native`]). The projector calls
    /// this from a thread of its own; other callers should too, or accept a
    /// blocked runtime thread for a few milliseconds.
    pub async fn apply(&self, events: &[Event]) -> Result<(), Error> {
        if events.is_empty() {
            return Ok(());
        }
        self.write(events, None).await
    }

    /// Records `events` like [`apply`](Self::apply) and, in the same
    /// transaction, moves `lease.projection`'s position from `from` to `to`
    /// (the last stream sequence the batch covers) and renews the lease.
    ///
    /// The move is a compare-and-set: it applies only if the stored position
    /// is still `from` and `lease.owner` still owns the projection (or
    /// nobody does, or the owner's lease ended before `lease.now_ms`).
    /// Otherwise nothing is written and the result is
    /// [`Error::Superseded`]. So a batch is committed at most once per
    /// position, and a retry after a failure whose outcome was unknown (a
    /// commit whose answer was lost) is refused rather than doubled.
    /// `events` may be empty, to move past messages that held no event.
    pub async fn apply_at(&self, events: &[Event], lease: &Lease, from: u64, to: u64) -> Result<(), Error> {
        self.write(events, Some((lease, from, to))).await
    }

    /// One transaction: the position's compare-and-set first (so concurrent
    /// projectors queue on its row and the loser writes nothing), then the
    /// events.
    async fn write(&self, events: &[Event], position: Option<(&Lease, u64, u64)>) -> Result<(), Error> {
        let runs = BatchRuns::of(events)?;
        match &self.native {
            Some(native) => {
                let mut conn = native.begin().await?;
                write_batch(Tx::Native(conn.get()), self.backend, events, &runs, position).await
            }
            None => {
                let tx = self.pool.begin().await.map_err(query_error("starting a transaction"))?;
                write_batch(Tx::Any(tx), self.backend, events, &runs, position).await
            }
        }
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

    /// How many of `tenant`'s runs the registry holds in `state` (for
    /// benchmarks and operators: one indexed count).
    pub async fn count(&self, tenant: &TenantId, state: RunState) -> Result<u64, Error> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM runs WHERE tenant = $1 AND state = $2")
            .bind(tenant.as_str())
            .bind(state.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(query_error("counting runs"))?;
        Ok(u64::try_from(count).unwrap_or(0))
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
                let r = RunRow::of(row)?;
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

/// One batch in `tx`: the position's compare-and-set first (so concurrent
/// projectors queue on its row and the loser writes nothing), then the
/// events, the new rows and the moved ones, then the commit.
async fn write_batch(
    mut tx: Tx<'_>,
    backend: Backend,
    events: &[Event],
    runs: &Runs<'_>,
    position: Option<(&Lease, u64, u64)>,
) -> Result<(), Error> {
    if let Some((lease, from, to)) = position {
        position::advance(&mut tx, lease, from, to).await?;
    }
    if events.is_empty() {
        return tx.commit("committing the projector position").await;
    }
    // Rows and events in key order, so concurrent projectors (replicas
    // on PostgreSQL) lock them in the same order and cannot deadlock.
    let mut sorted: Vec<&Event> = events.iter().collect();
    sorted.sort_by_key(|event| (event.run_id, event.seq));
    insert_events(&mut tx, backend, &sorted).await?;
    let created: Vec<(&Event, &RunCreated)> = runs.values().filter_map(|run| run.created).collect();
    let new_rows: Vec<NewRow<'_>> = runs
        .values()
        .filter_map(|run| {
            run.created.map(|(event, body)| NewRow { created: event, body, latest: run.latest })
        })
        .collect();
    insert_runs(&mut tx, backend, &new_rows).await?;
    // A run created in this batch may have later events stored by an
    // earlier batch (they arrived first): its row takes the highest.
    let mut stored_later = Vec::new();
    let created_tenant: std::collections::HashMap<RunId, &TenantId> =
        created.iter().map(|(event, _)| (event.run_id, &event.tenant)).collect();
    for (run, seq) in max_stored_seqs(&mut tx, backend, &created).await? {
        let Some(batch) = created_tenant.get(&run).and_then(|tenant| runs.get(&(run, *tenant))) else {
            continue;
        };
        if seq <= 1 || batch.latest.is_some_and(|latest| latest.seq >= seq) {
            continue;
        }
        if let Some(event) = last_stored_event(&mut tx, run, &batch.tenant).await? {
            stored_later.push(event);
        }
    }
    let mut latest: Vec<&Event> = runs
        .values()
        .filter_map(|run| run.latest)
        .filter(|event| {
            !stored_later.iter().any(|later| later.run_id == event.run_id && later.tenant == event.tenant)
        })
        .collect();
    latest.extend(stored_later.iter());
    latest.sort_by_key(|event| event.run_id);
    update_runs(&mut tx, backend, &latest).await?;
    tx.commit("committing events").await
}

/// The native writer of a SQLite file (`None` on PostgreSQL and for an
/// in-memory SQLite database).
fn native_writer(backend: Backend, url: &str) -> Option<Arc<native::Writer>> {
    match backend {
        Backend::Sqlite => native::Writer::for_url(url).map(Arc::new),
        Backend::Postgres => None,
    }
}

/// A pool of at most `connections`; SQLite connections are tuned
/// ([`sqlite::tune`]).
fn pool_options(backend: Backend, connections: u32) -> AnyPoolOptions {
    let options = AnyPoolOptions::new().max_connections(connections);
    match backend {
        Backend::Sqlite => options.after_connect(|conn, _| Box::pin(sqlite::tune(conn))),
        Backend::Postgres => options,
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

/// The most rows of one multi-row statement: 16 parameters each stays far
/// below SQLite's 32,766 and PostgreSQL's 65,535 bound parameters.
const ROWS_PER_STATEMENT: usize = 512;

/// Splits rows into multi-row statements whose sizes are powers of two
/// (full [`ROWS_PER_STATEMENT`] chunks, then the rest by its binary digits:
/// 300 rows are 256 + 32 + 8 + 4). Each statement's text depends only on its
/// size, so a connection prepares at most ten shapes per statement and
/// reuses them from its statement cache; with every batch size its own
/// text, parsing the statement cost about as much as running it.
fn statement_chunks<T>(rows: &[T]) -> impl Iterator<Item = &[T]> {
    let mut rest = rows;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let size = if rest.len() >= ROWS_PER_STATEMENT {
            ROWS_PER_STATEMENT
        } else {
            1 << (usize::BITS - 1 - rest.len().leading_zeros())
        };
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        Some(chunk)
    })
}

/// What one batch holds of each run.
struct BatchRun<'a> {
    tenant: TenantId,
    /// The run's `run.created`, if in the batch.
    created: Option<(&'a Event, &'a RunCreated)>,
    /// The batch's highest-seq event of the run after `run.created`.
    latest: Option<&'a Event>,
}

/// A batch's runs, by run and tenant.
type Runs<'a> = std::collections::BTreeMap<(RunId, &'a TenantId), BatchRun<'a>>;

struct BatchRuns;

impl BatchRuns {
    /// Groups a batch by run and tenant (an event naming another tenant
    /// than the run's never moves its row, so it must not hide the run's
    /// own latest event). Seq 1 must be `run.created`.
    fn of(events: &[Event]) -> Result<Runs<'_>, Error> {
        let mut runs = std::collections::BTreeMap::new();
        for event in events {
            let run = runs.entry((event.run_id, &event.tenant)).or_insert_with(|| BatchRun {
                tenant: event.tenant.clone(),
                created: None,
                latest: None,
            });
            if event.seq == 1 {
                let EventBody::Created(body) = &event.body else {
                    return Err(Error::Corrupt {
                        run_id: event.run_id.to_string(),
                        reason: format!("event 1 is {}, not run.created", event.body.type_name()),
                    });
                };
                run.created = Some((event, body));
            } else if run.latest.is_none_or(|latest: &Event| latest.seq < event.seq) {
                run.latest = Some(event);
            }
        }
        Ok(runs)
    }
}

/// `($1, …, $n), ($n+1, …)`: placeholders of `rows` rows of `columns`
/// each. SQLite gets anonymous `?`s instead: sqlx binds SQLite parameters
/// by looking each one's name up, a scan of every parameter for `$N`, which
/// costs more than the statement itself at thousands of parameters.
fn placeholders(backend: Backend, rows: usize, columns: usize) -> String {
    use std::fmt::Write as _;
    // Written into one buffer: a batch has thousands of them.
    let mut sql = String::with_capacity(rows * (columns * 6 + 4));
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 1..=columns {
            if c > 1 {
                sql.push_str(", ");
            }
            match backend {
                Backend::Sqlite => sql.push('?'),
                Backend::Postgres => {
                    let _ = write!(sql, "${}", r * columns + c);
                }
            }
        }
        sql.push(')');
    }
    sql
}

async fn insert_events(tx: &mut Tx<'_>, backend: Backend, events: &[&Event]) -> Result<(), Error> {
    for chunk in statement_chunks(events) {
        let sql = format!(
            "INSERT INTO run_events (run_id, seq, tenant, type, ts_ms, attempt, worker_id, body) \
             VALUES {} ON CONFLICT (run_id, seq) DO NOTHING",
            placeholders(backend, chunk.len(), 8)
        );
        let mut values = Vec::with_capacity(chunk.len() * 8);
        for event in chunk {
            values.extend([
                Value::text(event.run_id.to_string()),
                Value::Int(to_i64(event.seq)),
                Value::text(event.tenant.as_str()),
                Value::text(event.body.type_name()),
                Value::Int(event.ts_ms),
                Value::Int(i64::from(event.attempt)),
                Value::opt_text(event.worker_id.as_ref().map(ToString::to_string)),
                Value::text(json_text(event, event.run_id)?),
            ]);
        }
        tx.execute("inserting events", &sql, &values).await?;
    }
    Ok(())
}

/// A run whose `run.created` is in the batch, and the batch's latest event
/// of it after that, if any.
struct NewRow<'a> {
    created: &'a Event,
    body: &'a RunCreated,
    latest: Option<&'a Event>,
}

/// Creates the rows of runs whose `run.created` is in the batch, directly
/// at the batch's latest event of the run (a short run's whole life is
/// often one batch: one row write instead of an insert and an update that
/// moves every index entry again); rows that exist are left alone, and
/// [`update_runs`] moves them.
async fn insert_runs(tx: &mut Tx<'_>, backend: Backend, rows: &[NewRow<'_>]) -> Result<(), Error> {
    for chunk in statement_chunks(rows) {
        let sql = format!(
            "INSERT INTO runs ({RUN_COLUMNS}) VALUES {} ON CONFLICT (run_id) DO NOTHING",
            placeholders(backend, chunk.len(), 16)
        );
        let mut values = Vec::with_capacity(chunk.len() * 16);
        for NewRow { created, body, latest } in chunk {
            let now = latest.unwrap_or(created);
            let (output, error) = outcome_of(now);
            values.extend([
                Value::text(created.run_id.to_string()),
                Value::text(created.tenant.as_str()),
                Value::text(body.agent.as_str()),
                Value::text(body.queue.as_str()),
                Value::Int(i64::from(body.priority)),
                Value::text(now.state_after().as_str()),
                Value::Int(i64::from(now.attempt)),
                Value::Int(i64::from(body.max_attempts)),
                Value::text(json_text(&body.input, created.run_id)?),
                Value::opt_text(output.map(|output| json_text(&output, created.run_id)).transpose()?),
                Value::opt_text(error.map(|error| json_text(&error, created.run_id)).transpose()?),
                Value::opt_text(body.idempotency_key.as_deref()),
                Value::opt_text(now.worker_id.as_ref().map(ToString::to_string)),
                Value::Int(created.ts_ms),
                Value::Int(now.ts_ms),
                Value::Int(to_i64(now.seq)),
            ]);
        }
        tx.execute("inserting runs", &sql, &values).await?;
    }
    Ok(())
}

/// The highest stored seq of each run created in the batch.
async fn max_stored_seqs(
    tx: &mut Tx<'_>,
    backend: Backend,
    created: &[(&Event, &RunCreated)],
) -> Result<Vec<(RunId, u64)>, Error> {
    const WHAT: &str = "reading stored events";
    let mut found = Vec::new();
    for chunk in statement_chunks(created) {
        let params = placeholders(backend, 1, chunk.len());
        let sql = format!(
            "SELECT run_id, MAX(seq) AS seq FROM run_events WHERE run_id IN {params} GROUP BY run_id"
        );
        let values: Vec<Value<'_>> =
            chunk.iter().map(|(event, _)| Value::text(event.run_id.to_string())).collect();
        for row in tx.fetch(WHAT, &sql, &values).await? {
            let (Some(run), Some(seq)) =
                (row.first().and_then(Value::as_str), row.get(1).and_then(Value::as_int))
            else {
                return Err(Error::Corrupt {
                    run_id: "?".to_owned(),
                    reason: format!("{WHAT}: got {row:?}"),
                });
            };
            let run_id = run
                .parse()
                .map_err(|e| Error::Corrupt { run_id: run.to_owned(), reason: format!("run_id: {e}") })?;
            found.push((run_id, u64::try_from(seq).unwrap_or(0)));
        }
    }
    Ok(found)
}

/// Moves each run's row to its event in `latest` unless the row is already
/// at or past it (or does not exist yet: it appears with `run.created`,
/// which then looks for later stored events). One statement per chunk:
/// `UPDATE … FROM (VALUES …)`, which SQLite (≥ 3.33) and PostgreSQL share;
/// both name a `VALUES` list's columns `column1`, `column2`, ….
async fn update_runs(tx: &mut Tx<'_>, backend: Backend, latest: &[&Event]) -> Result<(), Error> {
    for chunk in statement_chunks(latest) {
        let sql = format!(
            "UPDATE runs SET state = v.column3, attempt = v.column4, output = v.column5, error = v.column6, \
             worker_id = v.column7, updated_ms = v.column8, last_seq = v.column9 \
             FROM (VALUES {}) AS v \
             WHERE runs.run_id = v.column1 AND runs.tenant = v.column2 AND runs.last_seq < v.column9",
            placeholders(backend, chunk.len(), 9)
        );
        let mut values = Vec::with_capacity(chunk.len() * 9);
        for event in chunk {
            let (output, error) = outcome_of(event);
            values.extend([
                Value::text(event.run_id.to_string()),
                Value::text(event.tenant.as_str()),
                Value::text(event.state_after().as_str()),
                Value::Int(i64::from(event.attempt)),
                Value::opt_text(output.map(|output| json_text(&output, event.run_id)).transpose()?),
                Value::opt_text(error.map(|error| json_text(&error, event.run_id)).transpose()?),
                Value::opt_text(event.worker_id.as_ref().map(ToString::to_string)),
                Value::Int(event.ts_ms),
                Value::Int(to_i64(event.seq)),
            ]);
        }
        tx.execute("updating runs", &sql, &values).await?;
    }
    Ok(())
}

/// The highest-seq stored event of `run` that belongs to `tenant`.
async fn last_stored_event(tx: &mut Tx<'_>, run: RunId, tenant: &TenantId) -> Result<Option<Event>, Error> {
    let rows = tx
        .fetch(
            "reading stored events",
            "SELECT body FROM run_events WHERE run_id = $1 AND tenant = $2 ORDER BY seq DESC LIMIT 1",
            &[Value::text(run.to_string()), Value::text(tenant.as_str())],
        )
        .await?;
    let Some(row) = rows.first() else { return Ok(None) };
    let body = row.first().and_then(Value::as_str).ok_or_else(|| Error::Corrupt {
        run_id: run.to_string(),
        reason: format!("stored event body: got {row:?}"),
    })?;
    decode_event(body, run).map(Some)
}

fn event_from_row(row: &AnyRow, run: RunId) -> Result<Event, Error> {
    let body: String =
        row.try_get("body").map_err(|e| Error::Corrupt { run_id: run.to_string(), reason: e.to_string() })?;
    decode_event(&body, run)
}

fn decode_event(body: &str, run: RunId) -> Result<Event, Error> {
    serde_json::from_str(body).map_err(|e| Error::Corrupt {
        run_id: run.to_string(),
        reason: format!("stored event does not decode: {e}"),
    })
}

/// Reads typed columns of one `runs` row, reporting any mismatch as corrupt.
struct RunRow<'a> {
    row: &'a AnyRow,
    run_id: String,
}

impl<'a> RunRow<'a> {
    /// Starts reading `row`, whose `run_id` names it in errors.
    fn of(row: &'a AnyRow) -> Result<Self, Error> {
        let run_id: String = row
            .try_get("run_id")
            .map_err(|e| Error::Corrupt { run_id: "?".to_owned(), reason: e.to_string() })?;
        Ok(Self { row, run_id })
    }

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
    let r = RunRow::of(row)?;
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
    fn placeholders_number_every_parameter_of_every_row() {
        assert_eq!(placeholders(Backend::Postgres, 2, 3), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(placeholders(Backend::Sqlite, 2, 2), "(?, ?), (?, ?)");
        assert_eq!(placeholders(Backend::Postgres, 1, 1), "($1)");
        assert_eq!(placeholders(Backend::Sqlite, 0, 4), "");
    }

    #[test]
    fn statements_come_in_a_few_sizes_and_cover_every_row() {
        for len in [0, 1, 2, 3, 7, 300, 511, 512, 513, 1500] {
            let rows: Vec<usize> = (0..len).collect();
            let chunks: Vec<&[usize]> = statement_chunks(&rows).collect();
            assert_eq!(chunks.concat(), rows, "{len} rows");
            for chunk in &chunks {
                assert!(
                    chunk.len().is_power_of_two() && chunk.len() <= ROWS_PER_STATEMENT,
                    "{len}: {}",
                    chunk.len()
                );
            }
        }
        let sizes: Vec<usize> = statement_chunks(&[0u8; 300]).map(<[u8]>::len).collect();
        assert_eq!(sizes, [256, 32, 8, 4]);
    }

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
