use proptest::prelude::*;

use super::scsi::*;
use super::*;

fn sequence() -> impl Strategy<Value = (u32, u32, u32)> {
    (any::<u32>(), any::<u32>(), any::<u32>())
}

fn header() -> impl Strategy<Value = Header> {
    let nop_out = (
        any::<bool>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(immediate, lun, itt, ttt, cmd_sn, exp_stat_sn)| {
            Header::NopOut(NopOut {
                immediate,
                lun,
                itt,
                ttt,
                cmd_sn,
                exp_stat_sn,
            })
        });
    let command = (
        (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            0u8..8,
        ),
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
        ),
        any::<[u8; 16]>(),
    )
        .prop_map(
            |(
                (immediate, final_, read, write, attr),
                (lun, itt, expected_len, cmd_sn, exp_stat_sn),
                cdb,
            )| {
                Header::ScsiCommand(ScsiCommand {
                    immediate,
                    final_,
                    read,
                    write,
                    attr,
                    lun,
                    itt,
                    expected_len,
                    cmd_sn,
                    exp_stat_sn,
                    cdb,
                })
            },
        );
    let tmf_req = (
        (
            any::<bool>(),
            0u8..0x80,
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
        ),
        (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
    )
        .prop_map(
            |(
                (immediate, function, lun, itt, referenced_tag),
                (cmd_sn, exp_stat_sn, ref_cmd_sn, exp_data_sn),
            )| {
                Header::TaskMgmtRequest(TaskMgmtRequest {
                    immediate,
                    function,
                    lun,
                    itt,
                    referenced_tag,
                    cmd_sn,
                    exp_stat_sn,
                    ref_cmd_sn,
                    exp_data_sn,
                })
            },
        );
    let login_req = (
        (
            any::<bool>(),
            any::<bool>(),
            0u8..4,
            0u8..4,
            any::<u8>(),
            any::<u8>(),
        ),
        (
            any::<[u8; 6]>(),
            any::<u16>(),
            any::<u32>(),
            any::<u16>(),
            any::<u32>(),
            any::<u32>(),
        ),
    )
        .prop_map(
            |(
                (transit, continue_, csg, nsg, version_max, version_min),
                (isid, tsih, itt, cid, cmd_sn, exp_stat_sn),
            )| {
                Header::LoginRequest(LoginRequest {
                    transit,
                    continue_,
                    csg,
                    nsg,
                    version_max,
                    version_min,
                    isid,
                    tsih,
                    itt,
                    cid,
                    cmd_sn,
                    exp_stat_sn,
                })
            },
        );
    let text_req = (
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<u64>()),
        (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
    )
        .prop_map(
            |((immediate, final_, continue_, lun), (itt, ttt, cmd_sn, exp_stat_sn))| {
                Header::TextRequest(TextRequest {
                    immediate,
                    final_,
                    continue_,
                    lun,
                    itt,
                    ttt,
                    cmd_sn,
                    exp_stat_sn,
                })
            },
        );
    let data_out = (
        any::<bool>(),
        any::<u64>(),
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
        ),
    )
        .prop_map(
            |(final_, lun, (itt, ttt, exp_stat_sn, data_sn, buffer_offset))| {
                Header::DataOut(DataOut {
                    final_,
                    lun,
                    itt,
                    ttt,
                    exp_stat_sn,
                    data_sn,
                    buffer_offset,
                })
            },
        );
    let logout_req = (
        any::<bool>(),
        0u8..0x80,
        any::<u32>(),
        any::<u16>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(immediate, reason, itt, cid, cmd_sn, exp_stat_sn)| {
            Header::LogoutRequest(LogoutRequest {
                immediate,
                reason,
                itt,
                cid,
                cmd_sn,
                exp_stat_sn,
            })
        });
    let nop_in = (any::<u64>(), any::<u32>(), any::<u32>(), sequence()).prop_map(
        |(lun, itt, ttt, (stat_sn, exp_cmd_sn, max_cmd_sn))| {
            Header::NopIn(NopIn {
                lun,
                itt,
                ttt,
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
            })
        },
    );
    let response = (
        (
            prop::sample::select(vec![0u8, 0x02, 0x04, 0x08, 0x10, 0x12, 0x1e]),
            any::<u8>(),
            any::<u8>(),
        ),
        (any::<u32>(), any::<u32>(), sequence()),
        (any::<u32>(), any::<u32>(), any::<u32>()),
    )
        .prop_map(
            |(
                (flags, response, status),
                (itt, snack_tag, (stat_sn, exp_cmd_sn, max_cmd_sn)),
                (exp_data_sn, bidi_residual, residual),
            )| {
                Header::ScsiResponse(ScsiResponse {
                    flags,
                    response,
                    status,
                    itt,
                    snack_tag,
                    stat_sn,
                    exp_cmd_sn,
                    max_cmd_sn,
                    exp_data_sn,
                    bidi_residual,
                    residual,
                })
            },
        );
    let tmf_resp = (any::<u8>(), any::<u32>(), sequence()).prop_map(
        |(response, itt, (stat_sn, exp_cmd_sn, max_cmd_sn))| {
            Header::TaskMgmtResponse(TaskMgmtResponse {
                response,
                itt,
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
            })
        },
    );
    let login_resp = (
        (
            any::<bool>(),
            any::<bool>(),
            0u8..4,
            0u8..4,
            any::<u8>(),
            any::<u8>(),
        ),
        (
            any::<[u8; 6]>(),
            any::<u16>(),
            any::<u32>(),
            sequence(),
            any::<u8>(),
            any::<u8>(),
        ),
    )
        .prop_map(
            |(
                (transit, continue_, csg, nsg, version_max, version_active),
                (isid, tsih, itt, (stat_sn, exp_cmd_sn, max_cmd_sn), status_class, status_detail),
            )| {
                Header::LoginResponse(LoginResponse {
                    transit,
                    continue_,
                    csg,
                    nsg,
                    version_max,
                    version_active,
                    isid,
                    tsih,
                    itt,
                    stat_sn,
                    exp_cmd_sn,
                    max_cmd_sn,
                    status_class,
                    status_detail,
                })
            },
        );
    let text_resp = (
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        sequence(),
    )
        .prop_map(
            |(final_, continue_, lun, itt, ttt, (stat_sn, exp_cmd_sn, max_cmd_sn))| {
                Header::TextResponse(TextResponse {
                    final_,
                    continue_,
                    lun,
                    itt,
                    ttt,
                    stat_sn,
                    exp_cmd_sn,
                    max_cmd_sn,
                })
            },
        );
    let data_in = (
        (
            any::<bool>(),
            any::<bool>(),
            prop::sample::select(vec![0u8, 2, 4, 6]),
            any::<bool>(),
            any::<u8>(),
        ),
        (any::<u64>(), any::<u32>(), any::<u32>(), sequence()),
        (any::<u32>(), any::<u32>(), any::<u32>()),
    )
        .prop_map(
            |(
                (final_, ack, flags, has_status, status),
                (lun, itt, ttt, (stat_sn, exp_cmd_sn, max_cmd_sn)),
                (data_sn, buffer_offset, residual),
            )| {
                Header::DataIn(DataIn {
                    final_,
                    ack,
                    flags,
                    has_status,
                    status,
                    lun,
                    itt,
                    ttt,
                    stat_sn,
                    exp_cmd_sn,
                    max_cmd_sn,
                    data_sn,
                    buffer_offset,
                    residual,
                })
            },
        );
    let logout_resp = (
        any::<u8>(),
        any::<u32>(),
        sequence(),
        any::<u16>(),
        any::<u16>(),
    )
        .prop_map(
            |(response, itt, (stat_sn, exp_cmd_sn, max_cmd_sn), time2wait, time2retain)| {
                Header::LogoutResponse(LogoutResponse {
                    response,
                    itt,
                    stat_sn,
                    exp_cmd_sn,
                    max_cmd_sn,
                    time2wait,
                    time2retain,
                })
            },
        );
    let r2t = (
        (any::<u64>(), any::<u32>(), any::<u32>(), sequence()),
        (any::<u32>(), any::<u32>(), any::<u32>()),
    )
        .prop_map(
            |(
                (lun, itt, ttt, (stat_sn, exp_cmd_sn, max_cmd_sn)),
                (r2t_sn, buffer_offset, desired_len),
            )| {
                Header::R2t(R2t {
                    lun,
                    itt,
                    ttt,
                    stat_sn,
                    exp_cmd_sn,
                    max_cmd_sn,
                    r2t_sn,
                    buffer_offset,
                    desired_len,
                })
            },
        );
    let async_msg = (
        (any::<u64>(), sequence()),
        (
            any::<u8>(),
            any::<u8>(),
            any::<u16>(),
            any::<u16>(),
            any::<u16>(),
        ),
    )
        .prop_map(
            |((lun, (stat_sn, exp_cmd_sn, max_cmd_sn)), (event, vcode, param1, param2, param3))| {
                Header::AsyncMessage(AsyncMessage {
                    lun,
                    stat_sn,
                    exp_cmd_sn,
                    max_cmd_sn,
                    event,
                    vcode,
                    param1,
                    param2,
                    param3,
                })
            },
        );
    let reject = (any::<u8>(), sequence(), any::<u32>()).prop_map(
        |(reason, (stat_sn, exp_cmd_sn, max_cmd_sn), data_sn)| {
            Header::Reject(Reject {
                reason,
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
                data_sn,
            })
        },
    );
    prop_oneof![
        nop_out,
        command,
        tmf_req,
        login_req,
        text_req,
        data_out,
        logout_req,
        nop_in,
        response,
        tmf_resp,
        login_resp,
        text_resp,
        data_in,
        logout_resp,
        r2t,
        async_msg,
        reject
    ]
}

fn digests() -> impl Strategy<Value = Digests> {
    (any::<bool>(), any::<bool>()).prop_map(|(header, data)| Digests { header, data })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn frames_round_trip(
        header in header(),
        ahs_words in 0usize..4,
        data in prop::collection::vec(any::<u8>(), 0..300),
        digests in digests(),
    ) {
        let frame = Frame {
            header,
            ahs: Bytes::from(vec![0xa5; ahs_words * 4]),
            data: Bytes::from(data),
        };
        let wire = encode(&frame, digests);
        prop_assert_eq!(wire.len() % 4, 0);
        let (back, used) = decode(&wire, digests, 1 << 20).unwrap().unwrap();
        prop_assert_eq!(used, wire.len());
        prop_assert_eq!(back, frame);
        // Every strict prefix is incomplete, never an error or a wrong frame.
        for cut in [0, 1, BHS_LEN - 1, BHS_LEN, wire.len() - 1] {
            if cut < wire.len() {
                prop_assert_eq!(decode(&wire[..cut], digests, 1 << 20).unwrap(), None);
            }
        }
    }

    #[test]
    fn corrupted_digests_are_caught(
        header in header(),
        data in prop::collection::vec(any::<u8>(), 1..300),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let digests = Digests { header: true, data: true };
        let frame = Frame::new(header, Bytes::from(data));
        let mut wire = encode(&frame, digests).to_vec();
        let i = at.index(wire.len());
        // The length bytes change the framing itself; skip them.
        prop_assume!(!(4..8).contains(&i));
        wire[i] ^= 1 << bit;
        match decode(&wire, digests, 1 << 20) {
            Err(CodecError::HeaderDigest { .. } | CodecError::DataDigest { .. }) => {}
            other => prop_assert!(false, "a flipped bit at {} went unnoticed: {:?}", i, other),
        }
    }

    #[test]
    fn decoder_survives_garbage(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        digests in digests(),
    ) {
        let mut at = 0;
        // Decode frame after frame; each call returns a frame, needs more, or fails cleanly.
        while let Ok(Some((_, used))) = decode(&bytes[at..], digests, 4096) {
            prop_assert!(used > 0);
            at += used;
        }
    }

    #[test]
    fn text_round_trips(pairs in prop::collection::vec(("[A-Za-z][A-Za-z0-9_.]{0,20}", "[ -~]{0,40}"), 0..10)) {
        let pairs: Vec<(String, String)> = pairs;
        prop_assert_eq!(text::decode(&text::encode(&pairs)).unwrap(), pairs);
    }

    #[test]
    fn text_decoder_survives_garbage(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = text::decode(&bytes);
    }

    #[test]
    fn cdbs_round_trip(cdb in cdb()) {
        let (bytes, len) = cdb.encode();
        prop_assert_eq!(Cdb::decode(&bytes[..len]).unwrap(), cdb);
    }

    #[test]
    fn scsi_data_round_trips(
        last_lba in any::<u64>(), block_len in any::<u32>(), exp in 0u8..16, lbpme in any::<bool>(), lbprz in any::<bool>(),
        limits in (any::<u16>(), any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>(), any::<u64>()),
        prov in (any::<bool>(), any::<bool>(), any::<bool>(), 0u8..8, 0u8..8),
        luns in prop::collection::vec(any::<u64>(), 0..20),
        ranges in prop::collection::vec((any::<u64>(), any::<u32>()), 0..20),
        sense in (0u8..16, any::<u8>(), any::<u8>(), prop::option::of(any::<u32>())),
        mode in (any::<bool>(), any::<bool>(), prop::option::of(any::<bool>())),
    ) {
        let c = Capacity { last_lba, block_len, physical_exponent: exp, lbpme, lbprz };
        prop_assert_eq!(Capacity::decode(&c.encode()).unwrap(), c);
        let l = BlockLimits {
            optimal_granularity: limits.0,
            max_transfer_len: limits.1,
            optimal_transfer_len: limits.2,
            max_unmap_lba_count: limits.3,
            max_unmap_descriptors: limits.4,
            optimal_unmap_granularity: limits.5,
            max_write_same_len: limits.6,
        };
        prop_assert_eq!(BlockLimits::decode(&l.encode()).unwrap(), l);
        let p = Provisioning { lbpu: prov.0, lbpws: prov.1, lbpws10: prov.2, lbprz: prov.3, provisioning_type: prov.4 };
        prop_assert_eq!(Provisioning::decode(&p.encode()).unwrap(), p);
        let (back, len) = decode_report_luns(&encode_report_luns(&luns)).unwrap();
        prop_assert_eq!(back, luns.clone());
        prop_assert_eq!(len as usize, luns.len() * 8);
        prop_assert_eq!(decode_unmap(&encode_unmap(&ranges)).unwrap(), ranges);
        let s = Sense { response_code: 0x70, key: sense.0, asc: sense.1, ascq: sense.2, information: sense.3.map(u64::from) };
        prop_assert_eq!(Sense::decode(&s.encode_fixed()).unwrap(), s);
        let d = Sense { response_code: 0x72, ..s };
        prop_assert_eq!(Sense::decode(&d.encode_descriptor()).unwrap(), d);
        let m = ModeSense { write_protect: mode.0, dpofua: mode.1, write_cache: mode.2 };
        prop_assert_eq!(ModeSense::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn scsi_decoders_survive_garbage(bytes in prop::collection::vec(any::<u8>(), 0..100)) {
        let _ = Cdb::decode(&bytes);
        let _ = Capacity::decode(&bytes);
        let _ = BlockLimits::decode(&bytes);
        let _ = Provisioning::decode(&bytes);
        let _ = Inquiry::decode(&bytes);
        let _ = decode_report_luns(&bytes);
        let _ = decode_unmap(&bytes);
        let _ = Sense::decode(&bytes);
        let _ = ModeSense::decode(&bytes);
        let _ = decode_supported_pages(&bytes);
        let _ = sense_of_response(&bytes);
    }

    #[test]
    fn luns_round_trip(lun in 0u16..16384) {
        prop_assert_eq!(decode_lun(encode_lun(lun)), Some(lun));
    }
}

fn cdb() -> impl Strategy<Value = Cdb> {
    prop_oneof![
        Just(Cdb::TestUnitReady),
        (any::<bool>(), any::<u8>(), any::<u16>()).prop_map(|(evpd, page, alloc_len)| {
            Cdb::Inquiry {
                evpd,
                page,
                alloc_len,
            }
        }),
        (any::<bool>(), 0u8..0x40, any::<u8>(), any::<u8>()).prop_map(
            |(dbd, page, subpage, alloc_len)| Cdb::ModeSense6 {
                dbd,
                page,
                subpage,
                alloc_len
            }
        ),
        (any::<u64>(), any::<u32>(), any::<bool>()).prop_map(|(lba, blocks, fua)| Cdb::Read16 {
            lba,
            blocks,
            fua
        }),
        (any::<u64>(), any::<u32>(), any::<bool>()).prop_map(|(lba, blocks, fua)| Cdb::Write16 {
            lba,
            blocks,
            fua
        }),
        (any::<u64>(), any::<u32>(), any::<bool>())
            .prop_map(|(lba, blocks, immed)| Cdb::SynchronizeCache16 { lba, blocks, immed }),
        (any::<bool>(), any::<u16>())
            .prop_map(|(anchor, param_len)| Cdb::Unmap { anchor, param_len }),
        (any::<u64>(), any::<u32>(), any::<bool>(), any::<bool>()).prop_map(
            |(lba, blocks, unmap, ndob)| Cdb::WriteSame16 {
                lba,
                blocks,
                unmap,
                ndob
            }
        ),
        any::<u32>().prop_map(|alloc_len| Cdb::ReadCapacity16 { alloc_len }),
        (any::<u8>(), any::<u32>()).prop_map(|(select_report, alloc_len)| Cdb::ReportLuns {
            select_report,
            alloc_len
        }),
    ]
}

#[test]
fn crc32c_matches_the_rfc_examples() {
    // RFC 7143 appendix B.4: 32 bytes of zeroes give the bytes aa 36 91 8a on the wire.
    assert_eq!(digest_bytes(crc32c(&[0u8; 32])), [0xaa, 0x36, 0x91, 0x8a]);
    // 32 bytes of ones.
    assert_eq!(
        digest_bytes(crc32c(&[0xffu8; 32])),
        [0x43, 0xab, 0xa8, 0x62]
    );
    // 32 incrementing bytes.
    let inc: Vec<u8> = (0..32).collect();
    assert_eq!(digest_bytes(crc32c(&inc)), [0x4e, 0x79, 0xdd, 0x46]);
}

#[test]
fn serial_numbers_wrap() {
    assert!(sn_lt(1, 2));
    assert!(sn_lt(u32::MAX, 0));
    assert!(!sn_lt(0, u32::MAX));
    assert!(sn_le(5, 5));
}

#[test]
fn sense_is_described() {
    let s = Sense::new(sense_key::ILLEGAL_REQUEST, 0x21, 0x00);
    assert_eq!(
        s.to_string(),
        "ILLEGAL REQUEST, logical block address out of range (ASC 0x21, ASCQ 0x00)"
    );
    let data = response_data(&s.encode_fixed());
    assert_eq!(Sense::decode(sense_of_response(&data).unwrap()).unwrap(), s);
}

#[test]
fn data_segment_limit_is_enforced() {
    let frame = Frame::new(
        Header::NopIn(NopIn {
            lun: 0,
            itt: 1,
            ttt: RESERVED_TAG,
            stat_sn: 0,
            exp_cmd_sn: 0,
            max_cmd_sn: 0,
        }),
        Bytes::from(vec![0u8; 100]),
    );
    let wire = encode(&frame, Digests::default());
    assert!(matches!(
        decode(&wire, Digests::default(), 64),
        Err(CodecError::TooLong { len: 100, max: 64 })
    ));
}
