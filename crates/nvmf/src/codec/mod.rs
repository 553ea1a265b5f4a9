//! The NVMe/TCP wire format, as pure functions: bytes in, typed values out, and back. No I/O,
//! no state — the target and the host drive it, the tests and the fuzz target feed it anything.
//!
//! - [`pdu`]: the transport's PDUs (ICReq/ICResp, CapsuleCmd/CapsuleResp, H2CData, C2HData,
//!   R2T, H2CTermReq/C2HTermReq), CRC32C digests, and the length checks a receiver makes
//!   before trusting a PDU.
//! - [`command`]: submission and completion entries, statuses, opcodes, command builders.
//! - [`fabrics`]: Connect, Property Get/Set and Disconnect.
//! - [`kinds`]: a command decoded by kind (admin, NVM I/O, fabrics) and Dataset Management
//!   ranges.
//! - [`identify`]: Identify data (controller, namespace, namespace lists and descriptors).
//! - [`log`]: log pages (error, SMART / health, changed namespaces, discovery).

pub mod command;
pub mod fabrics;
pub mod identify;
pub mod kinds;
pub mod log;
pub mod pdu;

pub use command::{
    admin_opcode, aen, cns, feature, io_opcode, log_id, sct, sgl_id, Command, Completion,
    Direction, Sgl, Status, IDENTIFY_LEN,
};
pub use fabrics::{
    cattr, connect_offset, fctype, property, Connect, ConnectData, ConnectDataError, Fabrics,
    CONNECT_DATA_LEN, MAX_NQN_LEN,
};
pub use identify::{
    decode_ns_descriptors, decode_ns_list, encode_ns_descriptors, encode_ns_list,
    IdentifyController, IdentifyNamespace, NsId, ShortData,
};
pub use kinds::{AdminCommand, BlockRange, DsmRange, IoCommand, DSM_RANGE_LEN};
pub use log::{DiscoveryEntry, DiscoveryLog, SmartLog};
pub use pdu::{
    decode_header, decode_pdu, digest, digest_of, fes, pdu_flags, pdu_type, CommonHeader,
    DataHeader, Digests, IcReq, IcResp, Layout, Limits, Pdu, PduError, PduHeader, R2t, Role,
    TermReq,
};

/// The NQN of the discovery subsystem every NVMe/TCP target serves.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// The IANA port of NVMe/TCP.
pub const DEFAULT_PORT: u16 = 4420;

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use proptest::prelude::*;

    use super::pdu::*;
    use super::*;

    const LIMITS: Limits = Limits {
        in_capsule: 8192,
        data_pdu: 1 << 20,
    };

    fn digests() -> impl Strategy<Value = Digests> {
        (any::<bool>(), any::<bool>()).prop_map(|(header, data)| Digests { header, data })
    }

    fn sgl() -> impl Strategy<Value = Sgl> {
        (any::<u64>(), any::<u32>(), any::<[u8; 3]>(), any::<u8>()).prop_map(
            |(address, length, reserved, id)| Sgl {
                address,
                length,
                reserved,
                id,
            },
        )
    }

    prop_compose! {
        fn command()(
            head in (any::<u8>(), any::<u8>(), any::<u16>(), any::<u32>(), any::<u32>(), any::<u32>(), any::<u64>()),
            dptr in sgl(),
            dws in any::<[u32; 6]>(),
        ) -> Command {
            let (opcode, flags, cid, nsid, cdw2, cdw3, mptr) = head;
            Command {
                opcode, flags, cid, nsid, cdw2, cdw3, mptr, dptr,
                cdw10: dws[0], cdw11: dws[1], cdw12: dws[2], cdw13: dws[3], cdw14: dws[4], cdw15: dws[5],
            }
        }
    }

    prop_compose! {
        fn completion()(result in any::<u64>(), sqhd in any::<u16>(), sqid in any::<u16>(), cid in any::<u16>(), status in 0u16..0x8000) -> Completion {
            Completion { result, sqhd, sqid, cid, status: Status::from_field(status) }
        }
    }

    fn round_trip(bytes: &[u8], role: Role, dg: Option<Digests>) -> Pdu {
        let (pdu, n) = decode_pdu(bytes, role, dg, LIMITS)
            .expect("a PDU this codec encoded decodes")
            .expect("the PDU is complete");
        assert_eq!(n, bytes.len(), "the PDU is exactly what was encoded");
        // Every proper prefix is incomplete, never an error.
        for cut in [0, 1, 7, 8, bytes.len() / 2, bytes.len() - 1] {
            if cut < bytes.len() {
                assert_eq!(
                    decode_pdu(&bytes[..cut], role, dg, LIMITS),
                    Ok(None),
                    "prefix {cut}"
                );
            }
        }
        pdu
    }

    proptest! {
        #[test]
        fn sqe_round_trips(c in command()) {
            let mut b = [0u8; 64];
            c.encode(&mut b);
            prop_assert_eq!(Command::decode(&b), c);
        }

        #[test]
        fn cqe_round_trips(c in completion()) {
            let mut b = [0u8; 16];
            c.encode(&mut b);
            prop_assert_eq!(Completion::decode(&b), c);
        }

        #[test]
        fn capsule_cmd_round_trips(c in command(), data in proptest::collection::vec(any::<u8>(), 0..9000), dg in digests()) {
            let data = &data[..data.len().min(LIMITS.in_capsule as usize)];
            let mut b = BytesMut::new();
            encode_capsule_cmd(&mut b, &c, data.len(), dg);
            b.extend_from_slice(data);
            if dg.data && !data.is_empty() {
                b.extend_from_slice(&digest(data));
            }
            let pdu = round_trip(&b, Role::Controller, Some(dg));
            prop_assert_eq!(pdu.header, PduHeader::CapsuleCmd(c));
            prop_assert_eq!(&pdu.data[..], data);
            prop_assert!(!pdu.data_digest_error);
        }

        #[test]
        fn capsule_resp_round_trips(c in completion(), dg in digests()) {
            let mut b = BytesMut::new();
            encode_capsule_resp(&mut b, &c, dg);
            let pdu = round_trip(&b, Role::Host, Some(dg));
            prop_assert_eq!(pdu.header, PduHeader::CapsuleResp(c));
        }

        #[test]
        fn data_pdus_round_trip(
            cccid in any::<u16>(), ttag in any::<u16>(), datao in any::<u32>(),
            data in proptest::collection::vec(any::<u8>(), 1..5000),
            dg in digests(), c2h in any::<bool>(), flags in 0u8..16, hpda in 0usize..4,
        ) {
            let d = DataHeader { cccid, ttag, datao, datal: data.len() as u32 };
            let (t, role) = if c2h { (pdu_type::C2H_DATA, Role::Host) } else { (pdu_type::H2C_DATA, Role::Controller) };
            let flags = flags & (pdu_flags::LAST_PDU | pdu_flags::SUCCESS);
            let mut b = BytesMut::new();
            encode_data_header(&mut b, t, flags, &d, dg, (hpda + 1) * 4);
            b.extend_from_slice(&data);
            if dg.data {
                b.extend_from_slice(&digest(&data));
            }
            let pdu = round_trip(&b, role, Some(dg));
            let want = if c2h { PduHeader::C2HData(d) } else { PduHeader::H2CData(d) };
            prop_assert_eq!(pdu.header, want);
            prop_assert_eq!(pdu.data, data);
            prop_assert_eq!(b[1] & (pdu_flags::LAST_PDU | pdu_flags::SUCCESS), flags);
        }

        #[test]
        fn r2t_round_trips(cccid in any::<u16>(), ttag in any::<u16>(), r2to in any::<u32>(), r2tl in any::<u32>(), dg in digests()) {
            let r = R2t { cccid, ttag, r2to, r2tl };
            let mut b = BytesMut::new();
            encode_r2t(&mut b, &r, dg);
            prop_assert_eq!(round_trip(&b, Role::Host, Some(dg)).header, PduHeader::R2t(r));
        }

        #[test]
        fn ic_round_trips(pfv in any::<u16>(), hpda in any::<u8>(), bits in 0u8..4, maxr2t in any::<u32>(), maxh2cdata in any::<u32>()) {
            let req = IcReq { pfv, hpda, digests: Digests::from_bits(bits), maxr2t };
            let mut b = BytesMut::new();
            encode_ic_req(&mut b, &req);
            prop_assert_eq!(round_trip(&b, Role::Controller, None).header, PduHeader::IcReq(req));
            let resp = IcResp { pfv, cpda: hpda, digests: Digests::from_bits(bits), maxh2cdata };
            let mut b = BytesMut::new();
            encode_ic_resp(&mut b, &resp);
            prop_assert_eq!(round_trip(&b, Role::Host, None).header, PduHeader::IcResp(resp));
        }

        #[test]
        fn term_reqs_round_trip(fes in any::<u16>(), fei in any::<u32>(), offending in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut b = BytesMut::new();
            encode_term_req(&mut b, Role::Controller, fes, fei, &offending);
            let pdu = round_trip(&b, Role::Host, Some(Digests::default()));
            prop_assert_eq!(pdu.header, PduHeader::C2HTermReq { fes, fei });
            prop_assert_eq!(&pdu.data[..], &offending[..offending.len().min(MAX_TERM_DATA)]);
            let mut b = BytesMut::new();
            encode_term_req(&mut b, Role::Host, fes, fei, &offending);
            // A termination request is valid before initialization too.
            let pdu = round_trip(&b, Role::Controller, None);
            prop_assert_eq!(pdu.header, PduHeader::H2CTermReq { fes, fei });
        }

        #[test]
        fn connect_data_round_trips(hostid in any::<[u8; 16]>(), cntlid in any::<u16>(), sub in "[a-z0-9.:-]{1,223}", host in "[a-z0-9.:-]{1,223}") {
            let d = ConnectData { hostid, cntlid, subnqn: sub, hostnqn: host };
            prop_assert_eq!(ConnectData::decode(&d.encode()), Ok(d));
        }

        #[test]
        fn identify_controller_round_trips(
            cntlid in any::<u16>(), mdts in any::<u8>(), maxcmd in any::<u16>(), nn in any::<u32>(),
            oncs in any::<u16>(), ioccsz in any::<u32>(), serial in "[A-Za-z0-9]{0,20}", model in "[A-Za-z0-9 ]{0,39}[A-Za-z0-9]",
            subnqn in "[a-z0-9.:-]{0,223}", oaes in any::<u32>(), kas in any::<u16>(),
        ) {
            let c = IdentifyController {
                cntlid, mdts, maxcmd, nn, oncs, ioccsz, serial, model, subnqn, oaes, kas,
                firmware: "1.0".into(), ver: 0x10300, sgls: 1, iorcsz: 1, cntrltype: 1,
                ..IdentifyController::default()
            };
            prop_assert_eq!(IdentifyController::decode(&c.encode()), Ok(c));
        }

        #[test]
        fn identify_namespace_round_trips(nsze in any::<u64>(), nguid in any::<[u8; 16]>(), shift in 9u8..16, nsattr in any::<u8>(), npwg in any::<u16>()) {
            let n = IdentifyNamespace {
                nsze, ncap: nsze, nuse: nsze, nguid, nsattr, npwg, nows: npwg,
                lbaf: vec![(0, shift)], dlfeat: 1, nmic: 1,
                ..IdentifyNamespace::default()
            };
            let back = IdentifyNamespace::decode(&n.encode()).expect("decode");
            prop_assert_eq!(back.lba_shift(), Some(shift));
            prop_assert_eq!(back, n);
        }

        #[test]
        fn ns_lists_round_trip(mut ids in proptest::collection::btree_set(1u32..u32::MAX, 0..1100), after in any::<u32>()) {
            let all: Vec<u32> = std::mem::take(&mut ids).into_iter().collect();
            let want: Vec<u32> = all.iter().copied().filter(|&n| n > after).take(1024).collect();
            prop_assert_eq!(decode_ns_list(&encode_ns_list(&all, after)), want);
        }

        #[test]
        fn ns_descriptors_round_trip(nguid in any::<[u8; 16]>(), uuid in any::<[u8; 16]>(), eui in any::<[u8; 8]>(), csi in any::<u8>()) {
            let ids = vec![NsId::Eui64(eui), NsId::Nguid(nguid), NsId::Uuid(uuid), NsId::Csi(csi)];
            prop_assert_eq!(decode_ns_descriptors(&encode_ns_descriptors(&ids)), ids);
        }

        #[test]
        fn smart_log_round_trips(reads in any::<u64>(), writes in any::<u64>(), hours in any::<u32>(), temp in any::<u16>()) {
            let s = SmartLog {
                temperature: temp, available_spare: 100, spare_threshold: 10,
                data_units_read: u128::from(reads), data_units_written: u128::from(writes),
                host_reads: u128::from(reads) * 3, host_writes: 7, power_on_hours: u128::from(hours),
                ..SmartLog::default()
            };
            prop_assert_eq!(SmartLog::decode(&s.encode()), Ok(s));
        }

        #[test]
        fn discovery_log_round_trips(genctr in any::<u64>(), nqns in proptest::collection::vec("[a-z0-9.:-]{1,223}", 0..5), port in any::<u16>()) {
            let entries = nqns.into_iter().map(|subnqn| DiscoveryEntry {
                trtype: log::trtype::TCP, adrfam: log::adrfam::IPV4, subtype: log::subtype::NVM,
                treq: 6, portid: 1, cntlid: 0xFFFF, asqsz: 32, eflags: 0,
                trsvcid: port.to_string(), subnqn, traddr: "192.0.2.7".into(), sectype: 0,
            }).collect();
            let l = DiscoveryLog { genctr, recfmt: 0, entries };
            let b = l.encode();
            prop_assert_eq!(DiscoveryLog::records(&b), Some(l.entries.len() as u64));
            prop_assert_eq!(DiscoveryLog::decode(&b), Ok(l));
        }

        #[test]
        fn status_fields_round_trip(sct in 0u8..8, sc in any::<u8>(), dnr in any::<bool>()) {
            let s = Status::new(sct, sc);
            let s = if dnr { s.dnr() } else { s };
            prop_assert_eq!(s.sct(), sct);
            prop_assert_eq!(s.sc(), sc);
            prop_assert_eq!(s.is_dnr(), dnr);
            prop_assert_eq!(s.code(), Status::new(sct, sc));
        }

        /// The fuzz target: arbitrary bytes into every decoder, for each role and negotiated
        /// state. Nothing panics; whatever decodes re-checks its own lengths.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), dg in digests(), init in any::<bool>()) {
            let dg = init.then_some(dg);
            for role in [Role::Controller, Role::Host] {
                for limits in [LIMITS, Limits { in_capsule: 0, data_pdu: 0 }, Limits { in_capsule: u32::MAX, data_pdu: u32::MAX }] {
                    if let Ok(Some((_, layout))) = decode_header(&bytes, role, dg, limits) {
                        prop_assert!(layout.header_len <= layout.total);
                        prop_assert!(layout.data_offset + layout.data_len <= layout.total);
                    }
                    if let Ok(Some((pdu, n))) = decode_pdu(&bytes, role, dg, limits) {
                        prop_assert!(n <= bytes.len());
                        prop_assert!(pdu.data.len() <= n);
                    }
                }
            }
            let _ = ConnectData::decode(&bytes);
            let _ = IdentifyController::decode(&bytes);
            let _ = IdentifyNamespace::decode(&bytes).map(|n| n.lba_shift());
            let _ = decode_ns_descriptors(&bytes);
            let _ = decode_ns_list(&bytes);
            let _ = SmartLog::decode(&bytes);
            let _ = DiscoveryLog::decode(&bytes);
            let _ = DsmRange::decode_all(&bytes);
            if bytes.len() >= 64 {
                let c = Command::decode(&bytes);
                let _ = (AdminCommand::parse(&c), IoCommand::parse(&c), Fabrics::parse(&c), c.direction());
            }
            if bytes.len() >= 16 {
                let c = Completion::decode(&bytes);
                let _ = c.status.to_string();
            }
        }

        /// Arbitrary bytes behind a valid common header of every type, so the decoders get past
        /// the first checks.
        #[test]
        fn arbitrary_bodies_never_panic(t in prop::sample::select(vec![0u8, 1, 2, 3, 4, 5, 6, 7, 9]), flags in any::<u8>(), pdo in any::<u8>(), plen in 0u32..20000, body in proptest::collection::vec(any::<u8>(), 0..300), dg in digests()) {
            let hlen = match t { 0 | 1 => 128u8, 4 => 72, _ => 24 };
            let mut b = vec![t, flags, hlen, pdo];
            b.extend_from_slice(&plen.to_le_bytes());
            b.extend_from_slice(&body);
            for role in [Role::Controller, Role::Host] {
                for init in [None, Some(dg)] {
                    let _ = decode_pdu(&b, role, init, LIMITS);
                }
            }
        }
    }

    #[test]
    fn crc32c_is_castagnoli() {
        // The check value of CRC-32C.
        assert_eq!(digest(b"123456789"), 0xE306_9283u32.to_le_bytes());
        assert_eq!(digest_of(&[b"1234", b"56789"]), digest(b"123456789"));
    }

    #[test]
    fn header_checks_name_the_field() {
        let dg = Digests {
            header: true,
            data: true,
        };
        let c = Command::keep_alive(7);
        let mut b = BytesMut::new();
        encode_capsule_cmd(&mut b, &c, 0, dg);
        let good = b.to_vec();

        let mut bad = good.clone();
        bad[10] ^= 1;
        assert_eq!(
            decode_header(&bad, Role::Controller, Some(dg), LIMITS)
                .expect_err("a corrupted header")
                .fes(),
            fes::HEADER_DIGEST_ERROR
        );
        let mut bad = good.clone();
        bad[2] = 24;
        let e = decode_header(&bad, Role::Controller, Some(dg), LIMITS).expect_err("bad HLEN");
        assert_eq!((e.fes(), e.fei()), (fes::INVALID_HEADER_FIELD, 2));
        let e = decode_header(&good, Role::Controller, Some(Digests::default()), LIMITS)
            .expect_err("HDGSTF without header digests");
        assert_eq!((e.fes(), e.fei()), (fes::INVALID_HEADER_FIELD, 1));
        let e = decode_header(&good, Role::Host, Some(dg), LIMITS).expect_err("wrong direction");
        assert_eq!((e.fes(), e.fei()), (fes::INVALID_HEADER_FIELD, 0));
        let e = decode_header(&good, Role::Controller, None, LIMITS).expect_err("before ICReq");
        assert_eq!(e.fes(), fes::PDU_SEQUENCE_ERROR);

        // Oversized data is refused from the common header alone.
        let d = DataHeader {
            cccid: 1,
            ttag: 0,
            datao: 0,
            datal: 2 << 20,
        };
        let mut b = BytesMut::new();
        encode_data_header(&mut b, pdu_type::H2C_DATA, 0, &d, dg, 0);
        let e = decode_header(&b[..8], Role::Controller, Some(dg), LIMITS)
            .expect_err("data beyond the limit");
        assert_eq!(e.fes(), fes::DATA_LIMIT_EXCEEDED);
        let mut b = BytesMut::new();
        encode_capsule_cmd(&mut b, &c, 9000, Digests::default());
        let e = decode_header(&b[..8], Role::Controller, Some(Digests::default()), LIMITS)
            .expect_err("in-capsule data beyond the limit");
        assert_eq!(e.fes(), fes::DATA_LIMIT_EXCEEDED);
    }

    #[test]
    fn data_digest_errors_are_reported_not_fatal() {
        let dg = Digests {
            header: false,
            data: true,
        };
        let d = DataHeader {
            cccid: 3,
            ttag: 1,
            datao: 0,
            datal: 4,
        };
        let mut b = BytesMut::new();
        encode_data_header(&mut b, pdu_type::H2C_DATA, pdu_flags::LAST_PDU, &d, dg, 0);
        b.extend_from_slice(b"abcd");
        b.extend_from_slice(&digest(b"abce"));
        let (pdu, _) = decode_pdu(&b, Role::Controller, Some(dg), LIMITS)
            .expect("valid header")
            .expect("complete");
        assert!(pdu.data_digest_error);
    }

    #[test]
    fn typed_commands_read_what_builders_write() {
        let c = Command::rw(
            io_opcode::WRITE,
            9,
            1,
            1 << 40,
            256,
            true,
            Sgl::transport(1 << 17),
        );
        assert_eq!(
            IoCommand::parse(&c),
            IoCommand::Write(BlockRange {
                slba: 1 << 40,
                nlb: 256,
                fua: true
            })
        );
        assert_eq!(c.direction(), Direction::HostToController);
        let c = Command::write_zeroes(1, 1, 5, 65536, true, false);
        assert_eq!(
            IoCommand::parse(&c),
            IoCommand::WriteZeroes {
                range: BlockRange {
                    slba: 5,
                    nlb: 65536,
                    fua: false
                },
                deac: true
            }
        );
        let c = Command::dataset_management(1, 1, 256, true, Sgl::in_capsule(4096));
        assert_eq!(
            IoCommand::parse(&c),
            IoCommand::DatasetManagement {
                ranges: 256,
                deallocate: true
            }
        );
        let c = Command::get_log_page(2, log_id::DISCOVERY, 0, 1 << 20, 4096, true);
        assert_eq!(
            AdminCommand::parse(&c),
            AdminCommand::GetLogPage {
                lid: log_id::DISCOVERY,
                lsp: 0,
                rae: true,
                len: 1 << 20,
                offset: 4096
            }
        );
        let conn = Connect {
            recfmt: 0,
            qid: 3,
            sqsize: 127,
            cattr: cattr::DISABLE_SQFLOW,
            kato: 5000,
        };
        let c = Command::connect(4, &conn);
        assert_eq!(Fabrics::parse(&c), Fabrics::Connect(conn));
        assert_eq!(c.direction(), Direction::HostToController);
        assert_eq!(
            Fabrics::parse(&Command::property_set(1, property::CC, false, 0x460001)),
            Fabrics::PropertySet {
                eight: false,
                offset: property::CC,
                value: 0x460001
            }
        );
    }
}
