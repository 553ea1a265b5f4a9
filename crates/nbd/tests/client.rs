//! The NBD client against the Strata server, in process: the block-device conformance suite over
//! TCP and over a unix socket (server and client end to end), and what a user of the client
//! notices when things go wrong: unknown exports, read-only exports, device errors from the
//! server, a server that goes away, and slow replies.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use strata_bdev::conformance::{self, Expect};
use strata_bdev::fault::{Action, Op, Rule};
use strata_bdev::{
    BlockDevice, Bytes, Capabilities, ErrorKind, Extent, FaultDevice, Geometry, MemDevice,
    Registry, Result, WriteOpts, ZeroOpts,
};
use strata_nbd::client::{ClientOptions, Target};
use strata_nbd::{NbdDevice, NbdOpener, Server, ServerConfig};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::task::JoinHandle;

mod common;
use common::{connect, export, mem, tcp_server, wait_until, Gated, Hold, LIMIT};

/// A fresh export per device the suite asks for, all served by one server.
async fn conformance_over(server: Arc<Server>, target: Target) {
    let n = AtomicUsize::new(0);
    conformance::run(Expect::default(), |size| {
        let name = format!("c{}", n.fetch_add(1, Ordering::Relaxed));
        server.add_export(export(&name, mem(size), false));
        let target = target.clone();
        async move {
            let dev = connect(&target, &name).await;
            let caps = dev.capabilities();
            assert!(caps.block_status && caps.trim && caps.fua && caps.fast_zero);
            Arc::new(dev) as Arc<dyn BlockDevice>
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_over_tcp() {
    let (server, target) = tcp_server(ServerConfig::default(), vec![]).await;
    conformance_over(server, target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_over_a_unix_socket() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let server = Server::new(ServerConfig::default(), vec![]);
    tokio::spawn(server.clone().serve_unix(listener));
    conformance_over(server, Target::Unix(path)).await;
}

/// A memory device with a 4 KiB minimum block size.
#[derive(Debug)]
struct Aligned(MemDevice);

#[async_trait]
impl BlockDevice for Aligned {
    fn geometry(&self) -> Geometry {
        Geometry {
            block_size: 4096,
            ..self.0.geometry()
        }
    }

    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        strata_bdev::check_io(self.geometry(), "read", offset, len as u64)?;
        self.0.read_at(offset, len).await
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        strata_bdev::check_io(self.geometry(), "write", offset, data.len() as u64)?;
        self.0.write_at(offset, data, opts).await
    }

    async fn flush(&self) -> Result<()> {
        self.0.flush().await
    }

    async fn trim(&self, offset: u64, len: u64, opts: WriteOpts) -> Result<()> {
        strata_bdev::check_io(self.geometry(), "trim", offset, len)?;
        self.0.trim(offset, len, opts).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        strata_bdev::check_io(self.geometry(), "write zeroes", offset, len)?;
        self.0.write_zeroes(offset, len, opts).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        strata_bdev::check_io(self.geometry(), "query block status", offset, len)?;
        self.0.block_status(offset, len).await
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.0.cache(offset, len).await
    }
}

/// The server's minimum block size and maximum payload reach the client: requests are aligned
/// and large I/O is split.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_sizes_are_honoured_and_large_io_is_split() {
    let config = ServerConfig {
        max_payload: 64 << 10,
        ..ServerConfig::default()
    };
    let (server, target) = tcp_server(config, vec![]).await;
    let n = AtomicUsize::new(0);
    conformance::run(Expect::default(), |size| {
        let name = format!("a{}", n.fetch_add(1, Ordering::Relaxed));
        let dev: Arc<dyn BlockDevice> = Arc::new(Aligned(MemDevice::new("a", size)));
        server.add_export(export(&name, dev, false));
        let target = target.clone();
        async move {
            let dev = connect(&target, &name).await;
            assert_eq!(dev.geometry().block_size, 4096);
            Arc::new(dev) as Arc<dyn BlockDevice>
        }
    })
    .await;

    // 3 MiB through a 64 KiB maximum payload: 48 requests each way.
    let big: Arc<dyn BlockDevice> = Arc::new(Aligned(MemDevice::new("big", 8 << 20)));
    server.add_export(export("big", big, false));
    let dev = connect(&target, "big").await;
    let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
    dev.write_at(4096, Bytes::from(data.clone()), WriteOpts { fua: true })
        .await
        .expect("split write");
    let back = dev.read_at(4096, 3 << 20).await.expect("split read");
    assert!(back[..] == data[..], "a split read returns the split write");
    let e = dev
        .write_at(1, Bytes::from_static(b"x"), WriteOpts::default())
        .await
        .expect_err("unaligned");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
}

#[tokio::test]
async fn an_unknown_export_is_named_in_the_error() {
    let (_server, target) = tcp_server(ServerConfig::default(), vec![]).await;
    let e = NbdDevice::connect(&target, "nosuch", &ClientOptions::default())
        .await
        .expect_err("no such export");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let msg = e.to_string();
    assert!(
        msg.contains("export \"nosuch\" not found on 127.0.0.1:"),
        "{msg}"
    );
}

#[tokio::test]
async fn connection_refused_names_the_address() {
    // Bind and drop a listener: its port is (almost certainly) free and refuses connections.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    drop(listener);
    let e = NbdDevice::connect(&Target::Tcp(addr.clone()), "x", &ClientOptions::default())
        .await
        .expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(e.to_string().contains(&addr), "{e}");
}

#[tokio::test]
async fn a_read_only_export_refuses_writes() {
    let dev = mem(1 << 20);
    dev.write_at(0, Bytes::from_static(b"kept"), WriteOpts::default())
        .await
        .expect("seed");
    let (_server, target) =
        tcp_server(ServerConfig::default(), vec![export("ro", dev, true)]).await;
    let dev = connect(&target, "ro").await;
    assert!(dev.capabilities().read_only);
    assert_eq!(dev.description(), Some("test export ro"));
    let refused = [
        dev.write_at(0, Bytes::from_static(b"gone"), WriteOpts::default())
            .await,
        dev.write_zeroes(0, 4096, ZeroOpts::default()).await,
        dev.trim(0, 4096, WriteOpts::default()).await,
    ];
    for r in refused {
        assert_eq!(
            r.expect_err("read-only").kind(),
            ErrorKind::PermissionDenied
        );
    }
    assert_eq!(&dev.read_at(0, 4).await.expect("read")[..], b"kept");
}

#[tokio::test]
async fn device_errors_cross_the_wire_with_the_servers_message() {
    let (fault, handle) = FaultDevice::new(mem(1 << 20));
    handle.add(Rule::fail(Op::Write, ErrorKind::NoSpace));
    handle.add(Rule::fail(Op::Flush, ErrorKind::Unsupported));
    let (_server, target) = tcp_server(
        ServerConfig::default(),
        vec![export("full", Arc::new(fault), false)],
    )
    .await;
    let dev = connect(&target, "full").await;
    let e = dev
        .write_at(4096, Bytes::from(vec![1u8; 4096]), WriteOpts::default())
        .await
        .expect_err("no space");
    assert_eq!(e.kind(), ErrorKind::NoSpace);
    let msg = e.to_string();
    assert!(
        msg.contains("write 4096 bytes at offset 4096") && msg.contains("ENOSPC"),
        "{msg}"
    );
    assert!(
        msg.contains("injected fault"),
        "the server's message: {msg}"
    );
    assert_eq!(
        dev.flush().await.expect_err("flush").kind(),
        ErrorKind::Unsupported
    );
    // The connection is fine: reads still work.
    assert!(dev
        .read_at(0, 4096)
        .await
        .expect("read")
        .iter()
        .all(|&b| b == 0));
}

/// A TCP proxy in front of `upstream` that the test can cut, like a network failure or a
/// crashed server host: both sockets close at once.
async fn proxy(upstream: &Target) -> (Target, JoinHandle<()>) {
    let Target::Tcp(upstream) = upstream.clone() else {
        panic!("TCP upstream expected");
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let task = tokio::spawn(async move {
        let (mut client, _) = listener.accept().await.expect("accept");
        let mut server = TcpStream::connect(upstream)
            .await
            .expect("connect upstream");
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    });
    (Target::Tcp(addr.to_string()), task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_connection_fails_in_flight_and_later_requests() {
    let (fault, handle) = FaultDevice::new(mem(1 << 20));
    // Reads never complete on the server: they stay in flight until the connection dies.
    handle.add(Rule {
        ops: vec![Op::Read],
        range: None,
        action: Action::Hang,
        remaining: None,
    });
    let (_server, upstream) = tcp_server(
        ServerConfig::default(),
        vec![export("e", Arc::new(fault), false)],
    )
    .await;
    let (target, cut) = proxy(&upstream).await;
    let dev = Arc::new(connect(&target, "e").await);
    let reads: Vec<_> = (0..8)
        .map(|i| {
            let dev = dev.clone();
            tokio::spawn(async move { dev.read_at(i * 4096, 4096).await })
        })
        .collect();
    // Wait until the server holds every read (a condition, polled; not a fixed delay).
    wait_until("the reads reach the server", || handle.fired() >= 8).await;

    cut.abort();
    for r in reads {
        let e = tokio::time::timeout(LIMIT, r)
            .await
            .expect("an in-flight read fails promptly")
            .expect("task")
            .expect_err("the connection is gone");
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.to_string().contains("was lost"), "{e}");
    }
    let e = tokio::time::timeout(
        LIMIT,
        dev.write_at(0, Bytes::from_static(b"x"), WriteOpts::default()),
    )
    .await
    .expect("a later write fails promptly")
    .expect_err("the connection is gone");
    assert_eq!(e.kind(), ErrorKind::Io);
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("connection to nbd://{target}/e was lost")),
        "{msg}"
    );
    assert!(!dev.is_connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_shutdown_finishes_in_flight_requests_then_fails_later_ones() {
    let (fault, handle) = FaultDevice::new(mem(1 << 20));
    handle.add(Rule {
        ops: vec![Op::Write],
        range: None,
        action: Action::Delay(Duration::from_millis(200)),
        remaining: None,
    });
    let (server, target) = tcp_server(
        ServerConfig::default(),
        vec![export("e", Arc::new(fault), false)],
    )
    .await;
    let dev = Arc::new(connect(&target, "e").await);
    let write = {
        let dev = dev.clone();
        tokio::spawn(async move {
            dev.write_at(0, Bytes::from_static(b"last words"), WriteOpts::default())
                .await
        })
    };
    wait_until("the write reaches the server", || handle.fired() >= 1).await;
    tokio::time::timeout(LIMIT, server.shutdown())
        .await
        .expect("the server shuts down");
    // The server drains what it had read before closing.
    tokio::time::timeout(LIMIT, write)
        .await
        .expect("the in-flight write completes")
        .expect("task")
        .expect("the server finished the write it had");
    let e = tokio::time::timeout(LIMIT, dev.read_at(0, 10))
        .await
        .expect("a later read fails promptly")
        .expect_err("the server is gone");
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(e.to_string().contains("was lost"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_times_out_and_the_connection_survives() {
    let held = Gated::new(1 << 20, Hold::FirstRead);
    held.inner
        .write_at(0, Bytes::from_static(b"late"), WriteOpts::default())
        .await
        .expect("seed");
    let (_server, target) = tcp_server(
        ServerConfig::default(),
        vec![export("slow", held.clone(), false)],
    )
    .await;
    let options = ClientOptions {
        request_timeout: Some(Duration::from_millis(100)),
        ..ClientOptions::default()
    };
    let dev = NbdDevice::connect(&target, "slow", &options)
        .await
        .expect("connect");
    let e = dev.read_at(0, 4096).await.expect_err("too slow");
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    wait_until("the held read reaches the device", || held.arrived() >= 1).await;
    // Elsewhere the device answers at once.
    dev.write_at(8192, Bytes::from_static(b"fine"), WriteOpts::default())
        .await
        .expect("write");
    assert_eq!(&dev.read_at(8192, 4).await.expect("read")[..], b"fine");

    // Let the held read finish: the server queues its late reply before anything it reads
    // afterwards, so by the time a request sent now is answered, the late reply has arrived.
    held.gate.add_permits(1);
    wait_until("the held read returns", || held.returned() == 1).await;
    let mut later = Vec::new();
    for _ in 0..10 {
        later.push(
            dev.read_at(8192, 4)
                .await
                .expect("read after the late reply"),
        );
    }
    assert!(
        later.iter().all(|b| &b[..] == b"fine"),
        "the late reply (\"late\") was not taken for another request's: {later:?}"
    );
    assert_eq!(&dev.read_at(0, 4).await.expect("read again")[..], b"late");
    assert!(dev.is_connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_opener_serves_both_uri_schemes() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("s.sock");
    let server = Server::new(
        ServerConfig::default(),
        vec![export("disk", mem(1 << 20), false)],
    );
    tokio::spawn(
        server
            .clone()
            .serve_unix(UnixListener::bind(&path).expect("bind")),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(server.clone().serve_tcp(listener));

    let mut registry = Registry::with_builtin();
    let opener = Arc::new(NbdOpener::default());
    registry.register("nbd", opener.clone());
    registry.register("nbd+unix", opener);

    let a = registry
        .open(&format!("nbd://127.0.0.1:{port}/disk?timeout=30"))
        .await
        .expect("open over TCP");
    a.write_at(0, Bytes::from_static(b"shared"), WriteOpts { fua: true })
        .await
        .expect("write");
    let b = registry
        .open(&format!("nbd+unix:///disk?socket={}", path.display()))
        .await
        .expect("open over a unix socket");
    assert_eq!(&b.read_at(0, 6).await.expect("read")[..], b"shared");
    assert_eq!(b.geometry().size, 1 << 20);

    let e = registry
        .open(&format!("nbd://127.0.0.1:{port}/disk?colour=blue"))
        .await
        .expect_err("unknown key");
    assert!(e.to_string().contains("unknown option \"colour\""), "{e}");
}
