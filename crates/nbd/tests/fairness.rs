//! Two clients pipelining hundreds of BLOCK_STATUS requests over 4 GiB each, against a device
//! that spends CPU per page it reports on (as a page store does), do not stall a third client
//! reading another export. The server runs on a runtime of two workers, as the daemon does on
//! a two-core machine.
#![allow(clippy::unwrap_used)] // test: a failed step is a failed test

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use strata_bdev::{BlockDevice, Bytes, Capabilities, Extent, Geometry, Result, WriteOpts};
use strata_nbd::codec::{self, cmd};
use strata_nbd::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{addr, connect, export, mem, request, tcp_server, within, Raw};

/// CPU a block status query costs per 4 GiB it covers: what a page store measured here
/// (19 ms on an empty image).
const COST_PER_4G: Duration = Duration::from_millis(20);
/// Requests each flooding client pipelines.
const FLOOD: usize = 400;
/// What a 4 KiB read of the other export may take meanwhile: generous (it takes well under a
/// millisecond on an idle machine).
const READ_BOUND: Duration = Duration::from_secs(1);

/// An empty device of 64 GiB whose block status spends CPU in proportion to the range it
/// covers, on the calling thread.
#[derive(Debug)]
struct Walking {
    calls: AtomicUsize,
}

#[async_trait]
impl BlockDevice for Walking {
    fn geometry(&self) -> Geometry {
        Geometry {
            size: 64 << 30,
            block_size: 512,
            optimal_io_size: 4096,
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            block_status: true,
            ..Capabilities::default()
        }
    }

    async fn read_at(&self, _offset: u64, len: usize) -> Result<Bytes> {
        Ok(Bytes::from(vec![0u8; len]))
    }

    async fn write_at(&self, _offset: u64, _data: Bytes, _opts: WriteOpts) -> Result<()> {
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn block_status(&self, _offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let cost = COST_PER_4G.mul_f64(len as f64 / (4u64 << 30) as f64);
        let start = Instant::now();
        while start.elapsed() < cost {
            std::hint::spin_loop();
        }
        Ok(vec![Extent::hole(len)])
    }
}

/// Pipeline `FLOOD` block status queries of almost 4 GiB on one connection, then read every
/// reply.
async fn flood(addr: std::net::SocketAddr) {
    let raw = Raw::open(addr, "walk", true).await;
    let (mut rd, mut wr) = raw.s.into_split();
    let reader = tokio::spawn(async move {
        for _ in 0..FLOOD {
            let mut h = [0u8; codec::STRUCTURED_REPLY_LEN];
            rd.read_exact(&mut h).await.unwrap();
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut payload = vec![0u8; len as usize];
            rd.read_exact(&mut payload).await.unwrap();
        }
    });
    let mut batch = Vec::new();
    for i in 0..FLOOD {
        let length = u32::MAX - 511;
        batch.extend_from_slice(&request(cmd::BLOCK_STATUS, i as u64, 0, length));
    }
    wr.write_all(&batch).await.unwrap();
    reader.await.unwrap();
}

#[test]
fn block_status_floods_do_not_stall_another_export() {
    let walking = Arc::new(Walking {
        calls: AtomicUsize::new(0),
    });
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (server, target) = server_rt.block_on(tcp_server(
        ServerConfig::default(),
        vec![
            export("walk", walking.clone(), true),
            export("disk", mem(1 << 20), false),
        ],
    ));
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    client_rt.block_on(async {
        let probe = connect(&target, "disk").await;
        probe
            .write_at(0, Bytes::from_static(b"probe"), WriteOpts::default())
            .await
            .unwrap();
        let floods = [
            tokio::spawn(flood(addr(&target))),
            tokio::spawn(flood(addr(&target))),
        ];
        let mut slowest = Duration::ZERO;
        let mut reads = 0;
        while floods.iter().any(|f| !f.is_finished()) {
            let start = Instant::now();
            let data = within("a read of the other export", probe.read_at(0, 4096)).await;
            slowest = slowest.max(start.elapsed());
            assert_eq!(&data.unwrap()[..5], b"probe");
            reads += 1;
        }
        for f in floods {
            f.await.unwrap();
        }
        let calls = walking.calls.load(Ordering::Relaxed);
        eprintln!(
            "{reads} reads while {calls} block status calls ran; the slowest took {slowest:?}"
        );
        assert!(
            calls >= 2 * FLOOD,
            "every query reached the device: {calls}"
        );
        assert!(
            slowest < READ_BOUND,
            "a 4 KiB read of another export took {slowest:?} while two clients flooded the \
             server with block status queries (at most {READ_BOUND:?})"
        );
    });
    server_rt.block_on(within("the server shuts down", server.shutdown()));
}
