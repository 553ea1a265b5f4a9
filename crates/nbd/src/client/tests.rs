//! The client against scripted servers on in-memory streams: reply assembly, protocol
//! violations, negotiation fallbacks, URIs.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use strata_bdev::{BlockDevice, ErrorKind, Extent, WriteOpts, ZeroOpts};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::{ClientOptions, NbdDevice};
use crate::codec::{self, cmd, cmd_flags, errno, info, opt, rep, reply, tx_flags, Request};

/// A scripted server on the other end of an in-memory stream.
struct Peer {
    s: DuplexStream,
}

impl Peer {
    async fn greet(&mut self, flags: u16) {
        let mut b = BytesMut::new();
        codec::encode_greeting(&mut b, flags);
        self.s.write_all(&b).await.unwrap();
        let client_flags = self.s.read_u32().await.unwrap();
        assert_eq!(
            client_flags & !(codec::client_flags::FIXED_NEWSTYLE | u32::from(flags)),
            0,
            "the client sets only flags the server offered"
        );
    }

    async fn option(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; codec::OPTION_HEADER_LEN];
        self.s.read_exact(&mut h).await.unwrap();
        let h = codec::decode_option_header(&h).unwrap();
        let mut d = vec![0u8; h.len as usize];
        self.s.read_exact(&mut d).await.unwrap();
        (h.option, d)
    }

    async fn reply(&mut self, option: u32, reply_type: u32, data: &[u8]) {
        let mut b = BytesMut::new();
        codec::encode_option_reply(&mut b, option, reply_type, data);
        self.s.write_all(&b).await.unwrap();
    }

    /// Answer the usual negotiation: structured replies (or not), base:allocation with id 5,
    /// and GO with `flags`.
    async fn accept(&mut self, structured: bool, flags: u16, size: u64) {
        use codec::handshake_flags::{FIXED_NEWSTYLE, NO_ZEROES};
        self.greet(FIXED_NEWSTYLE | NO_ZEROES).await;
        assert_eq!(self.option().await.0, opt::STRUCTURED_REPLY);
        if structured {
            self.reply(opt::STRUCTURED_REPLY, rep::ACK, &[]).await;
            let (o, d) = self.option().await;
            assert_eq!(o, opt::SET_META_CONTEXT);
            let req = codec::parse_option(o, &d).unwrap();
            assert!(matches!(req, codec::ClientOption::SetMetaContext(r)
                if r.export == "exp" && r.queries == [codec::BASE_ALLOCATION]));
            let d = codec::encode_rep_meta_context(5, codec::BASE_ALLOCATION);
            self.reply(o, rep::META_CONTEXT, &d).await;
            self.reply(o, rep::ACK, &[]).await;
        } else {
            self.reply(opt::STRUCTURED_REPLY, rep::ERR_UNSUP, b"no")
                .await;
        }
        let (o, d) = self.option().await;
        assert_eq!(o, opt::GO);
        let Ok(codec::ClientOption::Go(go)) = codec::parse_option(o, &d) else {
            panic!("GO expected");
        };
        assert_eq!(go.name, "exp");
        assert!(go.requests.contains(&info::BLOCK_SIZE));
        let d = codec::encode_info_export(size, flags | tx_flags::HAS_FLAGS);
        self.reply(o, rep::INFO, &d).await;
        self.reply(o, rep::ACK, &[]).await;
    }

    async fn request(&mut self) -> (Request, Vec<u8>) {
        let mut h = [0u8; codec::REQUEST_LEN];
        self.s.read_exact(&mut h).await.unwrap();
        let r = codec::decode_request(&h).unwrap();
        let mut payload = Vec::new();
        if r.command == cmd::WRITE {
            payload = vec![0u8; r.length as usize];
            self.s.read_exact(&mut payload).await.unwrap();
        }
        (r, payload)
    }

    async fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).await.unwrap();
    }
}

const ALL: u16 = tx_flags::SEND_FLUSH
    | tx_flags::SEND_FUA
    | tx_flags::SEND_TRIM
    | tx_flags::SEND_WRITE_ZEROES
    | tx_flags::SEND_FAST_ZERO
    | tx_flags::SEND_CACHE;

async fn pair(structured: bool, flags: u16, options: ClientOptions) -> (NbdDevice, Peer) {
    let (a, b) = tokio::io::duplex(1 << 20);
    let mut peer = Peer { s: b };
    let (dev, ()) = tokio::join!(
        NbdDevice::connect_stream(a, "test", "exp", &options),
        peer.accept(structured, flags, 1 << 20)
    );
    (dev.unwrap(), peer)
}

fn simple(cookie: u64, error: u32) -> BytesMut {
    let mut b = BytesMut::new();
    codec::encode_simple_reply(&mut b, error, cookie);
    b
}

fn data_chunk(cookie: u64, done: bool, offset: u64, data: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    let flags = if done { reply::FLAG_DONE } else { 0 };
    let len = 8 + data.len() as u32;
    codec::encode_chunk_header(&mut b, flags, reply::TYPE_OFFSET_DATA, cookie, len);
    b.put_u64(offset);
    b.put_slice(data);
    b
}

fn hole_chunk(cookie: u64, offset: u64, size: u32) -> BytesMut {
    let mut b = BytesMut::new();
    codec::encode_chunk_header(&mut b, 0, reply::TYPE_OFFSET_HOLE, cookie, 12);
    b.put_u64(offset);
    b.put_u32(size);
    b
}

fn none_chunk(cookie: u64) -> BytesMut {
    let mut b = BytesMut::new();
    codec::encode_chunk_header(&mut b, reply::FLAG_DONE, reply::TYPE_NONE, cookie, 0);
    b
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

const LIMIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn chunks_are_assembled_and_demultiplexed_by_cookie() {
    let (dev, mut p) = pair(true, ALL, ClientOptions::default()).await;
    assert!(dev.structured_replies());
    assert!(dev.capabilities().block_status);
    let client = async { tokio::join!(dev.read_at(0, 16384), dev.read_at(65536, 4096)) };
    let server = async {
        let mut reqs = [p.request().await.0, p.request().await.0];
        reqs.sort_by_key(|r| r.offset);
        let (first, second) = (reqs[0], reqs[1]);
        // The second request is answered first, in one chunk.
        p.send(&data_chunk(second.cookie, true, 65536, &pattern(9, 4096)))
            .await;
        // The first in four chunks, out of order: hole, data, data, none.
        p.send(&hole_chunk(first.cookie, 4096, 4096)).await;
        p.send(&data_chunk(first.cookie, false, 8192, &pattern(2, 8192)))
            .await;
        p.send(&data_chunk(first.cookie, false, 0, &pattern(1, 4096)))
            .await;
        p.send(&none_chunk(first.cookie)).await;
    };
    let ((a, b), ()) = tokio::join!(client, server);
    let a = a.unwrap();
    assert_eq!(a[..4096], pattern(1, 4096)[..]);
    assert!(a[4096..8192].iter().all(|&x| x == 0));
    assert_eq!(a[8192..], pattern(2, 8192)[..]);
    assert_eq!(b.unwrap()[..], pattern(9, 4096)[..]);
}

#[tokio::test]
async fn error_chunks_carry_the_servers_message() {
    let (dev, mut p) = pair(true, ALL, ClientOptions::default()).await;
    let server = async {
        let (r, _) = p.request().await;
        p.send(&data_chunk(r.cookie, false, 0, &pattern(1, 4096)))
            .await;
        let mut b = BytesMut::new();
        codec::encode_chunk_header(&mut b, 0, reply::TYPE_ERROR_OFFSET, r.cookie, 6 + 9 + 8);
        b.put_u32(errno::EIO);
        b.put_u16(9);
        b.put_slice(b"bad block");
        b.put_u64(4096);
        p.send(&b).await;
        p.send(&none_chunk(r.cookie)).await;
        // An unknown error chunk type fails the request but keeps the connection.
        let (r, _) = p.request().await;
        let mut b = BytesMut::new();
        codec::encode_chunk_header(&mut b, reply::FLAG_DONE, 0x8000 + 77, r.cookie, 6 + 4);
        b.put_u32(errno::ENOSPC);
        b.put_u16(4);
        b.put_slice(b"full");
        p.send(&b).await;
        let (r, _) = p.request().await;
        p.send(&simple(r.cookie, 0)).await;
    };
    let client = async {
        let e = dev.read_at(0, 8192).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.to_string().contains("EIO: bad block"), "{e}");
        let e = dev
            .write_at(0, Bytes::from(pattern(0, 512)), WriteOpts::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert!(e.to_string().contains("ENOSPC: full"), "{e}");
        dev.flush().await.unwrap();
    };
    tokio::join!(client, server);
}

#[tokio::test]
async fn a_short_read_fails_alone() {
    let (dev, mut p) = pair(true, ALL, ClientOptions::default()).await;
    let server = async {
        let (r, _) = p.request().await;
        p.send(&data_chunk(r.cookie, true, 0, &pattern(1, 2048)))
            .await;
        let (r, _) = p.request().await;
        p.send(&data_chunk(r.cookie, true, 0, &pattern(3, 4096)))
            .await;
    };
    let client = async {
        let e = dev.read_at(0, 4096).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.to_string().contains("2048 of the 4096"), "{e}");
        assert_eq!(
            dev.read_at(0, 4096).await.unwrap()[..],
            pattern(3, 4096)[..]
        );
    };
    tokio::join!(client, server);
    assert!(dev.is_connected());
}

/// Each of these breaks the connection: every request in flight and every later one fails
/// with Io, saying the connection was lost, and nothing hangs.
#[tokio::test]
async fn protocol_violations_fail_everything_in_flight() {
    type Bad = fn(&[Request]) -> BytesMut;
    let cases: Vec<(&str, Bad)> = vec![
        ("unknown cookie", |_| simple(999, 0)),
        ("bad magic", |_| {
            BytesMut::from(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..])
        }),
        ("data outside the request", |r| {
            data_chunk(r[0].cookie, true, r[0].offset + 4096, &[1; 4096])
        }),
        ("unknown chunk type", |r| {
            let mut b = BytesMut::new();
            codec::encode_chunk_header(&mut b, reply::FLAG_DONE, 77, r[0].cookie, 0);
            b
        }),
        ("overlapping chunks", |r| {
            let mut b = data_chunk(r[0].cookie, false, r[0].offset, &[1; 2048]);
            b.extend_from_slice(&data_chunk(
                r[0].cookie,
                true,
                r[0].offset + 1024,
                &[1; 2048],
            ));
            b
        }),
        ("NONE without DONE", |r| {
            let mut b = BytesMut::new();
            codec::encode_chunk_header(&mut b, 0, reply::TYPE_NONE, r[0].cookie, 0);
            b
        }),
        ("truncated by EOF", |r| {
            let mut b = data_chunk(r[0].cookie, true, r[0].offset, &[1; 4096]);
            b.truncate(100);
            b
        }),
    ];
    for (name, bad) in cases {
        let (dev, mut p) = pair(true, ALL, ClientOptions::default()).await;
        let server = async {
            let mut reqs = Vec::new();
            for _ in 0..3 {
                reqs.push(p.request().await.0);
            }
            p.send(&bad(&reqs)).await;
            // Hang up (the EOF case needs it; for the others the client already did).
            drop(p);
        };
        let client = async {
            tokio::join!(
                dev.read_at(0, 4096),
                dev.read_at(8192, 4096),
                dev.read_at(16384, 4096)
            )
        };
        let ((a, b, c), ()) = tokio::time::timeout(LIMIT, async { tokio::join!(client, server) })
            .await
            .unwrap_or_else(|_| panic!("{name}: requests hung"));
        for r in [a, b, c] {
            let e = r.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Io, "{name}: {e}");
            assert!(
                e.to_string().contains("connection to test/exp was lost"),
                "{name}: {e}"
            );
        }
        let e = tokio::time::timeout(LIMIT, dev.flush())
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{name}: {e}");
        assert!(e.to_string().contains("was lost"), "{name}: {e}");
        assert!(!dev.is_connected());
    }
}

#[tokio::test]
async fn eshutdown_makes_a_soft_disconnect() {
    let (dev, mut p) = pair(true, ALL, ClientOptions::default()).await;
    let server = async {
        let (r, _) = p.request().await;
        let mut b = BytesMut::new();
        codec::encode_error_chunk(&mut b, r.cookie, errno::ESHUTDOWN, "going away");
        p.send(&b).await;
        let (r, _) = p.request().await;
        assert_eq!(r.command, cmd::DISC, "the client says goodbye");
        drop(p);
    };
    let client = async {
        let e = dev.read_at(0, 4096).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Shutdown, "{e}");
    };
    tokio::time::timeout(LIMIT, async { tokio::join!(client, server) })
        .await
        .unwrap();
    let e = dev.read_at(0, 4096).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Shutdown, "{e}");
}

#[tokio::test]
async fn a_timed_out_request_leaves_the_connection_usable() {
    let options = ClientOptions {
        request_timeout: Some(Duration::from_millis(100)),
        ..ClientOptions::default()
    };
    let (dev, mut p) = pair(true, ALL, options).await;
    let (e, (late, _)) = tokio::join!(dev.read_at(0, 4096), p.request());
    let e = e.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    let server = async {
        let (r, _) = p.request().await;
        // The late reply is read and dropped; then the second request's reply.
        p.send(&data_chunk(late.cookie, true, 0, &pattern(1, 4096)))
            .await;
        p.send(&data_chunk(r.cookie, true, 4096, &pattern(2, 4096)))
            .await;
    };
    let (r, ()) = tokio::join!(dev.read_at(4096, 4096), server);
    assert_eq!(r.unwrap()[..], pattern(2, 4096)[..]);
    assert!(dev.is_connected());
}

#[tokio::test]
async fn simple_replies_when_the_server_has_no_structured_replies() {
    let flags = tx_flags::SEND_FLUSH | tx_flags::SEND_WRITE_ZEROES;
    let (dev, mut p) = pair(false, flags, ClientOptions::default()).await;
    assert!(!dev.structured_replies());
    let caps = dev.capabilities();
    assert!(!caps.block_status && !caps.fua && !caps.trim && !caps.fast_zero);
    // No meta context: block status is answered locally as all data.
    assert_eq!(
        dev.block_status(0, 8192).await.unwrap(),
        vec![Extent::data(8192)]
    );
    let server = async {
        let (r, _) = p.request().await;
        assert_eq!(r.command, cmd::READ);
        let mut b = simple(r.cookie, 0);
        b.extend_from_slice(&pattern(4, 100_000));
        p.send(&b).await;
        // A FUA write without SEND_FUA: a write, then a flush.
        let (r, data) = p.request().await;
        assert_eq!((r.command, r.flags), (cmd::WRITE, 0));
        assert_eq!(data, pattern(5, 4096));
        p.send(&simple(r.cookie, 0)).await;
        let (r, _) = p.request().await;
        assert_eq!(r.command, cmd::FLUSH);
        p.send(&simple(r.cookie, errno::ENOSPC)).await;
    };
    let client = async {
        assert_eq!(
            dev.read_at(0, 100_000).await.unwrap()[..],
            pattern(4, 100_000)[..]
        );
        let e = dev
            .write_at(0, Bytes::from(pattern(5, 4096)), WriteOpts { fua: true })
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
        // Without the server's support these fail at once, sending nothing.
        let fast = ZeroOpts {
            fast_only: true,
            ..ZeroOpts::default()
        };
        assert_eq!(
            dev.write_zeroes(0, 4096, fast).await.unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        assert_eq!(
            dev.trim(0, 4096, WriteOpts::default())
                .await
                .unwrap_err()
                .kind(),
            ErrorKind::Unsupported
        );
    };
    tokio::join!(client, server);
}

#[tokio::test]
async fn write_zeroes_flags_and_emulation() {
    let (dev, mut p) = pair(true, ALL, ClientOptions::default()).await;
    let server = async {
        for want in [cmd_flags::NO_HOLE, cmd_flags::FAST_ZERO | cmd_flags::FUA] {
            let (r, _) = p.request().await;
            assert_eq!((r.command, r.flags), (cmd::WRITE_ZEROES, want));
            p.send(&none_chunk(r.cookie)).await;
        }
    };
    let client = async {
        dev.write_zeroes(0, 4096, ZeroOpts::default())
            .await
            .unwrap();
        let opts = ZeroOpts {
            fua: true,
            may_trim: true,
            fast_only: true,
        };
        dev.write_zeroes(0, 4096, opts).await.unwrap();
    };
    tokio::join!(client, server);

    // A server without WRITE_ZEROES gets writes of zeroes.
    let (dev, mut p) = pair(true, tx_flags::SEND_FLUSH, ClientOptions::default()).await;
    let server = async {
        let (r, data) = p.request().await;
        assert_eq!((r.command, r.length), (cmd::WRITE, 8192));
        assert!(data.iter().all(|&b| b == 0));
        p.send(&none_chunk(r.cookie)).await;
    };
    let (r, ()) = tokio::join!(dev.write_zeroes(0, 8192, ZeroOpts::default()), server);
    r.unwrap();
}

#[tokio::test]
async fn go_unsupported_falls_back_to_export_name() {
    let (a, b) = tokio::io::duplex(1 << 20);
    let mut p = Peer { s: b };
    let server = async {
        // No NO_ZEROES: the EXPORT_NAME reply carries 124 zero bytes.
        p.greet(codec::handshake_flags::FIXED_NEWSTYLE).await;
        assert_eq!(p.option().await.0, opt::STRUCTURED_REPLY);
        p.reply(opt::STRUCTURED_REPLY, rep::ACK, &[]).await;
        assert_eq!(p.option().await.0, opt::SET_META_CONTEXT);
        p.reply(opt::SET_META_CONTEXT, rep::ACK, &[]).await;
        assert_eq!(p.option().await.0, opt::GO);
        p.reply(opt::GO, rep::ERR_UNSUP, &[]).await;
        assert_eq!(p.option().await, (opt::EXPORT_NAME, b"exp".to_vec()));
        let mut b = BytesMut::new();
        codec::encode_export_name_reply(
            &mut b,
            65536,
            tx_flags::HAS_FLAGS | tx_flags::READ_ONLY,
            false,
        );
        p.send(&b).await;
        let (r, _) = p.request().await;
        p.send(&data_chunk(r.cookie, true, 0, &pattern(7, 512)))
            .await;
    };
    let client = async {
        let dev = NbdDevice::connect_stream(a, "old", "exp", &ClientOptions::default())
            .await
            .unwrap();
        assert_eq!(dev.geometry().size, 65536);
        assert!(dev.capabilities().read_only);
        assert!(!dev.capabilities().block_status);
        assert_eq!(dev.read_at(0, 512).await.unwrap()[..], pattern(7, 512)[..]);
        assert_eq!(
            dev.write_at(0, Bytes::from_static(b"x"), WriteOpts::default())
                .await
                .unwrap_err()
                .kind(),
            ErrorKind::PermissionDenied
        );
    };
    tokio::join!(client, server);
}

#[tokio::test]
async fn negotiation_errors_are_clear() {
    // TLS required.
    let (a, b) = tokio::io::duplex(1 << 16);
    let mut p = Peer { s: b };
    let server = async {
        p.greet(codec::handshake_flags::FIXED_NEWSTYLE).await;
        p.option().await;
        p.reply(opt::STRUCTURED_REPLY, rep::ERR_TLS_REQD, b"use STARTTLS")
            .await;
    };
    let options = ClientOptions::default();
    let (r, ()) = tokio::join!(
        NbdDevice::connect_stream(a, "secure", "exp", &options),
        server
    );
    let e = r.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    assert!(e.to_string().contains("requires TLS"), "{e}");

    // No fixed newstyle.
    let (a, b) = tokio::io::duplex(1 << 16);
    let mut p = Peer { s: b };
    let mut g = BytesMut::new();
    codec::encode_greeting(&mut g, 0);
    p.send(&g).await;
    let e = NbdDevice::connect_stream(a, "old", "exp", &ClientOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("fixed newstyle"), "{e}");

    // A server that never answers: the connect time limit.
    let (a, _b) = tokio::io::duplex(1 << 16);
    let options = ClientOptions {
        connect_timeout: Duration::from_millis(50),
        ..ClientOptions::default()
    };
    let e = NbdDevice::connect_stream(a, "mute", "exp", &options)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut);
}

#[tokio::test]
async fn drop_and_close_send_disc() {
    let (dev, mut p) = pair(true, ALL, ClientOptions::default()).await;
    drop(dev);
    let (r, _) = p.request().await;
    assert_eq!(r.command, cmd::DISC);
    let mut rest = Vec::new();
    p.s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "nothing follows NBD_CMD_DISC");

    let (dev, mut p) = pair(true, ALL, ClientOptions::default()).await;
    let conn = dev.conn.clone();
    let (_, (r, _)) = tokio::join!(dev.close(), p.request());
    assert_eq!(r.command, cmd::DISC);
    assert!(
        conn.dead.is_cancelled(),
        "close returns once the tasks are done"
    );
    assert_eq!(
        Arc::strong_count(&conn),
        1,
        "the tasks let go of the connection"
    );
}

#[tokio::test]
async fn block_status_is_clipped_and_filtered_by_context() {
    let (dev, mut p) = pair(true, ALL, ClientOptions::default()).await;
    let server = async {
        let (r, _) = p.request().await;
        assert_eq!((r.command, r.length), (cmd::BLOCK_STATUS, 16384));
        for (id, extents) in [
            (9u32, vec![(16384u32, 0u32)]),
            (5, vec![(4096, 0), (65536, 3)]),
        ] {
            let mut b = BytesMut::new();
            let len = 4 + 8 * extents.len() as u32;
            let flags = if id == 5 { reply::FLAG_DONE } else { 0 };
            codec::encode_chunk_header(&mut b, flags, reply::TYPE_BLOCK_STATUS, r.cookie, len);
            b.put_u32(id);
            for (l, f) in extents {
                b.put_u32(l);
                b.put_u32(f);
            }
            p.send(&b).await;
        }
    };
    let (r, ()) = tokio::join!(dev.block_status(0, 16384), server);
    assert_eq!(
        r.unwrap(),
        vec![Extent::data(4096), Extent::hole(12288)],
        "the last extent is clipped to the request; context 9 is ignored"
    );
}
