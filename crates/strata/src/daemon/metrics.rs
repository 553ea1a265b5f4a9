//! Prometheus metrics: `GET /metrics` over HTTP from the daemon, in the text exposition format
//! (version 0.0.4). Everything is read from counters the data path keeps anyway (a
//! [`strata_bdev::StatsDevice`] per volume, nexus status, page-store statistics), so a scrape
//! costs the data path nothing.
//!
//! The HTTP side is deliberately small: one request per connection, `GET /metrics` or 404,
//! headers bounded in size and time.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use strata_bdev::stats::{Histogram, OpStats, LATENCY_BUCKETS_US};
use strata_bdev::BlockDevice;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use tokio_util::sync::CancellationToken;

use super::manager::{Managed, Manager};

/// Metrics connections served at once.
const MAX_CONNECTIONS: usize = 16;

/// Escape a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A text exposition being written. The format wants each family's samples in one group
/// under its HELP and TYPE lines, so samples collect per family (in the order families first
/// appear) and are joined at the end.
#[derive(Default)]
struct Exposition {
    families: Vec<(&'static str, String)>,
    current: usize,
}

impl Exposition {
    /// Make `name` the family the next samples belong to.
    fn family(&mut self, name: &'static str, kind: &str, help: &str) {
        match self.families.iter().position(|(n, _)| *n == name) {
            Some(i) => self.current = i,
            None => {
                self.families.push((
                    name,
                    format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"),
                ));
                self.current = self.families.len() - 1;
            }
        }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let out = &mut self.families[self.current].1;
        out.push_str(name);
        if !labels.is_empty() {
            out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{k}=\"{}\"", esc(v));
            }
            out.push('}');
        }
        let _ = writeln!(out, " {value}");
    }

    fn finish(self) -> String {
        self.families.into_iter().map(|(_, text)| text).collect()
    }

    fn gauge(&mut self, name: &'static str, help: &str, labels: &[(&str, &str)], v: u64) {
        self.family(name, "gauge", help);
        self.sample(name, labels, v);
    }

    fn counter(&mut self, name: &'static str, help: &str, labels: &[(&str, &str)], v: u64) {
        self.family(name, "counter", help);
        self.sample(name, labels, v);
    }

    fn histogram(
        &mut self,
        name: &'static str,
        help: &str,
        labels: &[(&str, &str)],
        h: &Histogram,
    ) {
        self.family(name, "histogram", help);
        let buckets = h.buckets();
        let mut cumulative = 0;
        let bucket = format!("{name}_bucket");
        for (i, n) in buckets.iter().enumerate() {
            cumulative += n;
            let le = match LATENCY_BUCKETS_US.get(i) {
                Some(us) => format!("{}", *us as f64 / 1e6),
                None => "+Inf".to_string(),
            };
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&bucket, &l, cumulative);
        }
        self.sample(&format!("{name}_sum"), labels, h.sum_nanos() as f64 / 1e9);
        self.sample(&format!("{name}_count"), labels, cumulative);
    }

    fn op(&mut self, volume: &str, op: &str, s: &OpStats) {
        let l = [("volume", volume), ("op", op)];
        self.counter(
            "strata_volume_requests_total",
            "Requests completed by a volume, by operation.",
            &l,
            s.requests.load(Relaxed),
        );
        self.counter(
            "strata_volume_bytes_total",
            "Bytes of the requests that succeeded, by operation.",
            &l,
            s.bytes.load(Relaxed),
        );
        self.counter(
            "strata_volume_errors_total",
            "Requests that failed, by operation.",
            &l,
            s.errors.load(Relaxed),
        );
    }
}

impl Exposition {
    /// A volume's size, request counters and latencies.
    fn volume(&mut self, m: &Managed) {
        let e = self;
        let name = m.name.clone();
        let v = name.as_str();
        let s = m.stats();
        e.gauge(
            "strata_volume_size_bytes",
            "A volume's size.",
            &[("volume", v)],
            m.device.geometry().size,
        );
        e.op(v, "read", &s.reads);
        e.op(v, "write", &s.writes);
        e.op(v, "flush", &s.flushes);
        e.op(v, "trim", &s.trims);
        e.op(v, "write_zeroes", &s.write_zeroes);
        e.op(v, "block_status", &s.block_status);
        e.gauge(
            "strata_volume_queue_depth",
            "Requests a volume is working on now.",
            &[("volume", v)],
            s.in_flight.load(Relaxed),
        );
        for (op, h) in [
            ("read", &s.read_latency),
            ("write", &s.write_latency),
            ("flush", &s.flush_latency),
        ] {
            e.histogram(
                "strata_volume_latency_seconds",
                "Time from a request reaching a volume to its completion, successful ones only.",
                &[("volume", v), ("op", op)],
                h,
            );
        }
    }

    /// A nexus's replicas and rebuilds.
    fn nexus(&mut self, v: &str, n: &strata_nexus::Nexus) {
        let e = self;
        for (i, c) in n.status().children.iter().enumerate() {
            let idx = i.to_string();
            let state = match &c.state {
                strata_nexus::ChildState::Online => "online",
                strata_nexus::ChildState::Rebuilding => "rebuilding",
                strata_nexus::ChildState::Faulted(_) => "faulted",
                strata_nexus::ChildState::Offline => "offline",
            };
            for st in ["online", "rebuilding", "faulted", "offline"] {
                e.gauge(
                    "strata_nexus_child_state",
                    "1 for the state a replica is in, 0 for the others.",
                    &[
                        ("volume", v),
                        ("child", &idx),
                        ("uri", &c.name),
                        ("state", st),
                    ],
                    u64::from(st == state),
                );
            }
            if let Some(r) = &c.rebuild {
                let l = [("volume", v), ("child", idx.as_str())];
                e.gauge(
                    "strata_rebuild_total_bytes",
                    "Bytes the current or last rebuild of a replica copies.",
                    &l,
                    r.total_bytes,
                );
                e.gauge(
                    "strata_rebuild_done_bytes",
                    "Bytes the current or last rebuild of a replica has copied or zeroed.",
                    &l,
                    r.done_bytes,
                );
                e.gauge(
                    "strata_rebuild_running",
                    "1 while a rebuild of the replica runs (or is paused).",
                    &l,
                    u64::from(matches!(
                        r.state,
                        strata_nexus::RebuildState::Running | strata_nexus::RebuildState::Paused
                    )),
                );
            }
        }
    }

    /// A page-store image's buffer, checkpoints, cache, and (once per store) its store's
    /// requests.
    fn image(
        &mut self,
        m: &Managed,
        i: &strata_pagestore::Image,
        stores_seen: &mut std::collections::BTreeSet<String>,
    ) {
        let e = self;
        let v = m.name.as_str();
        let st = i.stats();
        let l = [("volume", v)];
        e.gauge(
            "strata_image_wal_bytes",
            "Bytes in an image's write-ahead buffer, not yet checkpointed to its store.",
            &l,
            i.buffered_bytes().1,
        );
        e.counter(
            "strata_image_checkpoints_total",
            "Checkpoints of an image's write buffer into its store.",
            &l,
            st.checkpoints.load(Relaxed),
        );
        e.counter(
            "strata_image_compactions_total",
            "Compactions of an image's segments.",
            &l,
            st.compactions.load(Relaxed),
        );
        let (mem, disk, miss) = (
            st.cache_hits.load(Relaxed),
            st.disk_cache_hits.load(Relaxed),
            st.cache_misses.load(Relaxed),
        );
        for (tier, n) in [("memory", mem), ("disk", disk), ("store", miss)] {
            e.counter(
                "strata_image_page_reads_total",
                "Pages an image read, by where they came from (store = a cache miss).",
                &[("volume", v), ("tier", tier)],
                n,
            );
        }
        let total = mem + disk + miss;
        e.family(
            "strata_image_cache_hit_ratio",
            "gauge",
            "Share of page reads served from memory or the disk cache since start.",
        );
        let ratio = if total == 0 {
            1.0
        } else {
            (mem + disk) as f64 / total as f64
        };
        e.sample("strata_image_cache_hit_ratio", &l, ratio);
        e.gauge(
            "strata_image_fenced",
            "1 if the image stopped writing because another writer took it over.",
            &l,
            u64::from(i.fenced().is_some()),
        );
        if let Some(key) = m.decl().image() {
            let store = key.store.clone();
            if stores_seen.insert(store.clone()) {
                let ss = i.store_stats();
                let [gets, puts, lists, deletes, errors, retries] = ss.counts();
                for (op, n) in [
                    ("get", gets),
                    ("put", puts),
                    ("list", lists),
                    ("delete", deletes),
                ] {
                    e.counter(
                        "strata_store_requests_total",
                        "Requests to an object store, by operation.",
                        &[("store", &store), ("op", op)],
                        n,
                    );
                }
                e.counter(
                    "strata_store_errors_total",
                    "Object store requests that failed after their retries.",
                    &[("store", &store)],
                    errors,
                );
                e.counter(
                    "strata_store_retries_total",
                    "Object store requests retried.",
                    &[("store", &store)],
                    retries,
                );
                for (direction, n) in [("get", &ss.bytes_got), ("put", &ss.bytes_put)] {
                    e.counter(
                        "strata_store_bytes_total",
                        "Bytes moved to (put) and from (get) an object store.",
                        &[("store", &store), ("direction", direction)],
                        n.load(Relaxed),
                    );
                }
            }
        }
    }
}

/// The exposition of everything the daemon measures.
pub async fn render(manager: &Manager) -> String {
    let mut e = Exposition::default();
    e.gauge(
        "strata_build_info",
        "The running version.",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    e.gauge(
        "strata_state_store_available",
        "1 while the state store answers; at 0, volumes serve but changes are refused.",
        &[("store", &manager.state.describe())],
        u64::from(manager.state.available().await),
    );
    e.gauge(
        "strata_reconcile_problems",
        "Declared volumes that reconciliation could not make as declared.",
        &[],
        manager.problems().len() as u64,
    );
    let mut stores_seen = std::collections::BTreeSet::new();
    for m in manager.volumes() {
        e.volume(&m);
        if let Some(n) = m.nexus() {
            e.nexus(&m.name, n);
        }
        if let Some(i) = m.image() {
            e.image(&m, i, &mut stores_seen);
        }
    }
    e.finish()
}

/// Serve `/metrics` on `listener` until `stop` is cancelled.
pub async fn serve(manager: Arc<Manager>, listener: TcpListener, stop: CancellationToken) {
    // Scrapers are few; more connections than this wait in the backlog.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            _ = stop.cancelled() => return,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let m = manager.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(&m, stream).await {
                        debug!(error = %e, "metrics request");
                    }
                    drop(slot);
                });
            }
            Err(e) => {
                warn!(error = %e, "accept on the metrics listener");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(manager: &Manager, mut stream: TcpStream) -> std::io::Result<()> {
    const MAX_HEAD: usize = 16 << 10;
    let mut head = Vec::new();
    let read = async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || head.len() + n > MAX_HEAD {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "request head incomplete or too large",
                ));
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "slow request"))??;
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(manager).await,
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "strata serves /metrics here\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET /metrics\n".to_string(),
        ),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_and_histograms_are_cumulative() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut e = Exposition::default();
        let h = Histogram::default();
        e.histogram("x_seconds", "help", &[("volume", "v")], &h);
        e.gauge("y", "help", &[], 1);
        e.histogram("x_seconds", "help", &[("volume", "w")], &h);
        let out = e.finish();
        assert_eq!(out.matches("# TYPE x_seconds histogram").count(), 1);
        assert!(out.contains("x_seconds_bucket{volume=\"v\",le=\"0.000025\"} 0"));
        assert!(out.contains("x_seconds_bucket{volume=\"v\",le=\"+Inf\"} 0"));
        assert!(out.contains("x_seconds_count{volume=\"w\"} 0"));
        // Both volumes' samples come before the next family.
        assert!(out.find("volume=\"w\"").unwrap() < out.find("# HELP y").unwrap());
    }
}
