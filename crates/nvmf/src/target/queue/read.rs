//! The PDU reader: filling the read buffer, framing PDUs (header, digests, data layout) and
//! the ICReq that opens the connection.

use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use strata_bdev::wire;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info};

use crate::codec::pdu::{encode_ic_resp, MAX_TERM_DATA};
use crate::codec::{
    decode_header, digest, IcReq, IcResp, Limits as PduLimits, PduError, PduHeader, Role,
};
use crate::target::ADMIN_IN_CAPSULE;

use super::{Out, Phase, Queue, EXACT_READ_MIN, READ_CHUNK};

impl<S: AsyncRead + AsyncWrite + Unpin> Queue<S> {
    pub(super) fn pdu_limits(&self) -> PduLimits {
        let in_capsule = match &self.phase {
            Phase::Connected(c) if c.qid != 0 => self.shared.limits.in_capsule,
            _ => ADMIN_IN_CAPSULE,
        };
        PduLimits {
            in_capsule,
            data_pdu: self.shared.limits.max_h2c_data,
        }
    }

    /// The largest PDU this queue accepts, with room for a read chunk behind it.
    pub(super) fn largest_pdu(&self) -> usize {
        let l = self.pdu_limits();
        let header = crate::codec::pdu::CMD_HLEN + 2 * crate::codec::pdu::DIGEST_LEN + 256;
        header + l.in_capsule.max(l.data_pdu) as usize
    }

    /// Read more from the socket into `inbuf`.
    pub(super) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let rest = self.want.saturating_sub(self.inbuf.len());
        let limit = if rest >= EXACT_READ_MIN {
            rest
        } else {
            READ_CHUNK
        };
        // While nothing is buffered, making room for the largest PDU this queue takes moves no
        // bytes (and reuses the allocation when nothing else holds it). Later, when a large
        // H2CData PDU turns out to be arriving, there is room for all of it after what was
        // read already, which then need not be moved.
        let largest = self.largest_pdu();
        if self.inbuf.is_empty() && self.inbuf.capacity() < largest {
            self.inbuf.reserve(largest);
        }
        wire::poll_read_buf(&mut self.stream, cx, &mut self.inbuf, limit, READ_CHUNK)
    }

    /// The header of the PDU at the head of `inbuf`, for a termination request.
    pub(super) fn offending_header(&self) -> Vec<u8> {
        let hlen = self.inbuf.get(2).map_or(8, |&h| usize::from(h));
        let n = hlen.clamp(8, MAX_TERM_DATA).min(self.inbuf.len());
        self.inbuf[..n].to_vec()
    }

    /// Take one whole PDU from `inbuf` and act on it.
    pub(super) fn parse_one(&mut self) -> Result<bool, (PduError, Vec<u8>)> {
        let decoded = decode_header(
            &self.inbuf,
            Role::Controller,
            self.digests,
            self.pdu_limits(),
        )
        .map_err(|e| (e, self.offending_header()))?;
        let Some((header, layout)) = decoded else {
            self.want = 0;
            return Ok(false);
        };
        if self.inbuf.len() < layout.total {
            self.want = layout.total;
            return Ok(false);
        }
        self.want = 0;
        let flags = self.inbuf[1];
        // The header, for a termination request should this PDU turn out to break the rules.
        let mut head = [0u8; MAX_TERM_DATA];
        let head_len = layout.header_len.min(MAX_TERM_DATA);
        head[..head_len].copy_from_slice(&self.inbuf[..head_len]);
        let r = match header {
            PduHeader::IcReq(r) => {
                self.inbuf.advance(layout.total);
                self.on_ic_req(r)
            }
            PduHeader::H2CTermReq { fes, fei } => {
                let data = &self.inbuf[layout.header_len.min(layout.total)..layout.total];
                info!(fes, fei, header = ?data, "the host terminated the connection (H2CTermReq)");
                self.inbuf.advance(layout.total);
                self.aborted = true;
                self.reading = false;
                Ok(())
            }
            PduHeader::CapsuleCmd(cmd) => {
                let (data, bad) = self.take_pdu(&layout);
                self.on_capsule(cmd, data, bad)
            }
            PduHeader::H2CData(d) => {
                let (data, bad) = self.take_pdu(&layout);
                self.on_h2c_data(d, flags, data, bad)
            }
            other => Err(PduError::InvalidField {
                offset: 0,
                why: format!("{other:?} is not a PDU a controller receives"),
            }),
        };
        r.map(|()| true).map_err(|e| (e, head[..head_len].to_vec()))
    }

    /// Split a whole PDU off `inbuf`: its data (without a copy) and whether its data digest
    /// failed.
    pub(super) fn take_pdu(&mut self, layout: &crate::codec::Layout) -> (Bytes, bool) {
        if layout.data_len == 0 {
            self.inbuf.advance(layout.total);
            return (Bytes::new(), false);
        }
        self.inbuf.advance(layout.data_offset);
        let data = self.inbuf.split_to(layout.data_len).freeze();
        let bad = layout.data_digest && digest(&data)[..] != self.inbuf[..4];
        self.inbuf
            .advance(layout.total - layout.data_offset - layout.data_len);
        (data, bad)
    }

    pub(super) fn on_ic_req(&mut self, r: IcReq) -> Result<(), PduError> {
        if r.pfv != 0 {
            return Err(PduError::Unsupported {
                offset: 8,
                why: format!("PDU format version {}", r.pfv),
            });
        }
        if r.hpda > 31 {
            return Err(PduError::InvalidField {
                offset: 10,
                why: format!("HPDA {} is above 31", r.hpda),
            });
        }
        self.digests = Some(r.digests);
        self.align = (usize::from(r.hpda) + 1) * 4;
        self.phase = Phase::Initialized;
        debug!(
            header_digest = r.digests.header,
            data_digest = r.digests.data,
            "ICReq"
        );
        let resp = IcResp {
            pfv: 0,
            cpda: 0,
            digests: r.digests,
            maxh2cdata: self.shared.limits.max_h2c_data,
        };
        let b = self.encode(|b| encode_ic_resp(b, &resp));
        self.out.push(Out::one(b, false));
        Ok(())
    }
}
