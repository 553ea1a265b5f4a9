//! Connection slots: which connections hold one, what each is doing, and which gives way when a
//! new client needs room.
//!
//! ```text
//!   accept ─► admit(peer) ──► per peer at its limit?  reclaim one of its own, else refuse
//!                │            server full?            reclaim an idle one, else wait
//!                │            too many negotiating?   close the one negotiating longest
//!                ▼
//!              Slot (negotiating) ── negotiated() ──► Slot (transmission; idle or busy)
//! ```
//!
//! A connection is *reclaimable* when it negotiated and has had nothing in flight for the idle
//! timeout: it is closed only when its slot is needed, so idle clients (a mounted file system
//! nobody touches) keep their connection while there is room. Negotiating connections never
//! fill the server (their limit is at most half of it), and when their own limit is reached the
//! one negotiating longest is closed, so clients that connect and never negotiate cannot keep
//! others out.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::ServerConfig;

/// What the admission rules need from the configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub total: usize,
    pub per_peer: usize,
    pub handshakes: usize,
    pub handshakes_per_peer: usize,
    pub idle_timeout: Duration,
}

impl Limits {
    pub fn of(c: &ServerConfig) -> Limits {
        Limits {
            total: c.max_connections.max(1),
            per_peer: c.per_peer(),
            handshakes: c.handshakes(),
            handshakes_per_peer: c.handshakes_per_peer(),
            idle_timeout: c.idle_timeout,
        }
    }
}

/// The registry of connections holding a slot.
#[derive(Debug)]
pub(crate) struct Slots {
    limits: Limits,
    epoch: Instant,
    conns: Mutex<BTreeMap<u64, Entry>>,
    next_id: AtomicU64,
    /// Told whenever a slot is given back.
    freed: Notify,
    /// Connections closed at once because their peer was at its limit.
    pub refused: AtomicU64,
    /// Connections closed to make room (idle ones, or the longest negotiating).
    pub reclaimed: AtomicU64,
}

#[derive(Debug)]
struct Entry {
    peer: Arc<str>,
    negotiating: bool,
    activity: Arc<Activity>,
    stop: CancellationToken,
}

/// Whether a connection has requests in flight, and since when it has had none; written by the
/// connection's task on each change, read when room is needed.
#[derive(Debug)]
pub(crate) struct Activity {
    epoch: Instant,
    /// Milliseconds from `epoch` since which nothing is in flight; [`BUSY`] while something is.
    idle_since: AtomicU64,
}

const BUSY: u64 = u64::MAX;

impl Activity {
    fn millis(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Record that the connection now has (or no longer has) requests in flight.
    pub fn set_busy(&self, busy: bool) {
        let v = if busy { BUSY } else { self.millis() };
        self.idle_since.store(v, Ordering::Relaxed);
    }

    /// How long nothing has been in flight; `None` while something is.
    fn idle_for(&self) -> Option<Duration> {
        match self.idle_since.load(Ordering::Relaxed) {
            BUSY => None,
            since => Some(Duration::from_millis(self.millis().saturating_sub(since))),
        }
    }
}

/// A slot held by one connection; given back on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    slots: Arc<Slots>,
    id: u64,
    activity: Arc<Activity>,
    stop: CancellationToken,
}

impl Slot {
    /// Cancelled when the connection must stop: the server shuts down, or its slot is reclaimed
    /// (or, for a client identity, a newer connection takes over).
    pub fn stop(&self) -> &CancellationToken {
        &self.stop
    }

    pub fn activity(&self) -> Arc<Activity> {
        self.activity.clone()
    }

    /// Negotiation is over: the connection counts as idle from now until its first request.
    pub fn negotiated(&self) {
        self.activity.set_busy(false);
        let mut conns = self.slots.lock();
        if let Some(e) = conns.get_mut(&self.id) {
            e.negotiating = false;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.lock().remove(&self.id);
        self.slots.freed.notify_waiters();
    }
}

/// What an admission attempt found.
enum Admission {
    Admitted(Slot),
    Refused(String),
    /// No room now; look again when a slot is freed or at this time.
    Wait(Instant),
}

impl Slots {
    pub fn new(limits: Limits) -> Slots {
        Slots {
            limits,
            epoch: Instant::now(),
            conns: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            freed: Notify::new(),
            refused: AtomicU64::new(0),
            reclaimed: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        // Every critical section leaves the map consistent; a panic elsewhere must not stop
        // connections from being admitted and given back.
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connections holding a slot, and how many of them are negotiating.
    pub fn counts(&self) -> (usize, usize) {
        let conns = self.lock();
        let negotiating = conns.values().filter(|e| e.negotiating).count();
        (conns.len(), negotiating)
    }

    /// A slot for a new connection from `peer`: at once, after waiting for room (the server is
    /// full), or `Err` with the reason when the peer is at its limit. `None` if `shutdown`
    /// fires first.
    pub async fn admit(
        self: &Arc<Self>,
        peer: &str,
        shutdown: &CancellationToken,
    ) -> Option<Result<Slot, String>> {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            match self.try_admit(peer, shutdown, true) {
                Admission::Admitted(slot) => return Some(Ok(slot)),
                Admission::Refused(why) => return Some(Err(why)),
                Admission::Wait(at) => {
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = freed => {}
                        _ = tokio::time::sleep_until(at.into()) => {}
                    }
                }
            }
        }
    }

    /// A slot for a connection the caller limits itself (no waiting, no refusal); negotiating
    /// connections are still held to their limits.
    pub fn admit_unlimited(self: &Arc<Self>, peer: &str, shutdown: &CancellationToken) -> Slot {
        match self.try_admit(peer, shutdown, false) {
            Admission::Admitted(slot) => slot,
            Admission::Refused(_) | Admission::Wait(_) => {
                unreachable!("admission without limits always admits")
            }
        }
    }

    fn try_admit(
        self: &Arc<Self>,
        peer: &str,
        shutdown: &CancellationToken,
        limit: bool,
    ) -> Admission {
        let l = self.limits;
        let mut conns = self.lock();
        if limit {
            let of_peer = conns.values().filter(|e| &*e.peer == peer).count();
            // A limit per peer as large as the total is the total's: wait for room then.
            let victim = if of_peer >= l.per_peer && l.per_peer < l.total {
                match self.reclaimable(&conns, Some(peer)) {
                    Some(v) => Some((v, "its peer is at its connection limit")),
                    None => {
                        self.refused.fetch_add(1, Ordering::Relaxed);
                        return Admission::Refused(format!(
                            "{peer} holds {of_peer} connections, its limit \
                             (max_connections_per_peer), none of them idle"
                        ));
                    }
                }
            } else if conns.len() >= l.total {
                match self.reclaimable(&conns, None) {
                    Some(v) => Some((v, "the server is full")),
                    None => return Admission::Wait(self.next_reclaimable(&conns)),
                }
            } else {
                None
            };
            if let Some((id, why)) = victim {
                self.reclaim(&mut conns, id, why);
            }
        }
        // The new connection negotiates: make room among those negotiating.
        let negotiating_of_peer = || conns.values().filter(|e| e.negotiating && &*e.peer == peer);
        if negotiating_of_peer().count() >= l.handshakes_per_peer {
            let oldest = conns
                .iter()
                .find(|(_, e)| e.negotiating && &*e.peer == peer)
                .map(|(&id, _)| id);
            if let Some(id) = oldest {
                self.reclaim(
                    &mut conns,
                    id,
                    "its peer has too many connections negotiating",
                );
            }
        }
        if conns.values().filter(|e| e.negotiating).count() >= l.handshakes {
            let oldest = conns.iter().find(|(_, e)| e.negotiating).map(|(&id, _)| id);
            if let Some(id) = oldest {
                self.reclaim(&mut conns, id, "too many connections are negotiating");
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity {
            epoch: self.epoch,
            idle_since: AtomicU64::new(BUSY),
        });
        let stop = shutdown.child_token();
        conns.insert(
            id,
            Entry {
                peer: peer.into(),
                negotiating: true,
                activity: activity.clone(),
                stop: stop.clone(),
            },
        );
        Admission::Admitted(Slot {
            slots: self.clone(),
            id,
            activity,
            stop,
        })
    }

    /// The connection (of `peer`, or of anyone) that has been idle longest, if that is at least
    /// the idle timeout; for a peer at its own limit, else its longest negotiating one.
    fn reclaimable(&self, conns: &BTreeMap<u64, Entry>, peer: Option<&str>) -> Option<u64> {
        let mine = |e: &&Entry| peer.is_none_or(|p| &*e.peer == p);
        let idle = conns
            .iter()
            .filter(|(_, e)| !e.negotiating && mine(e))
            .filter_map(|(&id, e)| e.activity.idle_for().map(|d| (d, id)))
            .filter(|(d, _)| *d >= self.limits.idle_timeout)
            .max()
            .map(|(_, id)| id);
        idle.or_else(|| {
            peer?;
            conns
                .iter()
                .find(|(_, e)| e.negotiating && mine(e))
                .map(|(&id, _)| id)
        })
    }

    /// When the first connection may become reclaimable, if nothing else changes.
    fn next_reclaimable(&self, conns: &BTreeMap<u64, Entry>) -> Instant {
        let now = Instant::now();
        let timeout = self.limits.idle_timeout;
        conns
            .values()
            .filter(|e| !e.negotiating)
            .filter_map(|e| e.activity.idle_for())
            .map(|idle| now + timeout.saturating_sub(idle))
            .min()
            .unwrap_or(now + timeout)
            .min(now + timeout)
    }

    fn reclaim(&self, conns: &mut BTreeMap<u64, Entry>, id: u64, why: &str) {
        if let Some(e) = conns.remove(&id) {
            if e.negotiating {
                // Counted in the stats; clients that never negotiate could flood the log.
                debug!(peer = %e.peer, reason = why, "closing a negotiating connection to make room");
            } else {
                let idle = e.activity.idle_for().unwrap_or_default();
                info!(peer = %e.peer, idle = ?idle, reason = why, "closing an idle connection to make room");
            }
            self.reclaimed.fetch_add(1, Ordering::Relaxed);
            e.stop.cancel();
        }
    }
}
