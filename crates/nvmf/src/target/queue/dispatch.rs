//! Commands: a capsule checked and classified, Connect, and a command started on the device
//! once its data is in hand.

use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::codec::{
    cattr, connect_offset, sgl_id, AdminCommand, Command, Connect, ConnectData, Direction, Fabrics,
    IoCommand, PduError, Status,
};
use crate::target::controller::Controller;
use crate::target::io as iocmd;
use crate::target::{admin, ADMIN_QUEUE_ENTRIES};

use super::{Done, Exec, Op, Phase, Queue, QueueCtx};

impl<S: AsyncRead + AsyncWrite + Unpin> Queue<S> {
    pub(super) fn on_capsule(
        &mut self,
        cmd: Command,
        data: Bytes,
        digest_error: bool,
    ) -> Result<(), PduError> {
        if self.outstanding >= self.depth {
            return Err(PduError::Sequence(format!(
                "a command beyond the queue's {} entries",
                self.depth
            )));
        }
        self.outstanding += 1;
        if self.sq_entries > 0 {
            self.sq_head = (self.sq_head + 1) % self.sq_entries;
        }
        self.touched = true;
        if digest_error {
            debug!(cid = cmd.cid, "data digest error in a command capsule");
            self.respond(Done::status(cmd.cid, Status::TRANSIENT_TRANSPORT_ERROR));
            return Ok(());
        }
        let op = match self.classify(&cmd) {
            Ok(Some(op)) => op,
            Ok(None) => return Ok(()),
            Err(s) => {
                self.respond(Done::status(cmd.cid, s));
                return Ok(());
            }
        };
        let need = match op {
            Op::Connect(_) => crate::codec::CONNECT_DATA_LEN as u32,
            Op::Io(io) => io.data_in(),
            Op::Admin(_) => 0,
        };
        match plan_data(&cmd, data, need) {
            Err(s) => self.respond(Done::status(cmd.cid, s)),
            Ok(Data::Ready(d)) => self.execute(&cmd, op, d),
            Ok(Data::Fetch(len)) => self.request_data(cmd, op, len),
        }
        Ok(())
    }

    /// Sort a command out: `Ok(None)` when it was answered here already.
    pub(super) fn classify(&mut self, cmd: &Command) -> Result<Option<Op>, Status> {
        let ctx = match &self.phase {
            Phase::Connected(c) if !cmd.is_fabrics() => {
                if !c.ctrl.is_ready() {
                    return Err(Status::COMMAND_SEQUENCE_ERROR.dnr());
                }
                if c.qid == 0 {
                    return Ok(Some(Op::Admin(AdminCommand::parse(cmd))));
                }
                let ns = c.ns.as_ref().ok_or(Status::INVALID_OPCODE.dnr())?;
                return iocmd::prepare(ns, cmd, IoCommand::parse(cmd), &self.shared.limits)
                    .map(|op| Some(Op::Io(op)));
            }
            Phase::Connected(c) => c.clone(),
            _ => {
                return match (cmd.is_fabrics(), Fabrics::parse(cmd)) {
                    (true, Fabrics::Connect(c)) => Ok(Some(Op::Connect(c))),
                    _ => Err(Status::COMMAND_SEQUENCE_ERROR.dnr()),
                }
            }
        };
        // A fabrics command on a connected queue.
        let admin = ctx.qid == 0;
        let done = match Fabrics::parse(cmd) {
            Fabrics::Connect(_) => Done::status(cmd.cid, Status::COMMAND_SEQUENCE_ERROR.dnr()),
            Fabrics::PropertyGet { offset, eight } if admin => {
                match ctx.ctrl.property_get(offset, eight, self.cap()) {
                    Ok(v) => Done::result(cmd.cid, v),
                    Err(s) => Done::status(cmd.cid, s),
                }
            }
            Fabrics::PropertySet {
                offset,
                eight,
                value,
            } if admin => match ctx.ctrl.property_set(offset, eight, value, &self.shared) {
                Ok(()) => Done::ok(cmd.cid),
                Err(s) => Done::status(cmd.cid, s),
            },
            Fabrics::PropertyGet { .. } | Fabrics::PropertySet { .. } => {
                Done::status(cmd.cid, Status::INVALID_FIELD.dnr())
            }
            Fabrics::Disconnect { .. } => {
                debug!(qid = ctx.qid, "Disconnect");
                self.stop_reading();
                Done::ok(cmd.cid)
            }
            Fabrics::Other(_) => Done::status(cmd.cid, Status::INVALID_OPCODE.dnr()),
        };
        self.respond(done);
        Ok(None)
    }

    /// CAP: queue entries, the ready timeout (7.5 s), the NVM command set, 4 KiB pages.
    pub(super) fn cap(&self) -> u64 {
        let mqes = u64::from(self.shared.limits.max_queue_entries - 1);
        mqes | 15 << 24 | 1 << 37
    }

    /// Run a command whose data is in.
    pub(super) fn execute(&mut self, cmd: &Command, op: Op, data: Bytes) {
        match op {
            Op::Connect(c) => {
                let done = self.connect(cmd, c, &data);
                self.respond(done);
            }
            Op::Admin(a) => {
                let Some(ctx) = self.ctx().cloned() else {
                    return self.respond(Done::status(cmd.cid, Status::COMMAND_SEQUENCE_ERROR));
                };
                match admin::execute(&ctx, cmd, a) {
                    Exec::Now(d) => self.respond(d),
                    Exec::Later(f) => self.commands.push(f),
                }
            }
            Op::Io(io) => {
                let Some(f) = self
                    .ctx()
                    .and_then(|c| Some(iocmd::run(c.ns.clone()?, &c.ctrl, cmd.cid, io, data)))
                else {
                    return self.respond(Done::status(cmd.cid, Status::COMMAND_SEQUENCE_ERROR));
                };
                self.commands.push(f);
            }
        }
    }

    /// Connect: a new controller (admin queue) or an I/O queue of an existing one.
    pub(super) fn connect(&mut self, cmd: &Command, c: Connect, data: &[u8]) -> Done {
        let cid = cmd.cid;
        let invalid = |in_data: bool, offset: u16| Done {
            result: u64::from(in_data) << 16 | u64::from(offset),
            ..Done::status(cid, Status::CONNECT_INVALID_PARAMETERS.dnr())
        };
        if c.recfmt != 0 {
            return Done {
                result: u64::from(connect_offset::RECFMT),
                ..Done::status(cid, Status::CONNECT_INCOMPATIBLE_FORMAT.dnr())
            };
        }
        let d = match ConnectData::decode(data) {
            Ok(d) => d,
            Err(e) => {
                debug!(error = %e, "Connect refused");
                return invalid(true, e.offset);
            }
        };
        let Some(subsys) = self.shared.subsystem(&d.subnqn) else {
            info!(subnqn = %d.subnqn, host = %d.hostnqn, "Connect to an unknown subsystem");
            return invalid(true, connect_offset::SUBNQN);
        };
        if !subsys.host_allowed(&d.hostnqn) {
            warn!(subnqn = %d.subnqn, host = %d.hostnqn, "Connect from a host not on the subsystem's allow list");
            return Done {
                result: 1 << 16 | u64::from(connect_offset::HOSTNQN),
                ..Done::status(cid, Status::CONNECT_INVALID_HOST.dnr())
            };
        }
        let limits = &self.shared.limits;
        let now = self.shared.now_ms();
        let (ctrl, ns) = if c.qid == 0 {
            if d.cntlid != 0xFFFF {
                return invalid(true, connect_offset::CNTLID);
            }
            if c.sqsize == 0 || u32::from(c.sqsize) >= ADMIN_QUEUE_ENTRIES {
                return invalid(false, connect_offset::SQSIZE);
            }
            let kato = if c.kato == 0 && subsys.is_discovery() {
                limits
                    .keep_alive_default
                    .as_millis()
                    .min(u128::from(u32::MAX)) as u32
            } else {
                c.kato
            };
            let made = subsys.controllers.create(|id| {
                Controller::new(
                    id,
                    subsys.clone(),
                    d.hostnqn.clone(),
                    d.hostid,
                    kato,
                    limits.max_io_queues,
                    now,
                )
            });
            let Some(ctrl) = made else {
                return Done::status(cid, Status::CONNECT_CONTROLLER_BUSY);
            };
            let _ = ctrl.add_queue(0, self.digests.unwrap_or_default());
            self.shared
                .tasks
                .spawn(ctrl.clone().watchdog(self.shared.clone()));
            info!(nqn = %subsys.nqn, cntlid = ctrl.cntlid, host = %d.hostnqn,
                hostid = %crate::target::format_uuid(&ctrl.hostid), kato_ms = kato, "controller created");
            (ctrl, None)
        } else {
            if subsys.is_discovery() {
                return invalid(false, connect_offset::QID);
            }
            let Some(ctrl) = subsys.controllers.get(d.cntlid) else {
                return invalid(true, connect_offset::CNTLID);
            };
            if ctrl.hostnqn != d.hostnqn {
                return invalid(true, connect_offset::HOSTNQN);
            }
            if !ctrl.is_ready() {
                return Done::status(cid, Status::COMMAND_SEQUENCE_ERROR.dnr());
            }
            if c.sqsize == 0 || u32::from(c.sqsize) >= limits.max_queue_entries {
                return invalid(false, connect_offset::SQSIZE);
            }
            if let Err(s) = ctrl.add_queue(c.qid, self.digests.unwrap_or_default()) {
                return if s.code() == Status::CONNECT_INVALID_PARAMETERS {
                    invalid(false, connect_offset::QID)
                } else {
                    Done::status(cid, s)
                };
            }
            ctrl.touch(now);
            let ns = subsys.namespaces().into_iter().next();
            (ctrl, ns)
        };
        tracing::Span::current().record("volume", subsys.nqn.as_str());
        tracing::Span::current().record("qid", c.qid);
        self.ctrl_stop = Some(Box::pin(ctrl.stop.clone().cancelled_owned()));
        self.deadline = None;
        self.depth = usize::from(c.sqsize) + 1;
        self.sq_entries = u32::from(c.sqsize) + 1;
        self.sq_head = 1 % self.sq_entries;
        self.sqflow_disabled = c.cattr & cattr::DISABLE_SQFLOW != 0;
        let cntlid = ctrl.cntlid;
        self.phase = Phase::Connected(Arc::new(QueueCtx {
            shared: self.shared.clone(),
            ctrl,
            qid: c.qid,
            local: self.local,
            stop: CancellationToken::new(),
            ns,
        }));
        debug!(qid = c.qid, sqsize = c.sqsize, cntlid, "queue connected");
        Done::result(cid, u64::from(cntlid))
    }
}

/// Where a command's data is.
enum Data {
    /// In hand (possibly none).
    Ready(Bytes),
    /// To be asked for with an R2T: this many bytes.
    Fetch(u32),
}

/// Check a command's data pointer against its direction and the `need` bytes of data it
/// takes from the host.
fn plan_data(cmd: &Command, capsule: Bytes, need: u32) -> Result<Data, Status> {
    let sgl = cmd.dptr;
    match cmd.direction() {
        Direction::HostToController => {}
        Direction::Bidirectional => return Err(Status::INVALID_FIELD.dnr()),
        dir => {
            if !capsule.is_empty() {
                return Err(Status::INVALID_FIELD.dnr());
            }
            if dir == Direction::ControllerToHost && sgl.length > 0 && sgl.id != sgl_id::TRANSPORT {
                return Err(Status::SGL_TYPE_INVALID.dnr());
            }
            return Ok(Data::Ready(Bytes::new()));
        }
    }
    if need == 0 {
        if !capsule.is_empty() {
            return Err(Status::INVALID_FIELD.dnr());
        }
        return Ok(Data::Ready(Bytes::new()));
    }
    match sgl.id {
        sgl_id::IN_CAPSULE => {
            if sgl.address != 0 {
                return Err(Status::SGL_OFFSET_INVALID.dnr());
            }
            if sgl.length != need || capsule.len() != need as usize {
                return Err(Status::DATA_SGL_LENGTH_INVALID.dnr());
            }
            Ok(Data::Ready(capsule))
        }
        sgl_id::TRANSPORT => {
            if !capsule.is_empty() {
                return Err(Status::INVALID_FIELD.dnr());
            }
            if sgl.length != need {
                return Err(Status::DATA_SGL_LENGTH_INVALID.dnr());
            }
            Ok(Data::Fetch(need))
        }
        _ => Err(Status::SGL_TYPE_INVALID.dnr()),
    }
}
