//! The API of a real coordinator process: idempotent submission, and bad
//! input answered with typed errors without damaging anything.

mod harness;

use std::time::Duration;

use harness::stream::{by_run, check_run_log, eventually, tenant_events};
use harness::{Fleet, TestDb};
use runfleet::client::Error;
use runfleet_protocol::api::{ListRequest, Reply, SubmitRequest, SubmitResponse};
use runfleet_protocol::event::EventBody;
use runfleet_protocol::names::{API_VERBS, VERB_SUBMIT};
use runfleet_protocol::{codec, ErrorCode, Names, RunId, TenantId};
use serde_json::json;

fn submit(agent: &str, input: serde_json::Value) -> SubmitRequest {
    SubmitRequest {
        agent: agent.into(),
        input,
        queue: None,
        priority: None,
        idempotency_key: None,
        max_attempts: None,
    }
}

fn api_code(result: Result<impl std::fmt::Debug, Error>) -> (ErrorCode, Option<String>) {
    match result {
        Err(Error::Api(e)) => (e.code, e.field),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotent_submit_makes_one_run_and_conflicts_on_other_input() {
    harness::init_tracing();
    let fleet = Fleet::start(TestDb::sqlite(), 1, 2).await;
    let client = fleet.client("default").await;
    let keyed =
        SubmitRequest { idempotency_key: Some("order-42".into()), ..submit("echo", json!({"n": 42})) };

    let replies: Vec<SubmitResponse> = futures::future::join_all((0..20).map(|_| {
        let client = client.clone();
        let keyed = keyed.clone();
        async move { client.submit(keyed).await.unwrap_or_else(|e| panic!("submit: {e}")) }
    }))
    .await;
    let run = replies[0].run_id;
    assert!(replies.iter().all(|r| r.run_id == run), "every retry must name the same run");
    assert_eq!(replies.iter().filter(|r| r.created).count(), 1, "exactly one submit creates the run");

    let (code, field) =
        api_code(client.submit(SubmitRequest { input: json!({"n": 43}), ..keyed.clone() }).await);
    assert_eq!(code, ErrorCode::Conflict);
    assert_eq!(field.as_deref(), Some("idempotency_key"));

    let last = client.wait(run).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(last.body, EventBody::Completed(_)));
    // After completion the same submit still answers with the same run.
    let again = client.submit(keyed).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((again.run_id, again.created), (run, false));

    let nats = fleet.nats.client().await;
    let logs = by_run(&tenant_events(&nats, &TenantId::default_tenant()).await);
    assert_eq!(logs.len(), 1, "one run in the stream");
    let events = &logs[&run];
    check_run_log(run, events).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(events.iter().filter(|e| matches!(e.body, EventBody::Started(_))).count(), 1, "executed once");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_typed_errors_and_damages_nothing() {
    harness::init_tracing();
    let fleet = Fleet::start(TestDb::sqlite(), 1, 2).await;
    let client = fleet.client("default").await;

    // A run accepted before the onslaught must come through untouched.
    let before = client
        .submit(submit("sleep", json!({"steps": 3, "ms": 200})))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Malformed msgpack (and well-formed msgpack of the wrong shape) to every verb.
    let wrong_shape = codec::encode(&json!({"agent": 5, "run_id": 5, "state": 7, "limit": "ten"}))
        .unwrap_or_else(|e| panic!("{e}"));
    for verb in API_VERBS {
        for payload in [b"\xc1\xc1 not msgpack".to_vec(), Vec::new(), wrong_shape.clone()] {
            let raw = client.request_raw(verb, payload).await.unwrap_or_else(|e| panic!("{verb}: {e}"));
            match codec::decode::<Reply<serde_json::Value>>(&raw) {
                Ok(Reply::Err(e)) => assert_eq!(e.code, ErrorCode::MalformedRequest, "{verb}: {e}"),
                other => panic!("{verb}: expected malformed_request, got {other:?}"),
            }
        }
    }
    // A newer envelope version is named as such.
    let future = rmp_like_envelope(2);
    let raw = client.request_raw(VERB_SUBMIT, future).await.unwrap_or_else(|e| panic!("{e}"));
    match codec::decode::<Reply<serde_json::Value>>(&raw) {
        Ok(Reply::Err(e)) => assert_eq!(e.code, ErrorCode::UnsupportedVersion),
        other => panic!("expected unsupported_version, got {other:?}"),
    }

    // Invalid names in the body, each naming its field.
    let long = "x".repeat(65);
    for bad in ["", "a.b", "a*", "a>", "a b", long.as_str()] {
        let (code, field) = api_code(client.submit(submit(bad, json!(null))).await);
        assert_eq!((code, field.as_deref()), (ErrorCode::InvalidArgument, Some("agent")), "agent {bad:?}");
        let request = SubmitRequest { queue: Some(bad.into()), ..submit("echo", json!(null)) };
        let (code, field) = api_code(client.submit(request).await);
        assert_eq!((code, field.as_deref()), (ErrorCode::InvalidArgument, Some("queue")), "queue {bad:?}");
    }
    let (code, field) =
        api_code(client.submit(SubmitRequest { priority: Some(9), ..submit("echo", json!(null)) }).await);
    assert_eq!((code, field.as_deref()), (ErrorCode::InvalidArgument, Some("priority")));
    let (code, _) =
        api_code(client.submit(SubmitRequest { max_attempts: Some(0), ..submit("echo", json!(null)) }).await);
    assert_eq!(code, ErrorCode::InvalidArgument);

    // Invalid tenants: the ones NATS can carry reach the coordinator and are refused there…
    for bad in [long.as_str(), "t$nt", "tenänt"] {
        let subject = format!("runfleet.api.{bad}.submit");
        let payload = codec::encode(&submit("echo", json!(null))).unwrap_or_else(|e| panic!("{e}"));
        let reply = client.nats().request(subject, payload.into()).await.unwrap_or_else(|e| panic!("{e}"));
        match codec::decode::<Reply<serde_json::Value>>(&reply.payload) {
            Ok(Reply::Err(e)) => {
                assert_eq!((e.code, e.field.as_deref()), (ErrorCode::InvalidArgument, Some("tenant")))
            }
            other => panic!("tenant {bad:?}: expected invalid_argument, got {other:?}"),
        }
    }
    // …and the ones that would change the subject never become one.
    for bad in ["", "a.b", "a*", "a>", "a b"] {
        assert!(TenantId::new(bad).is_err(), "{bad:?}");
    }

    // An input over the limit.
    let big = json!({"blob": "x".repeat(300 * 1024)});
    let (code, field) = api_code(client.submit(submit("echo", big)).await);
    assert_eq!((code, field.as_deref()), (ErrorCode::PayloadTooLarge, Some("input")));

    // Unknown and invalid run ids.
    let (code, _) = api_code(client.get(RunId::generate()).await);
    assert_eq!(code, ErrorCode::NotFound);
    let (code, _) = api_code(client.events(RunId::generate(), 0, None).await);
    assert_eq!(code, ErrorCode::NotFound);
    let get = codec::encode(&runfleet_protocol::api::GetRequest { run_id: "not-a-run".into() })
        .unwrap_or_else(|e| panic!("{e}"));
    let raw = client.request_raw("get", get).await.unwrap_or_else(|e| panic!("{e}"));
    match codec::decode::<Reply<serde_json::Value>>(&raw) {
        Ok(Reply::Err(e)) => {
            assert_eq!((e.code, e.field.as_deref()), (ErrorCode::InvalidArgument, Some("run_id")))
        }
        other => panic!("expected invalid_argument, got {other:?}"),
    }
    // Another tenant cannot see this tenant's run.
    let other = fleet.client("other").await;
    let (code, _) = api_code(other.get(before.run_id).await);
    assert_eq!(code, ErrorCode::NotFound);

    // Garbage published straight onto an events subject must not stall the projector.
    let names = Names::default();
    let nats = fleet.nats.client().await;
    let js = async_nats::jetstream::new(nats.clone());
    let junk_run = RunId::generate();
    js.publish(names.run_events(&TenantId::default_tenant(), junk_run), "junk".into())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Nothing was damaged: the earlier run and a new one complete, and the registry has exactly them.
    let after = client.submit(submit("echo", json!({"after": true}))).await.unwrap_or_else(|e| panic!("{e}"));
    for run in [before.run_id, after.run_id] {
        let last = client.wait(run).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(last.body, EventBody::Completed(_)), "{run}: {last:?}");
    }
    let runs = eventually(Duration::from_secs(30), "registry to show both runs completed", || {
        let client = client.clone();
        async move {
            let page = client
                .list(ListRequest { state: Some("completed".into()), ..Default::default() })
                .await
                .ok()?;
            (page.runs.len() == 2).then_some(page.runs)
        }
    })
    .await;
    let mut ids: Vec<RunId> = runs.iter().map(|r| r.run_id).collect();
    ids.sort();
    let mut expected = vec![before.run_id, after.run_id];
    expected.sort();
    assert_eq!(ids, expected);
    let all = client.list(ListRequest::default()).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(all.runs.len(), 2, "no run was created by a bad request");
    let events = client.events(before.run_id, 0, None).await.unwrap_or_else(|e| panic!("{e}"));
    let seqs: Vec<u64> = events.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}

/// An envelope with another version number around a valid submit body.
fn rmp_like_envelope(version: u16) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Envelope<'a> {
        v: u16,
        data: &'a SubmitRequest,
    }
    let body = submit("echo", json!(null));
    rmp_serde::to_vec_named(&Envelope { v: version, data: &body }).unwrap_or_else(|e| panic!("{e}"))
}
