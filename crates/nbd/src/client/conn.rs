//! What callers, the reader task and the writer task share: the in-flight map (one short lock,
//! never held across an await), the requests on their way to the writer, and what each
//! request's reply has delivered so far.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use strata_bdev::Extent;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::codec::{self, cmd, Request};

/// The state callers, the reader and the writer share.
pub(super) struct Conn {
    /// The device's URI-like name, for messages.
    pub(super) name: Arc<str>,
    pub(super) state: Mutex<State>,
    /// Cancelled when the connection is finished: both tasks stop.
    pub(super) dead: CancellationToken,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) next_cookie: u64,
    pub(super) inflight: HashMap<u64, InFlight>,
    /// Why the connection is finished, once it is.
    pub(super) lost: Option<Arc<str>>,
    /// The server answered ESHUTDOWN: no new requests, and a soft disconnect once idle.
    pub(super) server_shutdown: bool,
}

impl Conn {
    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves a consistent map (every critical section is a
        // single insert, remove or drain); keep going rather than poison every caller.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn register(
        &self,
        expect: Expect,
    ) -> Result<(u64, oneshot::Receiver<Outcome>), Failed> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.state();
        if st.server_shutdown {
            return Err(Failed::Shutdown);
        }
        if let Some(why) = &st.lost {
            return Err(Failed::Lost(why.clone()));
        }
        let cookie = st.next_cookie;
        st.next_cookie = st.next_cookie.wrapping_add(1);
        st.inflight.insert(cookie, InFlight::new(expect, tx));
        Ok((cookie, rx))
    }

    pub(super) fn take(&self, cookie: u64) -> Option<InFlight> {
        self.state().inflight.remove(&cookie)
    }

    /// The failure of a request whose connection is gone.
    pub(super) fn lost(&self) -> Failed {
        let st = self.state();
        if st.server_shutdown {
            return Failed::Shutdown;
        }
        Failed::Lost(
            st.lost
                .clone()
                .unwrap_or_else(|| "the connection was closed".into()),
        )
    }

    /// Finish the connection: fail every request in flight with `why` and stop both tasks.
    pub(super) fn fail(&self, why: &str) -> Arc<str> {
        let (why, drained) = {
            let mut st = self.state();
            let why = st.lost.get_or_insert_with(|| why.into()).clone();
            (why, std::mem::take(&mut st.inflight))
        };
        for (_, f) in drained {
            let _ = f.tx.send(Err(Failed::Lost(why.clone())));
        }
        self.dead.cancel();
        why
    }
}

/// Takes back the entry of a request the writer never got.
pub(super) struct Unsent<'a> {
    pub(super) conn: &'a Conn,
    pub(super) cookie: Option<u64>,
}

impl Unsent<'_> {
    pub(super) fn sent(mut self) {
        self.cookie = None;
    }
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        if let Some(cookie) = self.cookie {
            self.conn.take(cookie);
        }
    }
}

/// A request on its way to the writer.
pub(super) struct Outgoing {
    pub(super) header: [u8; codec::REQUEST_LEN],
    pub(super) payload: Bytes,
    /// `NBD_CMD_DISC`: the last thing written.
    pub(super) disconnect: bool,
}

impl Outgoing {
    pub(super) fn disconnect() -> Outgoing {
        Outgoing {
            header: codec::request_header(&Request {
                flags: 0,
                command: cmd::DISC,
                cookie: u64::MAX,
                offset: 0,
                length: 0,
            }),
            payload: Bytes::new(),
            disconnect: true,
        }
    }
}

/// What the reply to a request must carry.
#[derive(Debug, Clone, Copy)]
pub(super) enum Expect {
    Read { offset: u64, len: u32 },
    Status { len: u32, context: u32 },
    Done,
}

/// A successful reply.
#[derive(Debug)]
pub(super) enum Done {
    Ok,
    Data(Bytes),
    Extents(Vec<Extent>),
}

/// A failed request.
#[derive(Debug)]
pub(super) enum Failed {
    /// The server answered with an error.
    Server { errno: u32, message: Option<String> },
    /// The reply did not answer the request (e.g. a read with bytes missing); the connection
    /// stays up.
    BadReply(String),
    /// The connection is gone.
    Lost(Arc<str>),
    /// The server said it is shutting down.
    Shutdown,
}

pub(super) type Outcome = Result<Done, Failed>;

/// A request in flight, and what its reply has delivered so far.
pub(super) struct InFlight {
    pub(super) tx: oneshot::Sender<Outcome>,
    pub(super) expect: Expect,
    pub(super) data: ReadData,
    pub(super) extents: Option<Vec<Extent>>,
    pub(super) error: Option<Failed>,
}

/// The data of a read reply so far.
pub(super) enum ReadData {
    None,
    /// One chunk (or a simple reply) with all of it.
    Whole(Bytes),
    /// Several chunks: a zeroed buffer, and the ranges filled (start → end, request-relative).
    Parts {
        buf: BytesMut,
        filled: BTreeMap<u64, u64>,
        covered: u64,
    },
}

impl InFlight {
    pub(super) fn new(expect: Expect, tx: oneshot::Sender<Outcome>) -> InFlight {
        InFlight {
            tx,
            expect,
            data: ReadData::None,
            extents: None,
            error: None,
        }
    }

    /// Whether payload for this request can be skipped: nobody waits, or it already failed.
    pub(super) fn discarding(&self) -> bool {
        self.tx.is_closed() || self.error.is_some()
    }

    pub(super) fn record_error(&mut self, e: Failed) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    /// Claim `[rel, rel + n)` of a read for a chunk (which must not overlap an earlier one) and
    /// return the buffer to fill it in.
    pub(super) fn claim(&mut self, len: u32, rel: u64, n: u64) -> Result<&mut BytesMut, String> {
        let end = rel + n;
        if let ReadData::None = self.data {
            self.data = ReadData::Parts {
                buf: BytesMut::zeroed(len as usize),
                filled: BTreeMap::new(),
                covered: 0,
            };
        }
        match &mut self.data {
            ReadData::Parts {
                buf,
                filled,
                covered,
            } => {
                let before = filled
                    .range(..=rel)
                    .next_back()
                    .is_some_and(|(_, &e)| e > rel);
                let after = filled.range(rel..).next().is_some_and(|(&s, _)| s < end);
                if before || after {
                    return Err(format!("read reply chunks overlap at request offset {rel}"));
                }
                filled.insert(rel, end);
                *covered += n;
                Ok(buf)
            }
            _ => Err(format!("read reply chunks overlap at request offset {rel}")),
        }
    }

    /// The outcome once the last chunk is in.
    pub(super) fn finish(self) -> (oneshot::Sender<Outcome>, Outcome) {
        let outcome = match (self.error, self.expect) {
            (Some(e), _) => Err(e),
            (None, Expect::Read { len, .. }) => match self.data {
                ReadData::Whole(b) => Ok(Done::Data(b)),
                ReadData::Parts { buf, covered, .. } if covered == u64::from(len) => {
                    Ok(Done::Data(buf.freeze()))
                }
                ReadData::Parts { covered, .. } => Err(Failed::BadReply(format!(
                    "the server's reply held {covered} of the {len} bytes asked for"
                ))),
                ReadData::None => Err(Failed::BadReply(format!(
                    "the server's reply held none of the {len} bytes asked for"
                ))),
            },
            (None, Expect::Status { .. }) => match self.extents {
                Some(e) if !e.is_empty() => Ok(Done::Extents(e)),
                _ => Err(Failed::BadReply(
                    "the server's reply held no base:allocation extents".into(),
                )),
            },
            (None, Expect::Done) => Ok(Done::Ok),
        };
        (self.tx, outcome)
    }
}
