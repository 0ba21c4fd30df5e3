//! Durable steps: [`RunContext::step`] and the values recorded as steps
//! ([`RunContext::now`], [`RunContext::uuid`], [`RunContext::random`]).

use std::any::type_name;
use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::{BackoffBuilder, ExponentialBuilder};
use runfleet_protocol::event::{EventBody, StepCompleted, StepFailed, StepStarted};
use runfleet_protocol::{ErrorCode, RunId, WorkerId};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::Instrument;

use super::{AgentError, Interruption, RunContext};
use crate::runtime::checkpoints;

/// The step names `now`, `uuid` and `random` are recorded under.
const STEP_NOW: &str = "runfleet.now";
const STEP_UUID: &str = "runfleet.uuid";
const STEP_RANDOM: &str = "runfleet.random";

/// How a step is executed: timeout per try and retries of retryable errors.
///
/// ```
/// use std::time::Duration;
/// use runfleet_worker::sdk::StepOptions;
///
/// let options = StepOptions::new()
///     .timeout(Duration::from_secs(30))
///     .retries(4)
///     .backoff(Duration::from_millis(200), Duration::from_secs(10));
/// # let _ = options;
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct StepOptions {
    timeout: Option<Duration>,
    retries: u32,
    min_backoff: Duration,
    max_backoff: Duration,
    jitter: bool,
}

impl Default for StepOptions {
    fn default() -> Self {
        Self {
            timeout: None,
            retries: 0,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            jitter: true,
        }
    }
}

impl StepOptions {
    /// No timeout, no retries.
    pub fn new() -> Self {
        Self::default()
    }

    /// Each try may take at most `timeout`; a try that exceeds it is dropped
    /// and counts as a retryable error.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Tries again up to `retries` times after a retryable error (so at most
    /// `retries + 1` tries), with exponential backoff and jitter between.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// The first and the largest delay between tries (defaults 100 ms and
    /// 30 s); the delay doubles from `min` up to `max`.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max.max(min);
        self
    }

    /// Whether delays get random jitter (default on), so many runs that
    /// failed together do not retry together.
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    fn delays(&self) -> impl Iterator<Item = Duration> {
        let builder = ExponentialBuilder::default()
            .with_min_delay(self.min_backoff)
            .with_max_delay(self.max_backoff)
            .with_factor(2.0)
            .with_max_times(usize::try_from(self.retries).unwrap_or(usize::MAX));
        if self.jitter {
            builder.with_jitter().build()
        } else {
            builder.build()
        }
    }
}

/// Why a step try failed. Retryable errors are tried again (see
/// [`StepOptions::retries`]); fatal ones fail the step at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    message: String,
    retryable: bool,
}

impl StepError {
    /// A failure that may go away (a timeout, a 503, a dropped connection).
    pub fn retryable(error: impl fmt::Display) -> Self {
        Self { message: error.to_string(), retryable: true }
    }

    /// A failure that will not go away by trying again.
    pub fn fatal(error: impl fmt::Display) -> Self {
        Self { message: error.to_string(), retryable: false }
    }

    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StepError {}

/// What a step's closure knows about the try it executes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepContext {
    run_id: RunId,
    worker_id: WorkerId,
    index: u32,
    name: String,
    attempt: u32,
    run_attempt: u32,
    fencing_token: u64,
}

impl StepContext {
    /// `<run_id>:<step_index>`: the same for every try and every run
    /// attempt of this step. Pass it to external systems as their
    /// idempotency key, so a step that runs again after a crash does not
    /// repeat its effect.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}", self.run_id, self.index)
    }

    /// The lease revision this run attempt claimed with: greater than that
    /// of any earlier attempt (0 for a submission's first attempt, claimed
    /// without a lease). An external system that remembers the largest
    /// token it saw per key can refuse writes from a stale worker.
    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    pub fn run_id(&self) -> RunId {
        self.run_id
    }

    /// The worker executing the step.
    pub fn worker_id(&self) -> &WorkerId {
        &self.worker_id
    }

    /// The step's position in the run, from 0.
    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The try of this step within the run attempt, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The run attempt, from 1.
    pub fn run_attempt(&self) -> u32 {
        self.run_attempt
    }
}

impl RunContext {
    /// Runs `f` as the run's next durable step, named `name`, and returns
    /// its output; see [`RunContext::step_with`] for options.
    ///
    /// Steps are numbered by position. If an earlier attempt of this run
    /// completed the step at this position, its recorded output is returned
    /// and `f` is not called. Otherwise `f` is called, its output is
    /// checkpointed (outputs too large to keep inline go to the object
    /// store) and `step.completed` is appended before the output is
    /// returned. The output is always returned as recorded (serialized and
    /// deserialized), so an attempt that executes the step and one that
    /// replays it see the same value.
    ///
    /// # Errors
    ///
    /// - [`AgentError::Step`] when `f` failed (after its retries); the agent
    ///   may handle it or return it.
    /// - [`AgentError::Divergence`] when a different step name is recorded
    ///   at this position, or the recorded output does not decode as `T`;
    ///   the run fails with `divergence` whatever the agent does next.
    /// - [`AgentError::Interrupted`] when the run is being stopped or a newer
    ///   attempt owns it; return it (`?`).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use runfleet_worker::sdk::{AgentError, RunContext, StepError};
    /// # async fn demo(ctx: &mut RunContext) -> Result<(), AgentError> {
    /// let order_id: String = ctx
    ///     .step("place-order", |step| async move {
    ///         // The key is stable across retries and crashes.
    ///         let key = step.idempotency_key();
    ///         Ok::<_, StepError>(format!("order-for-{key}"))
    ///     })
    ///     .await?;
    /// # let _ = order_id; Ok(()) }
    /// ```
    pub async fn step<T, F, Fut>(&mut self, name: &str, f: F) -> Result<T, AgentError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(StepContext) -> Fut,
        Fut: Future<Output = Result<T, StepError>>,
    {
        self.step_with(name, StepOptions::default(), f).await
    }

    /// [`RunContext::step`] with a timeout and retries.
    pub async fn step_with<T, F, Fut>(
        &mut self,
        name: &str,
        options: StepOptions,
        mut f: F,
    ) -> Result<T, AgentError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(StepContext) -> Fut,
        Fut: Future<Output = Result<T, StepError>>,
    {
        if let Some((code, message)) = &self.fatal {
            return Err(fatal_error(*code, message.clone()));
        }
        if self.parked.is_some() {
            return Err(AgentError::Interrupted(Interruption::Waiting));
        }
        if self.stop.is_cancelled() {
            return Err(AgentError::Interrupted(Interruption::Stopped));
        }
        let index = self.next_step;
        self.next_step = self.next_step.saturating_add(1);

        if let Some(recorded) = self.checkpoints.recorded(index) {
            if recorded.name != name {
                let message = format!(
                    "step {index} is recorded as {:?} but the agent now calls it {name:?}: the agent's code changed under a running run; finish such runs with the old code or start a new run",
                    recorded.name
                );
                return Err(self.fail_fatally(ErrorCode::Divergence, message));
            }
            let recorded = recorded.clone();
            let value = match self.checkpoints.output(&recorded).await {
                Ok(value) => value,
                Err(e @ checkpoints::Error::Corrupt { .. }) => {
                    return Err(self.fail_fatally(ErrorCode::Internal, e.to_string()))
                }
                Err(e) => return Err(AgentError::Interrupted(e.into())),
            };
            return serde_json::from_value(value).map_err(|e| {
                let message = format!(
                    "the recorded output of step {index} ({name}) does not decode as {}: {e}; the agent's code changed under a running run",
                    type_name::<T>()
                );
                self.fail_fatally(ErrorCode::Divergence, message)
            });
        }

        // A step boundary: a draining worker hands the run off here rather
        // than start work another worker would have to redo.
        if self.drain.is_cancelled() {
            self.handed_off = true;
            return Err(AgentError::Interrupted(Interruption::HandedOff));
        }
        let mut delays = options.delays();
        let mut attempt = 1;
        loop {
            // The step's work starts only once `step.started` is stored:
            // every execution of a step is in the log, and a worker that
            // lost the run (its append refused) never starts a step another
            // worker may have completed. Starting the work while the event
            // travelled, even with the lease surely held when it was sent,
            // let a worker paused between queueing the event and writing it
            // to the socket run a step the log never heard of (the chaos
            // harness caught it, about one run in five).
            self.begin_append(EventBody::StepStarted(StepStarted { index, name: name.to_owned(), attempt }))
                .await?;
            self.confirm_append().await?;
            let step = StepContext {
                run_id: self.run_id(),
                worker_id: self.worker_id().clone(),
                index,
                name: name.to_owned(),
                attempt,
                run_attempt: self.attempt(),
                fencing_token: self.checkpoints.fencing_token(),
            };
            let span =
                tracing::info_span!("step", otel.name = %format!("step {name}"), step = name, index, attempt);
            let started = Instant::now();
            let result = match options.timeout {
                Some(timeout) => {
                    tokio::time::timeout(timeout, f(step).instrument(span.clone())).await.unwrap_or_else(
                        |_| Err(StepError::retryable(format!("timed out after {}", humantime(timeout)))),
                    )
                }
                None => f(step).instrument(span.clone()).await,
            };
            let duration = started.elapsed();
            let duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
            match result {
                Ok(output) => {
                    let value = serde_json::to_value(&output).map_err(|e| {
                        self.fail_fatally(
                            ErrorCode::Internal,
                            format!("the output of step {index} ({name}) cannot be serialized: {e}"),
                        )
                    })?;
                    let recorded = value.clone();
                    if self.stop.is_cancelled() {
                        return Err(AgentError::Interrupted(Interruption::Stopped));
                    }
                    // The checkpoint and `step.started`'s acknowledgement at
                    // once. The checkpoint chain has its own fence: if
                    // `step.started` was refused, a newer attempt fenced the
                    // chain before it wrote to the log, so this write is
                    // refused too, or (sent first) it records work that did
                    // finish, which the newer attempt then replays.
                    let write = self.checkpoints.write(index, name, value, duration).instrument(span);
                    let (confirmed, written) = tokio::join!(self.log.confirm(), write);
                    if let Err(e) = confirmed {
                        return Err(self.refused(e));
                    }
                    let blob = match written {
                        Ok(blob) => blob,
                        Err(e) => {
                            if e.is_lease_lost() {
                                self.stop.cancel();
                            }
                            return Err(AgentError::Interrupted(e.into()));
                        }
                    };
                    // Held, not sent: it goes out with the run's next event
                    // (the next `step.started`, a wait, the terminal event)
                    // in one message, so a step costs two round trips, not
                    // three. The checkpoint is stored, so an attempt that
                    // dies before then loses only the event; its successor
                    // replays the step from the checkpoint.
                    let completed =
                        StepCompleted { index, name: name.to_owned(), attempt, duration_ms, blob };
                    self.hold_append(EventBody::StepCompleted(completed)).await?;
                    runfleet_ops::metrics::get()
                        .step_duration
                        .with_label_values(&[self.agent.as_str()])
                        .observe(started.elapsed().as_secs_f64());
                    return serde_json::from_value(recorded).map_err(|e| {
                        let message = format!(
                            "the output of step {index} ({name}) does not deserialize back into {}: {e}",
                            type_name::<T>()
                        );
                        self.fail_fatally(ErrorCode::Internal, message)
                    });
                }
                Err(error) => {
                    let retry_in = if error.retryable { delays.next() } else { None };
                    let failed = StepFailed {
                        index,
                        name: name.to_owned(),
                        attempt,
                        duration_ms,
                        error: error.message.clone(),
                        retryable: error.retryable,
                        retry_in_ms: retry_in.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    };
                    self.append(EventBody::StepFailed(failed)).await?;
                    let Some(delay) = retry_in else {
                        return Err(AgentError::Step {
                            index,
                            name: name.to_owned(),
                            attempts: attempt,
                            message: error.message,
                        });
                    };
                    tokio::select! {
                        () = self.stop.cancelled() => return Err(AgentError::Interrupted(Interruption::Stopped)),
                        () = tokio::time::sleep(delay) => {}
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// The current time, recorded as a step: a replay sees the time the
    /// first attempt saw.
    pub async fn now(&mut self) -> Result<SystemTime, AgentError> {
        let ms: u64 = self
            .step(STEP_NOW, |_| async {
                let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
                Ok(u64::try_from(ms).unwrap_or(u64::MAX))
            })
            .await?;
        Ok(UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// A fresh random UUID (v4), recorded as a step.
    pub async fn uuid(&mut self) -> Result<uuid::Uuid, AgentError> {
        self.step(STEP_UUID, |_| async { Ok(uuid::Uuid::new_v4()) }).await
    }

    /// A random `u64`, recorded as a step.
    pub async fn random(&mut self) -> Result<u64, AgentError> {
        self.step(STEP_RANDOM, |_| async { Ok(rand::random::<u64>()) }).await
    }

    /// Records a failure the run must end with whatever the agent returns,
    /// and returns it as an error for the agent.
    fn fail_fatally(&mut self, code: ErrorCode, message: String) -> AgentError {
        self.fatal.get_or_insert((code, message.clone()));
        fatal_error(code, message)
    }
}

fn fatal_error(code: ErrorCode, message: String) -> AgentError {
    match code {
        ErrorCode::Divergence => AgentError::Divergence { message },
        _ => AgentError::Checkpoint { message },
    }
}

fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}
