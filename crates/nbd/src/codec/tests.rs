use bytes::BytesMut;
use proptest::prelude::*;

use super::*;

#[test]
fn greeting_round_trip() {
    let mut b = BytesMut::new();
    encode_greeting(
        &mut b,
        handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES,
    );
    assert_eq!(b.len(), 18);
    assert_eq!(decode_greeting(&b), Ok(3));
    b[0] ^= 1;
    assert!(matches!(
        decode_greeting(&b),
        Err(ProtocolError::BadMagic { .. })
    ));
}

#[test]
fn option_data_is_validated() {
    assert!(parse_option(opt::LIST, b"x").is_err());
    assert!(parse_option(opt::STRUCTURED_REPLY, b"").is_ok());
    assert_eq!(
        parse_option(opt::ABORT, b"ignored"),
        Ok(ClientOption::Abort)
    );
    assert_eq!(parse_option(99, b""), Ok(ClientOption::Unknown(99)));
    // A name length that runs past the data.
    assert!(parse_option(opt::GO, &[0, 0, 0, 9, b'a', 0, 0]).is_err());
    // Truncated info requests.
    assert!(parse_option(opt::GO, &[0, 0, 0, 1, b'a', 0, 2, 0, 3]).is_err());
    assert!(parse_option(opt::SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9]).is_err());
    assert!(parse_option(opt::EXPORT_NAME, &[0xff, 0xfe]).is_err());
    assert!(parse_option(opt::EXPORT_NAME, &[b'a'; MAX_STRING + 1]).is_err());
}

#[test]
fn reply_payload_helpers() {
    let mut b = BytesMut::new();
    encode_simple_reply(&mut b, 0, 1);
    assert_eq!(reply_header_len(&b), Ok(Some(SIMPLE_REPLY_LEN)));
    b.clear();
    encode_chunk_header(&mut b, 0, reply::TYPE_NONE, 1, 0);
    assert_eq!(reply_header_len(&b[..4]), Ok(Some(STRUCTURED_REPLY_LEN)));
    assert_eq!(reply_header_len(&b[..3]), Ok(None));
    assert!(reply_header_len(&[1, 2, 3, 4]).is_err());

    let d = encode_rep_meta_context(7, BASE_ALLOCATION);
    assert_eq!(
        parse_rep_meta_context(&d),
        Ok((7, BASE_ALLOCATION.to_string()))
    );
    assert!(parse_rep_meta_context(&[0, 0]).is_err());

    let mut hole = 4096u64.to_be_bytes().to_vec();
    hole.extend_from_slice(&512u32.to_be_bytes());
    assert_eq!(parse_offset_hole(&hole), Ok((4096, 512)));
    assert!(parse_offset_hole(&hole[..11]).is_err());

    let mut b = BytesMut::new();
    encode_error_chunk(&mut b, 9, errno::ENOSPC, "full");
    let payload = &b[STRUCTURED_REPLY_LEN..];
    assert_eq!(
        parse_error_chunk(payload),
        Ok((errno::ENOSPC, "full".to_string()))
    );
    let mut with_offset = payload.to_vec();
    assert!(parse_error_offset_chunk(&with_offset).is_err());
    with_offset.extend_from_slice(&65536u64.to_be_bytes());
    assert_eq!(
        parse_error_offset_chunk(&with_offset),
        Ok((errno::ENOSPC, "full".to_string(), 65536))
    );

    let mut status = 1u32.to_be_bytes().to_vec();
    for (len, flags) in [
        (4096u32, 0u32),
        (8192, alloc_flags::HOLE | alloc_flags::ZERO),
    ] {
        status.extend_from_slice(&len.to_be_bytes());
        status.extend_from_slice(&flags.to_be_bytes());
    }
    let (id, d) = parse_block_status_chunk(&status).unwrap();
    assert_eq!(id, 1);
    assert_eq!(
        d,
        vec![
            BlockDescriptor {
                length: 4096,
                flags: 0
            },
            BlockDescriptor {
                length: 8192,
                flags: 3
            }
        ]
    );
    assert!(parse_block_status_chunk(&status[..4]).is_err());
    assert!(parse_block_status_chunk(&status[..13]).is_err());
}

proptest! {
    #[test]
    fn info_request_round_trips(name in "[a-z0-9/._-]{0,64}", requests in proptest::collection::vec(any::<u16>(), 0..8)) {
        let req = InfoRequest { name, requests };
        prop_assert_eq!(parse_option(opt::GO, &encode_info_request(&req)), Ok(ClientOption::Go(req)));
    }

    #[test]
    fn meta_request_round_trips(export in "[a-z]{0,16}", queries in proptest::collection::vec("[a-z:]{0,20}", 0..4)) {
        let req = MetaRequest { export, queries };
        prop_assert_eq!(parse_option(opt::SET_META_CONTEXT, &encode_meta_request(&req)), Ok(ClientOption::SetMetaContext(req)));
    }

    #[test]
    fn request_round_trips(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
        let r = Request { flags, command, cookie, offset, length };
        let mut b = BytesMut::new();
        encode_request(&mut b, &r);
        prop_assert_eq!(decode_request(&b), Ok(r));
    }

    #[test]
    fn request_header_matches_encode_request(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
        let r = Request { flags, command, cookie, offset, length };
        let mut b = BytesMut::new();
        encode_request(&mut b, &r);
        prop_assert_eq!(&request_header(&r)[..], &b[..]);
    }

    #[test]
    fn parsers_never_panic(option: u32, data in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = parse_option(option % 12, &data);
        let _ = parse_info(&data);
        let _ = decode_request(&data);
        let _ = decode_reply_header(&data);
        let _ = parse_error_chunk(&data);
        let _ = decode_option_header(&data);
        let _ = decode_option_reply_header(&data);
        let _ = reply_header_len(&data);
        let _ = parse_rep_meta_context(&data);
        let _ = parse_offset_hole(&data);
        let _ = parse_error_offset_chunk(&data);
        let _ = parse_block_status_chunk(&data);
    }

    #[test]
    fn reply_headers_round_trip(error: u32, cookie: u64, flags: u16, ty: u16, len: u32) {
        let mut b = BytesMut::new();
        encode_simple_reply(&mut b, error, cookie);
        prop_assert_eq!(decode_reply_header(&b), Ok(Some((ReplyHeader::Simple { error, cookie }, 16))));
        let mut b = BytesMut::new();
        encode_chunk_header(&mut b, flags, ty, cookie, len);
        prop_assert_eq!(decode_reply_header(&b), Ok(Some((ReplyHeader::Chunk { flags, chunk_type: ty, cookie, length: len }, 20))));
    }

    /// Valid messages of every kind, changed at a few places and cut short, through every
    /// decoder: errors, never panics (random bytes rarely get past the first length field).
    #[test]
    fn mutated_messages_never_panic_the_decoders(
        name in "[a-z:]{0,12}",
        n: u32,
        changes in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut: usize,
    ) {
        let mut messages: Vec<Vec<u8>> = vec![
            encode_info_request(&InfoRequest { name: name.clone(), requests: vec![1, 2, 3] }),
            encode_meta_request(&MetaRequest { export: name.clone(), queries: vec![name.clone()] }),
            encode_rep_server(&name, &name),
            encode_info_export(u64::from(n), n as u16),
            encode_info_string(info::NAME, &name),
            encode_info_block_size(BlockSizes { minimum: n, preferred: n, maximum: n }),
            encode_rep_meta_context(n, &name),
            request_header(&Request { flags: 0, command: n as u16, cookie: 1, offset: 0, length: n })
                .to_vec(),
        ];
        let mut b = BytesMut::new();
        encode_error_chunk(&mut b, 1, n, &name);
        messages.push(b.to_vec());
        messages.push(b[STRUCTURED_REPLY_LEN..].to_vec());
        let mut status = n.to_be_bytes().to_vec();
        status.extend_from_slice(&[0, 0, 16, 0, 0, 0, 0, 3]);
        messages.push(status);
        for mut m in messages {
            if !m.is_empty() {
                for &(at, v) in &changes {
                    let i = at % m.len();
                    m[i] = v;
                }
                m.truncate(cut % (m.len() + 1));
            }
            for option in [opt::EXPORT_NAME, opt::GO, opt::INFO, opt::LIST_META_CONTEXT, opt::SET_META_CONTEXT] {
                let _ = parse_option(option, &m);
            }
            let _ = parse_info(&m);
            let _ = decode_request(&m);
            let _ = decode_reply_header(&m);
            let _ = reply_header_len(&m);
            let _ = parse_error_chunk(&m);
            let _ = parse_error_offset_chunk(&m);
            let _ = parse_rep_meta_context(&m);
            let _ = parse_offset_hole(&m);
            let _ = parse_block_status_chunk(&m);
        }
    }
}
