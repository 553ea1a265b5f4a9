//! The writer task: requests as they come, batched into vectored writes; on a disconnect
//! request or a closed queue (the device was dropped), `NBD_CMD_DISC` and a shut-down stream.

use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::conn::{Conn, Outgoing};

/// Requests gathered into one vectored write at most.
const WRITE_BATCH: usize = 64;
/// How long a dropped device keeps trying to write its queued requests and `NBD_CMD_DISC`.
const DISCONNECT_GRACE: Duration = Duration::from_secs(5);

pub(super) async fn writer_task<W>(
    conn: Arc<Conn>,
    mut w: W,
    mut rx: mpsc::Receiver<Outgoing>,
    closing: CancellationToken,
) where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let grace = async {
        closing.cancelled().await;
        tokio::time::sleep(DISCONNECT_GRACE).await;
    };
    let result = tokio::select! {
        r = write_requests(&mut w, &mut rx) => r,
        _ = conn.dead.cancelled() => return,
        _ = grace => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the device was closed while the server was not reading",
        )),
    };
    match result {
        Ok(()) => {
            conn.fail("the client disconnected");
        }
        Err(e) => {
            let why = conn.fail(&format!("write to the server: {e}"));
            warn!(device = %conn.name, reason = %why, "NBD connection lost");
        }
    }
}

/// Write requests as they come, batched; on a disconnect request or a closed queue (the device
/// was dropped), send `NBD_CMD_DISC` and shut the stream down.
async fn write_requests<W: AsyncWrite + Unpin>(
    w: &mut W,
    rx: &mut mpsc::Receiver<Outgoing>,
) -> std::io::Result<()> {
    let mut batch: Vec<Outgoing> = Vec::with_capacity(WRITE_BATCH);
    let vectored = w.is_write_vectored();
    let mut coalesced = BytesMut::new();
    loop {
        if rx.recv_many(&mut batch, WRITE_BATCH).await == 0 {
            batch.push(Outgoing::disconnect());
        }
        let last = batch.iter().position(|m| m.disconnect);
        if let Some(i) = last {
            // Nothing may follow NBD_CMD_DISC.
            batch.truncate(i + 1);
        }
        if vectored {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
            for m in &batch {
                slices.push(IoSlice::new(&m.header));
                if !m.payload.is_empty() {
                    slices.push(IoSlice::new(&m.payload));
                }
            }
            write_all_vectored(w, &mut slices).await?;
        } else {
            coalesced.clear();
            for m in &batch {
                coalesced.extend_from_slice(&m.header);
                coalesced.extend_from_slice(&m.payload);
            }
            w.write_all(&coalesced).await?;
        }
        w.flush().await?;
        batch.clear();
        if last.is_some() {
            return w.shutdown().await.or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotConnected {
                    Ok(())
                } else {
                    Err(e)
                }
            });
        }
    }
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !slices.is_empty() {
        let n = w.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}
