//! The event log against a real nats-server: held events go out with the
//! next append in one message (both stored or neither, fenced like a single
//! append), and appends that get no acknowledgement (the server
//! paused with SIGSTOP while one is on its way) are sent again: they must
//! neither fail nor store anything twice, and a refused resend counts as
//! stored only when the stored event is this attempt's own.

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use async_nats::jetstream::context::PublishErrorKind;
use common::{assert_gapless, Env};
use runfleet_protocol::event::{AgentEvent, Event, EventBody, RunStarted, StepCompleted, StepStarted};
use runfleet_protocol::job::Job;
use runfleet_protocol::names::{HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE, HEADER_MSG_ID};
use runfleet_protocol::{time, WorkerId};
use runfleet_worker::runtime::events::{Error, EventLog, LastEvent, LogWriter};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// How long a publish waits for its acknowledgement in these tests.
const ACK_TIMEOUT: Duration = Duration::from_millis(400);
/// How long the server stays paused: past the first acknowledgement's
/// deadline, well inside the resends' budget.
const PAUSE: Duration = Duration::from_millis(1_000);

/// A held event waits this long for the next append in the tests that
/// append it: far longer than they take, so it surely goes in its message.
const HOLD_LONG: Duration = Duration::from_secs(3_600);

fn writer(env: &Env, worker_id: &WorkerId) -> Arc<LogWriter> {
    writer_with(env, worker_id, HOLD_LONG)
}

fn writer_with(env: &Env, worker_id: &WorkerId, hold_for: Duration) -> Arc<LogWriter> {
    let js = jetstream::ContextBuilder::new().timeout(ACK_TIMEOUT).build(env.client.clone());
    Arc::new(LogWriter {
        js,
        names: env.names.clone(),
        worker_id: worker_id.clone(),
        redactor: runfleet_ops::redact::Redactor::default(),
        hold_for,
    })
}

fn step_started(index: u32) -> EventBody {
    EventBody::StepStarted(StepStarted { index, name: format!("s{index}"), attempt: 1 })
}

fn step_completed(index: u32) -> EventBody {
    EventBody::StepCompleted(StepCompleted {
        index,
        name: format!("s{index}"),
        attempt: 1,
        duration_ms: 0,
        blob: false,
    })
}

/// A run's log with `run.started` (seq 2) appended by a fresh worker.
async fn started_log(env: &Env, hold_for: Duration) -> anyhow::Result<(Job, EventLog)> {
    let job = env.create_run("steps", json!({ "steps": 2 }), 2).await?;
    let created_seq = job.created_seq.context("a created run has its created_seq")?;
    let writer = writer_with(env, &WorkerId::generate(), hold_for);
    let mut log = EventLog::new(&writer, &job, 1, &LastEvent::created(&job, created_seq));
    assert_eq!(log.append(EventBody::Started(RunStarted { delivery: 1 })).await?, 2);
    Ok((job, log))
}

fn types(events: &[(u64, Event)]) -> Vec<&'static str> {
    events.iter().map(|(_, e)| e.body.type_name()).collect()
}

/// Appends `body` while the server is paused for [`PAUSE`], so the first
/// send's acknowledgement cannot arrive in time.
async fn append_across_a_pause(
    env: &Env,
    mut log: EventLog,
    body: EventBody,
) -> (EventLog, Result<u64, Error>) {
    env.server.signal("STOP");
    let append = tokio::spawn(async move {
        let result = log.append(body).await;
        (log, result)
    });
    tokio::time::sleep(PAUSE).await;
    env.server.signal("CONT");
    match append.await {
        Ok(appended) => appended,
        Err(e) => panic!("append task: {e}"),
    }
}

#[tokio::test]
async fn an_unacknowledged_append_is_sent_again_and_stored_once() -> anyhow::Result<()> {
    let env = Env::start(Duration::from_secs(5)).await?;
    let job = env.create_run("steps", json!({ "steps": 1 }), 2).await?;
    let created_seq = job.created_seq.context("a created run has its created_seq")?;
    let worker_id = WorkerId::generate();
    let log = EventLog::new(&writer(&env, &worker_id), &job, 1, &LastEvent::created(&job, created_seq));

    let (mut log, appended) =
        append_across_a_pause(&env, log, EventBody::Started(RunStarted { delivery: 1 })).await;
    assert_eq!(appended?, 2, "the append survives a server that did not answer in time");
    assert!(!log.is_lost() && !log.is_closed());

    // The log goes on from the stored event: the next append's expected
    // sequence is the resent event's.
    let next = EventBody::StepStarted(StepStarted { index: 0, name: "a".into(), attempt: 1 });
    assert_eq!(log.append(next).await?, 3);

    let events: Vec<Event> = env.events(job.run_id).await?.into_iter().map(|(_, e)| e).collect();
    assert_gapless(&events);
    assert_eq!(events.len(), 3, "the resent event is stored once: {events:?}");
    assert_eq!(events[1].attempt, 1);
    assert_eq!(events[1].worker_id.as_ref(), Some(&worker_id));
    Ok(())
}

/// Appends carry no `Nats-Msg-Id`: the expected sequence alone refuses a
/// second copy of a stored append, so the server keeps no de-duplication
/// entry per event.
#[tokio::test]
async fn a_second_copy_of_an_append_is_refused_without_a_msg_id() -> anyhow::Result<()> {
    let env = Env::start(Duration::from_secs(5)).await?;
    let (job, _log) = started_log(&env, Duration::ZERO).await?;
    let subject = env.names.run_events(&job.tenant, job.run_id);
    let stored = env.events.get_last_raw_message_by_subject(&subject).await?;
    assert!(stored.headers.get(HEADER_MSG_ID).is_none(), "an append carries no msg id: {:?}", stored.headers);
    let fence = stored.headers.get(HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE).map(|v| v.as_str().to_owned());
    let created_seq = job.created_seq.context("a created run has its created_seq")?;
    assert_eq!(fence, Some(created_seq.to_string()), "the append is fenced on run.created");

    // The same message again, as a resend after a lost acknowledgement.
    let again = env.js.publish_with_headers(subject, stored.headers.clone(), stored.payload.clone()).await?;
    match again.await {
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {}
        other => panic!("a second copy must be refused by its expected sequence: {other:?}"),
    }
    let events = env.events(job.run_id).await?;
    assert_eq!(types(&events), ["run.created", "run.started"], "stored once");
    Ok(())
}

#[tokio::test]
async fn a_resent_append_that_finds_another_writers_event_is_lost() -> anyhow::Result<()> {
    let env = Env::start(Duration::from_secs(5)).await?;
    let job = env.create_run("steps", json!({ "steps": 1 }), 2).await?;
    let created_seq = job.created_seq.context("a created run has its created_seq")?;
    let log =
        EventLog::new(&writer(&env, &WorkerId::generate()), &job, 1, &LastEvent::created(&job, created_seq));

    // A newer attempt on another worker already wrote seq 2, the seq our
    // append will carry.
    let other = WorkerId::generate();
    let theirs = Event {
        run_id: job.run_id,
        tenant: job.tenant.clone(),
        seq: 2,
        ts_ms: time::now_ms(),
        attempt: 2,
        worker_id: Some(other.clone()),
        trace_id: None,
        body: EventBody::Started(RunStarted { delivery: 2 }),
    };
    env.append_event(&theirs, created_seq).await?;

    let (log, appended) =
        append_across_a_pause(&env, log, EventBody::Started(RunStarted { delivery: 1 })).await;
    match appended {
        Err(e) if e.is_lease_lost() => {}
        other => panic!("a duplicate of another writer's event must not count as ours: {other:?}"),
    }
    assert!(log.is_lost());

    let events = env.events(job.run_id).await?;
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].1.worker_id.as_ref(), Some(&other), "the other writer's event stays");
    Ok(())
}

#[tokio::test]
async fn a_held_event_is_stored_with_the_next_append_in_one_message() -> anyhow::Result<()> {
    let env = Env::start(Duration::from_secs(5)).await?;
    let (job, mut log) = started_log(&env, HOLD_LONG).await?;
    assert_eq!(log.append(step_started(0)).await?, 3);
    log.hold(step_completed(0), &CancellationToken::new()).await?;
    assert_eq!(log.last_seq(), 3, "a held event is not in the log yet");
    assert_eq!(env.events(job.run_id).await?.len(), 3, "a held event is not sent on its own");

    assert_eq!(log.append(step_started(1)).await?, 5, "the next append gets the seq after the held one");
    log.hold(step_completed(1), &CancellationToken::new()).await?;
    log.flush().await?;
    assert_eq!(log.last_seq(), 6);

    let events = env.events(job.run_id).await?;
    let bodies: Vec<Event> = events.iter().map(|(_, e)| e.clone()).collect();
    assert_gapless(&bodies);
    assert_eq!(
        types(&events),
        ["run.created", "run.started", "step.started", "step.completed", "step.started", "step.completed"]
    );
    assert_eq!(events[4].0, events[3].0, "the held event and the next one are one message");
    assert_eq!(events[5].0, events[4].0 + 1, "a flushed event is a message of its own");
    Ok(())
}

#[tokio::test]
async fn a_message_fenced_out_by_another_writer_stores_neither_event() -> anyhow::Result<()> {
    let env = Env::start(Duration::from_secs(5)).await?;
    let (job, mut log) = started_log(&env, HOLD_LONG).await?;
    log.hold(step_completed(0), &CancellationToken::new()).await?;

    // A newer attempt on another worker writes seq 3 after our seq 2.
    let stored = env.events(job.run_id).await?;
    let other = WorkerId::generate();
    let theirs = Event {
        run_id: job.run_id,
        tenant: job.tenant.clone(),
        seq: 3,
        ts_ms: time::now_ms(),
        attempt: 2,
        worker_id: Some(other.clone()),
        trace_id: None,
        body: EventBody::Resumed(runfleet_protocol::event::RunResumed {
            delivery: 2,
            steps_replayed: 0,
            failures: 1,
        }),
    };
    env.append_event(&theirs, stored[1].0).await?;

    match log.append(step_started(1)).await {
        Err(e) if e.is_lease_lost() => {}
        other => panic!("an append behind another writer's event must be refused: {other:?}"),
    }
    assert!(log.is_lost());
    match log.append(step_started(2)).await {
        Err(e) if e.is_lease_lost() => {}
        other => panic!("a lost log writes nothing more: {other:?}"),
    }
    let events = env.events(job.run_id).await?;
    assert_eq!(types(&events), ["run.created", "run.started", "run.resumed"], "neither event is stored");
    assert_eq!(events[2].1.worker_id.as_ref(), Some(&other));
    Ok(())
}

#[tokio::test]
async fn an_unacknowledged_message_of_two_events_is_sent_again_and_stored_once() -> anyhow::Result<()> {
    let env = Env::start(Duration::from_secs(5)).await?;
    let (job, mut log) = started_log(&env, HOLD_LONG).await?;
    assert_eq!(log.append(step_started(0)).await?, 3);
    log.hold(step_completed(0), &CancellationToken::new()).await?;

    let (mut log, appended) = append_across_a_pause(&env, log, step_started(1)).await;
    assert_eq!(appended?, 5, "the message survives a server that did not answer in time");
    assert!(!log.is_lost() && !log.is_closed());
    assert_eq!(log.append(step_completed(1)).await?, 6, "the log goes on from the resent message");

    let events = env.events(job.run_id).await?;
    let bodies: Vec<Event> = events.iter().map(|(_, e)| e.clone()).collect();
    assert_gapless(&bodies);
    assert_eq!(
        types(&events),
        ["run.created", "run.started", "step.started", "step.completed", "step.started", "step.completed"],
        "the resent message is stored once"
    );
    Ok(())
}

#[tokio::test]
async fn with_no_hold_time_a_held_event_is_appended_at_once() -> anyhow::Result<()> {
    let env = Env::start(Duration::from_secs(5)).await?;
    let (job, mut log) = started_log(&env, Duration::ZERO).await?;
    log.hold(step_completed(0), &CancellationToken::new()).await?;
    assert_eq!(log.last_seq(), 3);
    assert_eq!(types(&env.events(job.run_id).await?), ["run.created", "run.started", "step.completed"]);
    Ok(())
}

#[tokio::test]
async fn a_held_event_with_nothing_after_it_is_sent_on_its_own() -> anyhow::Result<()> {
    let env = Env::start(Duration::from_secs(5)).await?;
    let hold_for = Duration::from_millis(50);
    let (job, mut log) = started_log(&env, hold_for).await?;
    log.hold(step_completed(0), &CancellationToken::new()).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while env.events(job.run_id).await?.len() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "the held event was never sent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The log learns where its own send left it, and goes on from there.
    assert_eq!(log.append(step_started(1)).await?, 4);
    let events = env.events(job.run_id).await?;
    assert_eq!(types(&events), ["run.created", "run.started", "step.completed", "step.started"]);
    Ok(())
}

#[tokio::test]
async fn a_closed_or_dropped_log_does_not_write_its_held_event() -> anyhow::Result<()> {
    let env = Env::start(Duration::from_secs(5)).await?;
    let hold_for = Duration::from_millis(50);
    let (closed, mut log) = started_log(&env, hold_for).await?;
    log.hold(step_completed(0), &CancellationToken::new()).await?;
    log.close();
    let (dropped, mut log) = started_log(&env, hold_for).await?;
    log.hold(step_completed(0), &CancellationToken::new()).await?;
    drop(log);
    tokio::time::sleep(hold_for * 10).await;
    for run_id in [closed.run_id, dropped.run_id] {
        assert_eq!(types(&env.events(run_id).await?), ["run.created", "run.started"]);
    }
    Ok(())
}

#[tokio::test]
async fn a_held_event_and_a_large_next_one_go_in_messages_of_their_own() -> anyhow::Result<()> {
    let env = Env::start(Duration::from_secs(5)).await?;
    let (job, mut log) = started_log(&env, HOLD_LONG).await?;
    log.hold(step_completed(0), &CancellationToken::new()).await?;
    let large = EventBody::Agent(AgentEvent { name: "big".into(), data: json!("x".repeat(70 * 1024)) });
    assert_eq!(log.append(large).await?, 4);
    let events = env.events(job.run_id).await?;
    assert_eq!(types(&events), ["run.created", "run.started", "step.completed", "agent.event"]);
    assert_eq!(events[3].0, events[2].0 + 1, "too large together: one message each");
    Ok(())
}

#[tokio::test]
async fn a_held_event_of_a_stopped_run_is_not_sent_by_its_timer() -> anyhow::Result<()> {
    let env = Env::start(Duration::from_secs(5)).await?;
    let hold_for = Duration::from_millis(50);
    let (job, mut log) = started_log(&env, hold_for).await?;
    let stop = CancellationToken::new();
    log.hold(step_completed(0), &stop).await?;
    // The lease is lost (or the run handed off) before the timer fires.
    stop.cancel();
    tokio::time::sleep(hold_for * 10).await;
    assert_eq!(types(&env.events(job.run_id).await?), ["run.created", "run.started"]);
    // A runtime that still holds the lease takes it into its next append.
    assert_eq!(log.append(step_started(1)).await?, 4);
    let events = env.events(job.run_id).await?;
    assert_eq!(types(&events), ["run.created", "run.started", "step.completed", "step.started"]);
    assert_eq!(events[3].0, events[2].0, "one message");
    Ok(())
}
