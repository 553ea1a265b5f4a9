//! The device's link to its target: a session opened and logged in, and the supervisor that
//! opens the next one, with backoff, when it dies.

use std::sync::Arc;
use std::time::Duration;

use strata_bdev::{Error, ErrorKind, Result};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::probe::Probe;
use super::{IscsiOptions, Link, Portal, Shared, FIRST_BACKOFF, MAX_BACKOFF};
use crate::connection::PduReader;
use crate::login::{login, LoginError, LoginParams};
use crate::session::{Session, SessionSettings};

pub(super) fn random_isid() -> [u8; 6] {
    let r: [u8; 5] = rand::random();
    // Type "random" (0b10 in the top bits), then the random part and a qualifier.
    [0x80 | (r[0] & 0x3f), r[1], r[2], r[3], r[4], 0x01]
}

/// Connect to `portal` and log in.
pub(super) async fn open_session(
    name: &str,
    portal: &Portal,
    params: &LoginParams,
    options: &IscsiOptions,
) -> Result<Arc<Session>> {
    let attempt = async {
        let s = TcpStream::connect(portal.address.as_str())
            .await
            .map_err(|e| Error::io(format!("connect to iSCSI portal {}", portal.address), e))?;
        let _ = s.set_nodelay(true);
        let (r, mut w) = s.into_split();
        // Login text is small; the bound is lifted to what was declared afterwards.
        let mut reader = PduReader::new(r, 64 << 10);
        let neg = login(&mut reader, &mut w, params)
            .await
            .map_err(|e| login_error(portal, e))?;
        Ok(Session::start(
            reader,
            w,
            neg,
            SessionSettings {
                name: name.into(),
                queue_depth: options.queue_depth,
                keepalive: options.timeout.min(Duration::from_secs(10)),
            },
        ))
    };
    tokio::time::timeout(options.timeout, attempt)
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::TimedOut,
                format!(
                    "log in to iSCSI target {} at {}: no answer within {:?}",
                    portal.target, portal.address, options.timeout
                ),
            )
        })?
}

fn login_error(portal: &Portal, e: LoginError) -> Error {
    let what = format!(
        "log in to iSCSI target {} at {}",
        portal.target, portal.address
    );
    let kind = match &e {
        LoginError::Refused(r) if r.is_auth() => ErrorKind::PermissionDenied,
        LoginError::NeedsChap => ErrorKind::PermissionDenied,
        LoginError::Refused(r) if r.is_not_found() => ErrorKind::NotFound,
        _ => ErrorKind::Io,
    };
    Error::new(kind, format!("{what}: {e}"))
}

/// Keep the device connected: when its session dies, log in again with backoff.
pub(super) async fn supervise(shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        let current = shared.link.borrow().clone();
        if let Link::Up(session) = current {
            tokio::select! {
                _ = session.dead() => {}
                _ = cancel.cancelled() => return,
            }
            let why = session.why();
            warn!(device = %shared.name, "iSCSI connection lost: {why}; reconnecting");
            shared.link.send_replace(Link::Down(why));
        }
        let mut backoff = FIRST_BACKOFF;
        loop {
            if shared.fatal.get().is_some() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = cancel.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            let attempt = async {
                let s = open_session(
                    &shared.name,
                    &shared.portal,
                    &shared.params,
                    &shared.options,
                )
                .await?;
                let deadline = Instant::now() + shared.options.timeout;
                let probe = Probe {
                    session: &s,
                    name: &shared.name,
                    deadline,
                    timeout: shared.options.timeout,
                };
                probe.ready(shared.lun).await?;
                let cap = probe.capacity(shared.lun).await?;
                shared.compare_capacity(&cap)?;
                Ok::<_, Error>(s)
            };
            let result = tokio::select! {
                r = attempt => r,
                _ = cancel.cancelled() => return,
            };
            match result {
                Ok(s) => {
                    info!(device = %shared.name, "iSCSI connection re-established");
                    shared.link.send_replace(Link::Up(s));
                    break;
                }
                Err(e) => {
                    shared
                        .link
                        .send_replace(Link::Down(format!("reconnecting failed: {}", e.chain())));
                    if shared.fatal.get().is_some() {
                        return;
                    }
                }
            }
        }
    }
}
