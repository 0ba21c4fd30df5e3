//! `stream_replicas` on a real 3-node JetStream cluster: every stream,
//! bucket and object store the coordinator creates gets that many replicas,
//! and a later start with another count changes them.

#[allow(dead_code)]
#[path = "../../tests/harness/nats.rs"]
mod nats;

use std::net::TcpListener;
use std::time::Duration;

use async_nats::jetstream;
use nats::NatsServer;
use runfleet_coordinator::{Coordinator, CoordinatorConfig};
use runfleet_protocol::Names;

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    listener.local_addr().unwrap_or_else(|e| panic!("addr: {e}")).port()
}

/// Starts a 3-node cluster on loopback.
fn cluster() -> Vec<NatsServer> {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let routes = ports.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
    ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let name = format!("n{i}");
            let cluster = format!("nats://127.0.0.1:{port}");
            NatsServer::start_with_args(&[
                "--server_name",
                &name,
                "--cluster_name",
                "rf",
                "--cluster",
                &cluster,
                "--routes",
                &routes,
            ])
        })
        .collect()
}

/// The replica count of every stream the coordinator made.
async fn replicas(js: &jetstream::Context, names: &Names) -> Vec<(String, usize)> {
    let mut streams =
        vec![names.jobs_stream(), names.events_stream(), format!("OBJ_{}", names.blobs_bucket())];
    for bucket in [
        names.leases_bucket(),
        names.checkpoints_bucket(),
        names.signals_bucket(),
        names.control_bucket(),
        names.idempotency_bucket(),
        names.workers_bucket(),
    ] {
        streams.push(format!("KV_{bucket}"));
    }
    let mut out = Vec::new();
    for name in streams {
        let mut stream = js.get_stream(&name).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        let info = stream.info().await.unwrap_or_else(|e| panic!("{name}: {e}"));
        out.push((name, info.config.num_replicas));
    }
    out
}

async fn start(url: &str, replicas: usize) -> Coordinator {
    let db = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = CoordinatorConfig {
        nats_url: url.to_owned(),
        database_url: format!("sqlite:{}", db.path().join("r.db").display()),
        stream_replicas: replicas,
        ..Default::default()
    };
    // The cluster elects its JetStream meta leader a moment after starting.
    for _ in 0..60 {
        match Coordinator::start(config.clone()).await {
            Ok(coordinator) => {
                std::mem::forget(db);
                return coordinator;
            }
            Err(error) => {
                eprintln!("coordinator start: {error}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    panic!("the coordinator never started on the cluster");
}

#[tokio::test]
async fn every_stream_bucket_and_object_store_gets_the_configured_replicas() {
    let servers = cluster();
    let url = servers.iter().map(NatsServer::url).collect::<Vec<_>>().join(",");
    let names = Names::default();

    let coordinator = start(&url, 3).await;
    let js = jetstream::new(coordinator.client().clone());
    let got = replicas(&js, &names).await;
    assert!(got.iter().all(|(_, r)| *r == 3), "{got:?}");
    assert_eq!(got.len(), 9);
    drop(coordinator);

    // Scaling down on the next start applies to what exists.
    let coordinator = start(&url, 1).await;
    let js = jetstream::new(coordinator.client().clone());
    let got = replicas(&js, &names).await;
    assert!(got.iter().all(|(_, r)| *r == 1), "{got:?}");
}
