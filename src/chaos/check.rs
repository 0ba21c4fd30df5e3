//! The chaos checker: plain data in, violations out. [`check_run`] takes
//! everything the fleet left behind about one run (a [`RunRecord`]: its
//! event log, its checkpoints and fence, its side-effect journal lines) and
//! says what it found (a [`RunReport`]). Nothing here touches NATS or a
//! process, so the unit tests below feed it hand-made violating logs: a
//! checker that cannot fail proves nothing.
//!
//! What it checks, per run (DESIGN.md's invariants, made concrete):
//!
//! 1. exactly one terminal event, last, and it is `run.completed` with the
//!    `steps` agent's output;
//! 2. seqs 1..n in order, `run.created` first;
//! 3. `run.started` is attempt 1, each `run.resumed` a greater attempt, and
//!    every other event carries the attempt of the latest start (an older
//!    attempt's event after a newer attempt began is a zombie write) and that
//!    attempt's worker;
//! 4. one checkpoint per step, none beyond, written by a started attempt's
//!    worker, at most one `step.completed` per step, from the checkpoint's
//!    attempt;
//! 5. checkpoint fencing: for a `run.resumed` of attempt `a` replaying `r`
//!    steps, checkpoints below `r` are older than `a` and the rest are from
//!    `a` or later; no checkpoint of an older attempt was stored after the
//!    run's last fence;
//! 6. side effects: every step executed, once by its checkpoint's attempt
//!    (after a matching `step.started`), never by an attempt that replayed
//!    it; an attempt's executions that another attempt checkpointed
//!    ("duplicate executions of in-flight steps") are at most one per
//!    attempt, and only its last step; fencing tokens are one per attempt
//!    and grow with the attempt.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use runfleet_protocol::checkpoint::{Checkpoint, Fence};
use runfleet_protocol::event::{Event, EventBody};
use runfleet_protocol::RunId;
use serde_json::{json, Value};

/// One line of the side-effect journal: one execution of a step's closure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Execution {
    pub(super) run_id: RunId,
    pub(super) index: u32,
    /// The run attempt that executed it.
    pub(super) attempt: u32,
    pub(super) worker_id: String,
    pub(super) fencing_token: u64,
}

/// Parses journal lines (`<run_id> <step_index> <run_attempt> <worker_id>
/// <fencing_token>`); returns the executions and the lines that do not parse
/// (a torn or interleaved write would show up there).
pub(super) fn parse_journal(text: &str) -> (Vec<Execution>, Vec<String>) {
    let mut executions = Vec::new();
    let mut bad = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        match parse_journal_line(line) {
            Some(execution) => executions.push(execution),
            None => bad.push(line.to_owned()),
        }
    }
    (executions, bad)
}

fn parse_journal_line(line: &str) -> Option<Execution> {
    let fields: Vec<&str> = line.split(' ').collect();
    let [run, index, attempt, worker, token] = fields.as_slice() else { return None };
    Some(Execution {
        run_id: run.parse().ok()?,
        index: index.parse().ok()?,
        attempt: attempt.parse().ok()?,
        worker_id: (*worker).to_owned(),
        fencing_token: token.parse().ok()?,
    })
}

/// A checkpoint as stored: its key's step index, its stream sequence in the
/// bucket and its record.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct StoredCheckpoint {
    pub(super) key_index: u32,
    pub(super) stream_seq: u64,
    pub(super) checkpoint: Checkpoint,
}

/// The run's checkpoint fence as stored (the bucket keeps only the last).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct StoredFence {
    pub(super) stream_seq: u64,
    pub(super) fence: Fence,
}

/// Everything the fleet left behind about one run.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RunRecord {
    pub(super) run_id: RunId,
    /// The run's events in stream order.
    pub(super) events: Vec<Event>,
    pub(super) checkpoints: Vec<StoredCheckpoint>,
    pub(super) fence: Option<StoredFence>,
    /// The run's journal lines in file order.
    pub(super) executions: Vec<Execution>,
    /// Events or checkpoints of the run that could not be decoded.
    pub(super) undecodable: Vec<String>,
}

impl RunRecord {
    pub(super) fn new(run_id: RunId) -> Self {
        Self {
            run_id,
            events: Vec::new(),
            checkpoints: Vec::new(),
            fence: None,
            executions: Vec::new(),
            undecodable: Vec::new(),
        }
    }
}

/// What the checker found in one run.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct RunReport {
    pub(super) violations: Vec<Violation>,
    /// The log ends with `run.completed`.
    pub(super) completed: bool,
    pub(super) resumes: u32,
    pub(super) executions: u64,
    pub(super) duplicate_executions: u32,
    /// The workers of attempts that a later attempt took over.
    pub(super) taken_over_from: Vec<String>,
}

/// Where a re-executed or out-of-range step was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Evidence {
    Journal,
    StepStarted,
    StepCompleted,
}

impl fmt::Display for Evidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Journal => "journal line",
            Self::StepStarted => "step.started event",
            Self::StepCompleted => "step.completed event",
        })
    }
}

/// Who an attempt belongs to, for messages.
fn owner_text(owner: &Option<String>) -> String {
    owner.as_ref().map_or_else(|| "never started".to_owned(), |o| format!("is {o}'s"))
}

/// A broken invariant of one run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum Violation {
    #[error("{what} could not be read: {detail}")]
    Undecodable { what: &'static str, detail: String },
    #[error("event #{position} has seq {seq}, expected {expected} (a gap, a duplicate or a reordering)")]
    Seq { position: usize, seq: u64, expected: u64 },
    #[error("the first event is {found}, not run.created")]
    FirstNotCreated { found: &'static str },
    #[error("seq {seq}: a second run.created")]
    MisplacedCreated { seq: u64 },
    #[error("{count} terminal events, expected exactly one")]
    TerminalCount { count: usize },
    #[error("the terminal event (seq {seq}) is not the last event")]
    TerminalNotLast { seq: u64 },
    #[error("the run ended with {found}: {detail}")]
    NotCompleted { found: &'static str, detail: String },
    #[error("the run completed with output {found}, expected {expected}")]
    WrongOutput { found: String, expected: String },
    #[error(
        "seq {seq}: {event} of attempt {attempt} after attempt {previous} \
         (run.started must be attempt 1 and first, each run.resumed a greater attempt)"
    )]
    AttemptOrder { seq: u64, event: &'static str, attempt: u32, previous: u32 },
    #[error(
        "seq {seq}: {event} written by attempt {attempt} after attempt {current} began (a zombie write)"
    )]
    ZombieEvent { seq: u64, event: &'static str, attempt: u32, current: u32 },
    #[error(
        "seq {seq}: {event} of attempt {attempt}, which never wrote run.started/run.resumed (current attempt {current})"
    )]
    UnannouncedAttempt { seq: u64, event: &'static str, attempt: u32, current: u32 },
    #[error(
        "seq {seq}: {event} of attempt {attempt} written by {worker}, but attempt {attempt} is {owner}'s"
    )]
    ForeignWriter { seq: u64, event: &'static str, attempt: u32, worker: String, owner: String },
    #[error("step {index} ({evidence}) is beyond the run's {steps} steps")]
    StepOutOfRange { index: u32, steps: u32, evidence: Evidence },
    #[error("{count} step.completed events for step {index}")]
    DuplicateStepCompleted { index: u32, count: usize },
    #[error("step {index} has no checkpoint")]
    MissingCheckpoint { index: u32 },
    #[error("a checkpoint of step {index} exists beyond the run's {steps} steps")]
    ExtraCheckpoint { index: u32, steps: u32 },
    #[error("checkpoint key of step {key_index}: {detail}")]
    CorruptCheckpoint { key_index: u32, detail: String },
    #[error(
        "checkpoint of step {index} was written by attempt {attempt} on {worker}, but that attempt {}",
        owner_text(owner)
    )]
    CheckpointWriter { index: u32, attempt: u32, worker: String, owner: Option<String> },
    #[error(
        "step.completed of step {index} is from attempt {event_attempt}, its checkpoint from attempt {checkpoint_attempt}"
    )]
    CompletedAttemptMismatch { index: u32, event_attempt: u32, checkpoint_attempt: u32 },
    #[error("attempt {attempt} claims to replay {replayed} steps of a {steps}-step run")]
    ReplayedBeyondSteps { attempt: u32, replayed: u32, steps: u32 },
    #[error(
        "attempt {resumed_attempt} replayed {replayed} steps, yet step {index}'s checkpoint is from attempt \
         {checkpoint_attempt}, not an earlier one"
    )]
    ReplayedCheckpointFromLater { index: u32, checkpoint_attempt: u32, resumed_attempt: u32, replayed: u32 },
    #[error(
        "step {index}'s checkpoint is from attempt {checkpoint_attempt}, but attempt {resumed_attempt} resumed \
         replaying only {replayed} steps: the old attempt wrote it after losing the run"
    )]
    StaleCheckpoint { index: u32, checkpoint_attempt: u32, resumed_attempt: u32, replayed: u32 },
    #[error(
        "step {index}'s checkpoint by attempt {checkpoint_attempt} was stored after attempt {fence_attempt}'s fence"
    )]
    CheckpointAfterFence { index: u32, checkpoint_attempt: u32, fence_attempt: u32 },
    #[error("step {index} was never executed (no journal line)")]
    NotExecuted { index: u32 },
    #[error("step {index} is checkpointed by attempt {attempt}, which never executed it")]
    CheckpointWithoutExecution { index: u32, attempt: u32 },
    #[error("attempt {attempt} executed step {index} {count} times")]
    RepeatedExecution { index: u32, attempt: u32, count: u32 },
    #[error("attempt {attempt} executed step {index} without a step.started event for it")]
    ExecutionWithoutStepStarted { index: u32, attempt: u32 },
    #[error(
        "journal: attempt {attempt} executed step {index} on {worker}, but that attempt {}",
        owner_text(owner)
    )]
    ExecutionWithoutAttempt { index: u32, attempt: u32, worker: String, owner: Option<String> },
    #[error(
        "attempt {attempt} re-ran step {index}, which it replayed ({replayed} steps replayed); seen as a {evidence}"
    )]
    ReplayedStepRerun { index: u32, attempt: u32, replayed: u32, evidence: Evidence },
    #[error(
        "attempt {attempt} executed steps {indices:?} that other attempts checkpointed; only its one in-flight \
         step may run twice"
    )]
    TooManyDuplicates { attempt: u32, indices: Vec<u32> },
    #[error(
        "attempt {attempt} executed step {index}, which another attempt checkpointed, and then went on to step \
         {highest}: only the in-flight (last) step may run twice"
    )]
    DuplicateNotInFlight { attempt: u32, index: u32, highest: u32 },
    #[error("attempt {attempt} used several fencing tokens {tokens:?}")]
    TokenMismatch { attempt: u32, tokens: Vec<u64> },
    #[error(
        "attempt {attempt}'s fencing token {token} is not above attempt {earlier_attempt}'s {earlier_token}"
    )]
    TokenOrder { attempt: u32, token: u64, earlier_attempt: u32, earlier_token: u64 },
}

/// What the log says about one attempt: its start event.
#[derive(Debug, Clone)]
struct AttemptInfo {
    worker: Option<String>,
    /// Steps it replayed (0 for `run.started`).
    replayed: u32,
}

/// Checks one run of the `steps` agent with `steps` steps. See the module
/// docs for the invariants.
pub(super) fn check_run(steps: u32, run: &RunRecord) -> RunReport {
    let mut v = Vec::new();
    for detail in &run.undecodable {
        v.push(Violation::Undecodable { what: "a record", detail: detail.clone() });
    }
    let completed = check_log_shape(steps, &run.events, &mut v);
    let attempts = check_attempts(&run.events, &mut v);
    let step_completed = check_step_events(steps, &run.events, &attempts, &mut v);
    let by_index = check_checkpoints(steps, run, &attempts, &step_completed, &mut v);
    check_fencing(steps, run, &attempts, &by_index, &mut v);
    let duplicate_executions = check_journal(steps, run, &attempts, &by_index, &mut v);
    check_tokens(run, &mut v);

    let workers: Vec<&Option<String>> = attempts.values().map(|a| &a.worker).collect();
    let taken_over_from =
        workers.iter().take(workers.len().saturating_sub(1)).filter_map(|w| w.as_ref()).cloned().collect();
    let resumes = run.events.iter().filter(|e| matches!(e.body, EventBody::Resumed(_))).count();
    RunReport {
        violations: v,
        completed,
        resumes: u32::try_from(resumes).unwrap_or(u32::MAX),
        executions: run.executions.len() as u64,
        duplicate_executions,
        taken_over_from,
    }
}

/// The `steps` agent's output for `steps` steps without padding.
fn expected_output(steps: u32) -> Value {
    json!({ "steps": steps, "bytes": 0 })
}

/// Checks 1 and 2: seqs 1..n, `run.created` first, one terminal event, last,
/// `run.completed` with the expected output. Returns whether it completed.
fn check_log_shape(steps: u32, events: &[Event], v: &mut Vec<Violation>) -> bool {
    for (position, event) in events.iter().enumerate() {
        let expected = position as u64 + 1;
        if event.seq != expected {
            // One is enough: every later event would be off too.
            v.push(Violation::Seq { position, seq: event.seq, expected });
            break;
        }
    }
    match events.first() {
        Some(Event { body: EventBody::Created(_), .. }) => {}
        Some(event) => v.push(Violation::FirstNotCreated { found: event.body.type_name() }),
        None => v.push(Violation::FirstNotCreated { found: "nothing" }),
    }
    let terminals: Vec<&Event> = events.iter().filter(|e| e.body.is_terminal()).collect();
    if terminals.len() != 1 {
        v.push(Violation::TerminalCount { count: terminals.len() });
    }
    let last = events.last();
    if let Some(first_terminal) = terminals.first() {
        if !last.is_some_and(|e| e.body.is_terminal()) {
            v.push(Violation::TerminalNotLast { seq: first_terminal.seq });
        }
    }
    match last.map(|e| &e.body) {
        Some(EventBody::Completed(c)) => {
            let expected = expected_output(steps);
            if c.output != expected {
                v.push(Violation::WrongOutput {
                    found: c.output.to_string(),
                    expected: expected.to_string(),
                });
                return false;
            }
            true
        }
        Some(EventBody::Failed(f)) => {
            v.push(Violation::NotCompleted {
                found: "run.failed",
                detail: format!("{}: {}", f.error.code, f.error.message),
            });
            false
        }
        _ => false,
    }
}

/// Check 3: attempts start in order and every other event belongs to the
/// current attempt and its worker. Returns the attempts that started.
fn check_attempts(events: &[Event], v: &mut Vec<Violation>) -> BTreeMap<u32, AttemptInfo> {
    let mut attempts = BTreeMap::new();
    let mut current: Option<u32> = None;
    let worker_of = |e: &Event| e.worker_id.as_ref().map(ToString::to_string);
    for event in events {
        let (seq, attempt, name) = (event.seq, event.attempt, event.body.type_name());
        match &event.body {
            EventBody::Created(_) => {
                if seq != 1 {
                    v.push(Violation::MisplacedCreated { seq });
                }
            }
            EventBody::Started(_) => {
                if attempt != 1 || current.is_some() {
                    v.push(Violation::AttemptOrder {
                        seq,
                        event: name,
                        attempt,
                        previous: current.unwrap_or(0),
                    });
                } else {
                    attempts.insert(attempt, AttemptInfo { worker: worker_of(event), replayed: 0 });
                    current = Some(attempt);
                }
            }
            EventBody::Resumed(resumed) => match current {
                Some(previous) if attempt > previous => {
                    attempts.insert(
                        attempt,
                        AttemptInfo { worker: worker_of(event), replayed: resumed.steps_replayed },
                    );
                    current = Some(attempt);
                }
                _ => v.push(Violation::AttemptOrder {
                    seq,
                    event: name,
                    attempt,
                    previous: current.unwrap_or(0),
                }),
            },
            body => match current {
                None => v.push(Violation::UnannouncedAttempt { seq, event: name, attempt, current: 0 }),
                Some(current) if attempt < current => {
                    v.push(Violation::ZombieEvent { seq, event: name, attempt, current })
                }
                Some(current) if attempt > current => {
                    v.push(Violation::UnannouncedAttempt { seq, event: name, attempt, current })
                }
                Some(current) => {
                    // A run that used up its attempts is failed by whichever
                    // worker claims it next, under the last attempt's number.
                    let owner = attempts.get(&current).and_then(|a| a.worker.clone());
                    let worker = worker_of(event);
                    if !matches!(body, EventBody::Failed(_)) && worker != owner {
                        v.push(Violation::ForeignWriter {
                            seq,
                            event: name,
                            attempt,
                            worker: worker.unwrap_or_else(|| "no worker".into()),
                            owner: owner.unwrap_or_else(|| "no worker".into()),
                        });
                    }
                }
            },
        }
    }
    attempts
}

/// Step events: in range, never for a replayed step, at most one
/// `step.completed` per step. Returns the attempts of each step's
/// `step.completed` events.
fn check_step_events(
    steps: u32,
    events: &[Event],
    attempts: &BTreeMap<u32, AttemptInfo>,
    v: &mut Vec<Violation>,
) -> BTreeMap<u32, Vec<u32>> {
    let mut completed: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for event in events {
        let (index, evidence) = match &event.body {
            EventBody::StepStarted(s) => (s.index, Evidence::StepStarted),
            EventBody::StepCompleted(s) => {
                completed.entry(s.index).or_default().push(event.attempt);
                (s.index, Evidence::StepCompleted)
            }
            _ => continue,
        };
        if index >= steps {
            v.push(Violation::StepOutOfRange { index, steps, evidence });
        }
        if let Some(info) = attempts.get(&event.attempt) {
            if index < info.replayed {
                v.push(Violation::ReplayedStepRerun {
                    index,
                    attempt: event.attempt,
                    replayed: info.replayed,
                    evidence,
                });
            }
        }
    }
    for (&index, list) in &completed {
        if list.len() > 1 {
            v.push(Violation::DuplicateStepCompleted { index, count: list.len() });
        }
    }
    completed
}

/// Check 4: one checkpoint per step, none beyond, each written by the worker
/// of an attempt that started, matching its `step.completed`. Returns the
/// checkpoints by step.
fn check_checkpoints<'a>(
    steps: u32,
    run: &'a RunRecord,
    attempts: &BTreeMap<u32, AttemptInfo>,
    step_completed: &BTreeMap<u32, Vec<u32>>,
    v: &mut Vec<Violation>,
) -> BTreeMap<u32, &'a Checkpoint> {
    let mut by_index: BTreeMap<u32, &Checkpoint> = BTreeMap::new();
    for stored in &run.checkpoints {
        let (index, c) = (stored.key_index, &stored.checkpoint);
        if c.index != index || c.run_id != run.run_id {
            v.push(Violation::CorruptCheckpoint {
                key_index: index,
                detail: format!("it records run {} step {}", c.run_id, c.index),
            });
        }
        if by_index.insert(index, c).is_some() {
            v.push(Violation::CorruptCheckpoint { key_index: index, detail: "a second record".into() });
        }
        if index >= steps {
            v.push(Violation::ExtraCheckpoint { index, steps });
        }
        let worker = c.worker_id.to_string();
        match attempts.get(&c.attempt) {
            Some(info) if info.worker.as_deref() == Some(worker.as_str()) => {}
            other => v.push(Violation::CheckpointWriter {
                index,
                attempt: c.attempt,
                worker,
                owner: other.and_then(|info| info.worker.clone()),
            }),
        }
    }
    for index in 0..steps {
        if !by_index.contains_key(&index) {
            v.push(Violation::MissingCheckpoint { index });
        }
    }
    for (index, list) in step_completed {
        let Some(checkpoint) = by_index.get(index) else { continue };
        for &event_attempt in list {
            if event_attempt != checkpoint.attempt {
                v.push(Violation::CompletedAttemptMismatch {
                    index: *index,
                    event_attempt,
                    checkpoint_attempt: checkpoint.attempt,
                });
            }
        }
    }
    by_index
}

/// Check 5: every attempt's view of the checkpoints when it started is
/// consistent with what is stored, and nothing older landed after the last
/// fence.
fn check_fencing(
    steps: u32,
    run: &RunRecord,
    attempts: &BTreeMap<u32, AttemptInfo>,
    by_index: &BTreeMap<u32, &Checkpoint>,
    v: &mut Vec<Violation>,
) {
    for (&attempt, info) in attempts {
        let replayed = info.replayed;
        if replayed > steps {
            v.push(Violation::ReplayedBeyondSteps { attempt, replayed, steps });
        }
        for (&index, checkpoint) in by_index.range(..steps) {
            if index < replayed && checkpoint.attempt >= attempt {
                v.push(Violation::ReplayedCheckpointFromLater {
                    index,
                    checkpoint_attempt: checkpoint.attempt,
                    resumed_attempt: attempt,
                    replayed,
                });
            }
            if index >= replayed && checkpoint.attempt < attempt {
                v.push(Violation::StaleCheckpoint {
                    index,
                    checkpoint_attempt: checkpoint.attempt,
                    resumed_attempt: attempt,
                    replayed,
                });
            }
        }
    }
    if let Some(fence) = &run.fence {
        for stored in &run.checkpoints {
            if stored.stream_seq > fence.stream_seq && stored.checkpoint.attempt < fence.fence.attempt {
                v.push(Violation::CheckpointAfterFence {
                    index: stored.key_index,
                    checkpoint_attempt: stored.checkpoint.attempt,
                    fence_attempt: fence.fence.attempt,
                });
            }
        }
    }
}

/// Check 6: the side-effect journal. Returns the number of duplicate
/// executions of in-flight steps.
fn check_journal(
    steps: u32,
    run: &RunRecord,
    attempts: &BTreeMap<u32, AttemptInfo>,
    by_index: &BTreeMap<u32, &Checkpoint>,
    v: &mut Vec<Violation>,
) -> u32 {
    // Executions and step.started tries per (step, attempt).
    let mut executed: BTreeMap<(u32, u32), u32> = BTreeMap::new();
    let mut tries: HashMap<(u32, u32), u32> = HashMap::new();
    for event in &run.events {
        if let EventBody::StepStarted(s) = &event.body {
            *tries.entry((s.index, event.attempt)).or_default() += 1;
        }
    }
    for x in &run.executions {
        if x.index >= steps {
            v.push(Violation::StepOutOfRange { index: x.index, steps, evidence: Evidence::Journal });
        }
        match attempts.get(&x.attempt) {
            Some(info) if info.worker.as_deref() == Some(x.worker_id.as_str()) => {
                if x.index < info.replayed {
                    v.push(Violation::ReplayedStepRerun {
                        index: x.index,
                        attempt: x.attempt,
                        replayed: info.replayed,
                        evidence: Evidence::Journal,
                    });
                }
            }
            other => v.push(Violation::ExecutionWithoutAttempt {
                index: x.index,
                attempt: x.attempt,
                worker: x.worker_id.clone(),
                owner: other.and_then(|info| info.worker.clone()),
            }),
        }
        *executed.entry((x.index, x.attempt)).or_default() += 1;
    }
    for (&(index, attempt), &count) in &executed {
        if count > 1 {
            v.push(Violation::RepeatedExecution { index, attempt, count });
        }
        if tries.get(&(index, attempt)).copied().unwrap_or(0) < count {
            v.push(Violation::ExecutionWithoutStepStarted { index, attempt });
        }
    }
    for index in 0..steps {
        if !executed.keys().any(|&(i, _)| i == index) {
            v.push(Violation::NotExecuted { index });
        }
        if let Some(checkpoint) = by_index.get(&index) {
            if !executed.contains_key(&(index, checkpoint.attempt)) {
                v.push(Violation::CheckpointWithoutExecution { index, attempt: checkpoint.attempt });
            }
        }
    }
    // Per attempt: its highest executed step and the steps it executed that
    // another attempt checkpointed.
    let mut per_attempt: BTreeMap<u32, (u32, Vec<u32>)> = BTreeMap::new();
    for &(index, attempt) in executed.keys() {
        let (highest, duplicates) = per_attempt.entry(attempt).or_insert((index, Vec::new()));
        *highest = (*highest).max(index);
        if by_index.get(&index).is_some_and(|c| c.attempt != attempt) {
            duplicates.push(index);
        }
    }
    let mut total = 0;
    for (attempt, (highest, duplicates)) in per_attempt {
        total += u32::try_from(duplicates.len()).unwrap_or(u32::MAX);
        match duplicates.as_slice() {
            [] => {}
            [index] if *index == highest => {}
            [index] => v.push(Violation::DuplicateNotInFlight { attempt, index: *index, highest }),
            _ => v.push(Violation::TooManyDuplicates { attempt, indices: duplicates }),
        }
    }
    total
}

/// Fencing tokens: one per attempt (journal, checkpoints and fence agree),
/// growing with the attempt.
fn check_tokens(run: &RunRecord, v: &mut Vec<Violation>) {
    let mut tokens: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    for x in &run.executions {
        tokens.entry(x.attempt).or_default().insert(x.fencing_token);
    }
    for stored in &run.checkpoints {
        tokens.entry(stored.checkpoint.attempt).or_default().insert(stored.checkpoint.fencing_token);
    }
    if let Some(fence) = &run.fence {
        tokens.entry(fence.fence.attempt).or_default().insert(fence.fence.fencing_token);
    }
    let mut earlier: Option<(u32, u64)> = None;
    for (&attempt, set) in &tokens {
        if set.len() > 1 {
            v.push(Violation::TokenMismatch { attempt, tokens: set.iter().copied().collect() });
        }
        let (Some(&low), Some(&high)) = (set.first(), set.last()) else { continue };
        if let Some((earlier_attempt, earlier_token)) = earlier {
            if low <= earlier_token {
                v.push(Violation::TokenOrder { attempt, token: low, earlier_attempt, earlier_token });
            }
        }
        earlier = Some((attempt, high));
    }
}

#[cfg(test)]
mod tests {
    use runfleet_protocol::checkpoint::StepOutput;
    use runfleet_protocol::event::{
        RunCompleted, RunCreated, RunError, RunFailed, RunResumed, RunStarted, StepCompleted, StepStarted,
    };
    use runfleet_protocol::{AgentName, ErrorCode, QueueName, TenantId, WorkerId};

    use super::*;

    const STEPS: u32 = 4;

    fn worker(id: &str) -> WorkerId {
        WorkerId::new(id).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Builds a run's record step by step, as a fleet would have left it.
    struct Builder {
        record: RunRecord,
        kv_seq: u64,
    }

    impl Builder {
        fn new() -> Self {
            let mut builder = Self { record: RunRecord::new(RunId::generate()), kv_seq: 0 };
            let created = RunCreated {
                agent: AgentName::new("steps").unwrap_or_else(|e| panic!("{e}")),
                queue: QueueName::default_queue(),
                priority: 2,
                input: json!({"steps": STEPS, "ms": 1}),
                max_attempts: 100,
                idempotency_key: None,
                traceparent: None,
            };
            builder.event(0, None, EventBody::Created(created));
            builder
        }

        fn event(&mut self, attempt: u32, worker_id: Option<&str>, body: EventBody) {
            let seq = self.record.events.len() as u64 + 1;
            self.record.events.push(Event {
                run_id: self.record.run_id,
                tenant: TenantId::default_tenant(),
                seq,
                ts_ms: 0,
                attempt,
                worker_id: worker_id.map(worker),
                trace_id: None,
                body,
            });
        }

        fn journal(&mut self, index: u32, attempt: u32, worker_id: &str, token: u64) {
            self.record.executions.push(Execution {
                run_id: self.record.run_id,
                index,
                attempt,
                worker_id: worker_id.to_owned(),
                fencing_token: token,
            });
        }

        fn checkpoint(&mut self, index: u32, attempt: u32, worker_id: &str, token: u64) {
            self.kv_seq += 1;
            self.record.checkpoints.push(StoredCheckpoint {
                key_index: index,
                stream_seq: self.kv_seq,
                checkpoint: Checkpoint {
                    run_id: self.record.run_id,
                    index,
                    name: format!("step-{index}"),
                    attempt,
                    worker_id: worker(worker_id),
                    fencing_token: token,
                    ts_ms: 0,
                    duration_ms: 1,
                    output: StepOutput::Inline { value: json!({"index": index, "pad": ""}) },
                },
            });
        }

        fn fence(&mut self, attempt: u32, worker_id: &str, token: u64) {
            self.kv_seq += 1;
            self.record.fence = Some(StoredFence {
                stream_seq: self.kv_seq,
                fence: Fence {
                    run_id: self.record.run_id,
                    attempt,
                    worker_id: worker(worker_id),
                    fencing_token: token,
                    ts_ms: 0,
                },
            });
        }

        /// A step executed to its end: started, journaled, checkpointed, completed.
        fn step(&mut self, index: u32, attempt: u32, worker_id: &str, token: u64) {
            self.started(index, attempt, worker_id, token);
            self.checkpoint(index, attempt, worker_id, token);
            let completed = StepCompleted {
                index,
                name: format!("step-{index}"),
                attempt: 1,
                duration_ms: 1,
                blob: false,
            };
            self.event(attempt, Some(worker_id), EventBody::StepCompleted(completed));
        }

        /// A step started and journaled, then interrupted.
        fn started(&mut self, index: u32, attempt: u32, worker_id: &str, token: u64) {
            let started = StepStarted { index, name: format!("step-{index}"), attempt: 1 };
            self.event(attempt, Some(worker_id), EventBody::StepStarted(started));
            self.journal(index, attempt, worker_id, token);
        }
    }

    /// Attempt 1 on w1 completes steps 0 and 1 and is killed in step 2;
    /// attempt 2 on w2 resumes (replaying 2) and completes the run.
    fn crashed_and_resumed() -> RunRecord {
        let mut b = Builder::new();
        b.event(1, Some("w1"), EventBody::Started(RunStarted { delivery: 1 }));
        b.step(0, 1, "w1", 10);
        b.step(1, 1, "w1", 10);
        b.started(2, 1, "w1", 10);
        b.fence(2, "w2", 20);
        b.event(
            2,
            Some("w2"),
            EventBody::Resumed(RunResumed { delivery: 2, steps_replayed: 2, failures: 1 }),
        );
        b.step(2, 2, "w2", 20);
        b.step(3, 2, "w2", 20);
        b.event(2, Some("w2"), EventBody::Completed(RunCompleted { output: expected_output(STEPS) }));
        b.record
    }

    fn violations(record: &RunRecord) -> Vec<Violation> {
        check_run(STEPS, record).violations
    }

    fn renumber(record: &mut RunRecord) {
        for (i, event) in record.events.iter_mut().enumerate() {
            event.seq = i as u64 + 1;
        }
    }

    fn position_of(record: &RunRecord, pred: impl Fn(&EventBody) -> bool) -> usize {
        record.events.iter().position(|e| pred(&e.body)).unwrap_or_else(|| panic!("no such event"))
    }

    fn checkpoint_mut(record: &mut RunRecord, index: u32) -> &mut Checkpoint {
        &mut record
            .checkpoints
            .iter_mut()
            .find(|c| c.key_index == index)
            .unwrap_or_else(|| panic!("no checkpoint {index}"))
            .checkpoint
    }

    #[test]
    fn a_clean_crash_and_resume_passes() {
        let record = crashed_and_resumed();
        let report = check_run(STEPS, &record);
        assert_eq!(report.violations, Vec::<Violation>::new());
        assert!(report.completed);
        assert_eq!(report.resumes, 1);
        assert_eq!(report.duplicate_executions, 1, "step 2 ran on w1 and w2");
        assert_eq!(report.executions, 5);
        assert_eq!(report.taken_over_from, vec!["w1".to_owned()]);
    }

    #[test]
    fn a_run_without_a_crash_passes() {
        let mut b = Builder::new();
        b.event(1, Some("w1"), EventBody::Started(RunStarted { delivery: 1 }));
        for index in 0..STEPS {
            b.step(index, 1, "w1", 7);
        }
        b.event(1, Some("w1"), EventBody::Completed(RunCompleted { output: expected_output(STEPS) }));
        let report = check_run(STEPS, &b.record);
        assert_eq!(report.violations, Vec::<Violation>::new());
        assert_eq!((report.resumes, report.duplicate_executions), (0, 0));
    }

    #[test]
    fn a_gap_in_seqs_is_detected() {
        let mut record = crashed_and_resumed();
        record.events.remove(3);
        assert!(violations(&record).contains(&Violation::Seq { position: 3, seq: 5, expected: 4 }));
    }

    #[test]
    fn a_duplicate_seq_is_detected() {
        let mut record = crashed_and_resumed();
        let copy = record.events[4].clone();
        record.events.insert(5, copy);
        assert!(violations(&record).iter().any(|v| matches!(v, Violation::Seq { position: 5, .. })));
    }

    #[test]
    fn two_terminal_events_are_detected() {
        let mut record = crashed_and_resumed();
        let mut again = record.events[record.events.len() - 1].clone();
        again.seq += 1;
        record.events.push(again);
        assert!(violations(&record).contains(&Violation::TerminalCount { count: 2 }));
    }

    #[test]
    fn a_terminal_event_that_is_not_last_is_detected() {
        let mut record = crashed_and_resumed();
        let last = record.events.len() - 1;
        record.events.swap(last, last - 1);
        renumber(&mut record);
        assert!(violations(&record).iter().any(|v| matches!(v, Violation::TerminalNotLast { .. })));
    }

    #[test]
    fn a_missing_terminal_event_is_detected() {
        let mut record = crashed_and_resumed();
        record.events.pop();
        let report = check_run(STEPS, &record);
        assert!(report.violations.contains(&Violation::TerminalCount { count: 0 }));
        assert!(!report.completed);
    }

    #[test]
    fn a_failed_run_and_a_wrong_output_are_detected() {
        let mut record = crashed_and_resumed();
        let last = record.events.len() - 1;
        record.events[last].body =
            EventBody::Completed(RunCompleted { output: json!({"steps": 3, "bytes": 0}) });
        assert!(violations(&record).iter().any(|v| matches!(v, Violation::WrongOutput { .. })));
        record.events[last].body = EventBody::Failed(RunFailed {
            error: RunError { code: ErrorCode::MaxAttemptsExceeded, message: "used up".into() },
        });
        assert!(violations(&record).iter().any(|v| matches!(v, Violation::NotCompleted { .. })));
    }

    #[test]
    fn a_zombie_event_after_a_newer_attempt_began_is_detected() {
        let mut record = crashed_and_resumed();
        // w1 (attempt 1) appends step 2's completion after attempt 2 resumed.
        let resumed = position_of(&record, |b| matches!(b, EventBody::Resumed(_)));
        let mut zombie = record.events[resumed].clone();
        zombie.attempt = 1;
        zombie.worker_id = Some(worker("w1"));
        zombie.body = EventBody::StepCompleted(StepCompleted {
            index: 2,
            name: "step-2".into(),
            attempt: 1,
            duration_ms: 1,
            blob: false,
        });
        record.events.insert(resumed + 1, zombie);
        renumber(&mut record);
        let found = violations(&record);
        assert!(
            found.iter().any(|v| matches!(v, Violation::ZombieEvent { attempt: 1, current: 2, .. })),
            "{found:?}"
        );
    }

    #[test]
    fn an_event_from_the_right_attempt_but_another_worker_is_detected() {
        let mut record = crashed_and_resumed();
        let last = record.events.len() - 2;
        record.events[last].worker_id = Some(worker("w9"));
        assert!(violations(&record).iter().any(|v| matches!(v, Violation::ForeignWriter { .. })));
    }

    #[test]
    fn attempts_out_of_order_are_detected() {
        let mut record = crashed_and_resumed();
        let resumed = position_of(&record, |b| matches!(b, EventBody::Resumed(_)));
        for event in &mut record.events[resumed..] {
            event.attempt = 1;
        }
        let found = violations(&record);
        assert!(found.iter().any(|v| matches!(v, Violation::AttemptOrder { attempt: 1, previous: 1, .. })));
    }

    #[test]
    fn a_checkpoint_by_an_old_attempt_after_a_newer_resume_is_detected() {
        let mut record = crashed_and_resumed();
        // Attempt 1 (paused) wakes up and its checkpoint of step 2 lands
        // although attempt 2 resumed replaying only steps 0 and 1.
        let checkpoint = checkpoint_mut(&mut record, 2);
        checkpoint.attempt = 1;
        checkpoint.worker_id = worker("w1");
        checkpoint.fencing_token = 10;
        let found = violations(&record);
        assert!(found.contains(&Violation::StaleCheckpoint {
            index: 2,
            checkpoint_attempt: 1,
            resumed_attempt: 2,
            replayed: 2
        }));
        assert!(found.contains(&Violation::CheckpointAfterFence {
            index: 2,
            checkpoint_attempt: 1,
            fence_attempt: 2
        }));
    }

    #[test]
    fn a_replay_count_that_disagrees_with_the_checkpoints_is_detected() {
        let mut record = crashed_and_resumed();
        let resumed = position_of(&record, |b| matches!(b, EventBody::Resumed(_)));
        record.events[resumed].body =
            EventBody::Resumed(RunResumed { delivery: 2, steps_replayed: 3, failures: 1 });
        let found = violations(&record);
        assert!(found.iter().any(|v| matches!(v, Violation::ReplayedCheckpointFromLater { index: 2, .. })));
        // Attempt 2 also re-ran step 2, which it claims to have replayed.
        assert!(found.iter().any(|v| matches!(
            v,
            Violation::ReplayedStepRerun { index: 2, attempt: 2, evidence: Evidence::Journal, .. }
        )));
    }

    #[test]
    fn a_re_executed_replayed_step_is_detected() {
        let mut record = crashed_and_resumed();
        // Attempt 2 runs step 0 again although it replayed it.
        record.executions.push(Execution {
            run_id: record.run_id,
            index: 0,
            attempt: 2,
            worker_id: "w2".into(),
            fencing_token: 20,
        });
        let found = violations(&record);
        assert!(found.contains(&Violation::ReplayedStepRerun {
            index: 0,
            attempt: 2,
            replayed: 2,
            evidence: Evidence::Journal
        }));
        // ... and did so without even logging step.started for it.
        assert!(found.contains(&Violation::ExecutionWithoutStepStarted { index: 0, attempt: 2 }));
    }

    #[test]
    fn a_replayed_step_started_again_in_the_log_is_detected() {
        let mut record = crashed_and_resumed();
        let resumed = position_of(&record, |b| matches!(b, EventBody::Resumed(_)));
        let mut again = record.events[resumed].clone();
        again.body = EventBody::StepStarted(StepStarted { index: 1, name: "step-1".into(), attempt: 1 });
        record.events.insert(resumed + 1, again);
        renumber(&mut record);
        assert!(violations(&record).iter().any(|v| matches!(
            v,
            Violation::ReplayedStepRerun { index: 1, attempt: 2, evidence: Evidence::StepStarted, .. }
        )));
    }

    #[test]
    fn more_than_one_duplicate_execution_per_attempt_is_detected() {
        let mut record = crashed_and_resumed();
        // Attempt 1 also executed step 3 (and logged it) without checkpointing.
        let resumed = position_of(&record, |b| matches!(b, EventBody::Resumed(_)));
        let mut started = record.events[resumed - 1].clone();
        started.body = EventBody::StepStarted(StepStarted { index: 3, name: "step-3".into(), attempt: 1 });
        record.events.insert(resumed, started);
        renumber(&mut record);
        record.executions.push(Execution {
            run_id: record.run_id,
            index: 3,
            attempt: 1,
            worker_id: "w1".into(),
            fencing_token: 10,
        });
        let report = check_run(STEPS, &record);
        assert!(report
            .violations
            .contains(&Violation::TooManyDuplicates { attempt: 1, indices: vec![2, 3] }));
        assert_eq!(report.duplicate_executions, 2);
    }

    #[test]
    fn a_duplicate_that_is_not_the_in_flight_step_is_detected() {
        let mut record = crashed_and_resumed();
        // Step 1's result is attributed to attempt 2 while attempt 1 went
        // on to step 2: attempt 1's duplicate (step 1) is not its last step.
        let one = checkpoint_mut(&mut record, 1);
        (one.attempt, one.worker_id, one.fencing_token) = (2, worker("w2"), 20);
        let two = checkpoint_mut(&mut record, 2);
        (two.attempt, two.worker_id, two.fencing_token) = (1, worker("w1"), 10);
        let found = violations(&record);
        assert!(
            found.contains(&Violation::DuplicateNotInFlight { attempt: 1, index: 1, highest: 2 }),
            "{found:?}"
        );
    }

    #[test]
    fn repeated_executions_by_one_attempt_are_detected() {
        let mut record = crashed_and_resumed();
        let line = record.executions[record.executions.len() - 1].clone();
        record.executions.push(line);
        assert!(violations(&record)
            .iter()
            .any(|v| matches!(v, Violation::RepeatedExecution { count: 2, .. })));
    }

    #[test]
    fn missing_and_extra_checkpoints_are_detected() {
        let mut record = crashed_and_resumed();
        record.checkpoints.retain(|c| c.key_index != 3);
        let mut extra = record.checkpoints[0].clone();
        extra.key_index = STEPS;
        extra.checkpoint.index = STEPS;
        record.checkpoints.push(extra);
        let found = violations(&record);
        assert!(found.contains(&Violation::MissingCheckpoint { index: 3 }));
        assert!(found.contains(&Violation::ExtraCheckpoint { index: STEPS, steps: STEPS }));
    }

    #[test]
    fn a_checkpoint_under_the_wrong_key_is_detected() {
        let mut record = crashed_and_resumed();
        record.checkpoints[0].checkpoint.index = 1;
        assert!(violations(&record)
            .iter()
            .any(|v| matches!(v, Violation::CorruptCheckpoint { key_index: 0, .. })));
    }

    #[test]
    fn a_step_completed_from_another_attempt_than_its_checkpoint_is_detected() {
        let mut record = crashed_and_resumed();
        checkpoint_mut(&mut record, 3).attempt = 3;
        let found = violations(&record);
        assert!(found.contains(&Violation::CompletedAttemptMismatch {
            index: 3,
            event_attempt: 2,
            checkpoint_attempt: 3
        }));
        // Attempt 3 never started, so it cannot have written it either.
        assert!(found
            .iter()
            .any(|v| matches!(v, Violation::CheckpointWriter { attempt: 3, owner: None, .. })));
    }

    #[test]
    fn a_step_never_executed_is_detected() {
        let mut record = crashed_and_resumed();
        record.executions.retain(|x| x.index != 3);
        let found = violations(&record);
        assert!(found.contains(&Violation::NotExecuted { index: 3 }));
        assert!(found.contains(&Violation::CheckpointWithoutExecution { index: 3, attempt: 2 }));
    }

    #[test]
    fn an_execution_by_an_attempt_that_never_started_is_detected() {
        let mut record = crashed_and_resumed();
        record.executions.push(Execution {
            run_id: record.run_id,
            index: 3,
            attempt: 5,
            worker_id: "w5".into(),
            fencing_token: 50,
        });
        assert!(violations(&record)
            .iter()
            .any(|v| matches!(v, Violation::ExecutionWithoutAttempt { attempt: 5, owner: None, .. })));
    }

    #[test]
    fn fencing_tokens_out_of_order_or_mixed_are_detected() {
        let mut record = crashed_and_resumed();
        for x in record.executions.iter_mut().filter(|x| x.attempt == 2) {
            x.fencing_token = 5;
        }
        let found = violations(&record);
        assert!(found.iter().any(|v| matches!(v, Violation::TokenMismatch { attempt: 2, .. })));
        assert!(found.iter().any(|v| matches!(v, Violation::TokenOrder { attempt: 2, token: 5, .. })));
    }

    #[test]
    fn undecodable_records_are_violations() {
        let mut record = crashed_and_resumed();
        record.undecodable.push("checkpoint x.1: bad msgpack".into());
        assert!(violations(&record).iter().any(|v| matches!(v, Violation::Undecodable { .. })));
    }

    #[test]
    fn journal_lines_parse_and_torn_lines_are_reported() {
        let run = RunId::generate();
        let text =
            format!("{run} 3 2 chaos-w4 17\n{run} 4 2 chaos-w4\n{run} 4 2 chaos-w4 17{run} 5 2 w 1\n\n");
        let (executions, bad) = parse_journal(&text);
        assert_eq!(
            executions,
            vec![Execution {
                run_id: run,
                index: 3,
                attempt: 2,
                worker_id: "chaos-w4".into(),
                fencing_token: 17
            }]
        );
        assert_eq!(bad.len(), 2);
    }
}
