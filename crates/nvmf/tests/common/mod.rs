//! What the NVMe/TCP tests share: a target on a free port, memory devices, a resizable device,
//! polling with a deadline, and a raw-PDU host that speaks the wire format byte by byte.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use strata_bdev::{
    check_io, BlockDevice, Bytes, Capabilities, Geometry, MemDevice, Result, WriteOpts, ZeroOpts,
};
use strata_nvmf::codec::pdu::{
    encode_capsule_cmd, encode_data_header, encode_ic_req, CommonHeader,
};
use strata_nvmf::codec::{
    decode_pdu, digest, pdu_type, property, Command, Completion, Connect, ConnectData, DataHeader,
    Digests, IcReq, IcResp, Limits, Pdu, PduHeader, Role, CONNECT_DATA_LEN,
};
use strata_nvmf::{HostOptions, NvmfDevice, Subsystem, Target, TargetSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Long enough for anything that works; a failure to finish within it is a hang.
pub const LIMIT: Duration = Duration::from_secs(20);

/// The host NQN raw clients use.
pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-000000000001";

pub fn nqn(name: &str) -> String {
    format!("nqn.2026-12.io.strata:{name}")
}

pub fn mem(name: &str, size: u64) -> Arc<MemDevice> {
    Arc::new(MemDevice::new(name, size))
}

/// A target on 127.0.0.1, on a free port.
pub async fn target(settings: TargetSettings) -> (Arc<Target>, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    let t = Target::new(settings).expect("target settings");
    tokio::spawn(t.clone().serve_tcp(listener));
    (t, addr)
}

/// A target at a given address (to start one again where another was).
pub async fn target_at(settings: TargetSettings, addr: SocketAddr) -> Arc<Target> {
    // The previous target's listener closes as its accept loop sees the shutdown.
    let deadline = tokio::time::Instant::now() + LIMIT;
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "bind {addr} again: {e}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let t = Target::new(settings).expect("target settings");
    tokio::spawn(t.clone().serve_tcp(listener));
    t
}

pub fn export(t: &Target, name: &str, dev: Arc<dyn BlockDevice>) -> String {
    let n = nqn(name);
    t.add_subsystem(Subsystem::new(n.clone(), dev))
        .expect("add subsystem");
    n
}

pub async fn host(addr: SocketAddr, nqn: &str, opts: HostOptions) -> NvmfDevice {
    tokio::time::timeout(LIMIT, NvmfDevice::connect(&addr.to_string(), nqn, opts))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// Poll `cond` until it holds, failing the test after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut pause = Duration::from_millis(5);
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

pub fn pattern(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    Bytes::from(
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect::<Vec<u8>>(),
    )
}

/// A memory device whose size can be changed while it is exported.
#[derive(Debug)]
pub struct Resizable {
    inner: MemDevice,
    size: AtomicU64,
}

impl Resizable {
    /// A device of `size` bytes that can grow up to `max`.
    pub fn new(name: &str, size: u64, max: u64) -> Resizable {
        Resizable {
            inner: MemDevice::new(name, max),
            size: AtomicU64::new(size),
        }
    }

    pub fn resize(&self, size: u64) {
        self.size.store(size, Ordering::SeqCst);
    }
}

#[async_trait]
impl BlockDevice for Resizable {
    fn geometry(&self) -> Geometry {
        Geometry {
            size: self.size.load(Ordering::SeqCst),
            ..self.inner.geometry()
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            resize: true,
            ..self.inner.capabilities()
        }
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_io(self.geometry(), "read", offset, len as u64)?;
        self.inner.read_at(offset, len).await
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        check_io(self.geometry(), "write", offset, data.len() as u64)?;
        self.inner.write_at(offset, data, opts).await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u64, opts: WriteOpts) -> Result<()> {
        check_io(self.geometry(), "trim", offset, len)?;
        self.inner.trim(offset, len, opts).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        check_io(self.geometry(), "write zeroes", offset, len)?;
        self.inner.write_zeroes(offset, len, opts).await
    }
}

// ---------------------------------------------------------------------------------------------
// A raw-PDU host

/// A host that builds every PDU itself, to send what a correct host never would.
pub struct Raw {
    pub stream: TcpStream,
    pub digests: Option<Digests>,
    buf: BytesMut,
    next_cid: u16,
}

/// What the controller answered a command with.
#[derive(Debug)]
pub struct Answer {
    pub completion: Completion,
    pub data: Vec<u8>,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Raw {
            stream,
            digests: None,
            buf: BytesMut::new(),
            next_cid: 1,
        }
    }

    pub fn dg(&self) -> Digests {
        self.digests.unwrap_or_default()
    }

    pub async fn send(&mut self, b: &[u8]) {
        self.stream.write_all(b).await.expect("send");
    }

    /// Send, tolerating a peer that already closed.
    pub async fn try_send(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(b).await
    }

    /// The next PDU, within [`LIMIT`].
    pub async fn recv(&mut self) -> Pdu {
        self.try_recv()
            .await
            .expect("a PDU before the connection closed")
    }

    /// The next PDU, or `None` when the controller closed the connection.
    pub async fn try_recv(&mut self) -> Option<Pdu> {
        tokio::time::timeout(LIMIT, async {
            loop {
                let limits = Limits {
                    in_capsule: 0,
                    data_pdu: u32::MAX,
                };
                match decode_pdu(&self.buf, Role::Host, self.digests, limits) {
                    Ok(Some((pdu, n))) => {
                        let _ = self.buf.split_to(n);
                        return Some(pdu);
                    }
                    Ok(None) => {}
                    Err(e) => panic!("the controller sent an invalid PDU: {e}"),
                }
                self.buf.reserve(65536);
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("the controller answers or closes in time")
    }

    /// Expect a C2HTermReq with `fes`, then the connection closed.
    pub async fn expect_termination(&mut self, fes: u16) -> u32 {
        let pdu = self.recv().await;
        let fei = match pdu.header {
            PduHeader::C2HTermReq { fes: got, fei } => {
                assert_eq!(got, fes, "fatal error status of {pdu:?}");
                fei
            }
            other => panic!("expected C2HTermReq, got {other:?}"),
        };
        assert!(
            self.try_recv().await.is_none(),
            "the controller closes the connection after C2HTermReq"
        );
        fei
    }

    /// ICReq/ICResp.
    pub async fn init(&mut self, digests: Digests) -> IcResp {
        let mut b = BytesMut::new();
        encode_ic_req(
            &mut b,
            &IcReq {
                pfv: 0,
                hpda: 0,
                digests,
                maxr2t: 0,
            },
        );
        self.send(&b).await;
        let pdu = self.recv().await;
        match pdu.header {
            PduHeader::IcResp(r) => {
                self.digests = Some(r.digests);
                r
            }
            other => panic!("expected ICResp, got {other:?}"),
        }
    }

    pub fn cid(&mut self) -> u16 {
        self.next_cid = self.next_cid.wrapping_add(1);
        self.next_cid
    }

    /// Encode a command capsule with in-capsule `data`.
    pub fn capsule(&self, cmd: &Command, data: &[u8]) -> Vec<u8> {
        let dg = self.dg();
        let mut b = BytesMut::new();
        encode_capsule_cmd(&mut b, cmd, data.len(), dg);
        b.extend_from_slice(data);
        if dg.data && !data.is_empty() {
            b.extend_from_slice(&digest(data));
        }
        b.to_vec()
    }

    /// Encode an H2CData PDU.
    pub fn h2c_data(&self, cccid: u16, ttag: u16, datao: u32, data: &[u8], last: bool) -> Vec<u8> {
        let dg = self.dg();
        let mut b = BytesMut::new();
        let h = DataHeader {
            cccid,
            ttag,
            datao,
            datal: data.len() as u32,
        };
        let flags = if last {
            strata_nvmf::codec::pdu_flags::LAST_PDU
        } else {
            0
        };
        encode_data_header(&mut b, pdu_type::H2C_DATA, flags, &h, dg, 0);
        b.extend_from_slice(data);
        if dg.data {
            b.extend_from_slice(&digest(data));
        }
        b.to_vec()
    }

    /// Send a command and collect its answer (C2HData, then the response or SUCCESS).
    pub async fn command(&mut self, cmd: Command, data: &[u8]) -> Answer {
        let b = self.capsule(&cmd, data);
        self.send(&b).await;
        self.answer(cmd.cid).await
    }

    /// Collect the answer to command `cid`.
    pub async fn answer(&mut self, cid: u16) -> Answer {
        let mut got = Vec::new();
        loop {
            let pdu = self.recv().await;
            match pdu.header {
                PduHeader::CapsuleResp(c) => {
                    assert_eq!(c.cid, cid, "the response is for the command sent");
                    return Answer {
                        completion: c,
                        data: got,
                    };
                }
                PduHeader::C2HData(d) => {
                    assert_eq!(d.cccid, cid);
                    assert_eq!(d.datao as usize, got.len(), "C2HData in order");
                    assert!(!pdu.data_digest_error, "C2HData digest");
                    got.extend_from_slice(&pdu.data);
                    if pdu.flags & strata_nvmf::codec::pdu_flags::SUCCESS != 0 {
                        return Answer {
                            completion: Completion {
                                cid,
                                ..Completion::default()
                            },
                            data: got,
                        };
                    }
                }
                other => panic!("expected the answer to command {cid}, got {other:?}"),
            }
        }
    }

    /// Connect the admin queue of a new controller; returns its ID.
    pub async fn connect_admin(&mut self, subnqn: &str, kato_ms: u32) -> u16 {
        let a = self.connect_queue(subnqn, 0, 31, 0xFFFF, kato_ms, 0).await;
        assert!(
            a.completion.status.is_success(),
            "admin connect: {}",
            a.completion.status
        );
        a.completion.result as u16
    }

    pub async fn connect_queue(
        &mut self,
        subnqn: &str,
        qid: u16,
        sqsize: u16,
        cntlid: u16,
        kato_ms: u32,
        cattr: u8,
    ) -> Answer {
        let cid = self.cid();
        let c = Command::connect(
            cid,
            &Connect {
                recfmt: 0,
                qid,
                sqsize,
                cattr,
                kato: kato_ms,
            },
        );
        let data = ConnectData {
            hostid: [7; 16],
            cntlid,
            subnqn: subnqn.to_string(),
            hostnqn: HOSTNQN.to_string(),
        }
        .encode();
        self.command(c, &data[..CONNECT_DATA_LEN]).await
    }

    /// Enable the controller (CC.EN) and wait for CSTS.RDY.
    pub async fn enable(&mut self) {
        let cid = self.cid();
        let a = self
            .command(
                Command::property_set(cid, property::CC, false, 1 | 6 << 16 | 4 << 20),
                &[],
            )
            .await;
        assert!(
            a.completion.status.is_success(),
            "enable: {}",
            a.completion.status
        );
        for _ in 0..1000 {
            let cid = self.cid();
            let a = self
                .command(Command::property_get(cid, property::CSTS, false), &[])
                .await;
            if a.completion.result & 1 == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the controller did not become ready");
    }

    /// A whole I/O setup: ICReq, admin connect, enable; then a second connection for I/O
    /// queue 1 of that controller.
    pub async fn io_queue(addr: SocketAddr, subnqn: &str, digests: Digests) -> (Raw, Raw, u16) {
        let mut admin = Raw::connect(addr).await;
        admin.init(digests).await;
        let cntlid = admin.connect_admin(subnqn, 0).await;
        admin.enable().await;
        let mut io = Raw::connect(addr).await;
        io.init(digests).await;
        let a = io.connect_queue(subnqn, 1, 31, cntlid, 0, 0).await;
        assert!(
            a.completion.status.is_success(),
            "I/O connect: {}",
            a.completion.status
        );
        (admin, io, cntlid)
    }
}

/// Decode just a common header (for tests that build broken PDUs).
pub fn common_header(b: &[u8]) -> CommonHeader {
    CommonHeader::decode(b)
}
