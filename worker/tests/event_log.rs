//! The event log's resend of appends that get no acknowledgement, against a
//! real nats-server paused with SIGSTOP while an append is on its way: the
//! append must neither fail nor store the event twice, and a duplicate
//! answer counts as stored only when the stored event is this attempt's own.

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use common::{assert_gapless, Env};
use runfleet_protocol::event::{Event, EventBody, RunStarted, StepStarted};
use runfleet_protocol::{time, WorkerId};
use runfleet_worker::runtime::events::{Error, EventLog, LastEvent, LogWriter};
use serde_json::json;

/// How long a publish waits for its acknowledgement in these tests.
const ACK_TIMEOUT: Duration = Duration::from_millis(400);
/// How long the server stays paused: past the first acknowledgement's
/// deadline, well inside the resends' budget.
const PAUSE: Duration = Duration::from_millis(1_000);

fn writer(env: &Env, worker_id: &WorkerId) -> Arc<LogWriter> {
    let js = jetstream::ContextBuilder::new().timeout(ACK_TIMEOUT).build(env.client.clone());
    Arc::new(LogWriter {
        js,
        names: env.names.clone(),
        worker_id: worker_id.clone(),
        redactor: runfleet_ops::redact::Redactor::default(),
    })
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

#[tokio::test]
async fn a_resent_append_that_finds_another_writers_event_is_lost() -> anyhow::Result<()> {
    let env = Env::start(Duration::from_secs(5)).await?;
    let job = env.create_run("steps", json!({ "steps": 1 }), 2).await?;
    let created_seq = job.created_seq.context("a created run has its created_seq")?;
    let log =
        EventLog::new(&writer(&env, &WorkerId::generate()), &job, 1, &LastEvent::created(&job, created_seq));

    // A newer attempt on another worker already wrote seq 2, with the msg
    // id our append will carry.
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
