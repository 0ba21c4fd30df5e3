//! `get`, `list` and `events`: reads from the registry, freshened from the
//! events stream where the registry may lag.
//!
//! `get` is fresh: the run's last event is read directly from the stream
//! (direct get, last message for the run's subject) and wins over the
//! registry row when newer; a run the projector has not reached yet is built
//! from its first and last events. `list` reads only the registry and may
//! lag the stream by milliseconds. `events` reads the registry, falling back
//! to the stream for a run the registry does not know yet; a page from the
//! registry may miss the newest events for the same reason.

use runfleet_protocol::api::{
    self, EventsRequest, EventsResponse, GetRequest, ListRequest, ListResponse, RunView,
};
use runfleet_protocol::event::{Event, EventBody};
use runfleet_protocol::{ApiError, ErrorCode, RunId, TenantId};

use super::{runs_error, unavailable, Api};
use crate::registry::outcome_of;
use crate::runs::{stored_events, Lookup};

pub(super) fn not_found(run: RunId) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("run {run} does not exist"))
}

impl Api {
    pub(super) async fn get(&self, tenant: TenantId, request: GetRequest) -> Result<RunView, ApiError> {
        let run = api::validate_run_id("run_id", &request.run_id)?;
        let row = self
            .inner
            .registry
            .get(&tenant, run)
            .await
            .map_err(|e| unavailable("could not read the registry", e))?;
        let subject = self.inner.names.run_events(&tenant, run);
        let last = self.last_event(&subject).await?;
        match (row, last) {
            (Some(view), Some(last)) if last.seq > view.last_seq => Ok(freshen(view, &last)),
            (Some(view), _) => Ok(view),
            (None, Some(last)) => {
                let first = self.first_event(&subject).await?;
                first.and_then(|first| view_from_events(&first, &last)).ok_or_else(|| not_found(run))
            }
            (None, None) => Err(not_found(run)),
        }
    }

    pub(super) async fn list(
        &self,
        tenant: TenantId,
        request: ListRequest,
    ) -> Result<ListResponse, ApiError> {
        let filter = request.validate()?;
        self.inner
            .registry
            .list(&tenant, &filter)
            .await
            .map_err(|e| unavailable("could not list runs from the registry", e))
    }

    pub(super) async fn events(
        &self,
        tenant: TenantId,
        request: EventsRequest,
    ) -> Result<EventsResponse, ApiError> {
        let (run, after_seq, limit) = request.validate()?;
        let page = self
            .inner
            .registry
            .events(&tenant, run, after_seq, limit)
            .await
            .map_err(|e| unavailable("could not read events from the registry", e))?;
        match page {
            Some(page) => Ok(page),
            None => self.stream_events(&tenant, run, after_seq, limit).await,
        }
    }

    /// Reads a page of events straight from the stream, for a run the
    /// registry does not know yet (so its log is short).
    async fn stream_events(
        &self,
        tenant: &TenantId,
        run: RunId,
        after_seq: u64,
        limit: u32,
    ) -> Result<EventsResponse, ApiError> {
        let subject = self.inner.names.run_events(tenant, run);
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let mut events = Vec::new();
        let mut next_stream_seq = 0;
        let mut found_any = false;
        while events.len() <= limit {
            let message = self
                .inner
                .runs
                .direct_get(&subject, Lookup::NextFrom(next_stream_seq))
                .await
                .map_err(runs_error)?;
            let Some(message) = message else {
                break;
            };
            found_any = true;
            next_stream_seq = message.sequence + 1;
            events.extend(stored_events(&message).into_iter().filter(|event| event.seq > after_seq));
        }
        if !found_any {
            return Err(not_found(run));
        }
        let has_more = events.len() > limit;
        events.truncate(limit);
        Ok(EventsResponse { events, has_more })
    }

    /// The run's newest event in the stream, if any.
    pub(super) async fn last_event(&self, subject: &str) -> Result<Option<Event>, ApiError> {
        let last = self.inner.runs.last_event_on(subject).await.map_err(runs_error)?;
        Ok(last.map(|stored| stored.event))
    }

    async fn first_event(&self, subject: &str) -> Result<Option<Event>, ApiError> {
        self.inner.runs.first_event_on(subject).await.map_err(runs_error)
    }
}

/// `view` updated with a newer event of its run.
pub(crate) fn freshen(mut view: RunView, event: &Event) -> RunView {
    view.state = event.state_after();
    view.attempt = event.attempt;
    view.worker_id = event.worker_id.clone();
    view.updated_ms = event.ts_ms;
    view.last_seq = event.seq;
    (view.output, view.error) = outcome_of(event);
    view
}

/// A run's view built from its first (`run.created`) and last events.
pub(crate) fn view_from_events(first: &Event, last: &Event) -> Option<RunView> {
    let EventBody::Created(created) = &first.body else {
        return None;
    };
    let view = RunView {
        run_id: first.run_id,
        tenant: first.tenant.clone(),
        agent: created.agent.clone(),
        queue: created.queue.clone(),
        priority: created.priority,
        state: first.state_after(),
        attempt: first.attempt,
        max_attempts: created.max_attempts,
        input: created.input.clone(),
        output: None,
        error: None,
        idempotency_key: created.idempotency_key.clone(),
        worker_id: None,
        created_ms: first.ts_ms,
        updated_ms: first.ts_ms,
        last_seq: first.seq,
    };
    Some(if last.seq > first.seq { freshen(view, last) } else { view })
}
