//! The target driven by a front-end outside any VM (the `vhost` crate's `Frontend` over a
//! memfd the test maps itself): I/O of every request type and layout, requests in flight
//! together, and every kind of bad input — descriptors outside memory, wrong lengths, unknown
//! types, read-only volumes, malicious control messages — each answered or refused while the
//! export keeps serving.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use common::{pattern, read_device, wait_until, Harness};
use strata_bdev::{BlockDevice, MemDevice};
use strata_vhost_user_blk::codec::{self, Segment, Status};
use strata_vhost_user_blk::frontend::{BlkFrontend, Buf, FrontendOptions, RawDescriptor};
use strata_vhost_user_blk::VhostUserSettings;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

const SIZE: u64 = 16 << 20;
const WAIT: Duration = Duration::from_secs(30);
const OK: Option<u8> = Some(Status::Ok as u8);
const IOERR: Option<u8> = Some(Status::IoErr as u8);
const UNSUPP: Option<u8> = Some(Status::Unsupp as u8);

fn connect(h: &Harness, name: &str, queues: u16) -> BlkFrontend {
    BlkFrontend::connect(
        &h.socket(name),
        &FrontendOptions {
            num_queues: queues,
            ..FrontendOptions::default()
        },
    )
    .expect("connect a front-end")
}

#[test]
fn requests_of_every_type_and_layout() {
    let h = Harness::new(VhostUserSettings::default());
    let device = Arc::new(MemDevice::new("vol", SIZE));
    let export = h.serve("vol", device.clone(), false);
    let mode = std::fs::metadata(export.socket_path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is owner-only");

    let mut f = connect(&h, "vol", 2);
    wait_until("the front-end is connected", WAIT, || export.connected());
    assert_eq!(f.capacity().unwrap(), SIZE / 512);
    let config = f.config(0, codec::CONFIG_LEN as u32).unwrap();
    assert_eq!(
        u32::from_le_bytes(config[20..24].try_into().unwrap()),
        512,
        "blk_size"
    );
    assert_eq!(
        u16::from_le_bytes(config[34..36].try_into().unwrap()),
        8,
        "num_queues"
    );
    for feature in [
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_CONFIG_WCE,
    ] {
        assert_ne!(
            f.features() & (1 << feature),
            0,
            "feature {feature} negotiated"
        );
    }

    // Write on one queue, read on the other; the device holds what was written.
    let data = pattern(1 << 20, 64 << 10, 1);
    assert_eq!(f.write(0, 1 << 20, &data).unwrap(), OK);
    let (status, back) = f.read(1, 1 << 20, 64 << 10).unwrap();
    assert_eq!(status, OK);
    assert!(back == data, "read back what was written");
    assert!(read_device(&h.runtime, device.as_ref(), 1 << 20, 64 << 10) == data);

    // GET_ID answers the volume name; FLUSH succeeds.
    let (status, id) = f.request(0, VIRTIO_BLK_T_GET_ID, 0, &[], 20).unwrap();
    assert_eq!(status, OK);
    assert_eq!(&id[..4], b"vol\0");
    assert_eq!(f.request(0, VIRTIO_BLK_T_FLUSH, 0, &[], 0).unwrap().0, OK);

    // Write zeroes and discard clear ranges.
    let zero = codec::encode_segment(Segment {
        sector: 2048,
        num_sectors: 16,
        flags: 0,
    });
    assert_eq!(
        f.request(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &zero, 0)
            .unwrap()
            .0,
        OK
    );
    let unmap = codec::encode_segment(Segment {
        sector: 2064,
        num_sectors: 16,
        flags: 1,
    });
    assert_eq!(
        f.request(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &unmap, 0)
            .unwrap()
            .0,
        OK
    );
    let discard = codec::encode_segment(Segment {
        sector: 2080,
        num_sectors: 8,
        flags: 0,
    });
    assert_eq!(
        f.request(1, VIRTIO_BLK_T_DISCARD, 0, &discard, 0)
            .unwrap()
            .0,
        OK
    );
    let cleared = read_device(&h.runtime, device.as_ref(), 1 << 20, 40 * 512);
    assert!(cleared.iter().all(|&b| b == 0), "the ranges read as zeroes");
    assert!(
        read_device(&h.runtime, device.as_ref(), (1 << 20) + 40 * 512, 512)
            == data[40 * 512..41 * 512]
    );

    // Any framing: the header and the data in one buffer, data split at odd places, the
    // status at the end of the data's buffer.
    let payload = pattern(4 << 20, 3 * 512, 2);
    let buf = f.alloc(16 + 3 * 512, 8).unwrap();
    f.memory()
        .write_slice(
            &codec::encode_header(VIRTIO_BLK_T_OUT, (4 << 20) / 512),
            GuestAddress(buf),
        )
        .unwrap();
    f.memory()
        .write_slice(&payload, GuestAddress(buf + 16))
        .unwrap();
    let status = f.alloc(1, 1).unwrap();
    let before = f.avail_idx(0);
    let head = f
        .submit(
            0,
            &[
                Buf::out(buf, 100),
                Buf::out(buf + 100, 700),
                Buf::out(buf + 800, 16 + 3 * 512 - 800),
                Buf::input(status, 1),
            ],
        )
        .unwrap();
    f.kick(0, before).unwrap();
    f.wait_for(0, head, WAIT).unwrap();
    assert_eq!(read_status(&f, status), OK);
    assert!(read_device(&h.runtime, device.as_ref(), 4 << 20, 3 * 512) == payload);

    let header = f.alloc(16, 16).unwrap();
    f.memory()
        .write_slice(
            &codec::encode_header(VIRTIO_BLK_T_IN, (4 << 20) / 512),
            GuestAddress(header),
        )
        .unwrap();
    let a = f.alloc(3 * 512 + 1, 8).unwrap();
    let before = f.avail_idx(0);
    let head = f
        .submit(
            0,
            &[
                Buf::out(header, 16),
                Buf::input(a, 1000),
                Buf::input(a + 1000, 3 * 512 + 1 - 1000),
            ],
        )
        .unwrap();
    f.kick(0, before).unwrap();
    let (_, written) = f.wait_for(0, head, WAIT).unwrap();
    assert_eq!(written, 3 * 512 + 1);
    let mut got = vec![0u8; 3 * 512 + 1];
    f.memory().read_slice(&mut got, GuestAddress(a)).unwrap();
    assert!(got[..3 * 512] == payload[..]);
    assert_eq!(got[3 * 512], Status::Ok as u8);

    // Many requests in flight on one queue, completed in whatever order.
    let depth = 64u64;
    let mut heads = Vec::new();
    let before = f.avail_idx(1);
    let mut statuses = Vec::new();
    for i in 0..depth {
        let header = f.alloc(16, 16).unwrap();
        f.memory()
            .write_slice(
                &codec::encode_header(VIRTIO_BLK_T_OUT, 8192 + i * 8),
                GuestAddress(header),
            )
            .unwrap();
        let data = f.alloc(4096, 4096).unwrap();
        f.memory()
            .write_slice(&pattern((8192 + i * 8) * 512, 4096, 3), GuestAddress(data))
            .unwrap();
        let status = f.alloc(1, 1).unwrap();
        heads.push(
            f.submit(
                1,
                &[
                    Buf::out(header, 16),
                    Buf::out(data, 4096),
                    Buf::input(status, 1),
                ],
            )
            .unwrap(),
        );
        statuses.push(status);
    }
    f.kick(1, before).unwrap();
    let mut done = std::collections::HashSet::new();
    while done.len() < heads.len() {
        for (head, _) in f.wait_used(1, WAIT).unwrap() {
            assert!(done.insert(head), "chain {head} completed twice");
        }
    }
    for status in statuses {
        assert_eq!(read_status(&f, status), OK);
    }
    let written = read_device(
        &h.runtime,
        device.as_ref(),
        8192 * 512,
        (depth * 4096) as usize,
    );
    assert!(written == pattern(8192 * 512, (depth * 4096) as usize, 3));

    // A request larger than the device's chunk size goes in pieces and arrives whole.
    let big = pattern(8 << 20, 6 << 20, 4);
    assert_eq!(f.write(0, 8 << 20, &big).unwrap(), OK);
    let (status, back) = f.read(1, 8 << 20, 6 << 20).unwrap();
    assert_eq!(status, OK);
    assert!(back == big);
}

fn read_status(f: &BlkFrontend, addr: u64) -> Option<u8> {
    let mut b = [0u8];
    f.memory().read_slice(&mut b, GuestAddress(addr)).unwrap();
    (b[0] != 0xff).then_some(b[0])
}

/// Writes a chain of raw descriptors taken from the queue's free entries and waits for it;
/// returns the bytes the back end says it wrote.
fn raw_chain(f: &mut BlkFrontend, q: usize, descs: &[(u64, u32, u16)]) -> u32 {
    let indices = f.reserve(q, descs.len()).unwrap();
    let table: Vec<(u16, RawDescriptor)> = descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let next = indices.get(i + 1).copied().unwrap_or(0);
            let flags = if i + 1 < descs.len() {
                flags | VRING_DESC_F_NEXT as u16
            } else {
                flags
            };
            (
                indices[i],
                RawDescriptor {
                    addr,
                    len,
                    flags,
                    next,
                },
            )
        })
        .collect();
    let before = f.avail_idx(q);
    f.submit_raw(q, &table, indices[0]).unwrap();
    f.kick(q, before).unwrap();
    f.wait_for(q, indices[0], WAIT).unwrap().1
}

#[test]
fn malformed_requests_are_answered_not_obeyed() {
    let h = Harness::new(VhostUserSettings::default());
    let device = Arc::new(MemDevice::new("vol", SIZE));
    let _export = h.serve("vol", device.clone(), false);
    let mut f = connect(&h, "vol", 1);
    let outside = f.memory_size() + (1 << 20);
    let w = VRING_DESC_F_WRITE as u16;

    // A sentinel in the volume: nothing below may change it.
    let sentinel = pattern(0, 1 << 20, 9);
    assert_eq!(f.write(0, 0, &sentinel).unwrap(), OK);

    let header = |f: &mut BlkFrontend, ty: u32, sector: u64| {
        let at = f.alloc(16, 16).unwrap();
        f.memory()
            .write_slice(&codec::encode_header(ty, sector), GuestAddress(at))
            .unwrap();
        at
    };
    let status = |f: &mut BlkFrontend| {
        let at = f.alloc(1, 1).unwrap();
        f.memory().write_slice(&[0xff], GuestAddress(at)).unwrap();
        at
    };
    // A read buffer fenced by canaries: nothing outside it may change.
    let fenced = |f: &mut BlkFrontend, len: u64| {
        let at = f.alloc(len + 2 * 4096, 4096).unwrap();
        f.memory()
            .write_slice(&vec![0xa5; (len + 2 * 4096) as usize], GuestAddress(at))
            .unwrap();
        at + 4096
    };
    let canaries_intact = |f: &BlkFrontend, at: u64, len: u64| {
        let mut before = vec![0u8; 4096];
        let mut after = vec![0u8; 4096];
        f.memory()
            .read_slice(&mut before, GuestAddress(at - 4096))
            .unwrap();
        f.memory()
            .read_slice(&mut after, GuestAddress(at + len))
            .unwrap();
        before.iter().chain(&after).all(|&b| b == 0xa5)
    };

    // Data outside guest memory: IOERR, for a write and for a read.
    let (hd, st) = (header(&mut f, VIRTIO_BLK_T_OUT, 0), status(&mut f));
    raw_chain(&mut f, 0, &[(hd, 16, 0), (outside, 4096, 0), (st, 1, w)]);
    assert_eq!(read_status(&f, st), IOERR, "write from outside memory");
    let (hd, st) = (header(&mut f, VIRTIO_BLK_T_IN, 0), status(&mut f));
    raw_chain(&mut f, 0, &[(hd, 16, 0), (outside, 4096, w), (st, 1, w)]);
    assert_eq!(read_status(&f, st), IOERR, "read into outside memory");
    // A buffer straddling the end of memory.
    let (hd, st) = (header(&mut f, VIRTIO_BLK_T_IN, 0), status(&mut f));
    let end = f.memory_size();
    raw_chain(&mut f, 0, &[(hd, 16, 0), (end - 2048, 4096, w), (st, 1, w)]);
    assert_eq!(read_status(&f, st), IOERR, "read across the end of memory");
    // A huge length.
    let (hd, st) = (header(&mut f, VIRTIO_BLK_T_IN, 0), status(&mut f));
    raw_chain(
        &mut f,
        0,
        &[(hd, 16, 0), (4096, u32::MAX - 4096, w), (st, 1, w)],
    );
    assert_eq!(read_status(&f, st), IOERR, "a 4 GiB descriptor");
    // The header outside memory; the status outside memory (nothing can be answered).
    let st = status(&mut f);
    raw_chain(&mut f, 0, &[(outside, 16, 0), (st, 1, w)]);
    assert_eq!(read_status(&f, st), IOERR, "header outside memory");
    let hd = header(&mut f, VIRTIO_BLK_T_IN, 0);
    let buf = fenced(&mut f, 4096);
    assert_eq!(
        raw_chain(&mut f, 0, &[(hd, 16, 0), (buf, 4096, w), (outside, 1, w)]),
        0
    );
    assert!(canaries_intact(&f, buf, 4096));

    // Wrong lengths: a short header, data not a multiple of 512, no status byte at all.
    let st = status(&mut f);
    let hd = header(&mut f, VIRTIO_BLK_T_IN, 0);
    raw_chain(&mut f, 0, &[(hd, 8, 0), (st, 1, w)]);
    assert_eq!(read_status(&f, st), IOERR, "an 8-byte header");
    let (hd, st) = (header(&mut f, VIRTIO_BLK_T_IN, 0), status(&mut f));
    let buf = fenced(&mut f, 4096);
    raw_chain(&mut f, 0, &[(hd, 16, 0), (buf, 1000, w), (st, 1, w)]);
    assert_eq!(read_status(&f, st), IOERR, "a 1000-byte read");
    assert!(canaries_intact(&f, buf, 1000));
    let hd = header(&mut f, VIRTIO_BLK_T_OUT, 0);
    let data = f.alloc(4096, 4096).unwrap();
    assert_eq!(
        raw_chain(&mut f, 0, &[(hd, 16, 0), (data, 4096, 0)]),
        0,
        "no status byte"
    );
    // A readable buffer after a writable one.
    let (hd, st) = (header(&mut f, VIRTIO_BLK_T_OUT, 0), status(&mut f));
    raw_chain(&mut f, 0, &[(hd, 16, 0), (st, 1, w), (data, 4096, 0)]);
    assert_eq!(read_status(&f, st), IOERR, "readable after writable");

    // Out of range: reads and writes past the end, sectors that overflow.
    let (hd, st) = (
        header(&mut f, VIRTIO_BLK_T_OUT, SIZE / 512 - 4),
        status(&mut f),
    );
    raw_chain(&mut f, 0, &[(hd, 16, 0), (data, 4096, 0), (st, 1, w)]);
    assert_eq!(read_status(&f, st), IOERR, "a write across the end");
    let (hd, st) = (
        header(&mut f, VIRTIO_BLK_T_IN, u64::MAX - 1),
        status(&mut f),
    );
    let buf = fenced(&mut f, 4096);
    raw_chain(&mut f, 0, &[(hd, 16, 0), (buf, 4096, w), (st, 1, w)]);
    assert_eq!(read_status(&f, st), IOERR, "a sector that overflows");
    assert!(canaries_intact(&f, buf, 4096));

    // Unknown and unsupported request types.
    for ty in [2, 14, 15, 0x55, u32::MAX] {
        let (hd, st) = (header(&mut f, ty, 0), status(&mut f));
        raw_chain(&mut f, 0, &[(hd, 16, 0), (data, 4096, 0), (st, 1, w)]);
        assert_eq!(read_status(&f, st), UNSUPP, "request type {ty}");
    }

    // Discard and write zeroes: unknown flags, unmap on discard, too many segments, ranges
    // past the end, a length that is not a whole number of segments.
    let seg = |sector, num_sectors, flags| {
        codec::encode_segment(Segment {
            sector,
            num_sectors,
            flags,
        })
    };
    assert_eq!(
        f.request(0, VIRTIO_BLK_T_DISCARD, 0, &seg(0, 8, 1), 0)
            .unwrap()
            .0,
        UNSUPP
    );
    assert_eq!(
        f.request(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &seg(0, 8, 6), 0)
            .unwrap()
            .0,
        UNSUPP
    );
    assert_eq!(
        f.request(
            0,
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            &seg(SIZE / 512 - 4, 8, 0),
            0
        )
        .unwrap()
        .0,
        IOERR
    );
    assert_eq!(
        f.request(0, VIRTIO_BLK_T_DISCARD, 0, &seg(0, 8, 0)[..10], 0)
            .unwrap()
            .0,
        IOERR
    );
    let many: Vec<u8> = (0..65).flat_map(|i| seg(i * 8, 8, 0)).collect();
    assert_eq!(
        f.request(0, VIRTIO_BLK_T_DISCARD, 0, &many, 0).unwrap().0,
        IOERR
    );
    assert_eq!(
        f.request(0, VIRTIO_BLK_T_DISCARD, 0, &seg(0, u32::MAX, 0), 0)
            .unwrap()
            .0,
        IOERR
    );

    // Broken chains: a loop, an indirect table outside memory, a head past the queue.
    let st = status(&mut f);
    let hd = header(&mut f, VIRTIO_BLK_T_IN, 0);
    let idx = f.reserve(0, 2).unwrap();
    let before = f.avail_idx(0);
    f.submit_raw(
        0,
        &[
            (
                idx[0],
                RawDescriptor {
                    addr: hd,
                    len: 16,
                    flags: VRING_DESC_F_NEXT as u16,
                    next: idx[1],
                },
            ),
            (
                idx[1],
                RawDescriptor {
                    addr: st,
                    len: 1,
                    flags: (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
                    next: idx[0],
                },
            ),
        ],
        idx[0],
    )
    .unwrap();
    f.kick(0, before).unwrap();
    f.wait_for(0, idx[0], WAIT).unwrap();
    let idx = f.reserve(0, 1).unwrap();
    let before = f.avail_idx(0);
    f.submit_raw(
        0,
        &[(
            idx[0],
            RawDescriptor {
                addr: outside,
                len: 64,
                flags: VRING_DESC_F_INDIRECT as u16,
                next: 0,
            },
        )],
        idx[0],
    )
    .unwrap();
    f.kick(0, before).unwrap();
    f.wait_for(0, idx[0], WAIT).unwrap();
    let before = f.avail_idx(0);
    f.submit_raw(0, &[], 4000).unwrap();
    f.kick(0, before).unwrap();

    // After all that the queue still works, and the volume holds what it held.
    let (status, back) = f.read(0, 0, 1 << 20).unwrap();
    assert_eq!(status, OK);
    assert!(back == sentinel, "the volume is unchanged");
    assert!(read_device(&h.runtime, device.as_ref(), 0, 1 << 20) == sentinel);
    let rest = read_device(
        &h.runtime,
        device.as_ref(),
        1 << 20,
        (SIZE - (1 << 20)) as usize,
    );
    assert!(
        rest.iter().all(|&b| b == 0),
        "nothing was written past the sentinel"
    );
}

#[test]
fn read_only_volumes_refuse_writes() {
    let h = Harness::new(VhostUserSettings::default());
    let device = Arc::new(MemDevice::new("ro", SIZE));
    h.runtime
        .block_on(device.write_at(0, pattern(0, 4096, 5).into(), Default::default()))
        .unwrap();
    let _export = h.serve("ro", device.clone(), true);
    let mut f = connect(&h, "ro", 1);
    assert_ne!(f.features() & (1 << VIRTIO_BLK_F_RO), 0, "RO offered");
    assert_eq!(
        f.features() & (1 << VIRTIO_BLK_F_DISCARD),
        0,
        "no DISCARD on a read-only disk"
    );
    assert_eq!(f.write(0, 0, &[0u8; 4096]).unwrap(), IOERR);
    let seg = codec::encode_segment(Segment {
        sector: 0,
        num_sectors: 8,
        flags: 0,
    });
    assert_eq!(
        f.request(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &seg, 0)
            .unwrap()
            .0,
        IOERR
    );
    assert_eq!(
        f.request(0, VIRTIO_BLK_T_DISCARD, 0, &seg, 0).unwrap().0,
        IOERR
    );
    assert_eq!(f.request(0, VIRTIO_BLK_T_FLUSH, 0, &[], 0).unwrap().0, OK);
    let (status, data) = f.read(0, 0, 4096).unwrap();
    assert_eq!(status, OK);
    assert!(
        data == pattern(0, 4096, 5),
        "reads work and the data is untouched"
    );
}

/// Sends raw bytes as a front-end would and returns the socket.
fn raw_message(socket: &std::path::Path, request: u32, flags: u32, payload: &[u8]) -> UnixStream {
    let mut s = UnixStream::connect(socket).expect("connect");
    let mut m = Vec::new();
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    s.write_all(&m).expect("send");
    s
}

/// The connection was closed by the back end: a read ends (after any reply bytes).
fn closed(mut s: UnixStream) -> bool {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => true,
        // Closed with our bytes unread.
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn malicious_messages_end_their_connection_not_the_export() {
    let h = Harness::new(VhostUserSettings::default());
    let device = Arc::new(MemDevice::new("vol", SIZE));
    let export = h.serve("vol", device, false);
    let socket = h.socket("vol");

    // Garbage: an unknown request, an oversized payload, a bad version, half a header.
    assert!(closed(raw_message(&socket, 0x7777, 1, &[])));
    assert!(closed(raw_message(&socket, 1, 1, &vec![0u8; 64 << 10])));
    let mut s = UnixStream::connect(&socket).unwrap();
    s.write_all(&[1, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f])
        .unwrap();
    assert!(closed(s));
    let mut s = UnixStream::connect(&socket).unwrap();
    s.write_all(&[1, 0, 0]).unwrap();
    drop(s);
    // SET_MEM_TABLE claiming regions without descriptors.
    let mut table = Vec::new();
    table.extend_from_slice(&1u32.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    table.extend_from_slice(&[0u8; 32]);
    assert!(closed(raw_message(&socket, 5, 1, &table)));

    // Valid messages with hostile values, through the vhost crate's front-end.
    let mut f = connect(&h, "vol", 1);
    assert!(
        f.vhost().set_vring_num(0, 4096).is_err(),
        "a queue larger than offered"
    );
    drop(f);
    let mut f = connect(&h, "vol", 1);
    assert!(
        f.vhost().set_vring_num(64, 128).is_err(),
        "a queue that does not exist"
    );
    drop(f);
    let mut f = connect(&h, "vol", 1);
    let bad = VringConfigData {
        queue_max_size: 256,
        queue_size: 256,
        flags: 0,
        desc_table_addr: 0xdead_0000_0000,
        used_ring_addr: 0xdead_0001_0000,
        avail_ring_addr: 0xdead_0002_0000,
        log_addr: None,
    };
    assert!(
        f.vhost().set_vring_addr(0, &bad).is_err(),
        "rings outside the memory table"
    );
    drop(f);
    let mut f = connect(&h, "vol", 1);
    // (A read of the configuration space past its end is answered with an empty payload,
    // which the vhost crate's front-end cannot take; codec::tests::config_reads covers it.)
    assert_eq!(f.config(0, 8).unwrap().len(), 8);
    assert!(
        f.vhost()
            .set_config(
                0,
                vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
                &[0u8; 8]
            )
            .is_err(),
        "the capacity is not writable"
    );
    drop(f);

    // The export still serves a well-behaved front-end, and has counted every connection.
    let mut f = connect(&h, "vol", 1);
    assert_eq!(f.write(0, 4096, &pattern(4096, 4096, 7)).unwrap(), OK);
    assert_eq!(f.read(0, 4096, 4096).unwrap().1, pattern(4096, 4096, 7));
    assert!(
        export.connections() >= 10,
        "{} connections",
        export.connections()
    );
}

#[test]
fn a_front_end_that_comes_back_finds_its_data() {
    let h = Harness::new(VhostUserSettings::default());
    let device = Arc::new(MemDevice::new("vol", SIZE));
    let export = h.serve("vol", device.clone(), false);

    // Disconnect and reconnect.
    let mut f = connect(&h, "vol", 2);
    assert_eq!(f.write(1, 0, &pattern(0, 8192, 1)).unwrap(), OK);
    drop(f);
    wait_until("the front-end is gone", WAIT, || !export.connected());
    let mut f = connect(&h, "vol", 1);
    assert_eq!(f.read(0, 0, 8192).unwrap().1, pattern(0, 8192, 1));
    drop(f);

    // The export restarts (as after a daemon restart): the socket is back, the data too.
    h.stop("vol");
    assert!(
        !common::is_socket(&h.socket("vol")),
        "the socket is removed"
    );
    let _export = h.serve("vol", device.clone(), false);
    let mut f = connect(&h, "vol", 1);
    assert_eq!(f.read(0, 0, 8192).unwrap().1, pattern(0, 8192, 1));

    // Stopping with a front-end connected disconnects it.
    assert!(f.vhost().get_features().is_ok());
    h.stop("vol");
    assert!(
        f.vhost().get_features().is_err(),
        "the front-end was disconnected"
    );
}
