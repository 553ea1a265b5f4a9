//! The virtio-blk wire format as pure functions: the feature bits a device offers, request
//! headers, how a descriptor chain's buffers split into header, data and status byte,
//! discard/write-zeroes segments, the configuration space, and the checks that decide a
//! request's status before the device is touched.
//!
//! No I/O and no guest memory here: addresses are plain numbers, so tests (and fuzzing) can
//! drive every function with arbitrary input. [`crate::connection`] reads and writes the guest
//! memory these functions point at, through `vm-memory`.

use virtio_bindings::virtio_blk as blk;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// virtio-blk addresses the disk in 512-byte sectors, whatever its block size.
pub const SECTOR_SIZE: u64 = 512;
/// The request header: type (le32), I/O priority (le32), sector (le64).
pub const HEADER_LEN: usize = 16;
/// One discard or write-zeroes segment: sector (le64), sectors (le32), flags (le32).
pub const SEGMENT_LEN: usize = 16;
/// The length of the identifier GET_ID answers.
pub const ID_BYTES: usize = blk::VIRTIO_BLK_ID_BYTES as usize;
/// The bytes of the configuration space this device defines (through `write_zeroes_may_unmap`
/// and its padding).
pub const CONFIG_LEN: usize = 60;
/// How far a front-end may read the configuration space; past [`CONFIG_LEN`] it reads zeroes
/// (fields of features this device does not offer).
pub const CONFIG_SPACE: usize = 256;
/// The offset of the `writeback` byte, the only field a driver may write.
pub const CONFIG_WRITEBACK: u32 = 32;

/// The vhost-user feature bit that says the back end speaks protocol features.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// Discard and write-zeroes segment flag: the range may be deallocated.
pub const SEGMENT_FLAG_UNMAP: u32 = blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

const fn bit(n: u32) -> u64 {
    1u64 << n
}

/// The status byte a request completes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Done.
    Ok = blk::VIRTIO_BLK_S_OK as u8,
    /// Failed: a device error, a request out of range or malformed, a write to a read-only disk.
    IoErr = blk::VIRTIO_BLK_S_IOERR as u8,
    /// A request type (or flag) the device does not support.
    Unsupp = blk::VIRTIO_BLK_S_UNSUPP as u8,
}

/// What the device offers, as the front-end sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    /// The volume refuses writes.
    pub read_only: bool,
    /// The device can release space (`trim`): DISCARD is offered.
    pub discard: bool,
}

/// The virtio feature bits for `offer`: the transport's (VERSION_1, indirect descriptors,
/// event index, vhost-user protocol features) and virtio-blk's.
pub fn device_features(offer: Offer) -> u64 {
    let mut features = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VHOST_USER_F_PROTOCOL_FEATURES)
        | bit(blk::VIRTIO_BLK_F_SEG_MAX)
        | bit(blk::VIRTIO_BLK_F_BLK_SIZE)
        | bit(blk::VIRTIO_BLK_F_TOPOLOGY)
        | bit(blk::VIRTIO_BLK_F_FLUSH)
        | bit(blk::VIRTIO_BLK_F_CONFIG_WCE)
        | bit(blk::VIRTIO_BLK_F_MQ);
    if offer.read_only {
        features |= bit(blk::VIRTIO_BLK_F_RO);
    } else {
        features |= bit(blk::VIRTIO_BLK_F_WRITE_ZEROES);
        if offer.discard {
            features |= bit(blk::VIRTIO_BLK_F_DISCARD);
        }
    }
    features
}

/// A request's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read (`VIRTIO_BLK_T_IN`).
    In,
    /// Write (`VIRTIO_BLK_T_OUT`).
    Out,
    /// Make completed writes durable.
    Flush,
    /// The device's identifier (20 bytes).
    GetId,
    /// Release ranges.
    Discard,
    /// Make ranges read as zeroes.
    WriteZeroes,
    /// Anything else (SCSI commands, secure erase, zoned commands, unknown numbers).
    Other(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> RequestType {
        match value {
            blk::VIRTIO_BLK_T_IN => RequestType::In,
            blk::VIRTIO_BLK_T_OUT => RequestType::Out,
            blk::VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            blk::VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            blk::VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            blk::VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Other(other),
        }
    }
}

impl RequestType {
    /// Whether the request changes the disk.
    pub fn writes(self) -> bool {
        matches!(
            self,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        )
    }
}

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub request_type: RequestType,
    /// The first sector (512 bytes) the request addresses.
    pub sector: u64,
}

/// Decodes the 16-byte request header (the I/O priority is ignored).
pub fn decode_header(bytes: &[u8; HEADER_LEN]) -> Header {
    let mut ty = [0u8; 4];
    ty.copy_from_slice(&bytes[0..4]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&bytes[8..16]);
    Header {
        request_type: RequestType::from(u32::from_le_bytes(ty)),
        sector: u64::from_le_bytes(sector),
    }
}

/// Encodes a request header (for front-ends and tests).
pub fn encode_header(request_type: u32, sector: u64) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[0..4].copy_from_slice(&request_type.to_le_bytes());
    out[8..16].copy_from_slice(&sector.to_le_bytes());
    out
}

/// Whether a request of `request_type` may run on a device that offered `offer`: `Ok` or the
/// status to answer at once. Writes to a read-only disk fail with IOERR (virtio 1.2, 5.2.6.2);
/// request types whose feature was not offered, and unknown ones, are UNSUPP.
pub fn admit(request_type: RequestType, offer: Offer) -> Result<(), Status> {
    match request_type {
        RequestType::In | RequestType::Flush | RequestType::GetId => Ok(()),
        RequestType::Out if offer.read_only => Err(Status::IoErr),
        RequestType::Out => Ok(()),
        // Not offered on a read-only disk; a driver that sends them anyway is refused as
        // for any other write.
        RequestType::Discard | RequestType::WriteZeroes if offer.read_only => Err(Status::IoErr),
        RequestType::Discard if !offer.discard => Err(Status::Unsupp),
        RequestType::Discard | RequestType::WriteZeroes => Ok(()),
        RequestType::Other(_) => Err(Status::Unsupp),
    }
}

/// One buffer of a descriptor chain: a guest-physical address, a length, and whether the
/// device may write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A part of a guest buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub addr: u64,
    pub len: u32,
}

/// Where a request's parts are in guest memory. Any framing is accepted: the header may share
/// a buffer with data, data may be split anywhere (virtio 1.x, "message framing").
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Layout {
    /// The 16 header bytes: the first readable bytes.
    pub header: Vec<Piece>,
    /// The readable bytes after the header (write data, discard segments).
    pub data_out: Vec<Piece>,
    /// The writable bytes before the status byte (read data, the identifier).
    pub data_in: Vec<Piece>,
    /// The status byte: the last writable byte.
    pub status: u64,
}

impl Layout {
    /// The bytes of `data_out`.
    pub fn out_len(&self) -> u64 {
        self.data_out.iter().map(|p| u64::from(p.len)).sum()
    }

    /// The bytes of `data_in`.
    pub fn in_len(&self) -> u64 {
        self.data_in.iter().map(|p| u64::from(p.len)).sum()
    }
}

/// Why a chain cannot be a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// No writable byte for the status: the request cannot even be answered.
    #[error("no writable byte for the status")]
    NoStatus,
    /// Fewer than 16 readable bytes.
    #[error("a header shorter than {HEADER_LEN} bytes")]
    ShortHeader,
    /// A readable buffer after a writable one.
    #[error("a readable buffer after a writable one")]
    ReadableAfterWritable,
    /// A buffer whose end does not fit in 64 bits.
    #[error("a buffer that wraps around the address space")]
    Wraps,
}

/// Splits a chain's buffers into a [`Layout`]. On error, also returns the status byte's
/// address when there is one, so that the request can be answered IOERR.
pub fn layout(buffers: &[Buffer]) -> Result<Layout, (Malformed, Option<u64>)> {
    // The status byte: the last byte of the last writable buffer that has any.
    let status = buffers
        .iter()
        .rev()
        .find(|b| b.writable && b.len > 0)
        .and_then(|b| b.addr.checked_add(u64::from(b.len) - 1));
    if buffers
        .iter()
        .any(|b| b.addr.checked_add(u64::from(b.len)).is_none())
    {
        return Err((Malformed::Wraps, status));
    }
    let Some(status) = status else {
        return Err((Malformed::NoStatus, None));
    };
    let first_writable = buffers
        .iter()
        .position(|b| b.writable)
        .unwrap_or(buffers.len());
    if buffers[first_writable..].iter().any(|b| !b.writable) {
        return Err((Malformed::ReadableAfterWritable, Some(status)));
    }
    let mut out = Layout {
        status,
        ..Layout::default()
    };
    let mut header_left = HEADER_LEN as u32;
    for b in &buffers[..first_writable] {
        let mut piece = Piece {
            addr: b.addr,
            len: b.len,
        };
        if header_left > 0 {
            let take = piece.len.min(header_left);
            if take > 0 {
                out.header.push(Piece {
                    addr: piece.addr,
                    len: take,
                });
            }
            header_left -= take;
            piece.addr += u64::from(take);
            piece.len -= take;
        }
        if piece.len > 0 {
            out.data_out.push(piece);
        }
    }
    if header_left > 0 {
        return Err((Malformed::ShortHeader, Some(status)));
    }
    // Every writable byte but the last is data.
    let mut in_left: u64 = buffers[first_writable..]
        .iter()
        .map(|b| u64::from(b.len))
        .sum::<u64>()
        - 1;
    for b in &buffers[first_writable..] {
        if in_left == 0 {
            break;
        }
        let take = u64::from(b.len).min(in_left);
        if take > 0 {
            out.data_in.push(Piece {
                addr: b.addr,
                len: take as u32,
            });
        }
        in_left -= take;
    }
    Ok(out)
}

/// Checks a read or write of `len` bytes at `sector` against a disk of `capacity` sectors
/// whose logical block is `block_size` bytes; returns the byte offset, or IOERR.
pub fn check_rw(sector: u64, len: u64, capacity: u64, block_size: u32) -> Result<u64, Status> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(Status::IoErr);
    }
    let end_sector = sector.checked_add(len / SECTOR_SIZE).ok_or(Status::IoErr)?;
    if end_sector > capacity {
        return Err(Status::IoErr);
    }
    let offset = sector * SECTOR_SIZE;
    let bs = u64::from(block_size.max(1));
    if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
        return Err(Status::IoErr);
    }
    Ok(offset)
}

/// One discard or write-zeroes segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

/// Decodes the segments of a discard or write-zeroes request; at least one, at most
/// `max_segments`, and a whole number of them, else IOERR.
pub fn decode_segments(bytes: &[u8], max_segments: u32) -> Result<Vec<Segment>, Status> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(SEGMENT_LEN) {
        return Err(Status::IoErr);
    }
    if bytes.len() / SEGMENT_LEN > max_segments as usize {
        return Err(Status::IoErr);
    }
    Ok(bytes
        .chunks_exact(SEGMENT_LEN)
        .map(|c| {
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&c[0..8]);
            let mut num = [0u8; 4];
            num.copy_from_slice(&c[8..12]);
            let mut flags = [0u8; 4];
            flags.copy_from_slice(&c[12..16]);
            Segment {
                sector: u64::from_le_bytes(sector),
                num_sectors: u32::from_le_bytes(num),
                flags: u32::from_le_bytes(flags),
            }
        })
        .collect())
}

/// Encodes a segment (for front-ends and tests).
pub fn encode_segment(segment: Segment) -> [u8; SEGMENT_LEN] {
    let mut out = [0u8; SEGMENT_LEN];
    out[0..8].copy_from_slice(&segment.sector.to_le_bytes());
    out[8..12].copy_from_slice(&segment.num_sectors.to_le_bytes());
    out[12..16].copy_from_slice(&segment.flags.to_le_bytes());
    out
}

/// A checked segment: the byte range and whether it may be deallocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
    pub unmap: bool,
}

/// Checks one segment of a discard (`discard: true`) or write-zeroes request. Unknown flags,
/// and the unmap flag on a discard, are UNSUPP (virtio 1.2, 5.2.6.2); a segment larger than
/// `max_sectors`, out of range or not aligned to the block size is IOERR.
pub fn check_segment(
    segment: Segment,
    discard: bool,
    capacity: u64,
    block_size: u32,
    max_sectors: u32,
) -> Result<Range, Status> {
    if segment.flags & !SEGMENT_FLAG_UNMAP != 0 {
        return Err(Status::Unsupp);
    }
    let unmap = segment.flags & SEGMENT_FLAG_UNMAP != 0;
    if discard && unmap {
        return Err(Status::Unsupp);
    }
    if segment.num_sectors > max_sectors {
        return Err(Status::IoErr);
    }
    let len = u64::from(segment.num_sectors) * SECTOR_SIZE;
    let offset = check_rw(segment.sector, len, capacity, block_size)?;
    Ok(Range { offset, len, unmap })
}

/// The identifier GET_ID answers: the volume name, cut to 20 bytes, zero-padded.
pub fn device_id(name: &str) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    let bytes = name.as_bytes();
    let n = bytes.len().min(ID_BYTES);
    id[..n].copy_from_slice(&bytes[..n]);
    id
}

/// The block sizes the guest is told: `blk_size` (the logical block, at least a sector), the
/// physical block as a power-of-two multiple of it, and the minimum and optimal I/O sizes in
/// logical blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
}

/// The largest physical block reported: a page of the largest page-store images.
const MAX_PHYSICAL_BLOCK: u32 = 64 << 10;

/// The topology of a device with logical block `block_size` and optimal I/O size
/// `optimal_io_size`: the physical block is the optimal I/O size where that is a power of two
/// no larger than 64 KiB (a page-store image's page), else the logical block.
pub fn topology(block_size: u32, optimal_io_size: u32) -> Topology {
    let blk_size = block_size.max(SECTOR_SIZE as u32);
    let physical = if optimal_io_size.is_power_of_two()
        && optimal_io_size > blk_size
        && optimal_io_size <= MAX_PHYSICAL_BLOCK
        && blk_size.is_power_of_two()
    {
        optimal_io_size
    } else {
        blk_size
    };
    let ratio = physical / blk_size;
    Topology {
        blk_size,
        physical_block_exp: ratio.trailing_zeros() as u8,
        min_io_size: u16::try_from(ratio).unwrap_or(u16::MAX),
        opt_io_size: (optimal_io_size / blk_size).max(1),
    }
}

/// The virtio-blk configuration space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Size in 512-byte sectors.
    pub capacity: u64,
    pub seg_max: u32,
    pub topology: Topology,
    /// The driver's cache mode: true = write back (flushes needed), false = write through.
    pub writeback: bool,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: bool,
}

impl Config {
    /// The configuration space's bytes (little endian, the layout of `virtio_blk_config`).
    pub fn encode(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        // size_max (8..12) and geometry (16..20) stay zero: those features are not offered.
        c[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        c[20..24].copy_from_slice(&self.topology.blk_size.to_le_bytes());
        c[24] = self.topology.physical_block_exp;
        c[25] = 0; // alignment_offset
        c[26..28].copy_from_slice(&self.topology.min_io_size.to_le_bytes());
        c[28..32].copy_from_slice(&self.topology.opt_io_size.to_le_bytes());
        c[32] = u8::from(self.writeback);
        c[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        c[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        c[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        c[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        c[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        c[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        c[56] = u8::from(self.write_zeroes_may_unmap);
        c
    }

    /// `size` bytes of the configuration space from `offset` (zeroes past [`CONFIG_LEN`]), or
    /// `None` if the range reaches past [`CONFIG_SPACE`].
    pub fn read(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        let end = offset.checked_add(size)? as usize;
        if end > CONFIG_SPACE {
            return None;
        }
        let mut space = [0u8; CONFIG_SPACE];
        space[..CONFIG_LEN].copy_from_slice(&self.encode());
        Some(space[offset as usize..end].to_vec())
    }
}

/// Decodes a driver's write to the configuration space: only the `writeback` byte may be
/// written, with 0 or 1. Returns the new writeback mode.
pub fn decode_config_write(offset: u32, bytes: &[u8]) -> Option<bool> {
    match (offset, bytes) {
        (CONFIG_WRITEBACK, [0]) => Some(false),
        (CONFIG_WRITEBACK, [1]) => Some(true),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::mem::offset_of;
    use virtio_bindings::virtio_blk::virtio_blk_config;

    #[test]
    fn config_layout_matches_the_bindings() {
        assert_eq!(offset_of!(virtio_blk_config, seg_max), 12);
        assert_eq!(offset_of!(virtio_blk_config, blk_size), 20);
        assert_eq!(offset_of!(virtio_blk_config, physical_block_exp), 24);
        assert_eq!(offset_of!(virtio_blk_config, min_io_size), 26);
        assert_eq!(offset_of!(virtio_blk_config, opt_io_size), 28);
        assert_eq!(
            offset_of!(virtio_blk_config, wce),
            CONFIG_WRITEBACK as usize
        );
        assert_eq!(offset_of!(virtio_blk_config, num_queues), 34);
        assert_eq!(offset_of!(virtio_blk_config, max_discard_sectors), 36);
        assert_eq!(offset_of!(virtio_blk_config, max_discard_seg), 40);
        assert_eq!(offset_of!(virtio_blk_config, discard_sector_alignment), 44);
        assert_eq!(offset_of!(virtio_blk_config, max_write_zeroes_sectors), 48);
        assert_eq!(offset_of!(virtio_blk_config, max_write_zeroes_seg), 52);
        assert_eq!(offset_of!(virtio_blk_config, write_zeroes_may_unmap), 56);
        assert_eq!(offset_of!(virtio_blk_config, max_secure_erase_sectors), 60);
    }

    fn config() -> Config {
        Config {
            capacity: 0x1122_3344_5566_7788,
            seg_max: 254,
            topology: topology(512, 4096),
            writeback: true,
            num_queues: 4,
            max_discard_sectors: 1 << 22,
            max_discard_seg: 16,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: 1 << 22,
            max_write_zeroes_seg: 16,
            write_zeroes_may_unmap: true,
        }
    }

    #[test]
    fn config_reads() {
        let c = config();
        let bytes = c.encode();
        assert_eq!(&bytes[0..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(bytes[24], 3, "4096 / 512 = 2^3");
        assert_eq!(c.read(0, 8).as_deref(), Some(&bytes[0..8]));
        assert_eq!(c.read(56, 16).map(|v| v.len()), Some(16));
        assert_eq!(c.read(60, 12), Some(vec![0; 12]));
        assert_eq!(c.read(250, 10), None);
        assert_eq!(c.read(u32::MAX, 2), None);
    }

    #[test]
    fn topology_of_images_and_plain_devices() {
        assert_eq!(
            topology(1, 1),
            Topology {
                blk_size: 512,
                physical_block_exp: 0,
                min_io_size: 1,
                opt_io_size: 1
            }
        );
        let image = topology(4096, 4096);
        assert_eq!((image.blk_size, image.physical_block_exp), (4096, 0));
        let page = topology(512, 16384);
        assert_eq!(page.physical_block_exp, 5);
        assert_eq!(page.min_io_size, 32);
        assert_eq!(page.opt_io_size, 32);
        // 1 MiB optimal I/O is not a page: the physical block stays the logical one.
        let big = topology(512, 1 << 20);
        assert_eq!(big.physical_block_exp, 0);
        assert_eq!(big.opt_io_size, 2048);
    }

    #[test]
    fn admission() {
        let rw = Offer {
            read_only: false,
            discard: true,
        };
        let ro = Offer {
            read_only: true,
            discard: true,
        };
        let no_trim = Offer {
            read_only: false,
            discard: false,
        };
        assert_eq!(admit(RequestType::Out, rw), Ok(()));
        assert_eq!(admit(RequestType::Out, ro), Err(Status::IoErr));
        assert_eq!(admit(RequestType::WriteZeroes, ro), Err(Status::IoErr));
        assert_eq!(admit(RequestType::In, ro), Ok(()));
        assert_eq!(admit(RequestType::Flush, ro), Ok(()));
        assert_eq!(admit(RequestType::Discard, no_trim), Err(Status::Unsupp));
        assert_eq!(admit(RequestType::Other(2), rw), Err(Status::Unsupp));
        assert_eq!(admit(RequestType::from(14), rw), Err(Status::Unsupp));
        assert_eq!(device_features(ro) & bit(blk::VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(device_features(ro) & bit(blk::VIRTIO_BLK_F_RO), 0);
        assert_eq!(device_features(no_trim) & bit(blk::VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(device_features(rw) & bit(blk::VIRTIO_BLK_F_DISCARD), 0);
    }

    #[test]
    fn layouts() {
        let r = |addr, len| Buffer {
            addr,
            len,
            writable: false,
        };
        let w = |addr, len| Buffer {
            addr,
            len,
            writable: true,
        };
        // The usual three descriptors.
        let l = layout(&[r(0x1000, 16), w(0x2000, 4096), w(0x3000, 1)]).unwrap();
        assert_eq!(
            l.header,
            vec![Piece {
                addr: 0x1000,
                len: 16
            }]
        );
        assert_eq!(
            l.data_in,
            vec![Piece {
                addr: 0x2000,
                len: 4096
            }]
        );
        assert_eq!(l.status, 0x3000);
        // Header and data in one buffer, status at the end of the data buffer.
        let l = layout(&[r(0x1000, 16 + 512), w(0x2000, 513)]).unwrap();
        assert_eq!(
            l.header,
            vec![Piece {
                addr: 0x1000,
                len: 16
            }]
        );
        assert_eq!(
            l.data_out,
            vec![Piece {
                addr: 0x1010,
                len: 512
            }]
        );
        assert_eq!(
            l.data_in,
            vec![Piece {
                addr: 0x2000,
                len: 512
            }]
        );
        assert_eq!(l.status, 0x2000 + 512);
        // A header split over buffers.
        let l = layout(&[r(0x10, 4), r(0x20, 12), w(0x30, 1)]).unwrap();
        assert_eq!(l.header.len(), 2);
        assert_eq!(
            layout(&[r(0x10, 8), w(0x30, 1)]),
            Err((Malformed::ShortHeader, Some(0x30)))
        );
        assert_eq!(layout(&[r(0x10, 16)]), Err((Malformed::NoStatus, None)));
        assert_eq!(
            layout(&[r(0x10, 16), w(0x30, 0)]),
            Err((Malformed::NoStatus, None))
        );
        assert_eq!(
            layout(&[w(0x30, 1), r(0x10, 16)]),
            Err((Malformed::ReadableAfterWritable, Some(0x30)))
        );
        assert_eq!(
            layout(&[r(u64::MAX - 3, 16), w(0x30, 1)]),
            Err((Malformed::Wraps, Some(0x30)))
        );
    }

    #[test]
    fn rw_checks() {
        assert_eq!(check_rw(0, 4096, 8, 512), Ok(0));
        assert_eq!(check_rw(1, 512, 8, 512), Ok(512));
        assert_eq!(check_rw(7, 1024, 8, 512), Err(Status::IoErr));
        assert_eq!(check_rw(0, 100, 8, 512), Err(Status::IoErr));
        assert_eq!(check_rw(u64::MAX, 512, u64::MAX, 512), Err(Status::IoErr));
        assert_eq!(check_rw(1, 4096, 64, 4096), Err(Status::IoErr));
        assert_eq!(check_rw(8, 4096, 64, 4096), Ok(4096));
        assert_eq!(check_rw(8, 0, 8, 512), Ok(4096));
    }

    #[test]
    fn segments() {
        let seg = Segment {
            sector: 8,
            num_sectors: 8,
            flags: 0,
        };
        let bytes = encode_segment(seg);
        assert_eq!(decode_segments(&bytes, 1), Ok(vec![seg]));
        assert_eq!(decode_segments(&bytes[..15], 1), Err(Status::IoErr));
        assert_eq!(decode_segments(&[], 1), Err(Status::IoErr));
        assert_eq!(
            decode_segments(&[bytes, bytes].concat(), 1),
            Err(Status::IoErr)
        );
        let range = check_segment(seg, true, 64, 512, 1024).unwrap();
        assert_eq!((range.offset, range.len, range.unmap), (4096, 4096, false));
        let unmap = Segment { flags: 1, ..seg };
        assert_eq!(
            check_segment(unmap, true, 64, 512, 1024),
            Err(Status::Unsupp)
        );
        assert!(check_segment(unmap, false, 64, 512, 1024).unwrap().unmap);
        let odd = Segment { flags: 2, ..seg };
        assert_eq!(
            check_segment(odd, false, 64, 512, 1024),
            Err(Status::Unsupp)
        );
        assert_eq!(check_segment(seg, false, 12, 512, 1024), Err(Status::IoErr));
        assert_eq!(check_segment(seg, false, 64, 512, 4), Err(Status::IoErr));
    }

    #[test]
    fn config_writes() {
        assert_eq!(decode_config_write(32, &[0]), Some(false));
        assert_eq!(decode_config_write(32, &[1]), Some(true));
        assert_eq!(decode_config_write(32, &[2]), None);
        assert_eq!(decode_config_write(0, &[0; 8]), None);
        assert_eq!(decode_config_write(32, &[1, 0]), None);
    }

    #[test]
    fn headers_round_trip() {
        let h = decode_header(&encode_header(1, 77));
        assert_eq!(h.request_type, RequestType::Out);
        assert_eq!(h.sector, 77);
        assert_eq!(device_id("demo")[..5], *b"demo\0");
        assert_eq!(
            device_id("a-very-long-volume-name-indeed"),
            *b"a-very-long-volume-n"
        );
    }

    fn buffers() -> impl Strategy<Value = Vec<Buffer>> {
        proptest::collection::vec(
            (any::<u64>(), 0u32..70_000, any::<bool>()).prop_map(|(addr, len, writable)| Buffer {
                addr,
                len,
                writable,
            }),
            0..12,
        )
    }

    proptest! {
        /// Whatever the chain, the layout's parts are inside its buffers, add up to its bytes,
        /// and put the status on the last writable byte.
        #[test]
        fn layout_stays_inside_the_buffers(bufs in buffers()) {
            let inside = |addr: u64, len: u64, writable: bool| {
                bufs.iter().any(|b| {
                    b.writable == writable
                        && addr >= b.addr
                        && addr.checked_add(len).is_some_and(|end| end <= b.addr + u64::from(b.len))
                })
            };
            if let Ok(l) = layout(&bufs) {
                let readable: u64 = bufs.iter().filter(|b| !b.writable).map(|b| u64::from(b.len)).sum();
                let writable: u64 = bufs.iter().filter(|b| b.writable).map(|b| u64::from(b.len)).sum();
                let header: u64 = l.header.iter().map(|p| u64::from(p.len)).sum();
                prop_assert_eq!(header, HEADER_LEN as u64);
                prop_assert_eq!(header + l.out_len(), readable);
                prop_assert_eq!(l.in_len() + 1, writable);
                for p in l.header.iter().chain(&l.data_out) {
                    prop_assert!(inside(p.addr, u64::from(p.len), false));
                }
                for p in &l.data_in {
                    prop_assert!(inside(p.addr, u64::from(p.len), true));
                }
                prop_assert!(inside(l.status, 1, true));
            } else if let Err((_, Some(status))) = layout(&bufs) {
                prop_assert!(inside(status, 1, true));
            }
        }

        #[test]
        fn checked_ranges_stay_on_the_disk(sector in any::<u64>(), len in any::<u64>(), capacity in 0u64..1 << 40) {
            if let Ok(offset) = check_rw(sector, len, capacity, 512) {
                prop_assert!(offset + len <= capacity * SECTOR_SIZE);
            }
        }
    }
}
