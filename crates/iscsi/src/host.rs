//! The initiator: [`IscsiDevice`], a [`BlockDevice`] backed by one LUN of an iSCSI target.
//!
//! ```text
//!   read_at / write_at / flush / trim / write_zeroes
//!        │ SCSI command (READ(16), WRITE(16), SYNCHRONIZE CACHE(16), UNMAP, WRITE SAME(16))
//!        ▼
//!   current session ──────── lost? ─► wait for the supervisor's next session (until the
//!        │                            command's deadline), then send the command again
//!        ▼
//!   status: GOOD ─► done │ CHECK CONDITION ─► sense ─► ErrorKind (UNIT ATTENTION: retried)
//!                        │ BUSY / TASK SET FULL ─► retried after a pause
//!
//!   supervisor task: session dies ─► reconnect with backoff (50 ms → 5 s) ─► log in, check
//!                    the capacity ─► publish the new session
//! ```
//!
//! Every command has a deadline (`timeout`): a command without status by then fails with
//! [`ErrorKind::TimedOut`] (and is aborted at the target), whether the target is silent or
//! unreachable. Commands cut off by a lost connection are sent again on the next one while
//! their deadline allows: reads and writes of whole blocks are idempotent.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;
use strata_bdev::{
    check_io, read_only_error, write_zeroes_by_writing, BlockDevice, Capabilities, Error,
    ErrorKind, Geometry, Result, WriteOpts, ZeroOpts,
};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::codec::scsi::{
    self, device_type, sense_key, status, vpd, BlockLimits, Capacity, Cdb, Inquiry, ModeSense,
    Provisioning, Sense,
};
use crate::codec::{decode_lun, encode_lun};
use crate::connection::PduReader;
use crate::login::{login, Chap, LoginError, LoginParams, Negotiated};
use crate::session::{Command, Completion, Failure, Session, SessionSettings};

/// The IANA port of iSCSI.
pub const DEFAULT_PORT: u16 = 3260;
/// The largest transfer of one command, even if the target allows more.
const MAX_TRANSFER: u64 = 8 << 20;
/// WRITE SAME blocks per command when the target reports no limit.
const DEFAULT_WRITE_SAME_BLOCKS: u64 = 1 << 16;
/// Unit attentions absorbed per command.
const MAX_UNIT_ATTENTIONS: u32 = 8;
/// The longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// How to reach a target and what to ask of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IscsiOptions {
    /// The initiator's name (an IQN).
    pub initiator: String,
    /// CHAP credentials, when the target requires them.
    pub chap: Option<Chap>,
    /// Require CRC32C header digests.
    pub header_digest: bool,
    /// Require CRC32C data digests.
    pub data_digest: bool,
    /// Time limit of each call, of connecting and logging in, and of a keep-alive ping.
    /// Default: 30 s.
    pub timeout: Duration,
    /// Commands in flight at most. Default: 128.
    pub queue_depth: usize,
    /// The largest data segment Strata accepts (MaxRecvDataSegmentLength). Default: 256 KiB.
    pub max_recv_data_segment: u32,
    /// The burst lengths Strata proposes. Defaults: 16 MiB - 1 KiB and 256 KiB.
    pub max_burst: u32,
    pub first_burst: u32,
}

impl Default for IscsiOptions {
    fn default() -> IscsiOptions {
        IscsiOptions {
            initiator: default_initiator(),
            chap: None,
            header_digest: false,
            data_digest: false,
            timeout: Duration::from_secs(30),
            queue_depth: 128,
            max_recv_data_segment: 256 << 10,
            max_burst: (16 << 20) - 1024,
            first_burst: 256 << 10,
        }
    }
}

/// `iqn.2024-01.io.strata:HOSTNAME`.
pub fn default_initiator() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| {
            h.trim()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                        c.to_ascii_lowercase()
                    } else {
                        '-'
                    }
                })
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "initiator".into());
    format!("iqn.2024-01.io.strata:{host}")
}

/// Where a LUN is: the portal (`host:port`), the target's name and the LUN (`None`: the first
/// disk the target reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Portal {
    pub address: String,
    pub target: String,
    pub lun: Option<u16>,
}

impl fmt::Display for Portal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "iscsi://{}/{}", self.address, self.target)?;
        if let Some(l) = self.lun {
            write!(f, "/{l}")?;
        }
        Ok(())
    }
}

/// The state of the device's link to its target.
#[derive(Clone)]
enum Link {
    Up(Arc<Session>),
    /// Reconnecting; the reason the last attempt failed.
    Down(String),
}

struct Shared {
    name: String,
    portal: Portal,
    options: IscsiOptions,
    params: LoginParams,
    lun: u64,
    link: watch::Sender<Link>,
    /// Set when the device can never be used again (e.g. the capacity changed).
    fatal: OnceLock<String>,
    /// Capacity at open: every new session must show the same.
    capacity: Capacity,
}

/// What the target's pages said about sizes and features.
#[derive(Debug, Clone, Copy)]
struct Limits {
    block: u64,
    max_transfer: u64,
    unmap: bool,
    max_unmap_blocks: u64,
    unmap_with_write_same: bool,
    max_write_same_blocks: u64,
    fua: bool,
    write_cache: bool,
    read_only: bool,
    trim_reads_zero: bool,
}

/// A LUN of an iSCSI target as a block device.
pub struct IscsiDevice {
    shared: Arc<Shared>,
    geometry: Geometry,
    limits: Limits,
    /// WRITE SAME works (cleared when the target refuses it; zeroing then writes zeroes).
    write_same: AtomicBool,
    cancel: CancellationToken,
    supervisor: Option<JoinHandle<()>>,
}

impl fmt::Debug for IscsiDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} bytes)", self.shared.name, self.geometry.size)
    }
}

impl Drop for IscsiDevice {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// What a call was, for its error message.
#[derive(Debug, Clone, Copy)]
struct Op {
    verb: &'static str,
    offset: u64,
    len: u64,
}

impl Op {
    fn new(verb: &'static str, offset: u64, len: u64) -> Op {
        Op { verb, offset, len }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.len == 0 && self.offset == 0 {
            f.write_str(self.verb)
        } else {
            write!(
                f,
                "{} {} bytes at offset {}",
                self.verb, self.len, self.offset
            )
        }
    }
}

fn random_isid() -> [u8; 6] {
    let r: [u8; 5] = rand::random();
    // Type "random" (0b10 in the top bits), then the random part and a qualifier.
    [0x80 | (r[0] & 0x3f), r[1], r[2], r[3], r[4], 0x01]
}

/// Connect to `portal` and log in.
async fn open_session(
    name: &str,
    portal: &Portal,
    params: &LoginParams,
    options: &IscsiOptions,
) -> Result<Arc<Session>> {
    let attempt = async {
        let s = TcpStream::connect(portal.address.as_str())
            .await
            .map_err(|e| Error::io(format!("connect to iSCSI portal {}", portal.address), e))?;
        let _ = s.set_nodelay(true);
        let (r, mut w) = s.into_split();
        // Login text is small; the bound is lifted to what was declared afterwards.
        let mut reader = PduReader::new(r, 64 << 10);
        let neg = login(&mut reader, &mut w, params)
            .await
            .map_err(|e| login_error(portal, e))?;
        Ok(Session::start(
            reader,
            w,
            neg,
            SessionSettings {
                name: name.into(),
                queue_depth: options.queue_depth,
                keepalive: options.timeout.min(Duration::from_secs(10)),
            },
        ))
    };
    tokio::time::timeout(options.timeout, attempt)
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::TimedOut,
                format!(
                    "log in to iSCSI target {} at {}: no answer within {:?}",
                    portal.target, portal.address, options.timeout
                ),
            )
        })?
}

fn login_error(portal: &Portal, e: LoginError) -> Error {
    let what = format!(
        "log in to iSCSI target {} at {}",
        portal.target, portal.address
    );
    let kind = match &e {
        LoginError::Refused(r) if r.is_auth() => ErrorKind::PermissionDenied,
        LoginError::NeedsChap => ErrorKind::PermissionDenied,
        LoginError::Refused(r) if r.is_not_found() => ErrorKind::NotFound,
        _ => ErrorKind::Io,
    };
    Error::new(kind, format!("{what}: {e}"))
}

impl IscsiDevice {
    /// Connect to `portal`, log in, find the LUN and its sizes.
    pub async fn connect(portal: Portal, options: IscsiOptions) -> Result<IscsiDevice> {
        let params = LoginParams {
            initiator: options.initiator.clone(),
            target: portal.target.clone(),
            isid: random_isid(),
            chap: options.chap.clone(),
            header_digest: options.header_digest,
            data_digest: options.data_digest,
            max_recv_data_segment: options.max_recv_data_segment,
            max_burst: options.max_burst,
            first_burst: options.first_burst.min(options.max_burst),
            max_outstanding_r2t: 8,
        };
        let name = portal.to_string();
        let session = open_session(&name, &portal, &params, &options).await?;
        let deadline = Instant::now() + options.timeout;
        let probe = Probe {
            session: &session,
            name: &name,
            deadline,
            timeout: options.timeout,
        };
        let lun = match portal.lun {
            Some(l) => encode_lun(l),
            None => probe.first_disk().await?,
        };
        let name = match portal.lun {
            Some(_) => name.clone(),
            None => format!("{name}/{}", decode_lun(lun).unwrap_or(0)),
        };
        let probe = Probe {
            session: &session,
            name: &name,
            deadline,
            timeout: options.timeout,
        };
        probe.ready(lun).await?;
        let capacity = probe.capacity(lun).await?;
        let limits = probe.limits(lun, &capacity).await?;
        let size = capacity.bytes().ok_or_else(|| {
            Error::new(
                ErrorKind::Io,
                format!("open {name}: the capacity {capacity:?} does not fit 64 bits"),
            )
        })?;
        let optimal = limits.max_transfer.min(1 << 20).max(limits.block);
        let geometry = Geometry {
            size,
            block_size: capacity.block_len,
            optimal_io_size: optimal as u32,
        };
        info!(device = %name, size, block = capacity.block_len, ?limits, "iSCSI LUN opened");
        let (link, _) = watch::channel(Link::Up(session));
        let shared = Arc::new(Shared {
            name,
            portal,
            options,
            params,
            lun,
            link,
            fatal: OnceLock::new(),
            capacity,
        });
        let cancel = CancellationToken::new();
        let supervisor = tokio::spawn(supervise(shared.clone(), cancel.clone()));
        Ok(IscsiDevice {
            shared,
            geometry,
            write_same: AtomicBool::new(true),
            limits,
            cancel,
            supervisor: Some(supervisor),
        })
    }

    /// Whether a session is up now.
    pub fn is_connected(&self) -> bool {
        matches!(&*self.shared.link.borrow(), Link::Up(s) if s.is_alive())
    }

    /// What the current session's login settled, while one is up.
    pub fn negotiated(&self) -> Option<Negotiated> {
        match &*self.shared.link.borrow() {
            Link::Up(s) if s.is_alive() => Some(*s.negotiated()),
            _ => None,
        }
    }

    /// The LUN in use.
    pub fn lun(&self) -> u16 {
        decode_lun(self.shared.lun).unwrap_or(0)
    }

    /// The portal the device reaches.
    pub fn portal(&self) -> &Portal {
        &self.shared.portal
    }

    /// Whether trimmed blocks read back as zeroes (LBPRZ).
    pub fn trim_reads_zero(&self) -> bool {
        self.limits.trim_reads_zero
    }

    /// Log out and stop reconnecting.
    pub async fn close(mut self) {
        self.cancel.cancel();
        if let Some(t) = self.supervisor.take() {
            let _ = t.await;
        }
        let link = self.shared.link.borrow().clone();
        if let Link::Up(s) = link {
            s.logout(Duration::from_secs(2)).await;
        }
    }

    /// Run one command to a good status, within the deadline, across reconnections.
    async fn exec(&self, op: Op, cmd: Command) -> Result<Bytes> {
        let deadline = Instant::now() + self.shared.options.timeout;
        self.shared.exec(op, &cmd, deadline).await
    }

    fn cmd(&self, cdb: Cdb, data_out: Bytes, read_len: usize) -> Command {
        Command {
            lun: self.shared.lun,
            cdb: cdb.encode().0,
            data_out,
            read_len,
        }
    }

    fn lba(&self, offset: u64) -> u64 {
        offset / self.limits.block
    }

    async fn read_piece(&self, offset: u64, len: u64) -> Result<Bytes> {
        let cdb = Cdb::Read16 {
            lba: self.lba(offset),
            blocks: (len / self.limits.block) as u32,
            fua: false,
        };
        let op = Op::new("read", offset, len);
        let data = self
            .exec(op, self.cmd(cdb, Bytes::new(), len as usize))
            .await?;
        if data.len() as u64 != len {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "{op} on {}: the target returned {} bytes",
                    self.shared.name,
                    data.len()
                ),
            ));
        }
        Ok(data)
    }

    async fn write_piece(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let len = data.len() as u64;
        let cdb = Cdb::Write16 {
            lba: self.lba(offset),
            blocks: (len / self.limits.block) as u32,
            fua,
        };
        self.exec(Op::new("write", offset, len), self.cmd(cdb, data, 0))
            .await
            .map(|_| ())
    }

    /// `[offset, offset + len)` in pieces of at most `max` bytes.
    fn pieces(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
        let mut done = 0;
        std::iter::from_fn(move || {
            (done < len).then(|| {
                let n = (len - done).min(max);
                let piece = (offset + done, n);
                done += n;
                piece
            })
        })
    }

    async fn all(&self, futs: Vec<impl std::future::Future<Output = Result<()>>>) -> Result<()> {
        for r in join_all(futs).await {
            r?;
        }
        Ok(())
    }

    async fn sync_cache(&self) -> Result<()> {
        let cdb = Cdb::SynchronizeCache16 {
            lba: 0,
            blocks: 0,
            immed: false,
        };
        self.exec(Op::new("flush", 0, 0), self.cmd(cdb, Bytes::new(), 0))
            .await
            .map(|_| ())
    }

    async fn settle(&self, fua: bool) -> Result<()> {
        if fua && self.limits.write_cache {
            self.sync_cache().await
        } else {
            Ok(())
        }
    }
}

impl Shared {
    /// The session to send a command on: the current one, or the next one the supervisor
    /// brings up before `deadline`.
    async fn session(&self, op: Op, deadline: Instant, lost: Option<&str>) -> Result<Arc<Session>> {
        let mut rx = self.link.subscribe();
        loop {
            if let Some(why) = self.fatal.get() {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!("{op} on {}: {why}", self.name),
                ));
            }
            let why = match &*rx.borrow_and_update() {
                Link::Up(s) if s.is_alive() => return Ok(s.clone()),
                Link::Up(s) => s.why(),
                Link::Down(why) => why.clone(),
            };
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                let first = lost
                    .map(|l| format!("; the connection it was sent on was lost: {l}"))
                    .unwrap_or_default();
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    format!(
                        "{op} on {}: the target is unreachable ({why}){first}; gave up after {:?}",
                        self.name, self.options.timeout
                    ),
                ));
            }
        }
    }

    async fn exec(&self, op: Op, cmd: &Command, deadline: Instant) -> Result<Bytes> {
        let mut attentions = 0;
        let mut busy = Duration::from_millis(1);
        // Why the last connection the command was sent on was lost.
        let mut lost: Option<String> = None;
        loop {
            let session = self.session(op, deadline, lost.as_deref()).await?;
            let timed_out = |lost: &Option<String>| {
                let after = lost
                    .as_ref()
                    .map(|why| format!(" (it was sent again after a lost connection: {why})"))
                    .unwrap_or_default();
                Error::new(
                    ErrorKind::TimedOut,
                    format!(
                        "{op} on {}: no answer within {:?}{after}",
                        self.name, self.options.timeout
                    ),
                )
            };
            let done = match tokio::time::timeout_at(deadline, session.execute(cmd)).await {
                Err(_) => return Err(timed_out(&lost)),
                // Sent again on the next session, if one comes in time.
                Ok(Err(Failure::Lost(why))) => {
                    lost = Some(why);
                    continue;
                }
                Ok(Err(Failure::Refused(why))) => {
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!("{op} on {}: {why}", self.name),
                    ))
                }
                Ok(Ok(c)) => c,
            };
            if session.take_capacity_changed() {
                self.check_capacity(&session, deadline).await?;
            }
            match done.status {
                status::GOOD | status::CONDITION_MET => return Ok(done.data),
                status::CHECK_CONDITION => match &done.sense {
                    Some(s) if s.key == sense_key::UNIT_ATTENTION => {
                        attentions += 1;
                        if attentions > MAX_UNIT_ATTENTIONS {
                            return Err(self.check_error(op, &done));
                        }
                    }
                    _ => return Err(self.check_error(op, &done)),
                },
                status::BUSY | status::TASK_SET_FULL => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(timed_out(&lost));
                    }
                    tokio::time::sleep(busy.min(left)).await;
                    busy = (busy * 2).min(Duration::from_millis(100));
                }
                other => {
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!(
                            "{op} on {}: the target answered {} ({other:#04x})",
                            self.name,
                            scsi::status_name(other)
                        ),
                    ))
                }
            }
        }
    }

    fn check_error(&self, op: Op, done: &Completion) -> Error {
        let (kind, what) = match (&done.sense, &done.raw_sense) {
            (Some(s), _) => (sense_kind(s), s.to_string()),
            (None, Some(raw)) => (ErrorKind::Io, format!("undecodable sense data {raw:02x?}")),
            (None, None) => (ErrorKind::Io, "no sense data".to_string()),
        };
        Error::new(
            kind,
            format!(
                "{op} on {}: the target answered CHECK CONDITION: {what}",
                self.name
            ),
        )
    }

    /// Read the capacity again after the target said it changed; a device whose capacity
    /// shrank or whose block size changed is unusable from now on.
    async fn check_capacity(&self, session: &Session, deadline: Instant) -> Result<()> {
        let probe = Probe {
            session,
            name: &self.name,
            deadline,
            timeout: self.options.timeout,
        };
        let now = probe.capacity(self.lun).await?;
        self.compare_capacity(&now)
    }

    fn compare_capacity(&self, now: &Capacity) -> Result<()> {
        let was = self.capacity;
        let (old, new) = (was.bytes().unwrap_or(0), now.bytes().unwrap_or(0));
        if now.block_len != was.block_len || new < old {
            let why = format!(
                "the target's capacity changed from {old} bytes in {}-byte blocks to {new} bytes \
                 in {}-byte blocks; the device is unusable until it is opened again",
                was.block_len, now.block_len
            );
            if self.fatal.set(why.clone()).is_ok() {
                warn!(device = %self.name, "{why}");
                // Wake every caller waiting for a session.
                self.link.send_modify(|_| {});
            }
            return Err(Error::new(ErrorKind::Io, format!("{}: {why}", self.name)));
        }
        if new > old {
            warn!(device = %self.name, old, new, "the target's capacity grew; the device keeps its size");
        }
        Ok(())
    }
}

/// The error kind a CHECK CONDITION maps to.
fn sense_kind(s: &Sense) -> ErrorKind {
    match (s.key, s.asc, s.ascq) {
        (sense_key::ILLEGAL_REQUEST, 0x21, _) => ErrorKind::OutOfRange,
        (sense_key::ILLEGAL_REQUEST, 0x20, _) => ErrorKind::Unsupported,
        (sense_key::ILLEGAL_REQUEST, _, _) => ErrorKind::InvalidInput,
        (sense_key::DATA_PROTECT, 0x27, 0x07) => ErrorKind::NoSpace,
        (sense_key::DATA_PROTECT, _, _) => ErrorKind::PermissionDenied,
        (sense_key::VOLUME_OVERFLOW, _, _) => ErrorKind::NoSpace,
        _ => ErrorKind::Io,
    }
}

/// Commands run while opening or checking a device.
#[derive(Clone, Copy)]
struct Probe<'a> {
    session: &'a Session,
    name: &'a str,
    deadline: Instant,
    timeout: Duration,
}

impl Probe<'_> {
    async fn run(
        &self,
        what: &'static str,
        lun: u64,
        cdb: Cdb,
        read_len: usize,
    ) -> Result<Completion> {
        let cmd = Command {
            lun,
            cdb: cdb.encode().0,
            data_out: Bytes::new(),
            read_len,
        };
        match tokio::time::timeout_at(self.deadline, self.session.execute(&cmd)).await {
            Err(_) => Err(Error::new(
                ErrorKind::TimedOut,
                format!(
                    "{what} on {}: no answer within {:?}",
                    self.name, self.timeout
                ),
            )),
            Ok(Err(Failure::Lost(why) | Failure::Refused(why))) => Err(Error::new(
                ErrorKind::Io,
                format!("{what} on {}: {why}", self.name),
            )),
            Ok(Ok(c)) => Ok(c),
        }
    }

    /// Run to a good status, absorbing unit attentions; returns the data.
    async fn good(&self, what: &'static str, lun: u64, cdb: Cdb, read_len: usize) -> Result<Bytes> {
        for _ in 0..MAX_UNIT_ATTENTIONS {
            let c = self.run(what, lun, cdb, read_len).await?;
            match (c.status, &c.sense) {
                (status::GOOD, _) => return Ok(c.data),
                (status::CHECK_CONDITION, Some(s)) if s.key == sense_key::UNIT_ATTENTION => {}
                (status::CHECK_CONDITION, Some(s)) => {
                    return Err(Error::new(
                        sense_kind(s),
                        format!(
                            "{what} on {}: the target answered CHECK CONDITION: {s}",
                            self.name
                        ),
                    ))
                }
                (st, _) => {
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!(
                            "{what} on {}: the target answered {}",
                            self.name,
                            scsi::status_name(st)
                        ),
                    ))
                }
            }
        }
        Err(Error::new(
            ErrorKind::Io,
            format!(
                "{what} on {}: unit attention after unit attention",
                self.name
            ),
        ))
    }

    fn bad(&self, what: &str, e: impl fmt::Display) -> Error {
        Error::new(
            ErrorKind::Io,
            format!(
                "{what} on {}: the target's answer is malformed: {e}",
                self.name
            ),
        )
    }

    /// The first LUN that holds a disk.
    async fn first_disk(&self) -> Result<u64> {
        let data = self
            .good(
                "report LUNs",
                0,
                Cdb::ReportLuns {
                    select_report: 0,
                    alloc_len: 16 << 10,
                },
                16 << 10,
            )
            .await?;
        let (luns, _) = scsi::decode_report_luns(&data).map_err(|e| self.bad("report LUNs", e))?;
        let mut seen = Vec::new();
        for lun in luns {
            let data = self
                .good(
                    "inquiry",
                    lun,
                    Cdb::Inquiry {
                        evpd: false,
                        page: 0,
                        alloc_len: Inquiry::LEN as u16,
                    },
                    Inquiry::LEN,
                )
                .await?;
            let inq = Inquiry::decode(&data).map_err(|e| self.bad("inquiry", e))?;
            if inq.qualifier == 0 && inq.device_type == device_type::DISK {
                return Ok(lun);
            }
            seen.push(format!(
                "{} (device type {:#04x})",
                decode_lun(lun).map_or_else(|| format!("{lun:#x}"), |l| l.to_string()),
                inq.device_type
            ));
        }
        Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "open {}: the target has no disk LUN (LUNs: {}); name one as iscsi://HOST/IQN/LUN",
                self.name,
                if seen.is_empty() {
                    "none".into()
                } else {
                    seen.join(", ")
                }
            ),
        ))
    }

    async fn ready(&self, lun: u64) -> Result<()> {
        self.good("test unit ready", lun, Cdb::TestUnitReady, 0)
            .await
            .map(|_| ())
    }

    async fn capacity(&self, lun: u64) -> Result<Capacity> {
        let data = self
            .good(
                "read capacity",
                lun,
                Cdb::ReadCapacity16 {
                    alloc_len: Capacity::LEN as u32,
                },
                Capacity::LEN,
            )
            .await?;
        let c = Capacity::decode(&data).map_err(|e| self.bad("read capacity", e))?;
        if !c.block_len.is_power_of_two() || !(512..=65536).contains(&c.block_len) {
            return Err(self.bad(
                "read capacity",
                format!("a logical block of {} bytes", c.block_len),
            ));
        }
        if c.bytes().is_none() {
            return Err(self.bad("read capacity", format!("{c:?} overflows")));
        }
        Ok(c)
    }

    async fn vpd(&self, lun: u64, page: u8, len: usize) -> Result<Bytes> {
        self.good(
            "inquiry",
            lun,
            Cdb::Inquiry {
                evpd: true,
                page,
                alloc_len: len as u16,
            },
            len,
        )
        .await
    }

    async fn limits(&self, lun: u64, cap: &Capacity) -> Result<Limits> {
        let block = u64::from(cap.block_len);
        let pages = match self.vpd(lun, vpd::SUPPORTED_PAGES, 255).await {
            Ok(d) => scsi::decode_supported_pages(&d).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let bl = if pages.contains(&vpd::BLOCK_LIMITS) {
            let d = self.vpd(lun, vpd::BLOCK_LIMITS, BlockLimits::LEN).await?;
            BlockLimits::decode(&d).map_err(|e| self.bad("block limits", e))?
        } else {
            BlockLimits::default()
        };
        let prov = if cap.lbpme && pages.contains(&vpd::LOGICAL_BLOCK_PROVISIONING) {
            let d = self
                .vpd(lun, vpd::LOGICAL_BLOCK_PROVISIONING, Provisioning::LEN)
                .await?;
            Provisioning::decode(&d).map_err(|e| self.bad("logical block provisioning", e))?
        } else {
            Provisioning::default()
        };
        let mode = self
            .good(
                "mode sense",
                lun,
                Cdb::ModeSense6 {
                    dbd: true,
                    page: scsi::CACHING_PAGE,
                    subpage: 0,
                    alloc_len: 255,
                },
                255,
            )
            .await
            .ok()
            .and_then(|d| ModeSense::decode(&d).ok())
            .unwrap_or_default();
        let cap_blocks = |n: u64, default: u64| if n == 0 { default } else { n };
        let max_transfer = (cap_blocks(u64::from(bl.max_transfer_len), u64::MAX / block)
            .saturating_mul(block))
        .min(MAX_TRANSFER)
        .max(block);
        Ok(Limits {
            block,
            max_transfer,
            unmap: cap.lbpme && prov.lbpu && bl.max_unmap_lba_count > 0,
            max_unmap_blocks: u64::from(bl.max_unmap_lba_count),
            unmap_with_write_same: cap.lbpme && prov.lbpws,
            max_write_same_blocks: cap_blocks(bl.max_write_same_len, DEFAULT_WRITE_SAME_BLOCKS)
                .min(u64::from(u32::MAX)),
            fua: mode.dpofua,
            write_cache: mode.write_cache.unwrap_or(true),
            read_only: mode.write_protect,
            trim_reads_zero: cap.lbprz || prov.lbprz == 1,
        })
    }
}

/// Keep the device connected: when its session dies, log in again with backoff.
async fn supervise(shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        let current = shared.link.borrow().clone();
        if let Link::Up(session) = current {
            tokio::select! {
                _ = session.dead() => {}
                _ = cancel.cancelled() => return,
            }
            let why = session.why();
            warn!(device = %shared.name, "iSCSI connection lost: {why}; reconnecting");
            shared.link.send_replace(Link::Down(why));
        }
        let mut backoff = FIRST_BACKOFF;
        loop {
            if shared.fatal.get().is_some() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = cancel.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            let attempt = async {
                let s = open_session(
                    &shared.name,
                    &shared.portal,
                    &shared.params,
                    &shared.options,
                )
                .await?;
                let deadline = Instant::now() + shared.options.timeout;
                let probe = Probe {
                    session: &s,
                    name: &shared.name,
                    deadline,
                    timeout: shared.options.timeout,
                };
                probe.ready(shared.lun).await?;
                let cap = probe.capacity(shared.lun).await?;
                shared.compare_capacity(&cap)?;
                Ok::<_, Error>(s)
            };
            let result = tokio::select! {
                r = attempt => r,
                _ = cancel.cancelled() => return,
            };
            match result {
                Ok(s) => {
                    info!(device = %shared.name, "iSCSI connection re-established");
                    shared.link.send_replace(Link::Up(s));
                    break;
                }
                Err(e) => {
                    shared
                        .link
                        .send_replace(Link::Down(format!("reconnecting failed: {}", e.chain())));
                    if shared.fatal.get().is_some() {
                        return;
                    }
                }
            }
        }
    }
}

#[async_trait]
impl BlockDevice for IscsiDevice {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.limits.read_only,
            flush: self.limits.write_cache,
            fua: self.limits.fua,
            trim: self.limits.unmap,
            write_zeroes: true,
            fast_zero: false,
            block_status: false,
            multi_conn: false,
            resize: false,
        }
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_io(self.geometry, "read", offset, len as u64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let max = self.limits.max_transfer;
        if len as u64 <= max {
            return self.read_piece(offset, len as u64).await;
        }
        let parts = join_all(
            IscsiDevice::pieces(offset, len as u64, max)
                .map(|(off, n)| self.read_piece(off, n))
                .collect::<Vec<_>>(),
        )
        .await;
        let mut out = BytesMut::with_capacity(len);
        for p in parts {
            out.extend_from_slice(&p?);
        }
        Ok(out.freeze())
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        if self.limits.read_only {
            return Err(read_only_error("write"));
        }
        let len = data.len() as u64;
        check_io(self.geometry, "write", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let native = opts.fua && self.limits.fua;
        let max = self.limits.max_transfer;
        self.all(
            IscsiDevice::pieces(offset, len, max)
                .map(|(off, n)| {
                    let start = (off - offset) as usize;
                    self.write_piece(off, data.slice(start..start + n as usize), native)
                })
                .collect(),
        )
        .await?;
        self.settle(opts.fua && !native).await
    }

    async fn flush(&self) -> Result<()> {
        if !self.limits.write_cache {
            // No volatile cache: completed writes are durable already.
            return Ok(());
        }
        self.sync_cache().await
    }

    async fn trim(&self, offset: u64, len: u64, opts: WriteOpts) -> Result<()> {
        if self.limits.read_only {
            return Err(read_only_error("trim"));
        }
        check_io(self.geometry, "trim", offset, len)?;
        if !self.limits.unmap {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "trim on {}: the LUN is not thin-provisioned (no UNMAP)",
                    self.shared.name
                ),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        let bs = self.limits.block;
        let max = self
            .limits
            .max_unmap_blocks
            .min(u64::from(u32::MAX))
            .saturating_mul(bs)
            .max(bs);
        self.all(
            IscsiDevice::pieces(offset, len, max)
                .map(|(off, n)| {
                    let list = Bytes::from(scsi::encode_unmap(&[(off / bs, (n / bs) as u32)]));
                    let cdb = Cdb::Unmap {
                        anchor: false,
                        param_len: list.len() as u16,
                    };
                    async move {
                        self.exec(Op::new("trim", off, n), self.cmd(cdb, list, 0))
                            .await
                            .map(|_| ())
                    }
                })
                .collect(),
        )
        .await?;
        self.settle(opts.fua).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        if self.limits.read_only {
            return Err(read_only_error("write zeroes"));
        }
        check_io(self.geometry, "write zeroes", offset, len)?;
        if opts.fast_only {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "write zeroes fast on {}: iSCSI targets do not promise fast zeroing",
                    self.shared.name
                ),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        if !self.write_same.load(Ordering::Relaxed) {
            return write_zeroes_by_writing(self, offset, len, opts).await;
        }
        let bs = self.limits.block;
        let block = Bytes::from(vec![0u8; bs as usize]);
        let unmap = opts.may_trim && self.limits.unmap_with_write_same;
        let max = self.limits.max_write_same_blocks.saturating_mul(bs);
        let r = self
            .all(
                IscsiDevice::pieces(offset, len, max)
                    .map(|(off, n)| {
                        let cdb = Cdb::WriteSame16 {
                            lba: off / bs,
                            blocks: (n / bs) as u32,
                            unmap,
                            ndob: false,
                        };
                        let cmd = self.cmd(cdb, block.clone(), 0);
                        async move {
                            self.exec(Op::new("write zeroes", off, n), cmd)
                                .await
                                .map(|_| ())
                        }
                    })
                    .collect(),
            )
            .await;
        match r {
            Err(e) if matches!(e.kind(), ErrorKind::Unsupported | ErrorKind::InvalidInput) => {
                // The target has no WRITE SAME (or not with these fields): write zeroes.
                info!(device = %self.shared.name, error = %e, "WRITE SAME refused; zeroing by writing");
                self.write_same.store(false, Ordering::Relaxed);
                write_zeroes_by_writing(self, offset, len, opts).await
            }
            Err(e) => Err(e),
            Ok(()) => self.settle(opts.fua).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sense_maps_to_kinds() {
        let k = |key, asc, ascq| sense_kind(&Sense::new(key, asc, ascq));
        assert_eq!(
            k(sense_key::ILLEGAL_REQUEST, 0x21, 0),
            ErrorKind::OutOfRange
        );
        assert_eq!(
            k(sense_key::ILLEGAL_REQUEST, 0x20, 0),
            ErrorKind::Unsupported
        );
        assert_eq!(
            k(sense_key::ILLEGAL_REQUEST, 0x24, 0),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            k(sense_key::DATA_PROTECT, 0x27, 0),
            ErrorKind::PermissionDenied
        );
        assert_eq!(k(sense_key::DATA_PROTECT, 0x27, 7), ErrorKind::NoSpace);
        assert_eq!(k(sense_key::MEDIUM_ERROR, 0x11, 0), ErrorKind::Io);
    }

    #[test]
    fn isids_are_random_type() {
        let i = random_isid();
        assert_eq!(i[0] & 0xc0, 0x80);
    }
}
