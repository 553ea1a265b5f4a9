//! The Node service: what this daemon is, and its volumes' I/O counters.

use std::sync::atomic::Ordering::Relaxed;

use strata_api::v1 as pb;
use tonic::{Request, Response};

use super::{status, Api, Reply};

#[tonic::async_trait]
impl pb::node_server::Node for Api {
    async fn get_info(&self, _: Request<pb::GetInfoRequest>) -> Reply<pb::NodeInfo> {
        let m = &self.manager;
        Ok(Response::new(pb::NodeInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            data_dir: m.data_dir.display().to_string(),
            nbd: m.exports.listening(super::super::manager::Protocol::Nbd),
            state_store: m.state.describe(),
            state_store_available: m.state.available().await,
            uptime_secs: m.started.elapsed().as_secs(),
            node_name: m.node.clone(),
            problems: m
                .problems()
                .into_iter()
                .map(|(v, why)| format!("{v}: {why}"))
                .collect(),
            pools: m
                .pool_space()
                .into_iter()
                .map(|p| pb::Pool {
                    name: p.name,
                    path: p.path.display().to_string(),
                    total_bytes: p.total_bytes,
                    free_bytes: p.free_bytes,
                })
                .collect(),
        }))
    }

    async fn get_stats(&self, req: Request<pb::GetStatsRequest>) -> Reply<pb::NodeStats> {
        let name = req.into_inner().volume;
        let volumes = if name.is_empty() {
            self.manager.volumes()
        } else {
            vec![self.manager.get(&name).map_err(status)?]
        };
        let volumes = volumes
            .iter()
            .map(|m| {
                let s = m.stats();
                pb::VolumeStats {
                    volume: m.name.clone(),
                    reads: s.reads.requests.load(Relaxed),
                    writes: s.writes.requests.load(Relaxed),
                    flushes: s.flushes.requests.load(Relaxed),
                    trims: s.trims.requests.load(Relaxed),
                    write_zeroes: s.write_zeroes.requests.load(Relaxed),
                    read_bytes: s.reads.bytes.load(Relaxed),
                    write_bytes: s.writes.bytes.load(Relaxed),
                    errors: s.errors(),
                    in_flight: s.in_flight.load(Relaxed),
                    read_nanos: s.read_latency.sum_nanos(),
                    write_nanos: s.write_latency.sum_nanos(),
                }
            })
            .collect();
        Ok(Response::new(pb::NodeStats { volumes }))
    }
}
