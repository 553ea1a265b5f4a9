//! The test kit of strata-nbd's tests: servers on loopback, exports, a raw NBD client that
//! speaks the protocol byte by byte (for what a well-behaved client never does), conditions
//! polled with a deadline, and what the process holds (RSS, file descriptors).
#![allow(dead_code)] // each test binary uses its own part of the kit
#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use strata_bdev::{BlockDevice, Capabilities, Geometry, MemDevice, Result, WriteOpts};
use strata_nbd::client::{ClientOptions, Target};
use strata_nbd::codec::{self, opt, rep};
use strata_nbd::{Export, NbdDevice, Server, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Long enough for anything that works; a failure to finish within it is a hang.
pub const LIMIT: Duration = Duration::from_secs(30);

pub fn export(name: &str, device: Arc<dyn BlockDevice>, read_only: bool) -> Export {
    Export {
        name: name.to_string(),
        description: format!("test export {name}"),
        device,
        read_only,
        transactions: None,
    }
}

pub fn mem(size: u64) -> Arc<dyn BlockDevice> {
    Arc::new(MemDevice::new("m", size))
}

/// Which calls of a [`Gated`] device wait at its gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Every write.
    Writes,
    /// The first read that touches the first 4 KiB.
    FirstRead,
}

/// A memory device whose held calls wait for a permit of `gate`, which the test gives.
#[derive(Debug)]
pub struct Gated {
    pub inner: MemDevice,
    hold: Hold,
    pub gate: Semaphore,
    /// Held calls that reached the gate, and that passed it and returned.
    pub arrived: AtomicUsize,
    pub returned: AtomicUsize,
}

impl Gated {
    pub fn new(size: u64, hold: Hold) -> Arc<Gated> {
        Arc::new(Gated {
            inner: MemDevice::new("gated", size),
            hold,
            gate: Semaphore::new(0),
            arrived: AtomicUsize::new(0),
            returned: AtomicUsize::new(0),
        })
    }

    pub fn arrived(&self) -> usize {
        self.arrived.load(Ordering::SeqCst)
    }

    pub fn returned(&self) -> usize {
        self.returned.load(Ordering::SeqCst)
    }

    async fn held<T>(&self, call: impl Future<Output = T>) -> T {
        self.gate.acquire().await.expect("gate open").forget();
        let r = call.await;
        self.returned.fetch_add(1, Ordering::SeqCst);
        r
    }
}

#[async_trait]
impl BlockDevice for Gated {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let held = self.hold == Hold::FirstRead && offset < 4096;
        if held && self.arrived.fetch_add(1, Ordering::SeqCst) == 0 {
            return self.held(self.inner.read_at(offset, len)).await;
        }
        self.inner.read_at(offset, len).await
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        if self.hold == Hold::Writes {
            self.arrived.fetch_add(1, Ordering::SeqCst);
            return self.held(self.inner.write_at(offset, data, opts)).await;
        }
        self.inner.write_at(offset, data, opts).await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
}

/// A server on a free loopback port.
pub async fn tcp_server(config: ServerConfig, exports: Vec<Export>) -> (Arc<Server>, Target) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    let server = Server::new(config, exports);
    tokio::spawn(server.clone().serve_tcp(listener));
    (server, Target::Tcp(addr.to_string()))
}

/// The address of a TCP target.
pub fn addr(target: &Target) -> SocketAddr {
    match target {
        Target::Tcp(a) => a.parse().expect("a socket address"),
        Target::Unix(_) => panic!("a TCP target expected"),
    }
}

pub async fn connect(target: &Target, name: &str) -> NbdDevice {
    NbdDevice::connect(target, name, &ClientOptions::default())
        .await
        .expect("connect")
}

/// Wait until `cond` holds, polling it; panics naming `what` if it does not within [`LIMIT`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `fut`, or a panic naming `what` if it takes longer than [`LIMIT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {LIMIT:?}"))
}

/// The resident set size of this process, in bytes.
pub fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib << 10
}

/// File descriptors this process has open.
/// The connections the server listening on `port` still holds open: sockets on its port in
/// the kernel's table that are established or closed by their client only (a socket the server
/// closed is in another state, or gone). Other tests running meanwhile do not change it.
pub fn server_sockets(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            // 01 ESTABLISHED, 08 CLOSE_WAIT.
            local_port == Some(port) && matches!(fields.get(3), Some(&"01" | &"08"))
        })
        .count()
}

/// A request header as bytes (a WRITE's payload follows it).
pub fn request(command: u16, cookie: u64, offset: u64, length: u32) -> BytesMut {
    let mut b = BytesMut::new();
    codec::encode_request(
        &mut b,
        &codec::Request {
            flags: 0,
            command,
            cookie,
            offset,
            length,
        },
    );
    b
}

/// A raw NBD client: negotiation and requests spelled out, replies read as they come.
pub struct Raw<S> {
    pub s: S,
}

impl Raw<TcpStream> {
    /// Connect to `addr` and read the greeting; nothing more.
    pub async fn greeted(addr: SocketAddr) -> Raw<TcpStream> {
        let mut r = Raw {
            s: TcpStream::connect(addr).await.expect("connect"),
        };
        r.greeting().await;
        r
    }

    /// Connect with a receive buffer of `bytes` (the kernel's own sizing can hold tens of MB
    /// of replies a client does not read), read the greeting and negotiate `export`.
    pub async fn open_with_receive_buffer(
        addr: SocketAddr,
        export: &str,
        bytes: u32,
    ) -> Raw<TcpStream> {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        let mut r = Raw {
            s: socket.connect(addr).await.expect("connect"),
        };
        r.greeting().await;
        r.go(export, false).await;
        r
    }

    /// Connect and negotiate `export` with `NBD_OPT_GO` (structured replies and
    /// `base:allocation` when `structured`).
    pub async fn open(addr: SocketAddr, export: &str, structured: bool) -> Raw<TcpStream> {
        let mut r = Raw::greeted(addr).await;
        r.go(export, structured).await;
        r
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    pub async fn greeting(&mut self) {
        let mut greeting = [0u8; 18];
        self.s.read_exact(&mut greeting).await.expect("greeting");
        codec::decode_greeting(&greeting).expect("a valid greeting");
        let flags = codec::client_flags::FIXED_NEWSTYLE | codec::client_flags::NO_ZEROES;
        self.s.write_u32(flags).await.expect("client flags");
    }

    pub async fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = BytesMut::new();
        codec::encode_option(&mut b, option, data);
        self.s.write_all(&b).await.expect("send an option");
    }

    /// One option reply: its type and data.
    pub async fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; codec::OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h).await.expect("option reply");
        let h = codec::decode_option_reply_header(&h).expect("a valid option reply");
        let mut data = vec![0u8; h.len as usize];
        self.s
            .read_exact(&mut data)
            .await
            .expect("option reply data");
        (h.reply_type, data)
    }

    /// Replies to one option up to its ACK; panics on an error reply.
    pub async fn acked(&mut self) {
        loop {
            let (t, data) = self.option_reply().await;
            assert!(
                !rep::is_error(t),
                "option refused: {}",
                String::from_utf8_lossy(&data)
            );
            if t == rep::ACK {
                return;
            }
        }
    }

    pub async fn go(&mut self, export: &str, structured: bool) {
        if structured {
            self.option(opt::STRUCTURED_REPLY, &[]).await;
            self.acked().await;
            let meta = codec::encode_meta_request(&codec::MetaRequest {
                export: export.to_string(),
                queries: vec![codec::BASE_ALLOCATION.to_string()],
            });
            self.option(opt::SET_META_CONTEXT, &meta).await;
            self.acked().await;
        }
        let go = codec::encode_info_request(&codec::InfoRequest {
            name: export.to_string(),
            requests: vec![codec::info::BLOCK_SIZE],
        });
        self.option(opt::GO, &go).await;
        self.acked().await;
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("send");
    }

    /// A simple reply: its error and cookie (no payload read).
    pub async fn simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; codec::SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut h).await.expect("a reply");
        match codec::decode_reply_header(&h).expect("a valid reply header") {
            Some((codec::ReplyHeader::Simple { error, cookie }, _)) => (error, cookie),
            other => panic!("a simple reply expected, got {other:?}"),
        }
    }
}
