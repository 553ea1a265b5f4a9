//! Targets that misbehave — garbage, refused logins, connections dropped in the middle of a
//! burst, silence, a capacity that changes — each give a clear error (or a fault) within the
//! configured time limit: no hang, no panic. The target here is a small fake speaking the
//! protocol through Strata's own codec, misbehaving where each test says.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use strata_bdev::{ErrorKind, Registry, WriteOpts};
use strata_iscsi::codec::scsi::{
    encode_supported_pages, sense_key, status, Capacity, Cdb, ModeSense, Sense,
};
use strata_iscsi::codec::{
    self, stage, DataIn, Digests, Frame, Header, LoginResponse, R2t, ScsiResponse, RESERVED_TAG,
};
use strata_iscsi::connection::{write_frame, PduReader};
use strata_iscsi::IscsiOpener;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: u64 = 1 << 20;

/// How the fake target misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Answers the login with random bytes.
    GarbageLogin,
    /// Refuses the login: authorization failure.
    RejectLogin,
    /// Accepts the connection and never says a word.
    Silent,
    /// Logs in and serves the device, then answers READ with garbage.
    GarbageOnRead,
    /// Logs in and serves the device, then drops the connection after the first Data-Out
    /// of every write.
    DropMidBurst,
    /// Logs in and serves the device, then never answers a READ.
    SilentOnRead,
    /// Serves the device; after `shrink_after` commands, raises "capacity data has changed"
    /// and reports half the capacity.
    Shrinks,
}

struct Fake {
    mode: Mode,
    size: AtomicU64,
    commands: AtomicUsize,
    connections: AtomicUsize,
}

/// Start a fake target; returns its URI (LUN 0) with `query`.
async fn fake(mode: Mode, query: &str) -> (String, Arc<Fake>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let f = Arc::new(Fake {
        mode,
        size: AtomicU64::new(8 * MIB),
        commands: AtomicUsize::new(0),
        connections: AtomicUsize::new(0),
    });
    let fake = f.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            fake.connections.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(fake.clone(), s));
        }
    });
    (
        format!("iscsi://127.0.0.1:{port}/iqn.2024-01.io.strata.test:fake/0?{query}"),
        f,
    )
}

async fn serve(f: Arc<Fake>, s: TcpStream) {
    let (r, mut w) = s.into_split();
    let mut r = PduReader::new(r, 1 << 20);
    if f.mode == Mode::Silent {
        // Read and drop whatever comes, never answer.
        let mut sink = [0u8; 4096];
        let raw = r.get_mut();
        while raw.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        return;
    }
    let Ok(first) = r.read_frame().await else {
        return;
    };
    let Header::LoginRequest(req) = first.header else {
        return;
    };
    if f.mode == Mode::GarbageLogin {
        let garbage: Vec<u8> = (0..300u32).map(|i| (i * 7919 % 251) as u8).collect();
        let _ = w.write_all(&garbage).await;
        let _ = w.flush().await;
        // Keep the connection open: the initiator must give up on its own.
        let _ = r.read_frame().await;
        return;
    }
    let mut stat_sn = 1u32;
    let login_resp = |req: codec::LoginRequest, transit, csg, nsg, class, stat_sn| LoginResponse {
        transit,
        continue_: false,
        csg,
        nsg,
        version_max: 0,
        version_active: 0,
        isid: req.isid,
        tsih: 1,
        itt: req.itt,
        stat_sn,
        exp_cmd_sn: req.cmd_sn,
        max_cmd_sn: req.cmd_sn.wrapping_add(32),
        status_class: class,
        status_detail: if class == 0 { 0 } else { 2 },
    };
    if f.mode == Mode::RejectLogin {
        let resp = login_resp(req, false, 0, 0, 2, 0);
        let _ = write_frame(
            &mut w,
            &Frame::new(Header::LoginResponse(resp), Bytes::new()),
            Digests::default(),
        )
        .await;
        return;
    }
    // Security stage: no authentication, straight on to operational negotiation.
    let resp = login_resp(req, true, stage::SECURITY, stage::OPERATIONAL, 0, 0);
    let text = codec::text::encode(&[("AuthMethod".into(), "None".into())]);
    if write_frame(
        &mut w,
        &Frame::new(Header::LoginResponse(resp), Bytes::from(text)),
        Digests::default(),
    )
    .await
    .is_err()
    {
        return;
    }
    let Ok(op) = r.read_frame().await else { return };
    let Header::LoginRequest(req) = op.header else {
        return;
    };
    let resp = login_resp(req, true, stage::OPERATIONAL, stage::FULL_FEATURE, 0, 0);
    let keys: Vec<(String, String)> = [
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("MaxRecvDataSegmentLength", "8192"),
        ("MaxBurstLength", "65536"),
        ("FirstBurstLength", "65536"),
        // Writes must wait for an R2T.
        ("ImmediateData", "No"),
        ("InitialR2T", "Yes"),
        ("MaxOutstandingR2T", "1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if write_frame(
        &mut w,
        &Frame::new(
            Header::LoginResponse(resp),
            Bytes::from(codec::text::encode(&keys)),
        ),
        Digests::default(),
    )
    .await
    .is_err()
    {
        return;
    }

    // Full feature phase.
    let mut shrunk_reported = false;
    loop {
        let Ok(frame) = r.read_frame().await else {
            return;
        };
        let Header::ScsiCommand(cmd) = frame.header else {
            // NOP-Outs and aborts: answer pings, ignore the rest.
            if let Header::NopOut(n) = frame.header {
                if n.itt != RESERVED_TAG {
                    let nop = Header::NopIn(codec::NopIn {
                        lun: 0,
                        itt: n.itt,
                        ttt: RESERVED_TAG,
                        stat_sn,
                        exp_cmd_sn: n.cmd_sn,
                        max_cmd_sn: n.cmd_sn.wrapping_add(32),
                    });
                    stat_sn += 1;
                    if f.mode != Mode::SilentOnRead
                        && write_frame(&mut w, &Frame::new(nop, Bytes::new()), Digests::default())
                            .await
                            .is_err()
                    {
                        return;
                    }
                }
            }
            continue;
        };
        let n = f.commands.fetch_add(1, Ordering::SeqCst);
        let exp = cmd.cmd_sn.wrapping_add(1);
        let cdb = Cdb::decode(&cmd.cdb);
        let respond = |status: u8, sense: Option<Sense>, stat_sn: u32| {
            let data = sense
                .map(|s| codec::scsi::response_data(&s.encode_fixed()))
                .unwrap_or_default();
            Frame::new(
                Header::ScsiResponse(ScsiResponse {
                    flags: 0,
                    response: 0,
                    status,
                    itt: cmd.itt,
                    snack_tag: 0,
                    stat_sn,
                    exp_cmd_sn: exp,
                    max_cmd_sn: exp.wrapping_add(31),
                    exp_data_sn: 0,
                    bidi_residual: 0,
                    residual: 0,
                }),
                Bytes::from(data),
            )
        };
        let data_in = |data: Vec<u8>, stat_sn: u32| {
            Frame::new(
                Header::DataIn(DataIn {
                    final_: true,
                    ack: false,
                    flags: 0,
                    has_status: true,
                    status: status::GOOD,
                    lun: 0,
                    itt: cmd.itt,
                    ttt: RESERVED_TAG,
                    stat_sn,
                    exp_cmd_sn: exp,
                    max_cmd_sn: exp.wrapping_add(31),
                    data_sn: 0,
                    buffer_offset: 0,
                    residual: 0,
                }),
                Bytes::from(data),
            )
        };
        let size = f.size.load(Ordering::SeqCst);
        let reply = match cdb {
            Ok(Cdb::ReadCapacity16 { .. }) => data_in(
                Capacity {
                    last_lba: size / 512 - 1,
                    block_len: 512,
                    physical_exponent: 0,
                    lbpme: false,
                    lbprz: false,
                }
                .encode()
                .to_vec(),
                stat_sn,
            ),
            Ok(Cdb::Inquiry { evpd: true, .. }) => data_in(encode_supported_pages(&[0]), stat_sn),
            Ok(Cdb::ModeSense6 { .. }) => data_in(
                ModeSense {
                    write_protect: false,
                    dpofua: true,
                    write_cache: Some(true),
                }
                .encode(),
                stat_sn,
            ),
            Ok(Cdb::Read16 { blocks, .. }) => match f.mode {
                Mode::GarbageOnRead => {
                    let _ = w.write_all(&[0xde; 200]).await;
                    let _ = w.flush().await;
                    continue;
                }
                Mode::SilentOnRead => continue,
                Mode::Shrinks if n >= 6 && !shrunk_reported => {
                    shrunk_reported = true;
                    f.size.store(size / 2, Ordering::SeqCst);
                    respond(
                        status::CHECK_CONDITION,
                        Some(Sense::new(sense_key::UNIT_ATTENTION, 0x2a, 0x09)),
                        stat_sn,
                    )
                }
                _ => data_in(vec![0u8; blocks as usize * 512], stat_sn),
            },
            Ok(Cdb::Write16 { blocks, .. }) => {
                let len = blocks * 512;
                let r2t = Frame::new(
                    Header::R2t(R2t {
                        lun: 0,
                        itt: cmd.itt,
                        ttt: 0x1000 + n as u32,
                        stat_sn,
                        exp_cmd_sn: exp,
                        max_cmd_sn: exp.wrapping_add(31),
                        r2t_sn: 0,
                        buffer_offset: 0,
                        desired_len: len.min(65536),
                    }),
                    Bytes::new(),
                );
                if write_frame(&mut w, &r2t, Digests::default()).await.is_err() {
                    return;
                }
                // The first Data-Out of the burst.
                let Ok(_) = r.read_frame().await else { return };
                if f.mode == Mode::DropMidBurst {
                    // Gone in the middle of the burst, without a word.
                    return;
                }
                // Swallow the rest of the burst (this fake asks for 64 KiB at most).
                let mut got = 8192.min(len);
                while got < len.min(65536) {
                    let Ok(fr) = r.read_frame().await else { return };
                    got += fr.data.len() as u32;
                }
                respond(status::GOOD, None, stat_sn)
            }
            Ok(_) => respond(status::GOOD, None, stat_sn),
            Err(_) => respond(
                status::CHECK_CONDITION,
                Some(Sense::new(sense_key::ILLEGAL_REQUEST, 0x20, 0)),
                stat_sn,
            ),
        };
        stat_sn += 1;
        if write_frame(&mut w, &reply, Digests::default())
            .await
            .is_err()
        {
            return;
        }
    }
}

fn registry() -> Registry {
    let mut r = Registry::empty();
    IscsiOpener::register(&mut r);
    r
}

/// Await `fut`; a hang (far past every time limit these tests set) fails the test.
async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_at_login_is_an_error() {
    let (uri, _) = fake(Mode::GarbageLogin, "timeout=3").await;
    let e = bounded("open", registry().open(&uri)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(e.to_string().contains("log in to iSCSI target"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_says_why() {
    let (uri, _) = fake(Mode::RejectLogin, "timeout=3").await;
    let e = bounded("open", registry().open(&uri)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("authorization failure"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_target_times_out_at_login() {
    let (uri, _) = fake(Mode::Silent, "timeout=1").await;
    let e = bounded("open", registry().open(&uri)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(e.to_string().contains("no answer within 1s"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_the_full_feature_phase_fails_the_call_in_time() {
    let (uri, f) = fake(Mode::GarbageOnRead, "timeout=2").await;
    let dev = bounded("open", registry().open(&uri)).await.unwrap();
    let e = bounded("read", dev.read_at(0, 4096)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(
        e.to_string().contains("malformed PDU") || e.to_string().contains("unknown opcode"),
        "{e}"
    );
    // The garbage dropped the connection and the device reconnected to try again.
    assert!(f.connections.load(Ordering::SeqCst) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_mid_burst_fails_the_write_in_time() {
    let (uri, f) = fake(Mode::DropMidBurst, "timeout=2").await;
    let dev = bounded("open", registry().open(&uri)).await.unwrap();
    // Reads still work on this target.
    assert_eq!(dev.read_at(0, 4096).await.unwrap().len(), 4096);
    let e = bounded(
        "write",
        dev.write_at(0, Bytes::from(vec![1u8; 65536]), WriteOpts::default()),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(e.to_string().contains("closed the connection"), "{e}");
    assert!(f.connections.load(Ordering::SeqCst) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_never_answers_a_read_times_out() {
    let (uri, _) = fake(Mode::SilentOnRead, "timeout=2").await;
    let dev = bounded("open", registry().open(&uri)).await.unwrap();
    let e = bounded("read", dev.read_at(0, 4096)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(e.to_string().contains("no answer within 2s"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_that_shrinks_makes_the_device_fail_clearly() {
    let (uri, _) = fake(Mode::Shrinks, "timeout=5").await;
    let dev = bounded("open", registry().open(&uri)).await.unwrap();
    assert_eq!(dev.geometry().size, 8 * MIB);
    let mut error = None;
    for _ in 0..8 {
        if let Err(e) = bounded("read", dev.read_at(0, 4096)).await {
            error = Some(e);
            break;
        }
    }
    let e = error.expect("a read fails once the capacity shrank");
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(
        e.to_string()
            .contains("capacity changed from 8388608 bytes"),
        "{e}"
    );
    // And every call after it, at once.
    let e = bounded("read", dev.read_at(0, 4096)).await.unwrap_err();
    assert!(e.to_string().contains("capacity changed"), "{e}");
}
