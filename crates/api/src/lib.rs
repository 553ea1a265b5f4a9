//! Strata's gRPC API: the protobuf messages and services of `proto/strata/v1/strata.proto`,
//! generated as a tonic client and server.
//!
//! ```text
//!  strata CLI / tests / other programs ── v1::*_client ──▶ gRPC ──▶ v1::*_server ── daemon
//! ```
//!
//! The daemon implements the server traits; `strata` (the CLI) and the tests use the clients.
//! [`connect`] reaches a daemon by `unix:///path` or `http://host:port`.

#![allow(missing_debug_implementations)]

/// Generated from `strata/v1/strata.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("strata.v1");
}

/// A client of etcd's v3 KV service (the subset in `proto/etcd/kv.proto`), for the state store.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// The encoded descriptor set of every service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/strata_descriptor.bin"));

/// How long [`connect`] waits for the daemon to accept a connection.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A channel to a daemon at `endpoint`: `unix:///path/to/api.sock`, a bare socket path, or
/// `http://host:port`.
pub async fn connect(endpoint: &str) -> Result<tonic::transport::Channel, ConnectError> {
    use tonic::transport::Endpoint;
    let fail = |e: &dyn std::fmt::Display| ConnectError {
        endpoint: endpoint.to_string(),
        reason: e.to_string(),
    };
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.starts_with('/').then_some(endpoint));
    match path {
        Some(path) => {
            let path = std::path::PathBuf::from(path);
            // The URI is required by the API but unused: the connector dials the socket.
            Endpoint::from_static("http://localhost")
                .connect_timeout(CONNECT_TIMEOUT)
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let path = path.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
                .await
                .map_err(|e| fail(&error_chain(&e)))
        }
        None => Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| fail(&e))?
            .connect_timeout(CONNECT_TIMEOUT)
            .connect()
            .await
            .map_err(|e| fail(&error_chain(&e))),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The daemon could not be reached.
#[derive(Debug)]
pub struct ConnectError {
    pub endpoint: String,
    pub reason: String,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "connect to the strata daemon at {}: {} (is `strata serve` running? its API \
             socket is api.sock in its data directory; pass --endpoint)",
            self.endpoint, self.reason
        )
    }
}

impl std::error::Error for ConnectError {}
