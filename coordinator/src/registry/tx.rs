//! One transaction of a projected batch, on either executor: sqlx's `Any`
//! driver (PostgreSQL, and an in-memory SQLite database, whose connections
//! are databases of their own), or [`native`](super::native), which runs a
//! SQLite file on the calling thread.
//!
//! A batch's statements are built once ([`Value`]s bound in order to the
//! same SQL text) and run by whichever executor the registry holds, so the
//! two cannot drift apart: the registry suite runs the native one on SQLite
//! and the `Any` one on PostgreSQL.

use std::borrow::Cow;

use sqlx::any::{AnyArguments, AnyRow, AnyTypeInfoKind};
use sqlx::query::Query;
use sqlx::{Any, Row, Transaction, ValueRef as _};

use super::{native, query_error, Error};

/// A bound parameter or a fetched column. `Null` is a NULL of text type
/// (every nullable column the batch writes is text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Value<'a> {
    Null,
    Int(i64),
    Text(Cow<'a, str>),
}

impl<'a> Value<'a> {
    pub(super) fn text(text: impl Into<Cow<'a, str>>) -> Self {
        Self::Text(text.into())
    }

    pub(super) fn opt_text(text: Option<impl Into<Cow<'a, str>>>) -> Self {
        text.map_or(Self::Null, Self::text)
    }

    pub(super) fn as_str(&self) -> Option<&str> {
        match self {
            Self::Text(text) => Some(text),
            Self::Null | Self::Int(_) => None,
        }
    }

    pub(super) fn as_int(&self) -> Option<i64> {
        match self {
            Self::Int(value) => Some(*value),
            Self::Null | Self::Text(_) => None,
        }
    }
}

/// One fetched row, its columns in the query's order.
pub(super) type Fetched = Vec<Value<'static>>;

/// An open transaction.
pub(super) enum Tx<'c> {
    Any(Transaction<'c, Any>),
    /// A SQLite connection inside `BEGIN IMMEDIATE`, run on this thread.
    Native(&'c mut rusqlite::Connection),
}

impl Tx<'_> {
    /// Runs one statement; the number of rows it changed.
    pub(super) async fn execute(
        &mut self,
        what: &'static str,
        sql: &str,
        values: &[Value<'_>],
    ) -> Result<u64, Error> {
        match self {
            Self::Any(tx) => {
                let done =
                    bind_all(sqlx::query(sql), values).execute(&mut **tx).await.map_err(query_error(what))?;
                Ok(done.rows_affected())
            }
            Self::Native(conn) => native::execute(conn, what, sql, values),
        }
    }

    /// Runs one query; its rows.
    pub(super) async fn fetch(
        &mut self,
        what: &'static str,
        sql: &str,
        values: &[Value<'_>],
    ) -> Result<Vec<Fetched>, Error> {
        match self {
            Self::Any(tx) => {
                let rows = bind_all(sqlx::query(sql), values)
                    .fetch_all(&mut **tx)
                    .await
                    .map_err(query_error(what))?;
                rows.iter().map(|row| any_row(row).map_err(query_error(what))).collect()
            }
            Self::Native(conn) => native::fetch(conn, what, sql, values),
        }
    }

    /// Commits; `what` names the batch in an error.
    pub(super) async fn commit(self, what: &'static str) -> Result<(), Error> {
        match self {
            Self::Any(tx) => tx.commit().await.map_err(query_error(what)),
            Self::Native(conn) => native::commit(conn, what),
        }
    }
}

fn bind_all<'q>(
    mut query: Query<'q, Any, AnyArguments<'q>>,
    values: &'q [Value<'_>],
) -> Query<'q, Any, AnyArguments<'q>> {
    for value in values {
        query = match value {
            Value::Null => query.bind(None::<String>),
            Value::Int(value) => query.bind(*value),
            Value::Text(text) => query.bind(text.as_ref()),
        };
    }
    query
}

/// A row's columns by the type each value came back as.
fn any_row(row: &AnyRow) -> Result<Fetched, sqlx::Error> {
    (0..row.len())
        .map(|index| {
            let kind = row.try_get_raw(index)?.type_info().kind();
            Ok(match kind {
                AnyTypeInfoKind::Null => Value::Null,
                AnyTypeInfoKind::SmallInt | AnyTypeInfoKind::Integer | AnyTypeInfoKind::BigInt => {
                    Value::Int(row.try_get(index)?)
                }
                AnyTypeInfoKind::Text => Value::text(row.try_get::<String, _>(index)?),
                AnyTypeInfoKind::Bool
                | AnyTypeInfoKind::Real
                | AnyTypeInfoKind::Double
                | AnyTypeInfoKind::Blob => {
                    return Err(sqlx::Error::ColumnDecode {
                        index: index.to_string(),
                        source: format!("the registry reads no {kind:?} columns").into(),
                    })
                }
            })
        })
        .collect()
}
