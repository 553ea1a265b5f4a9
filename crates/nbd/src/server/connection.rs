//! One connection's life: the handshake (greeting, options, STARTTLS) under one time limit,
//! then transmission, and — for a client with an identity — taking over from its previous
//! connection to the same export.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::negotiate::{Negotiated, Session};
use super::slots::Slot;
use super::{invalid, Export, Resolved, Server};
use crate::codec;
use crate::transmission::{self, Budget, Control, Heavy};

/// A connection known by its export and client identity.
#[derive(Debug)]
pub(super) struct ClientConn {
    id: u64,
    /// Asks it to answer what it has in flight and close.
    stop: CancellationToken,
    /// Tells it to drop its unsent replies (its client is not reading them).
    abandon: CancellationToken,
    done: watch::Receiver<bool>,
}

/// How a handshake ended.
enum Handshake<S> {
    Closed,
    Plain(S, Session, Resolved),
    Tls(Box<TlsStream<S>>, Session, Resolved),
}

impl Server {
    /// Run a connection on its own task, holding `slot` (and the caller's `permit`) until it
    /// ends.
    pub(super) fn start<S>(
        self: &Arc<Self>,
        stream: S,
        peer: String,
        slot: Slot,
        permit: Option<OwnedSemaphorePermit>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let server = self.clone();
        // Every line a connection logs carries its id, its peer and, once chosen, its export.
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let span = tracing::info_span!(
            "nbd",
            conn = id,
            peer = %peer,
            volume = tracing::field::Empty
        );
        self.tasks.spawn(
            async move {
                debug!("connected");
                match server.serve_connection(stream, &slot).await {
                    Ok(()) => debug!("disconnected"),
                    Err(e) => info!(error = %e, "connection ended"),
                }
                drop(slot);
                drop(permit);
            }
            .instrument(span),
        );
    }

    async fn serve_connection<S>(&self, stream: S, slot: &Slot) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let stop = slot.stop().clone();
        let limit = self.config.handshake_timeout;
        let handshake = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            h = tokio::time::timeout(limit, self.handshake(stream, slot)) => h,
        };
        let handshake = handshake.map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("negotiation took longer than {limit:?}"),
            )
        })??;
        match handshake {
            Handshake::Closed => Ok(()),
            Handshake::Plain(stream, s, found) => self.transmission(stream, s, found, slot).await,
            Handshake::Tls(stream, s, found) => self.transmission(stream, s, found, slot).await,
        }
    }

    /// Greeting, options, and STARTTLS with the options after it.
    async fn handshake<S>(&self, mut stream: S, slot: &Slot) -> std::io::Result<Handshake<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut buf = BytesMut::new();
        codec::encode_greeting(
            &mut buf,
            codec::handshake_flags::FIXED_NEWSTYLE | codec::handshake_flags::NO_ZEROES,
        );
        stream.write_all(&buf).await?;
        let client_flags = stream.read_u32().await?;
        let known = codec::client_flags::FIXED_NEWSTYLE | codec::client_flags::NO_ZEROES;
        if client_flags & !known != 0 {
            return Err(invalid(format!(
                "client sent unknown client flags {client_flags:#x}"
            )));
        }
        let session = Session {
            fixed: client_flags & codec::client_flags::FIXED_NEWSTYLE != 0,
            no_zeroes: client_flags & codec::client_flags::NO_ZEROES != 0,
            ..Session::default()
        };
        let session = match self.negotiate(&mut stream, session, slot).await? {
            Negotiated::Close => return Ok(Handshake::Closed),
            Negotiated::Transmission(s, found) => return Ok(Handshake::Plain(stream, s, found)),
            Negotiated::StartTls(session) => session,
        };
        let tls = self
            .config
            .tls
            .clone()
            .expect("STARTTLS is acknowledged only when TLS is configured");
        let mut stream = tls.acceptor.accept(stream).await?;
        let session = Session {
            tls: true,
            ..session
        };
        match self.negotiate(&mut stream, session, slot).await? {
            Negotiated::Close => Ok(Handshake::Closed),
            Negotiated::Transmission(s, found) => Ok(Handshake::Tls(Box::new(stream), s, found)),
            Negotiated::StartTls(_) => {
                unreachable!("a second STARTTLS is refused during negotiation")
            }
        }
    }

    /// The transmission phase, on this task: see [`transmission`](crate::transmission).
    async fn transmission<S>(
        &self,
        stream: S,
        s: Session,
        found: Resolved,
        slot: &Slot,
    ) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let export = found.export;
        tracing::Span::current().record("volume", export.name.as_str());
        debug!(export = %export.name, structured = s.structured, tls = s.tls, "transmission");
        let control = Control {
            stop: slot.stop().clone(),
            abandon: CancellationToken::new(),
            activity: slot.activity(),
            counters: self.counters.clone(),
        };
        let Some(client) = found.client_id else {
            return self.serve_requests(stream, s, export, control).await;
        };
        // The same client on the same export again: the previous connection answers what it has
        // in flight and closes before this one starts.
        let key = (export.name.clone(), client);
        let id = self
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (done_tx, done_rx) = watch::channel(false);
        let me = ClientConn {
            id,
            stop: control.stop.clone(),
            abandon: control.abandon.clone(),
            done: done_rx,
        };
        let previous = self.clients().insert(key.clone(), me);
        if let Some(prev) = previous {
            info!(client = %key.1, "the same client connected again: closing its previous connection");
            if let Err((e, prev)) = self.take_over(prev).await {
                // Still in charge: the previous connection, not this one.
                let mut clients = self.clients();
                if clients.get(&key).is_some_and(|c| c.id == id) {
                    clients.insert(key, prev);
                }
                return Err(e);
            }
        }
        let result = self.serve_requests(stream, s, export, control).await;
        {
            let mut clients = self.clients();
            if clients.get(&key).is_some_and(|c| c.id == id) {
                clients.remove(&key);
            }
        }
        let _ = done_tx.send(true);
        result
    }

    fn clients(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<(String, String), ClientConn>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stop `prev` and wait until it is done: it answers what it has in flight within the
    /// takeover time, else its unsent replies are dropped and the device calls behind them
    /// finish within as long again; else this connection gives up.
    async fn take_over(&self, mut prev: ClientConn) -> Result<(), (std::io::Error, ClientConn)> {
        let limit = self.config.takeover_timeout;
        prev.stop.cancel();
        if finished(&mut prev.done, limit).await {
            return Ok(());
        }
        warn!(
            limit = ?limit,
            "the previous connection of this client did not answer what it had in flight: \
             dropping its replies"
        );
        prev.abandon.cancel();
        if finished(&mut prev.done, limit).await {
            return Ok(());
        }
        let e = std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the previous connection of this client still has device calls in flight after \
                 {:?}; refusing this one until it finishes",
                limit * 2
            ),
        );
        Err((e, prev))
    }

    async fn serve_requests<S>(
        &self,
        stream: S,
        s: Session,
        export: Arc<Export>,
        control: Control,
    ) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let ctx = Arc::new(transmission::Ctx {
            block_size: u64::from(export.device.geometry().block_size.max(1)),
            export,
            structured: s.structured,
            block_status: s.meta_export.is_some(),
            max_payload: self.config.max_payload,
            heavy: Heavy::new(self.heavy.clone()),
        });
        let budget = Budget {
            bytes: self.config.max_in_flight_bytes,
            requests: self.config.max_in_flight_requests,
        };
        transmission::serve(stream, ctx, budget, control).await
    }
}

/// Whether the connection behind `done` finished within `limit`.
async fn finished(done: &mut watch::Receiver<bool>, limit: Duration) -> bool {
    // A closed channel: the connection's task is gone, which is finished too.
    tokio::time::timeout(limit, done.wait_for(|d| *d))
        .await
        .is_ok()
}
