//! A client with an identity (an access token's `client_id`) that connects again takes over
//! from its previous connection to the same export: never hanging on a previous connection whose
//! peer reads nothing, and never touching its connections to other exports.
#![allow(clippy::unwrap_used)] // test: a failed step is a failed test

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use strata_bdev::{BlockDevice, Bytes, ErrorKind, WriteOpts};
use strata_nbd::codec::cmd;
use strata_nbd::{Export, Resolved, Resolver, ServerConfig};
use tokio::io::AsyncReadExt;

mod common;
use common::{addr, connect, export, mem, request, tcp_server, wait_until, within, Raw};

/// Names `EXPORT~CLIENT`: export `EXPORT`, with client identity `CLIENT`.
#[derive(Debug)]
struct ByIdentity(HashMap<String, Arc<Export>>);

#[async_trait]
impl Resolver for ByIdentity {
    async fn resolve(&self, name: &str) -> Result<Option<Resolved>, String> {
        let Some((export, client)) = name.split_once('~') else {
            return Ok(None);
        };
        Ok(self.0.get(export).map(|e| Resolved {
            export: e.clone(),
            client_id: Some(client.to_string()),
        }))
    }
}

fn resolver(names: &[&str]) -> Arc<ByIdentity> {
    let exports = names
        .iter()
        .map(|n| (n.to_string(), Arc::new(export(n, mem(64 << 20), false))))
        .collect();
    Arc::new(ByIdentity(exports))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_does_not_wait_for_a_client_that_reads_nothing() {
    let config = ServerConfig {
        takeover_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let (server, target) = tcp_server(config, vec![]).await;
    server.set_resolver(resolver(&["a"]));

    // The first connection asks for 256 MiB of reads and reads no reply: the server fills the
    // socket, spends the connection's budget, and can neither write nor read more.
    let mut old = Raw::open(addr(&target), "a~vm1", false).await;
    let mut batch = Vec::new();
    for i in 0..256u64 {
        batch.extend_from_slice(&request(cmd::READ, i, (i % 64) << 20, 1 << 20));
    }
    old.send(&batch).await;
    wait_until("the old connection is stuck on its unread replies", || {
        server.stats().paused_connections == 1
    })
    .await;

    // The same client connects again: it is served, whatever the old connection's peer does.
    within("the new connection is served", async {
        let new = connect(&target, "a~vm1").await;
        new.write_at(4096, Bytes::from_static(b"mine"), WriteOpts::default())
            .await
            .unwrap();
        assert_eq!(&new.read_at(4096, 4).await.unwrap()[..], b"mine");
    })
    .await;
    wait_until("the old connection is gone", || {
        server.stats().connections == 1
    })
    .await;
    // The old connection's client gets what the server had written, then the end of the
    // stream (or a reset: the server did not read all it sent).
    let mut rest = Vec::new();
    let _ = within("the old connection is closed", old.s.read_to_end(&mut rest)).await;
    assert_eq!(server.stats().requests_in_flight, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_is_scoped_to_its_export() {
    let (server, target) = tcp_server(ServerConfig::default(), vec![]).await;
    server.set_resolver(resolver(&["a", "b"]));
    let on_a = connect(&target, "a~vm1").await;
    on_a.write_at(0, Bytes::from_static(b"on a"), WriteOpts::default())
        .await
        .unwrap();
    // The same identity on another export: both connections stay.
    let on_b = connect(&target, "b~vm1").await;
    on_b.write_at(0, Bytes::from_static(b"on b"), WriteOpts::default())
        .await
        .unwrap();
    assert_eq!(&on_a.read_at(0, 4).await.unwrap()[..], b"on a");
    assert_eq!(&on_b.read_at(0, 4).await.unwrap()[..], b"on b");
    assert!(on_a.is_connected() && on_b.is_connected());
    assert_eq!(server.stats().connections, 2);

    // The same identity on the same export: the previous connection is closed.
    let again = connect(&target, "a~vm1").await;
    assert_eq!(&again.read_at(0, 4).await.unwrap()[..], b"on a");
    let e = within("the replaced connection fails", async {
        loop {
            match on_a.read_at(0, 4).await {
                Ok(_) => tokio::task::yield_now().await,
                Err(e) => return e,
            }
        }
    })
    .await;
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert_eq!(&on_b.read_at(0, 4).await.unwrap()[..], b"on b");
    assert!(on_b.is_connected());
}
