//! Bad input from a host, sent PDU by PDU with a raw client: each is answered with the right
//! NVMe status (and the queue goes on) or, when the transport's rules are broken, with a
//! C2HTermReq and a closed connection. In every test a well-behaved host keeps doing I/O on
//! the same target and is not disturbed.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use common::*;
use strata_bdev::{BlockDevice, BlockDeviceExt, WriteOpts};
use strata_nvmf::codec::pdu::{encode_capsule_cmd, encode_data_header, CMD_HLEN};
use strata_nvmf::codec::{
    connect_offset, fes, io_opcode, pdu_type, Command, DataHeader, Digests, PduHeader, Sgl, Status,
};
use strata_nvmf::{HostOptions, NvmfDevice, Subsystem, Target, TargetSettings};

const SIZE: u64 = 16 << 20;

/// A target with one writable subsystem, and a well-behaved host using it.
async fn setup(settings: TargetSettings) -> (Arc<Target>, SocketAddr, String, NvmfDevice) {
    let (t, addr) = target(settings).await;
    let vol = export(&t, "vol", mem("vol", SIZE));
    let other = export(&t, "other", mem("other", SIZE));
    let bystander = host(addr, &other, HostOptions::default()).await;
    (t, addr, vol, bystander)
}

fn nqn_of(name: &str) -> String {
    nqn(name)
}

/// The well-behaved host still reads back what it writes.
async fn undisturbed(dev: &NvmfDevice, seed: u64) {
    let data = pattern(seed, 65536);
    tokio::time::timeout(LIMIT, async {
        dev.write_at(
            seed * 65536 % (SIZE - 65536),
            data.clone(),
            WriteOpts::default(),
        )
        .await
        .expect("the other host's write");
        let back = dev
            .read_at(seed * 65536 % (SIZE - 65536), 65536)
            .await
            .expect("the other host's read");
        assert_eq!(back, data, "the other host reads back its write");
    })
    .await
    .expect("the other host is served in time");
}

fn read(cid: u16, slba: u64, nlb: u32, len: u32) -> Command {
    Command::rw(
        io_opcode::READ,
        cid,
        1,
        slba,
        nlb,
        false,
        Sgl::transport(len),
    )
}

fn write_r2t(cid: u16, slba: u64, nlb: u32, len: u32) -> Command {
    Command::rw(
        io_opcode::WRITE,
        cid,
        1,
        slba,
        nlb,
        false,
        Sgl::transport(len),
    )
}

fn assert_status(a: &Answer, want: Status, what: &str) {
    assert_eq!(
        a.completion.status.code(),
        want,
        "{what}: got {}",
        a.completion.status
    );
}

/// A read that works proves the queue is still usable.
async fn queue_alive(io: &mut Raw) {
    let cid = io.cid();
    let a = io.command(read(cid, 0, 1, 512), &[]).await;
    assert!(
        a.completion.status.is_success(),
        "the queue still serves reads"
    );
    assert_eq!(a.data.len(), 512);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_pdu_headers_terminate_the_connection() {
    let (_t, addr, nqn, other) = setup(TargetSettings::default()).await;
    let _ = nqn;
    // A command capsule with the wrong header length.
    let (_admin, mut io, _) = Raw::io_queue(addr, &nqn_of("vol"), Digests::default()).await;
    let cid = io.cid();
    let mut b = io.capsule(&read(cid, 0, 1, 512), &[]);
    b[2] = 24;
    io.send(&b).await;
    assert_eq!(
        io.expect_termination(fes::INVALID_HEADER_FIELD).await,
        2,
        "FEI names HLEN"
    );
    undisturbed(&other, 1).await;

    // A PDU type no host sends.
    let (_admin, mut io, _) = Raw::io_queue(addr, &nqn_of("vol"), Digests::default()).await;
    let mut b = {
        let cid = io.cid();
        io.capsule(&read(cid, 0, 1, 512), &[])
    };
    b[0] = pdu_type::R2T;
    b[2] = 24;
    io.send(&b[..24]).await;
    assert_eq!(
        io.expect_termination(fes::INVALID_HEADER_FIELD).await,
        0,
        "FEI names the type"
    );

    // A header digest that does not match.
    let dg = Digests {
        header: true,
        data: false,
    };
    let (_admin, mut io, _) = Raw::io_queue(addr, &nqn_of("vol"), dg).await;
    let mut b = {
        let cid = io.cid();
        io.capsule(&read(cid, 0, 1, 512), &[])
    };
    b[CMD_HLEN] ^= 0xFF;
    io.send(&b).await;
    io.expect_termination(fes::HEADER_DIGEST_ERROR).await;

    // A capsule before ICReq, and a second ICReq.
    let mut raw = Raw::connect(addr).await;
    raw.digests = Some(Digests::default());
    let b = raw.capsule(&Command::keep_alive(1), &[]);
    raw.digests = None;
    raw.send(&b).await;
    raw.expect_termination(fes::PDU_SEQUENCE_ERROR).await;
    let mut raw = Raw::connect(addr).await;
    raw.init(Digests::default()).await;
    let mut ic = BytesMut::new();
    strata_nvmf::codec::pdu::encode_ic_req(
        &mut ic,
        &strata_nvmf::codec::IcReq {
            pfv: 0,
            hpda: 0,
            digests: Digests::default(),
            maxr2t: 0,
        },
    );
    raw.send(&ic).await;
    raw.expect_termination(fes::PDU_SEQUENCE_ERROR).await;

    // An unsupported PDU format version in ICReq.
    let mut raw = Raw::connect(addr).await;
    ic[8] = 1;
    raw.send(&ic).await;
    assert_eq!(raw.expect_termination(fes::UNSUPPORTED_PARAMETER).await, 8);
    undisturbed(&other, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_lengths_get_statuses_or_termination() {
    let (_t, addr, _nqn, other) = setup(TargetSettings::default()).await;
    let (_admin, mut io, _) = Raw::io_queue(addr, &nqn_of("vol"), Digests::default()).await;
    // The data pointer says 4096 bytes, the command 8 blocks of 512.
    let cid = io.cid();
    let a = io.command(read(cid, 0, 8, 4096 + 512), &[]).await;
    assert_status(&a, Status::DATA_SGL_LENGTH_INVALID, "SGL length vs NLB");
    // In-capsule data shorter than the command's blocks.
    let cid = io.cid();
    let c = Command::rw(io_opcode::WRITE, cid, 1, 0, 2, false, Sgl::in_capsule(512));
    let a = io.command(c, &[1u8; 512]).await;
    assert_status(
        &a,
        Status::DATA_SGL_LENGTH_INVALID,
        "in-capsule data vs NLB",
    );
    // In-capsule data whose length the descriptor does not state.
    let cid = io.cid();
    let c = Command::rw(io_opcode::WRITE, cid, 1, 0, 1, false, Sgl::in_capsule(512));
    let a = io.command(c, &[1u8; 1024]).await;
    assert_status(&a, Status::DATA_SGL_LENGTH_INVALID, "descriptor vs capsule");
    // Data in the capsule of a read.
    let cid = io.cid();
    let a = io.command(read(cid, 0, 1, 512), &[0u8; 512]).await;
    assert_status(&a, Status::INVALID_FIELD, "data with a read");
    // A transfer beyond the maximum data transfer size.
    let cid = io.cid();
    let a = io.command(read(cid, 0, 4096, 2 << 20), &[]).await;
    assert_status(&a, Status::INVALID_FIELD, "over MDTS");
    queue_alive(&mut io).await;

    // A PLEN that does not fit the header: fatal.
    let cid = io.cid();
    let mut b = io.capsule(&read(cid, 0, 1, 512), &[]);
    b[4..8].copy_from_slice(&40u32.to_le_bytes());
    io.send(&b).await;
    assert_eq!(
        io.expect_termination(fes::INVALID_HEADER_FIELD).await,
        4,
        "FEI names PLEN"
    );

    // In-capsule data beyond what the queue takes: fatal, refused from the header alone.
    let (_admin, mut io, _) = Raw::io_queue(addr, &nqn_of("vol"), Digests::default()).await;
    let mut b = BytesMut::new();
    let c = Command::rw(io_opcode::WRITE, 9, 1, 0, 32, false, Sgl::in_capsule(16384));
    encode_capsule_cmd(&mut b, &c, 16384, Digests::default());
    io.send(&b).await;
    io.expect_termination(fes::DATA_LIMIT_EXCEEDED).await;

    // Connect data that is too short.
    let mut raw = Raw::connect(addr).await;
    raw.init(Digests::default()).await;
    let cid = raw.cid();
    let mut c = Command::connect(
        cid,
        &strata_nvmf::codec::Connect {
            recfmt: 0,
            qid: 0,
            sqsize: 31,
            cattr: 0,
            kato: 0,
        },
    );
    c.dptr = Sgl::in_capsule(512);
    let a = raw.command(c, &[0u8; 512]).await;
    assert_status(&a, Status::DATA_SGL_LENGTH_INVALID, "short Connect data");
    undisturbed(&other, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_opcodes_are_invalid_and_the_queue_goes_on() {
    let (_t, addr, _nqn, other) = setup(TargetSettings::default()).await;
    let (mut admin, mut io, _) = Raw::io_queue(addr, &nqn_of("vol"), Digests::default()).await;
    for op in [0x7Eu8, 0x0C, 0x80, 0xFF] {
        let cid = io.cid();
        let mut c = Command::flush(cid, 1);
        c.opcode = op;
        let a = io.command(c, &[]).await;
        assert_status(&a, Status::INVALID_OPCODE, &format!("I/O opcode {op:#x}"));
        assert!(a.completion.status.is_dnr(), "not worth a retry");
    }
    for op in [0x00u8, 0x01, 0x04, 0x10, 0xC0] {
        let cid = admin.cid();
        let mut c = Command::keep_alive(cid);
        c.opcode = op;
        let a = admin.command(c, &[]).await;
        assert_status(&a, Status::INVALID_OPCODE, &format!("admin opcode {op:#x}"));
    }
    // A fabrics command type that does not exist, and a property that does not.
    let cid = admin.cid();
    let mut c = Command::disconnect(cid);
    c.nsid = 0x7E;
    let a = admin.command(c, &[]).await;
    assert_status(&a, Status::INVALID_OPCODE, "fabrics type 0x7e");
    let cid = admin.cid();
    let a = admin
        .command(Command::property_get(cid, 0x40, false), &[])
        .await;
    assert_status(&a, Status::INVALID_FIELD, "property 0x40");
    // Unknown Identify, log page and feature.
    let cid = admin.cid();
    let a = admin.command(Command::identify(cid, 0x42, 0, 0), &[]).await;
    assert_status(&a, Status::INVALID_FIELD, "CNS 0x42");
    let cid = admin.cid();
    let a = admin
        .command(Command::get_log_page(cid, 0xC7, 0, 512, 0, false), &[])
        .await;
    assert_status(&a, Status::INVALID_LOG_PAGE, "log page 0xc7");
    let cid = admin.cid();
    let a = admin.command(Command::get_features(cid, 0x55), &[]).await;
    assert_status(&a, Status::INVALID_FIELD, "feature 0x55");
    // A fused command.
    let cid = io.cid();
    let mut c = read(cid, 0, 1, 512);
    c.flags |= 1;
    let a = io.command(c, &[]).await;
    assert_status(&a, Status::INVALID_FIELD, "fused");
    // A namespace that does not exist.
    let cid = io.cid();
    let mut c = read(cid, 0, 1, 512);
    c.nsid = 2;
    let a = io.command(c, &[]).await;
    assert_status(&a, Status::INVALID_NAMESPACE, "namespace 2");
    queue_alive(&mut io).await;
    let cid = admin.cid();
    let a = admin.command(Command::keep_alive(cid), &[]).await;
    assert!(a.completion.status.is_success());
    undisturbed(&other, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_lbas_are_refused_before_the_device() {
    let (_t, addr, _nqn, other) = setup(TargetSettings::default()).await;
    let (_admin, mut io, _) = Raw::io_queue(addr, &nqn_of("vol"), Digests::default()).await;
    let blocks = SIZE / 512;
    for (slba, nlb) in [
        (blocks, 1u32),
        (blocks - 1, 2),
        (u64::MAX, 1),
        (u64::MAX - 3, 8),
    ] {
        let cid = io.cid();
        let a = io.command(read(cid, slba, nlb, nlb * 512), &[]).await;
        assert_status(
            &a,
            Status::LBA_OUT_OF_RANGE,
            &format!("read {nlb} at {slba}"),
        );
        // A write past the end is refused without asking for its data.
        let cid = io.cid();
        let a = io.command(write_r2t(cid, slba, nlb, nlb * 512), &[]).await;
        assert_status(
            &a,
            Status::LBA_OUT_OF_RANGE,
            &format!("write {nlb} at {slba}"),
        );
        let cid = io.cid();
        let a = io
            .command(Command::write_zeroes(cid, 1, slba, nlb, false, false), &[])
            .await;
        assert_status(
            &a,
            Status::LBA_OUT_OF_RANGE,
            &format!("zeroes {nlb} at {slba}"),
        );
    }
    // Dataset Management with a range past the end.
    let cid = io.cid();
    let mut ranges = Vec::new();
    strata_nvmf::codec::DsmRange {
        attributes: 0,
        nlb: 8,
        slba: blocks - 4,
    }
    .encode(&mut ranges);
    let c = Command::dataset_management(cid, 1, 1, true, Sgl::in_capsule(16));
    let a = io.command(c, &ranges).await;
    assert_status(&a, Status::LBA_OUT_OF_RANGE, "deallocate past the end");
    // The last block is fine.
    let cid = io.cid();
    let a = io.command(read(cid, blocks - 1, 1, 512), &[]).await;
    assert!(a.completion.status.is_success());
    queue_alive(&mut io).await;
    undisturbed(&other, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_beyond_maxh2cdata_or_outside_the_r2t_terminates() {
    let settings = TargetSettings {
        max_h2c_data: 4096,
        in_capsule_data_size: 0,
        ..TargetSettings::default()
    };
    let (_t, addr, _nqn, other) = setup(settings).await;
    let (_admin, mut io, _) = Raw::io_queue(addr, &nqn_of("vol"), Digests::default()).await;

    // An R2T'd write done right, in two H2CData PDUs: it works.
    let cid = io.cid();
    let b = io.capsule(&write_r2t(cid, 0, 16, 8192), &[]);
    io.send(&b).await;
    let r2t = match io.recv().await.header {
        PduHeader::R2t(r) => r,
        other => panic!("expected R2T, got {other:?}"),
    };
    assert_eq!((r2t.cccid, r2t.r2to, r2t.r2tl), (cid, 0, 8192));
    let data = pattern(9, 8192);
    let b = io.h2c_data(cid, r2t.ttag, 0, &data[..4096], false);
    io.send(&b).await;
    let b = io.h2c_data(cid, r2t.ttag, 4096, &data[4096..], true);
    io.send(&b).await;
    let a = io.answer(cid).await;
    assert!(a.completion.status.is_success(), "{}", a.completion.status);
    let cid = io.cid();
    let a = io.command(read(cid, 0, 16, 8192), &[]).await;
    assert_eq!(a.data, data.to_vec(), "the R2T'd write landed");

    // One H2CData PDU of 8 KiB where MAXH2CDATA is 4 KiB.
    let cid = io.cid();
    let b = io.capsule(&write_r2t(cid, 0, 16, 8192), &[]);
    io.send(&b).await;
    let PduHeader::R2t(r2t) = io.recv().await.header else {
        panic!("expected R2T")
    };
    let b = io.h2c_data(cid, r2t.ttag, 0, &data, true);
    io.send(&b).await;
    io.expect_termination(fes::DATA_LIMIT_EXCEEDED).await;

    // Data outside the range asked for.
    let (_admin, mut io, _) = Raw::io_queue(addr, &nqn_of("vol"), Digests::default()).await;
    let cid = io.cid();
    let b = io.capsule(&write_r2t(cid, 0, 8, 4096), &[]);
    io.send(&b).await;
    let PduHeader::R2t(r2t) = io.recv().await.header else {
        panic!("expected R2T")
    };
    let b = io.h2c_data(cid, r2t.ttag, 2048, &data[..4096], true);
    io.send(&b).await;
    io.expect_termination(fes::DATA_OUT_OF_RANGE).await;

    // Data nobody asked for.
    let (_admin, mut io, _) = Raw::io_queue(addr, &nqn_of("vol"), Digests::default()).await;
    let b = io.h2c_data(77, 5, 0, &data[..512], true);
    io.send(&b).await;
    assert_eq!(
        io.expect_termination(fes::INVALID_HEADER_FIELD).await,
        10,
        "FEI names TTAG"
    );

    // A DATAL that disagrees with PLEN.
    let (_admin, mut io, _) = Raw::io_queue(addr, &nqn_of("vol"), Digests::default()).await;
    let mut b = BytesMut::new();
    let h = DataHeader {
        cccid: 1,
        ttag: 0,
        datao: 0,
        datal: 512,
    };
    encode_data_header(&mut b, pdu_type::H2C_DATA, 0, &h, Digests::default(), 0);
    b[16..20].copy_from_slice(&256u32.to_le_bytes());
    b.extend_from_slice(&[0u8; 512]);
    io.send(&b).await;
    assert_eq!(io.expect_termination(fes::INVALID_HEADER_FIELD).await, 16);
    undisturbed(&other, 6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_vanishing_mid_transfer_disturbs_nobody() {
    let (t, addr, nqn, other) = setup(TargetSettings {
        in_capsule_data_size: 0,
        ..TargetSettings::default()
    })
    .await;
    // Mid-R2T: half the data, then gone.
    let (admin, mut io, cntlid) = Raw::io_queue(addr, &nqn, Digests::default()).await;
    let cid = io.cid();
    let b = io.capsule(&write_r2t(cid, 0, 128, 65536), &[]);
    io.send(&b).await;
    let PduHeader::R2t(r2t) = io.recv().await.header else {
        panic!("expected R2T")
    };
    let b = io.h2c_data(cid, r2t.ttag, 0, &pattern(1, 32768), false);
    io.send(&b).await;
    drop(io);
    undisturbed(&other, 7).await;
    // The association lives on: a new I/O queue for it works.
    let mut io = Raw::connect(addr).await;
    io.init(Digests::default()).await;
    let a = io.connect_queue(&nqn, 1, 31, cntlid, 0, 0).await;
    assert!(a.completion.status.is_success(), "{}", a.completion.status);
    queue_alive(&mut io).await;
    // Mid-PDU: half a capsule header, then gone.
    let b = {
        let cid = io.cid();
        io.capsule(&read(cid, 0, 1, 512), &[])
    };
    io.send(&b[..30]).await;
    drop(io);
    // The admin queue vanishing ends the association.
    assert_eq!(t.controllers(&nqn), vec![cntlid]);
    drop(admin);
    wait_until("the controller is torn down", LIMIT, || {
        let t = t.clone();
        let nqn = nqn.clone();
        async move { t.controllers(&nqn).is_empty() }
    })
    .await;
    undisturbed(&other, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refusals_say_why() {
    let (t, addr) = target(TargetSettings::default()).await;
    let vol = export(&t, "vol", mem("vol", SIZE));
    let locked = nqn("locked");
    t.add_subsystem(Subsystem {
        allowed_hosts: Some(vec!["nqn.2014-08.org.example:someone-else".into()]),
        ..Subsystem::new(locked.clone(), mem("locked", SIZE))
    })
    .expect("add");
    let mut raw = Raw::connect(addr).await;
    raw.init(Digests::default()).await;
    // A command before Connect.
    let cid = raw.cid();
    let a = raw.command(Command::keep_alive(cid), &[]).await;
    assert_status(&a, Status::COMMAND_SEQUENCE_ERROR, "before Connect");
    // No such subsystem.
    let a = raw.connect_queue(&nqn("nope"), 0, 31, 0xFFFF, 0, 0).await;
    assert_status(&a, Status::CONNECT_INVALID_PARAMETERS, "unknown subsystem");
    assert_eq!(
        a.completion.result as u32,
        1 << 16 | u32::from(connect_offset::SUBNQN),
        "IATTR: data; IPO: SUBNQN"
    );
    // A host not on the allow list.
    let a = raw.connect_queue(&locked, 0, 31, 0xFFFF, 0, 0).await;
    assert_status(&a, Status::CONNECT_INVALID_HOST, "allow list");
    // A queue size of 1 entry, and more than the admin queue has.
    for sqsize in [0u16, 32] {
        let a = raw.connect_queue(&vol, 0, sqsize, 0xFFFF, 0, 0).await;
        assert_status(&a, Status::CONNECT_INVALID_PARAMETERS, "admin SQSIZE");
        assert_eq!(a.completion.result as u16, connect_offset::SQSIZE);
    }
    // An I/O queue of a controller that does not exist.
    let a = raw.connect_queue(&vol, 1, 31, 4242, 0, 0).await;
    assert_status(&a, Status::CONNECT_INVALID_PARAMETERS, "unknown controller");
    assert_eq!(a.completion.result as u16, connect_offset::CNTLID);
    // An I/O queue before the controller is enabled.
    let mut admin = Raw::connect(addr).await;
    admin.init(Digests::default()).await;
    let cntlid = admin.connect_admin(&vol, 0).await;
    let a = raw.connect_queue(&vol, 1, 31, cntlid, 0, 0).await;
    assert_status(&a, Status::COMMAND_SEQUENCE_ERROR, "before enable");
    // Admin commands before enable.
    let cid = admin.cid();
    let a = admin.command(Command::identify(cid, 1, 0, 0), &[]).await;
    assert_status(&a, Status::COMMAND_SEQUENCE_ERROR, "identify before enable");
    admin.enable().await;
    // An I/O queue beyond the number of queues, and one connected twice.
    let a = raw.connect_queue(&vol, 9, 31, cntlid, 0, 0).await;
    assert_status(&a, Status::CONNECT_INVALID_PARAMETERS, "qid 9 of 8");
    let a = raw.connect_queue(&vol, 1, 31, cntlid, 0, 0).await;
    assert!(a.completion.status.is_success());
    let mut again = Raw::connect(addr).await;
    again.init(Digests::default()).await;
    let a = again.connect_queue(&vol, 1, 31, cntlid, 0, 0).await;
    assert_status(&a, Status::COMMAND_SEQUENCE_ERROR, "qid 1 twice");
    // A second Connect on a connected queue.
    let a = raw.connect_queue(&vol, 2, 31, cntlid, 0, 0).await;
    assert_status(
        &a,
        Status::COMMAND_SEQUENCE_ERROR,
        "Connect on a connected queue",
    );
    queue_alive(&mut raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_commands_than_the_queue_size_terminates() {
    let (_t, addr, nqn, other) = setup(TargetSettings {
        in_capsule_data_size: 0,
        ..TargetSettings::default()
    })
    .await;
    let mut admin = Raw::connect(addr).await;
    admin.init(Digests::default()).await;
    let cntlid = admin.connect_admin(&nqn, 0).await;
    admin.enable().await;
    let mut io = Raw::connect(addr).await;
    io.init(Digests::default()).await;
    // Four entries.
    let a = io.connect_queue(&nqn, 1, 3, cntlid, 0, 0).await;
    assert!(a.completion.status.is_success());
    // Writes waiting for their data stay outstanding: the fifth command is one too many.
    let mut b = Vec::new();
    for i in 0..5u16 {
        b.extend(io.capsule(&write_r2t(100 + i, u64::from(i), 1, 512), &[]));
    }
    io.send(&b).await;
    for _ in 0..4 {
        assert!(matches!(io.recv().await.header, PduHeader::R2t(_)));
    }
    io.expect_termination(fes::PDU_SEQUENCE_ERROR).await;
    undisturbed(&other, 9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_digest_errors_fail_the_command_not_the_queue() {
    let (_t, addr, _nqn, other) = setup(TargetSettings::default()).await;
    let dg = Digests {
        header: true,
        data: true,
    };
    let (_admin, mut io, _) = Raw::io_queue(addr, &nqn_of("vol"), dg).await;
    let cid = io.cid();
    let c = Command::rw(io_opcode::WRITE, cid, 1, 0, 1, false, Sgl::in_capsule(512));
    let mut b = io.capsule(&c, &[5u8; 512]);
    let n = b.len();
    b[n - 1] ^= 0xFF;
    io.send(&b).await;
    let a = io.answer(cid).await;
    assert_status(
        &a,
        Status::TRANSIENT_TRANSPORT_ERROR,
        "in-capsule data digest",
    );
    let cid = io.cid();
    let a = io.command(read(cid, 0, 1, 512), &[]).await;
    assert_eq!(a.data, vec![0u8; 512], "the damaged write was not applied");
    undisturbed(&other, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_a_read_only_subsystem_are_refused() {
    let (t, addr) = target(TargetSettings::default()).await;
    let ro = nqn("ro");
    t.add_subsystem(Subsystem {
        read_only: true,
        ..Subsystem::new(ro.clone(), mem("ro", SIZE))
    })
    .expect("add");
    let (_admin, mut io, _) = Raw::io_queue(addr, &ro, Digests::default()).await;
    let cid = io.cid();
    let c = Command::rw(io_opcode::WRITE, cid, 1, 0, 1, false, Sgl::in_capsule(512));
    let a = io.command(c, &[1u8; 512]).await;
    assert_status(&a, Status::NAMESPACE_WRITE_PROTECTED, "write");
    let cid = io.cid();
    let a = io
        .command(Command::write_zeroes(cid, 1, 0, 1, false, false), &[])
        .await;
    assert_status(&a, Status::NAMESPACE_WRITE_PROTECTED, "write zeroes");
    queue_alive(&mut io).await;
    // The host sees it read-only, and refuses writes itself.
    let dev = host(addr, &ro, HostOptions::default()).await;
    assert!(dev.capabilities().read_only);
    assert_eq!(
        dev.write_slice_at(0, &[0u8; 512])
            .await
            .expect_err("read-only")
            .kind(),
        strata_bdev::ErrorKind::PermissionDenied
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_hosts_are_cut_off() {
    let settings = TargetSettings {
        handshake_timeout_secs: 0.3,
        ..TargetSettings::default()
    };
    let (t, addr, nqn, other) = setup(settings).await;
    // A connection that never says anything.
    let mut mute = Raw::connect(addr).await;
    assert!(
        mute.try_recv().await.is_none(),
        "closed after the handshake timeout"
    );
    // A controller whose host stops sending anything within its keep-alive timeout.
    let mut admin = Raw::connect(addr).await;
    admin.init(Digests::default()).await;
    let cntlid = admin.connect_admin(&nqn, 300).await;
    admin.enable().await;
    assert!(t.controllers(&nqn).contains(&cntlid));
    assert!(
        admin.try_recv().await.is_none(),
        "the controller's connection is closed"
    );
    assert!(
        !t.controllers(&nqn).contains(&cntlid),
        "and the controller is gone"
    );
    // The other host sends keep-alives, and stays.
    undisturbed(&other, 11).await;
    assert!(other.is_connected());
}
