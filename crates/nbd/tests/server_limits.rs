//! Server limits: the per-connection in-flight byte budget stops reading a client whose writes
//! the device has not finished, and releasing the device completes every write.

#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use strata_bdev::{BlockDevice, Bytes, Capabilities, Geometry, MemDevice, Result, WriteOpts};
use strata_nbd::codec::{self, cmd, opt, rep};
use strata_nbd::{Export, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod common;
use common::{wait_until, Gated, Hold, Raw};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_budget_applies_backpressure_and_loses_nothing() {
    const MIB: usize = 1 << 20;
    const WRITES: usize = 64;
    let device = Gated::new((WRITES * MIB) as u64, Hold::Writes);
    let config = ServerConfig {
        max_in_flight_bytes: MIB,
        max_payload: MIB as u32,
        ..ServerConfig::default()
    };
    let server = Server::new(
        config,
        vec![Export {
            name: "g".into(),
            description: String::new(),
            device: device.clone(),
            read_only: false,
            transactions: None,
        }],
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server.clone().serve_tcp(listener));
    let s = Raw::open(addr, "g", false).await.s;
    let (mut rd, mut wr) = s.into_split();

    // Send 64 MiB of writes while the device accepts none: the server must stop reading after
    // its 1 MiB budget, so the sender blocks once the socket buffers are full.
    let sender = tokio::spawn(async move {
        let mut sent = 0usize;
        for i in 0..WRITES {
            let mut b = BytesMut::new();
            codec::encode_request(
                &mut b,
                &codec::Request {
                    flags: 0,
                    command: cmd::WRITE,
                    cookie: i as u64,
                    offset: (i * MIB) as u64,
                    length: MIB as u32,
                },
            );
            b.extend_from_slice(&vec![i as u8 + 1; MIB]);
            wr.write_all(&b).await.unwrap();
            sent += 1;
        }
        (sent, wr)
    });
    // The server says when it stops reading the connection: from then on, nothing it could
    // read would reach the device until a write completes.
    wait_until(
        "the server stops reading the connection, or has read all of it",
        || server.stats().paused_connections == 1 || sender.is_finished(),
    )
    .await;
    assert!(
        !sender.is_finished(),
        "the server read 64 MiB of writes it could not process: no backpressure"
    );
    let stats = server.stats();
    assert_eq!(
        (stats.requests_in_flight, stats.bytes_in_flight),
        (1, MIB),
        "{stats:?}"
    );
    // The budget is one payload, so exactly one write reached the device.
    assert_eq!(device.arrived(), 1, "writes past the budget were not read");

    // Open the device: every write completes and is acknowledged.
    device.gate.add_permits(WRITES);
    let (sent, _wr) = tokio::time::timeout(Duration::from_secs(60), sender)
        .await
        .expect("sender unblocks")
        .unwrap();
    assert_eq!(sent, WRITES);
    let mut acked = std::collections::HashSet::new();
    for _ in 0..WRITES {
        let mut h = [0u8; 16];
        tokio::time::timeout(Duration::from_secs(60), rd.read_exact(&mut h))
            .await
            .expect("reply")
            .unwrap();
        assert_eq!(&h[4..8], &[0, 0, 0, 0], "write succeeded");
        acked.insert(u64::from_be_bytes(h[8..16].try_into().unwrap()));
    }
    assert_eq!(acked.len(), WRITES);
    for i in 0..WRITES {
        let data = device.read_at((i * MIB) as u64, MIB).await.unwrap();
        assert!(data.iter().all(|&b| b == i as u8 + 1), "write {i} landed");
    }
}

/// A memory device that asks for `block` -byte aligned I/O.
#[derive(Debug)]
struct Aligned {
    inner: MemDevice,
    block: u32,
}

#[async_trait]
impl BlockDevice for Aligned {
    fn geometry(&self) -> Geometry {
        Geometry {
            block_size: self.block,
            optimal_io_size: self.block.max(4096),
            ..self.inner.geometry()
        }
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.inner.read_at(offset, len).await
    }
    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        self.inner.write_at(offset, data, opts).await
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
}

/// A client that does not ask for block sizes (the Linux kernel's nbd-client, for one) gets an
/// export with 512-byte blocks — the alignment every client keeps to — and is refused one
/// that needs more, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_without_block_sizes_is_refused_only_beyond_512_bytes() {
    for (block, served) in [(512u32, true), (4096, false)] {
        let device = Arc::new(Aligned {
            inner: MemDevice::new("a", 1 << 20),
            block,
        });
        let (_server, target) = common::tcp_server(
            ServerConfig::default(),
            vec![common::export("g", device, false)],
        )
        .await;
        let addr = common::addr(&target);
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await.unwrap();
        s.write_u32(codec::client_flags::FIXED_NEWSTYLE | codec::client_flags::NO_ZEROES)
            .await
            .unwrap();
        let mut b = BytesMut::new();
        let go = codec::encode_info_request(&codec::InfoRequest {
            name: "g".into(),
            requests: vec![],
        });
        codec::encode_option(&mut b, opt::GO, &go);
        s.write_all(&b).await.unwrap();
        let last = loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).await.unwrap();
            let h = codec::decode_option_reply_header(&h).unwrap();
            let mut data = vec![0u8; h.len as usize];
            s.read_exact(&mut data).await.unwrap();
            if h.reply_type != rep::INFO {
                break (h.reply_type, String::from_utf8_lossy(&data).into_owned());
            }
        };
        if served {
            assert_eq!(last.0, rep::ACK, "{block}-byte blocks: {}", last.1);
        } else {
            assert_eq!(last.0, rep::ERR_BLOCK_SIZE_REQD, "{block}-byte blocks");
            assert!(last.1.contains("4096-byte aligned"), "{}", last.1);
        }
    }
}
