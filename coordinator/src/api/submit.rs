//! `submit`: create a run durably, at most once per idempotency key.
//!
//! A new run is acknowledged only after JetStream acknowledged both its
//! `run.created` event (seq 1, published with expected last subject sequence
//! 0, so a run's log can only start once) and its job. With an idempotency
//! key, a KV `create` decides which request creates the run; a retry with
//! the same key and the same request publishes the same event again (which
//! the expected sequence refuses once the log exists) and the same job
//! (same msg id, a duplicate within the window), which repairs a submitter
//! that crashed half-way and is otherwise a no-op.

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv;
use async_nats::HeaderMap;
use bytes::Bytes;
use runfleet_ops::redact::Redactor;
use runfleet_ops::telemetry;
use runfleet_protocol::api::{SubmitRequest, SubmitResponse, ValidSubmit};
use runfleet_protocol::event::{Event, EventBody, RunCreated};
use runfleet_protocol::idempotency::{self, IdempotencyRecord};
use runfleet_protocol::job::Job;
use runfleet_protocol::{codec, time, ApiError, ErrorCode, IdempotencyKey, RunId, RunState, TenantId};
use tracing::{info, instrument, warn};

use super::{unavailable, Api};
use crate::runs::{content_headers, event_headers};

/// How often a submit retries when its idempotency key vanishes between a
/// failed create and the read (the key expired or was deleted meanwhile).
const IDEMPOTENCY_ATTEMPTS: u32 = 3;

/// A run about to be (or already) created: everything its `run.created`
/// event and job are built from, so both are deterministic.
struct NewRun {
    tenant: TenantId,
    submit: ValidSubmit,
    record: IdempotencyRecord,
    /// The submit request's trace context (`traceparent`), if traced.
    trace: Option<String>,
}

impl NewRun {
    fn new(tenant: TenantId, submit: ValidSubmit, record: IdempotencyRecord) -> Self {
        Self { tenant, submit, record, trace: telemetry::traceparent() }
    }

    fn count_submitted(&self) {
        runfleet_ops::metrics::get()
            .runs_submitted
            .with_label_values(&[self.submit.queue.as_str(), self.submit.agent.as_str()])
            .inc();
    }

    /// The `run.created` event, its input redacted, and whether anything was.
    fn created_event(&self, redactor: &Redactor) -> (Event, bool) {
        let mut event = Event {
            run_id: self.record.run_id,
            tenant: self.tenant.clone(),
            seq: 1,
            ts_ms: self.record.created_ms,
            attempt: 0,
            worker_id: None,
            trace_id: self.trace.as_deref().and_then(telemetry::trace_id_of),
            body: EventBody::Created(RunCreated {
                agent: self.submit.agent.clone(),
                queue: self.submit.queue.clone(),
                priority: self.submit.priority,
                input: self.submit.input.clone(),
                max_attempts: self.submit.max_attempts,
                idempotency_key: self.submit.idempotency_key.as_ref().map(|k| k.as_str().to_owned()),
                traceparent: self.trace.clone(),
            }),
        };
        let redacted = event.payload_mut().is_some_and(|input| redactor.redact(input));
        (event, redacted)
    }

    /// The run's job; `created_seq` only on the dispatch published right
    /// after `run.created` was stored (see [`Job::created_seq`]).
    fn job(&self, created_seq: Option<u64>) -> Job {
        Job {
            run_id: self.record.run_id,
            tenant: self.tenant.clone(),
            agent: self.submit.agent.clone(),
            queue: self.submit.queue.clone(),
            priority: self.submit.priority,
            input: self.submit.input.clone(),
            max_attempts: self.submit.max_attempts,
            created_us: self.record.created_us,
            traceparent: self.trace.clone(),
            created_seq,
        }
    }
}

fn fresh_record(fingerprint: String) -> IdempotencyRecord {
    IdempotencyRecord {
        run_id: RunId::generate(),
        fingerprint,
        created_ms: time::now_ms(),
        created_us: time::now_us(),
    }
}

fn internal(what: &str, error: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Internal, format!("{what}: {error}"))
}

impl Api {
    #[instrument(skip_all, fields(tenant = %tenant))]
    pub(super) async fn submit(
        &self,
        tenant: TenantId,
        request: SubmitRequest,
    ) -> Result<SubmitResponse, ApiError> {
        let limits = &self.inner.limits;
        let submit = request.validate(limits.max_input_bytes, limits.default_max_attempts)?;
        match submit.idempotency_key.clone() {
            None => {
                let run = NewRun::new(tenant, submit, fresh_record(String::new()));
                self.publish_run(&run).await?;
                run.count_submitted();
                info!(run_id = %run.record.run_id, agent = %run.submit.agent, queue = %run.submit.queue, "run submitted");
                Ok(SubmitResponse { run_id: run.record.run_id, state: RunState::Queued, created: true })
            }
            Some(key) => self.submit_idempotent(tenant, submit, &key).await,
        }
    }

    /// Creates the key's record (then the run), or finds it and answers with
    /// its run after re-publishing what a crashed submitter may have missed.
    async fn submit_idempotent(
        &self,
        tenant: TenantId,
        submit: ValidSubmit,
        key: &IdempotencyKey,
    ) -> Result<SubmitResponse, ApiError> {
        let kv_key = self.inner.names.idempotency_key(&tenant, key);
        let fingerprint = idempotency::fingerprint(&submit).map_err(|e| internal("fingerprint", e))?;
        for _ in 0..IDEMPOTENCY_ATTEMPTS {
            let record = fresh_record(fingerprint.clone());
            let value = codec::encode(&record).map_err(|e| internal("idempotency record", e))?;
            match self.inner.idempotency.create(&kv_key, Bytes::from(value)).await {
                Ok(_) => {
                    let run = NewRun::new(tenant, submit, record);
                    self.publish_run(&run).await?;
                    run.count_submitted();
                    info!(run_id = %run.record.run_id, "run submitted with idempotency key");
                    return Ok(SubmitResponse {
                        run_id: run.record.run_id,
                        state: RunState::Queued,
                        created: true,
                    });
                }
                Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {
                    let Some(existing) = self.idempotency_record(&kv_key).await? else {
                        continue; // expired between the create and the read: try again
                    };
                    if existing.fingerprint != fingerprint {
                        return Err(ApiError {
                            code: ErrorCode::Conflict,
                            message: format!(
                                "idempotency key {:?} is already bound to run {} with a different request; \
                                 use a new key for a different request",
                                key.as_str(),
                                existing.run_id
                            ),
                            field: Some("idempotency_key".to_owned()),
                        });
                    }
                    return self.resubmit(NewRun::new(tenant, submit, existing)).await;
                }
                Err(error) => return Err(unavailable("could not create the idempotency key", error)),
            }
        }
        Err(ApiError::new(
            ErrorCode::Unavailable,
            format!("idempotency key {:?} kept changing while submitting; retry", key.as_str()),
        ))
    }

    /// Answers a retried submit with its existing run, re-publishing its
    /// event and job if the first submitter did not get that far.
    async fn resubmit(&self, run: NewRun) -> Result<SubmitResponse, ApiError> {
        self.publish_run(&run).await?;
        let subject = self.inner.names.run_events(&run.tenant, run.record.run_id);
        let state =
            self.last_event(&subject).await?.map(|event| event.state_after()).unwrap_or(RunState::Queued);
        info!(run_id = %run.record.run_id, %state, "idempotent submit matched an existing run");
        Ok(SubmitResponse { run_id: run.record.run_id, state, created: false })
    }

    async fn idempotency_record(&self, kv_key: &str) -> Result<Option<IdempotencyRecord>, ApiError> {
        let value = self
            .inner
            .idempotency
            .get(kv_key)
            .await
            .map_err(|e| unavailable("could not read the idempotency key", e))?;
        value
            .map(|bytes| codec::decode(&bytes).map_err(|e| internal("stored idempotency record", e)))
            .transpose()
    }

    /// Publishes `run.created`, then the job, awaiting each acknowledgement.
    /// If the run's log already exists and the run has started, the job is
    /// not re-published (the run is under way and owns its job).
    async fn publish_run(&self, run: &NewRun) -> Result<(), ApiError> {
        let names = &self.inner.names;
        let run_id = run.record.run_id;
        let (created, redacted) = run.created_event(&self.inner.redactor);
        if redacted {
            // The event carries the redacted input; jobs the coordinator
            // rebuilds later (wakes, recovery) take the real one from here.
            let job = codec::encode(&run.job(None)).map_err(|e| internal("job", e))?;
            self.inner
                .inputs
                .put(run_id.to_string(), Bytes::from(job))
                .await
                .map_err(|e| unavailable(format!("could not store the input of run {run_id}"), e))?;
        }
        let event = codec::encode(&created).map_err(|e| internal("run.created event", e))?;
        let subject = names.run_events(&run.tenant, run_id);
        let created_seq = match self.publish(subject.clone(), event_headers(0), event).await {
            Ok(seq) => {
                if redacted {
                    runfleet_ops::metrics::get().events_redacted.inc();
                }
                Some(seq)
            }
            Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
                // The log exists. If nothing moved the run past `run.created`,
                // its job may be what a crashed submitter never published:
                // publish it again. Within the duplicate window the job's
                // msg id makes this a no-op; after it, a second job for a queued run
                // is harmless (its claimant finds the lease held or the run
                // terminal and only acks).
                let started = self.last_event(&subject).await?.is_some_and(|last| last.seq > 1);
                if started {
                    return Ok(());
                }
                None
            }
            Err(error) => {
                return Err(unavailable(format!("could not publish run.created for run {run_id}"), error))
            }
        };
        let job = codec::encode(&run.job(created_seq)).map_err(|e| internal("job", e))?;
        let subject = names.job(&run.submit.queue, run.submit.priority, run_id);
        let headers = content_headers(&names.job_msg_id(run_id, 0));
        if let Err(error) = self.publish(subject, headers, job).await.map(drop) {
            warn!(run_id = %run_id, error = %error, "run.created is stored but its job is not");
            return Err(unavailable(format!("could not publish the job of run {run_id}"), error));
        }
        Ok(())
    }

    /// Publishes and awaits the acknowledgement; the stored message's stream
    /// sequence (the original's, for a duplicate job).
    async fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Vec<u8>,
    ) -> Result<u64, async_nats::jetstream::context::PublishError> {
        let ack = self.inner.js.publish_with_headers(subject, headers, Bytes::from(payload)).await?;
        ack.await.map(|ack| ack.sequence)
    }
}
