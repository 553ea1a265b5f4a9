//! Fuzz targets, run as property tests in bounded time: a server fed arbitrary and mutated byte
//! streams, over an in-memory stream, in negotiation (options) and in transmission (requests).
//! Whatever it is sent, the server never panics, answers with well-formed messages, and closes
//! the connection once the client has nothing more to say.
//!
//! Cases per target: 512 (`PROPTEST_CASES` overrides it, e.g. for a longer run by hand).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use bytes::BytesMut;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use strata_nbd::codec::{self, cmd, opt, reply, ReplyHeader};
use strata_nbd::{Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::Semaphore;

mod common;
use common::{export, mem, Raw};

/// Panics anywhere in the process (the server's tasks included), counted.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// The most a case may take: a server that neither answers nor closes fails it.
const CASE_LIMIT: Duration = Duration::from_secs(20);

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

fn server() -> Arc<Server> {
    let config = ServerConfig {
        handshake_timeout: Duration::from_secs(5),
        ..ServerConfig::default()
    };
    Server::new(config, vec![export("d", mem(1 << 20), false)])
}

/// A connection to `server` over an in-memory stream.
async fn connect(server: &Arc<Server>) -> DuplexStream {
    let (client, conn) = tokio::io::duplex(64 << 10);
    let permit = Arc::new(Semaphore::new(1))
        .acquire_owned()
        .await
        .expect("a permit");
    server.spawn_connection(conn, "fuzz".to_string(), permit);
    client
}

/// Send `input`, then end the stream; returns all the server sent until it closed, or `None`
/// if it did neither within [`CASE_LIMIT`].
async fn exchange(s: DuplexStream, input: Vec<u8>) -> Option<Vec<u8>> {
    let (mut rd, mut wr) = tokio::io::split(s);
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        // A reset or an error ends the stream as well as an orderly close.
        let _ = rd.read_to_end(&mut out).await;
        out
    });
    let writer = async move {
        // The server may close before taking everything: that is an answer too.
        let _ = wr.write_all(&input).await;
        let _ = wr.shutdown().await;
    };
    tokio::time::timeout(CASE_LIMIT, async {
        writer.await;
        reader.await.expect("the reader task")
    })
    .await
    .ok()
}

/// What a client may send in the option phase: options as the codec encodes them, with names
/// and queries the server knows or not, headers that claim more data than follows, and noise.
#[derive(Debug, Clone)]
enum Piece {
    Option(u32, Vec<u8>),
    /// An option header claiming `len` bytes of data, with none following.
    Header(u32, u32),
    Noise(Vec<u8>),
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![Just("d".to_string()), Just(String::new()), "[a-z~/@]{0,12}"]
}

fn option_piece() -> impl Strategy<Value = Piece> {
    let code = prop_oneof![4 => 0u32..12, 1 => any::<u32>()];
    let info = (name(), proptest::collection::vec(0u16..6, 0..4)).prop_map(|(name, requests)| {
        codec::encode_info_request(&codec::InfoRequest { name, requests })
    });
    let meta =
        (name(), proptest::collection::vec("[a-z:]{0,20}", 0..3)).prop_map(|(export, queries)| {
            codec::encode_meta_request(&codec::MetaRequest { export, queries })
        });
    prop_oneof![
        3 => (prop_oneof![Just(opt::GO), Just(opt::INFO)], info)
            .prop_map(|(o, d)| Piece::Option(o, d)),
        2 => (prop_oneof![Just(opt::SET_META_CONTEXT), Just(opt::LIST_META_CONTEXT)], meta)
            .prop_map(|(o, d)| Piece::Option(o, d)),
        1 => name().prop_map(|n| Piece::Option(opt::EXPORT_NAME, n.into_bytes())),
        3 => (code.clone(), proptest::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(o, d)| Piece::Option(o, d)),
        1 => (code, any::<u32>()).prop_map(|(o, l)| Piece::Header(o, l)),
        1 => proptest::collection::vec(any::<u8>(), 1..40).prop_map(Piece::Noise),
    ]
}

/// Bytes changed at random places of the stream (positions taken modulo its length).
fn mutations() -> impl Strategy<Value = Vec<(usize, u8)>> {
    prop_oneof![
        3 => Just(Vec::new()),
        1 => proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    ]
}

fn client_flags() -> impl Strategy<Value = u32> {
    let fixed = codec::client_flags::FIXED_NEWSTYLE;
    let no_zeroes = codec::client_flags::NO_ZEROES;
    prop_oneof![
        6 => Just(fixed | no_zeroes),
        1 => Just(fixed),
        1 => Just(0),
        1 => any::<u32>(),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[(usize, u8)]) -> Vec<u8> {
    if !bytes.is_empty() {
        for &(at, b) in mutations {
            let i = at % bytes.len();
            bytes[i] = b;
        }
    }
    bytes
}

/// The server's side of the option phase starts with its greeting.
fn check_greeting(out: &[u8]) -> Result<(), TestCaseError> {
    prop_assert!(out.len() >= 18, "no greeting: {} bytes", out.len());
    prop_assert!(codec::decode_greeting(&out[..18]).is_ok(), "a bad greeting");
    Ok(())
}

fn run_target<S, F>(strategy: S, case: F)
where
    S: Strategy,
    F: Fn(&tokio::runtime::Runtime, S::Value) -> Result<(), TestCaseError>,
{
    count_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        ..Config::default()
    });
    let result = runner.run(&strategy, |input| {
        let before = PANICS.load(Ordering::SeqCst);
        case(&rt, input)?;
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), before, "a panic (see above)");
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn negotiation_survives_any_options() {
    let strategy = (
        client_flags(),
        proptest::collection::vec(option_piece(), 0..12),
        mutations(),
    );
    let server = server();
    run_target(strategy, |rt, (flags, pieces, mutations)| {
        let mut input = flags.to_be_bytes().to_vec();
        let mut b = BytesMut::new();
        for p in &pieces {
            match p {
                Piece::Option(o, d) => codec::encode_option(&mut b, *o, d),
                Piece::Header(o, len) => {
                    b.extend_from_slice(&codec::IHAVEOPT.to_be_bytes());
                    b.extend_from_slice(&o.to_be_bytes());
                    b.extend_from_slice(&len.to_be_bytes());
                }
                Piece::Noise(n) => b.extend_from_slice(n),
            }
        }
        input.extend_from_slice(&b);
        let input = mutate(input, &mutations);
        let out = rt.block_on(async {
            let s = connect(&server).await;
            exchange(s, input).await
        });
        let out = out.ok_or_else(|| TestCaseError::fail("the server neither closed nor ended"))?;
        check_greeting(&out)
    });
}

/// What a client may send in transmission: requests with any command, flags, offset and length
/// (biased to what the export holds), write payloads of the declared length or not, and noise.
#[derive(Debug, Clone)]
enum Sent {
    Request {
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        /// Payload bytes sent after a WRITE: its length, or less, or more.
        payload: Option<u32>,
    },
    Noise(Vec<u8>),
}

fn sent() -> impl Strategy<Value = Sent> {
    let command = prop_oneof![8 => 0u16..8, 2 => 64u16..68, 1 => any::<u16>()];
    let flags = prop_oneof![3 => Just(0u16), 2 => 0u16..32, 1 => any::<u16>()];
    let offset = prop_oneof![
        4 => (0u64..256).prop_map(|b| b * 4096),
        1 => 0u64..(1 << 20),
        1 => any::<u64>(),
    ];
    let length = prop_oneof![
        4 => (1u32..16).prop_map(|b| b * 4096),
        1 => 0u32..(1 << 20),
        1 => Just(0u32),
        1 => any::<u32>(),
    ];
    let payload = prop_oneof![4 => Just(None), 1 => (0u32..70_000).prop_map(Some)];
    prop_oneof![
        12 => (command, flags, offset, length, payload).prop_map(
            |(command, flags, offset, length, payload)| Sent::Request {
                command,
                flags,
                offset,
                length,
                payload,
            }
        ),
        1 => proptest::collection::vec(any::<u8>(), 1..64).prop_map(Sent::Noise),
    ]
}

/// Every reply in `out` is well-formed; when the requests were sent as they were made (no noise,
/// no mutation: `sent` is exact), each answers a request that was sent, at most once.
fn check_replies(
    out: &[u8],
    sent: &HashMap<u64, (u16, u32)>,
    exact: bool,
) -> Result<(), TestCaseError> {
    let mut done: HashMap<u64, usize> = HashMap::new();
    let mut at = 0;
    while at < out.len() {
        let Some((h, n)) = codec::decode_reply_header(&out[at..])
            .map_err(|e| TestCaseError::fail(format!("reply header at byte {at}: {e}")))?
        else {
            // A server that closes on broken framing may leave its last reply unfinished.
            return Ok(());
        };
        at += n;
        let cookie = h.cookie();
        let Some(&(command, length)) = sent.get(&cookie).filter(|_| exact) else {
            prop_assert!(!exact, "a reply to cookie {}, never sent", cookie);
            if let ReplyHeader::Chunk { length, .. } = h {
                at += length as usize;
            }
            continue;
        };
        match h {
            ReplyHeader::Simple { error, .. } => {
                prop_assert!(
                    error != 0 || command != cmd::READ,
                    "a successful read answered with a simple reply under structured replies"
                );
                *done.entry(cookie).or_default() += 1;
            }
            ReplyHeader::Chunk {
                flags,
                chunk_type,
                length: payload,
                ..
            } => {
                let end = at + payload as usize;
                if end > out.len() {
                    // Unfinished, as above.
                    return Ok(());
                }
                let body = &out[at..end];
                at = end;
                match chunk_type {
                    reply::TYPE_OFFSET_DATA => {
                        prop_assert_eq!(command, cmd::READ);
                        prop_assert!(payload as u64 <= 8 + u64::from(length));
                    }
                    reply::TYPE_BLOCK_STATUS => prop_assert_eq!(command, cmd::BLOCK_STATUS),
                    reply::TYPE_ERROR => {
                        prop_assert!(codec::parse_error_chunk(body).is_ok(), "an error chunk");
                    }
                    reply::TYPE_NONE | reply::TYPE_OFFSET_HOLE => {}
                    t => return Err(TestCaseError::fail(format!("chunk type {t}"))),
                }
                if flags & reply::FLAG_DONE != 0 {
                    *done.entry(cookie).or_default() += 1;
                }
            }
        }
    }
    for (cookie, n) in done {
        prop_assert!(n <= 1, "cookie {} answered {} times", cookie, n);
    }
    Ok(())
}

#[test]
fn transmission_survives_any_requests() {
    let strategy = (proptest::collection::vec(sent(), 0..40), mutations());
    let server = server();
    run_target(strategy, |rt, (requests, mutations)| {
        let mut input = Vec::new();
        let mut lengths = HashMap::new();
        let exact =
            mutations.is_empty() && requests.iter().all(|r| matches!(r, Sent::Request { .. }));
        for (i, r) in requests.iter().enumerate() {
            match r {
                Sent::Request {
                    command,
                    flags,
                    offset,
                    length,
                    payload,
                } => {
                    let cookie = i as u64;
                    lengths.insert(cookie, (*command, *length));
                    let mut b = BytesMut::new();
                    let req = codec::Request {
                        flags: *flags,
                        command: *command,
                        cookie,
                        offset: *offset,
                        length: *length,
                    };
                    codec::encode_request(&mut b, &req);
                    input.extend_from_slice(&b);
                    if *command == cmd::WRITE {
                        let n = payload.unwrap_or(*length).min(1 << 20);
                        input.extend(std::iter::repeat_n(0xa5u8, n as usize));
                    }
                }
                Sent::Noise(n) => input.extend_from_slice(n),
            }
        }
        let input = mutate(input, &mutations);
        let out = rt.block_on(async {
            let mut raw = Raw {
                s: connect(&server).await,
            };
            raw.greeting().await;
            raw.go("d", true).await;
            exchange(raw.s, input).await
        });
        let out = out.ok_or_else(|| TestCaseError::fail("the server neither closed nor ended"))?;
        check_replies(&out, &lengths, exact)
    });
}
