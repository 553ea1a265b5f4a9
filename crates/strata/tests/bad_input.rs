//! Malformed and hostile input against `strata serve`, one test each: the right NBD error, no
//! panic, no hang, and the connection stays usable wherever the protocol allows.

#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use bytes::BytesMut;
use common::{Strata, CONFIG};
use strata_nbd::codec::{self, cmd, cmd_flags, errno, opt, rep};

/// A hand-driven NBD connection.
struct Raw {
    s: TcpStream,
}

impl Raw {
    /// Connect and read the greeting; do not send client flags yet.
    fn greeted(addr: &str) -> Raw {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut r = Raw { s };
        let g = r.read(18);
        assert_eq!(
            codec::decode_greeting(&g).expect("greeting") & 1,
            1,
            "fixed newstyle"
        );
        r
    }

    /// Connect and send fixed-newstyle client flags.
    fn negotiating(addr: &str) -> Raw {
        let mut r = Raw::greeted(addr);
        r.write(
            &(codec::client_flags::FIXED_NEWSTYLE | codec::client_flags::NO_ZEROES).to_be_bytes(),
        );
        r
    }

    fn read(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s
            .read_exact(&mut b)
            .unwrap_or_else(|e| panic!("read {n} bytes: {e}"));
        b
    }

    fn write(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("write");
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = BytesMut::new();
        codec::encode_option(&mut b, option, data);
        self.write(&b);
    }

    /// Read one option reply: (type, data).
    fn reply(&mut self) -> (u32, Vec<u8>) {
        let h = codec::decode_option_reply_header(&self.read(20)).expect("option reply header");
        let data = self.read(h.len as usize);
        (h.reply_type, data)
    }

    /// Read replies up to the final ACK or error; returns the final type.
    fn final_reply(&mut self) -> (u32, Vec<u8>) {
        loop {
            let (t, d) = self.reply();
            if t == rep::ACK || rep::is_error(t) {
                return (t, d);
            }
        }
    }

    /// Negotiate structured replies, base:allocation, and GO `export`.
    fn transmission(addr: &str, export: &str, structured: bool) -> Raw {
        let mut r = Raw::negotiating(addr);
        if structured {
            r.option(opt::STRUCTURED_REPLY, &[]);
            assert_eq!(r.final_reply().0, rep::ACK);
        }
        let go = codec::encode_info_request(&codec::InfoRequest {
            name: export.into(),
            requests: vec![codec::info::BLOCK_SIZE],
        });
        r.option(opt::GO, &go);
        assert_eq!(r.final_reply().0, rep::ACK, "GO {export}");
        r
    }

    fn request(&mut self, command: u16, flags: u16, offset: u64, length: u32, payload: &[u8]) {
        let mut b = BytesMut::new();
        codec::encode_request(
            &mut b,
            &codec::Request {
                flags,
                command,
                cookie: 0x1234,
                offset,
                length,
            },
        );
        b.extend_from_slice(payload);
        self.write(&b);
    }

    /// Read a simple reply (or a structured error chunk) and return the error.
    fn error(&mut self) -> u32 {
        let head = self.read(4);
        match u32::from_be_bytes(head[..4].try_into().unwrap()) {
            codec::SIMPLE_REPLY_MAGIC => {
                let rest = self.read(12);
                u32::from_be_bytes(rest[..4].try_into().unwrap())
            }
            codec::STRUCTURED_REPLY_MAGIC => {
                let rest = self.read(16);
                let len = u32::from_be_bytes(rest[12..16].try_into().unwrap()) as usize;
                let payload = self.read(len);
                let chunk_type = u16::from_be_bytes(rest[2..4].try_into().unwrap());
                if chunk_type == codec::reply::TYPE_ERROR {
                    codec::parse_error_chunk(&payload).expect("error chunk").0
                } else {
                    0
                }
            }
            m => panic!("bad reply magic {m:#x}"),
        }
    }

    /// A READ that must succeed: proves the connection is still in sync and usable.
    fn assert_usable(&mut self) {
        self.request(cmd::READ, 0, 0, 512, &[]);
        let head = self.read(16);
        assert_eq!(
            u32::from_be_bytes(head[..4].try_into().unwrap()),
            codec::SIMPLE_REPLY_MAGIC
        );
        assert_eq!(
            u32::from_be_bytes(head[4..8].try_into().unwrap()),
            0,
            "read succeeds"
        );
        self.read(512);
    }

    /// The server closed the connection.
    fn assert_closed(&mut self) {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the server to close the connection, got {other:?}"),
        }
    }
}

/// After each hostile client, a fresh client still works.
fn server_still_serves(s: &Strata) {
    let mut r = Raw::transmission(&s.addr, "disk", false);
    r.assert_usable();
}

#[test]
fn truncated_handshake_and_vanishing_clients() {
    let s = Strata::start(CONFIG);
    // Half of the client flags, then gone.
    let mut r = Raw::greeted(&s.addr);
    r.write(&[0, 0]);
    drop(r);
    // Half an option header.
    let mut r = Raw::negotiating(&s.addr);
    r.write(&codec::IHAVEOPT.to_be_bytes()[..5]);
    drop(r);
    // An option that announces more data than it sends.
    let mut r = Raw::negotiating(&s.addr);
    let mut b = BytesMut::new();
    codec::encode_option(&mut b, opt::GO, &[0, 0, 0, 4]);
    b[12..16].copy_from_slice(&100u32.to_be_bytes());
    r.write(&b);
    drop(r);
    // A write whose payload never fully arrives, while another client works.
    let mut other = Raw::transmission(&s.addr, "disk", false);
    let mut r = Raw::transmission(&s.addr, "disk", false);
    r.request(cmd::WRITE, 0, 0, 65536, &[7u8; 1000]);
    r.s.shutdown(Shutdown::Both).unwrap();
    drop(r);
    other.assert_usable();
    server_still_serves(&s);
}

#[test]
fn unknown_client_flags_and_bad_option_magic_close_the_connection() {
    let s = Strata::start(CONFIG);
    let mut r = Raw::greeted(&s.addr);
    r.write(&0x8000_0001u32.to_be_bytes());
    r.assert_closed();
    let mut r = Raw::negotiating(&s.addr);
    r.write(&[0x55u8; 16]);
    r.assert_closed();
    server_still_serves(&s);
}

#[test]
fn malformed_options_get_the_right_errors_and_negotiation_continues() {
    let s = Strata::start(CONFIG);
    let mut r = Raw::negotiating(&s.addr);
    // LIST with data.
    r.option(opt::LIST, b"junk");
    assert_eq!(r.final_reply().0, rep::ERR_INVALID);
    // An option the server does not know.
    r.option(99, b"whatever");
    assert_eq!(r.final_reply().0, rep::ERR_UNSUP);
    // GO whose name length runs past its data.
    r.option(opt::GO, &[0, 0, 0, 200, b'd', 0, 0]);
    assert_eq!(r.final_reply().0, rep::ERR_INVALID);
    // An unknown export: a clear error naming it.
    let go = codec::encode_info_request(&codec::InfoRequest {
        name: "nope".into(),
        requests: vec![],
    });
    r.option(opt::GO, &go);
    let (t, msg) = r.final_reply();
    assert_eq!(t, rep::ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&msg).contains("nope"));
    // Oversized option data.
    r.option(opt::INFO, &vec![0u8; 100 << 10]);
    assert_eq!(r.final_reply().0, rep::ERR_TOO_BIG);
    // Meta contexts need structured replies first.
    let meta = codec::encode_meta_request(&codec::MetaRequest {
        export: "disk".into(),
        queries: vec!["base:allocation".into()],
    });
    r.option(opt::SET_META_CONTEXT, &meta);
    assert_eq!(r.final_reply().0, rep::ERR_INVALID);
    // TLS is not configured here.
    r.option(opt::STARTTLS, &[]);
    assert_eq!(r.final_reply().0, rep::ERR_UNSUP);
    // Structured reply with data.
    r.option(opt::STRUCTURED_REPLY, &[1]);
    assert_eq!(r.final_reply().0, rep::ERR_INVALID);
    // Still negotiating: LIST works and GO enters transmission.
    r.option(opt::LIST, &[]);
    assert_eq!(r.final_reply().0, rep::ACK);
    let go = codec::encode_info_request(&codec::InfoRequest {
        name: "disk".into(),
        requests: vec![],
    });
    r.option(opt::GO, &go);
    assert_eq!(r.final_reply().0, rep::ACK);
    r.assert_usable();
}

#[test]
fn export_name_for_a_missing_export_closes_and_abort_is_acknowledged() {
    let s = Strata::start(CONFIG);
    let mut r = Raw::negotiating(&s.addr);
    r.option(opt::EXPORT_NAME, b"missing");
    r.assert_closed();
    let mut r = Raw::negotiating(&s.addr);
    r.option(opt::ABORT, &[]);
    assert_eq!(r.reply().0, rep::ACK);
    r.assert_closed();
    server_still_serves(&s);
}

#[test]
fn out_of_range_zero_length_and_oversized_requests() {
    let s = Strata::start(CONFIG);
    let size: u64 = 1 << 30;
    let mut r = Raw::transmission(&s.addr, "disk", false);
    // Read past the end: EINVAL. Write past the end: ENOSPC (payload consumed).
    r.request(cmd::READ, 0, size - 512, 1024, &[]);
    assert_eq!(r.error(), errno::EINVAL);
    r.request(cmd::WRITE, 0, size - 512, 1024, &[1u8; 1024]);
    assert_eq!(r.error(), errno::ENOSPC);
    r.assert_usable();
    // Offsets that overflow 64 bits.
    r.request(cmd::READ, 0, u64::MAX - 10, 512, &[]);
    assert_eq!(r.error(), errno::EINVAL);
    r.request(cmd::TRIM, 0, size, 4096, &[]);
    assert_eq!(r.error(), errno::EINVAL);
    r.request(cmd::WRITE_ZEROES, 0, size - 4096, 8192, &[]);
    assert_eq!(r.error(), errno::ENOSPC);
    // Zero-length requests.
    r.request(cmd::READ, 0, 0, 0, &[]);
    assert_eq!(r.error(), errno::EINVAL);
    r.request(cmd::WRITE, 0, 0, 0, &[]);
    assert_eq!(r.error(), errno::EINVAL);
    // Over the 32 MiB maximum payload: refused, and a write's payload is skipped so the stream
    // stays in sync.
    r.request(cmd::READ, 0, 0, 64 << 20, &[]);
    assert_eq!(r.error(), errno::EINVAL);
    r.request(
        cmd::WRITE,
        0,
        0,
        (32 << 20) + 4096,
        &vec![9u8; (32 << 20) + 4096],
    );
    assert_eq!(r.error(), errno::EINVAL);
    r.assert_usable();
    // Nothing of the refused writes landed.
    r.request(cmd::READ, 0, size - 512, 512, &[]);
    let head = r.read(16);
    assert_eq!(&head[4..8], &[0, 0, 0, 0]);
    assert!(
        r.read(512).iter().all(|&b| b == 0),
        "a refused write changed nothing"
    );
    // A trim or zero larger than the maximum payload is fine (no payload).
    r.request(cmd::WRITE_ZEROES, 0, 0, 256 << 20, &[]);
    assert_eq!(r.error(), 0);
}

#[test]
fn unknown_commands_and_flags_are_einval() {
    let s = Strata::start(CONFIG);
    let mut r = Raw::transmission(&s.addr, "disk", true);
    r.request(99, 0, 0, 512, &[]);
    assert_eq!(r.error(), errno::EINVAL);
    r.request(cmd::FLUSH, 0x4000, 0, 0, &[]);
    assert_eq!(r.error(), errno::EINVAL);
    // A flag valid only for another command.
    r.request(cmd::WRITE_ZEROES, cmd_flags::REQ_ONE, 0, 4096, &[]);
    assert_eq!(r.error(), errno::EINVAL);
    // Block status without a negotiated meta context.
    r.request(cmd::BLOCK_STATUS, 0, 0, 4096, &[]);
    assert_eq!(r.error(), errno::EINVAL);
    // FUA is valid on every command.
    r.request(cmd::FLUSH, cmd_flags::FUA, 0, 0, &[]);
    assert_eq!(r.error(), 0);
}

#[test]
fn writes_to_a_read_only_export_are_eperm() {
    let s = Strata::start(CONFIG);
    let mut r = Raw::transmission(&s.addr, "ro", true);
    r.request(cmd::WRITE, 0, 0, 512, &[1u8; 512]);
    assert_eq!(r.error(), errno::EPERM);
    r.request(cmd::TRIM, 0, 0, 4096, &[]);
    assert_eq!(r.error(), errno::EPERM);
    r.request(cmd::WRITE_ZEROES, 0, 0, 4096, &[]);
    assert_eq!(r.error(), errno::EPERM);
    r.request(cmd::FLUSH, 0, 0, 0, &[]);
    assert_eq!(r.error(), 0);
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let s = Strata::start(CONFIG);
    let mut other = Raw::transmission(&s.addr, "disk", false);
    let mut r = Raw::transmission(&s.addr, "disk", false);
    r.write(&[0xffu8; 28]);
    r.assert_closed();
    other.assert_usable();
}

#[test]
fn pipelined_requests_are_all_answered() {
    let s = Strata::start(CONFIG);
    let mut r = Raw::transmission(&s.addr, "scratch", false);
    let mut b = BytesMut::new();
    for i in 0..200u64 {
        codec::encode_request(
            &mut b,
            &codec::Request {
                flags: 0,
                command: cmd::WRITE,
                cookie: i,
                offset: i * 4096,
                length: 4096,
            },
        );
        b.extend_from_slice(&[i as u8; 4096]);
    }
    r.write(&b);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let h = r.read(16);
        assert_eq!(&h[4..8], &[0, 0, 0, 0]);
        seen.insert(u64::from_be_bytes(h[8..16].try_into().unwrap()));
    }
    assert_eq!(seen.len(), 200, "every cookie answered once");
}

#[test]
fn connection_limit_makes_clients_wait_not_fail() {
    let config = CONFIG.replace("[nbd]\n", "[nbd]\nmax_connections = 2\n");
    let s = Strata::start(&config);
    let a = Raw::transmission(&s.addr, "disk", false);
    let _b = Raw::transmission(&s.addr, "disk", false);
    // The third client is accepted by the kernel but not served yet.
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut g = [0u8; 18];
    let early = c.read(&mut g);
    assert!(
        matches!(early, Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "{early:?}"
    );
    // When one leaves, the waiting client gets its greeting.
    drop(a);
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.read_exact(&mut g).expect("greeting after a slot frees");
    assert!(codec::decode_greeting(&g).is_ok());
}
