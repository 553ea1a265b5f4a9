//! Writes whose data the host sends after an R2T: asking for it, and collecting its H2CData
//! PDUs.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::codec::pdu::encode_r2t;
use crate::codec::{pdu_flags, Command, DataHeader, PduError, R2t, Status};

use super::{Done, Op, Out, Queue, Transfer};

impl<S: AsyncRead + AsyncWrite + Unpin> Queue<S> {
    /// Ask for a write's data with an R2T.
    pub(super) fn request_data(&mut self, cmd: Command, op: Op, len: u32) {
        let tag = match self.free_tags.pop() {
            Some(t) => t,
            None => {
                self.transfers.push(None);
                (self.transfers.len() - 1) as u16
            }
        };
        self.transfers[usize::from(tag)] = Some(Transfer {
            cmd,
            op,
            len,
            received: 0,
            chunks: Vec::new(),
            digest_error: false,
        });
        let r = R2t {
            cccid: cmd.cid,
            ttag: tag,
            r2to: 0,
            r2tl: len,
        };
        let dg = self.digests.unwrap_or_default();
        let b = self.encode(|b| encode_r2t(b, &r, dg));
        self.out.push(Out::one(b, false));
    }

    pub(super) fn on_h2c_data(
        &mut self,
        d: DataHeader,
        flags: u8,
        data: Bytes,
        digest_error: bool,
    ) -> Result<(), PduError> {
        let slot = self
            .transfers
            .get_mut(usize::from(d.ttag))
            .and_then(Option::as_mut)
            .ok_or_else(|| PduError::InvalidField {
                offset: 10,
                why: format!("H2CData for transfer tag {}, which no R2T gave", d.ttag),
            })?;
        if slot.cmd.cid != d.cccid {
            return Err(PduError::InvalidField {
                offset: 8,
                why: format!(
                    "H2CData for command {} under the transfer tag of command {}",
                    d.cccid, slot.cmd.cid
                ),
            });
        }
        let end = u64::from(d.datao) + u64::from(d.datal);
        if d.datao != slot.received || end > u64::from(slot.len) {
            return Err(PduError::OutOfRange(format!(
                "H2CData of {} bytes at offset {} where bytes {}..{} were asked for",
                d.datal, d.datao, slot.received, slot.len
            )));
        }
        if end == u64::from(slot.len) && flags & pdu_flags::LAST_PDU == 0 {
            debug!(
                cid = d.cccid,
                "the last H2CData of a transfer lacks LAST_PDU"
            );
        }
        slot.received += d.datal;
        slot.digest_error |= digest_error;
        slot.chunks.push(data);
        if slot.received < slot.len {
            return Ok(());
        }
        let t = self.transfers[usize::from(d.ttag)]
            .take()
            .expect("the transfer was just found");
        self.free_tags.push(d.ttag);
        if t.digest_error {
            self.respond(Done::status(t.cmd.cid, Status::TRANSIENT_TRANSPORT_ERROR));
            return Ok(());
        }
        let data = if t.chunks.len() == 1 {
            t.chunks.into_iter().next().unwrap_or_default()
        } else {
            let mut all = BytesMut::with_capacity(t.len as usize);
            for c in &t.chunks {
                all.extend_from_slice(c);
            }
            all.freeze()
        };
        self.execute(&t.cmd, t.op, data);
        Ok(())
    }
}
