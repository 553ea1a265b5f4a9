//! A client that pipelines millions of requests without payload (FLUSH) and never reads a reply
//! holds a bounded amount of the server's memory, and gives it all back when it goes. Alone in
//! its binary: it measures the process's resident set size.
#![allow(clippy::unwrap_used)] // test: a failed step is a failed test

use strata_nbd::codec::cmd;
use strata_nbd::ServerConfig;
use tokio::io::AsyncWriteExt;

mod common;
use common::{addr, export, mem, request, rss, tcp_server, wait_until, within, Raw};

/// Flushes sent: 56 MB of requests; held as replies, tens of bytes each, they would be
/// hundreds of MB.
const FLUSHES: usize = 2_000_000;
/// What the server may grow by while the client floods it: generous against the few MB its
/// budget lets it hold.
const GROWTH: u64 = 64 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_pipelined_flushes_hold_bounded_memory() {
    let (server, target) = tcp_server(
        ServerConfig::default(),
        vec![export("f", mem(1 << 20), false)],
    )
    .await;
    let raw = Raw::open_with_receive_buffer(addr(&target), "f", 64 << 10).await;
    let before = rss();

    // One batch of requests, sent again and again: what the client holds does not grow.
    let mut batch = Vec::new();
    for i in 0..4096u64 {
        batch.extend_from_slice(&request(cmd::FLUSH, i, 0, 0));
    }
    let (rd, mut wr) = raw.s.into_split();
    let sender = tokio::spawn(async move {
        for _ in 0..FLUSHES / 4096 {
            wr.write_all(&batch).await.unwrap();
        }
        wr
    });
    wait_until(
        "the server stops reading the flood, or has read all of it",
        || server.stats().paused_connections == 1 || sender.is_finished(),
    )
    .await;
    let stats = server.stats();
    let grown = rss().saturating_sub(before);
    assert!(
        !sender.is_finished(),
        "the server read all {FLUSHES} flushes of a client that reads no replies ({} MiB more \
         resident)",
        grown >> 20
    );
    assert!(
        stats.requests_in_flight <= ServerConfig::default().max_in_flight_requests,
        "{stats:?}"
    );
    eprintln!("{stats:?}; {} MiB more resident", grown >> 20);
    assert!(
        grown < GROWTH,
        "the server grew by {} MiB for a client that reads no replies (at most {} MiB)",
        grown >> 20,
        GROWTH >> 20
    );

    // The client goes: everything it held is given back.
    sender.abort();
    drop(rd);
    wait_until("the connection's requests are given back", || {
        let s = server.stats();
        s.connections == 0 && s.requests_in_flight == 0 && s.bytes_in_flight == 0
    })
    .await;
    assert_eq!(server.stats().paused_connections, 0);
    let grown = rss().saturating_sub(before);
    assert!(
        grown < GROWTH,
        "{} MiB still held after the client left",
        grown >> 20
    );
    within("the server shuts down", server.shutdown()).await;
}
