//! Connection slots: idle connections give way when the server is full, one peer cannot take
//! every slot, and clients that connect and never negotiate cannot keep others out. What the
//! server holds is measured in its counters and in this process's open file descriptors.
#![allow(clippy::unwrap_used)] // test: a failed step is a failed test

use std::net::SocketAddr;
use std::time::Duration;

use strata_bdev::{BlockDevice, Bytes, WriteOpts};
use strata_nbd::codec::cmd;
use strata_nbd::ServerConfig;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

mod common;
use common::{
    addr, connect, export, mem, request, server_sockets, tcp_server, wait_until, within, Raw,
};

/// A connection to `to` from the loopback address `from` (127.0.0.0/8 is all loopback: each
/// address is another peer to the server).
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Whether the server closed `s` (after whatever it had sent).
async fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return true,
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_give_way_when_the_server_is_full() {
    let config = ServerConfig {
        max_connections: 4,
        idle_timeout: Duration::from_millis(500),
        ..ServerConfig::default()
    };
    let (server, target) = tcp_server(config, vec![export("d", mem(1 << 20), false)]).await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(Raw::open(addr(&target), "d", false).await);
    }
    assert_eq!(server.stats().connections, 4);
    // A fifth client: served once an idle connection has been idle long enough to give way.
    let fifth = within("a fifth client is served", connect(&target, "d")).await;
    fifth
        .write_at(0, Bytes::from_static(b"in"), WriteOpts::default())
        .await
        .unwrap();
    let stats = server.stats();
    assert!(stats.reclaimed >= 1 && stats.connections <= 4, "{stats:?}");
    // The one idle longest gave way: its client sees the connection end.
    assert!(within("the idlest connection is closed", closed(&mut idle[0].s)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_take_every_slot() {
    let config = ServerConfig {
        max_connections: 8,
        max_connections_per_peer: 2,
        ..ServerConfig::default()
    };
    let (server, target) = tcp_server(config, vec![export("d", mem(1 << 20), false)]).await;
    let to = addr(&target);
    let _one = Raw::open(to, "d", false).await;
    let _two = Raw::open(to, "d", false).await;
    // A third from the same address is closed at once, unanswered.
    let mut third = connect_from("127.0.0.1", to).await;
    let mut greeting = [0u8; 18];
    let r = within(
        "the third connection is closed",
        third.read_exact(&mut greeting),
    )
    .await;
    assert!(
        r.is_err(),
        "the third connection of one peer got a greeting"
    );
    assert_eq!(server.stats().refused, 1);
    // Another peer is served.
    let mut other = Raw {
        s: connect_from("127.0.0.2", to).await,
    };
    within("another peer is served", async {
        other.greeting().await;
        other.go("d", false).await;
    })
    .await;
    assert_eq!(server.stats().connections, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_cannot_keep_others_out() {
    let config = ServerConfig {
        max_connections: 8,
        ..ServerConfig::default()
    };
    let (server, target) = tcp_server(config, vec![export("d", mem(1 << 20), false)]).await;
    let to = addr(&target);
    // As many clients as the server has slots connect and never negotiate.
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(Raw::greeted(to).await);
    }
    wait_until("the server holds at most half its slots for them", || {
        server.stats().negotiating <= 4
    })
    .await;
    // A real client is served long before the silent ones' handshake time (60 s) is up.
    let dev = within("a client is served", connect(&target, "d")).await;
    dev.flush().await.unwrap();
    let stats = server.stats();
    assert!(stats.negotiating <= 4 && stats.reclaimed >= 5, "{stats:?}");
    // The server closed the sockets of the silent clients it gave up on: it holds at most
    // 4 of them, and the real client's.
    let held = server_sockets(to.port());
    assert!(held <= 4 + 1, "the server holds {held} connections");
    let mut closed_ones = 0;
    for raw in &mut silent[..4] {
        if within("a silent connection is closed", closed(&mut raw.s)).await {
            closed_ones += 1;
        }
    }
    assert_eq!(closed_ones, 4, "the oldest silent connections were closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peers_silent_connections_do_not_close_anothers() {
    let config = ServerConfig {
        max_connections: 16,
        max_handshakes_per_peer: 2,
        ..ServerConfig::default()
    };
    let (server, target) = tcp_server(config, vec![export("d", mem(1 << 20), false)]).await;
    let to = addr(&target);
    // A client of another peer starts negotiating...
    let mut patient = Raw {
        s: connect_from("127.0.0.2", to).await,
    };
    patient.greeting().await;
    // ...while one peer opens connection after connection and says nothing.
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(Raw::greeted(to).await);
    }
    wait_until("that peer negotiates on at most 2 connections", || {
        server.stats().negotiating <= 3
    })
    .await;
    within(
        "the other peer finishes negotiating",
        patient.go("d", false),
    )
    .await;
    patient.send(&request(cmd::FLUSH, 9, 0, 0)).await;
    assert_eq!(patient.simple_reply().await, (0, 9));
}

#[test]
fn zero_connections_is_refused() {
    let config = ServerConfig {
        max_connections: 0,
        ..ServerConfig::default()
    };
    let e = config.validate().unwrap_err();
    assert_eq!(
        e.to_string(),
        "[nbd] max_connections: must be at least 1 (0 would refuse every client)"
    );
}
