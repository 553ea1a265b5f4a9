//! Strata's gRPC API: the protobuf messages and services of `proto/strata/v1/strata.proto`,
//! generated as a tonic client and server.
//!
//! ```text
//!  strata CLI / tests / other programs ── v1::*_client ──▶ gRPC ──▶ v1::*_server ── daemon
//! ```
//!
//! The daemon implements the server traits; `strata` (the CLI) and the tests use the clients.
//! [`connect`] reaches a daemon by `unix:///path`, `http://host:port` or `https://host:port`
//! ([`connect_with`] adds a bearer token and TLS client certificates).

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

/// How a client proves itself to a daemon's TCP listener (its unix socket needs nothing: the
/// socket's owner is the daemon's user).
#[derive(Debug, Clone, Default)]
pub struct ClientAuth {
    /// Sent with every call as `authorization: Bearer TOKEN`.
    pub token: Option<String>,
    /// For `https://`: the CA certificate (PEM) that signed the daemon's certificate.
    pub ca: Option<std::path::PathBuf>,
    /// For `https://` with client certificates: this client's certificate chain and private
    /// key (PEM).
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// A channel to a daemon, carrying the client's token with every call.
#[derive(Debug, Clone)]
pub struct ApiChannel {
    inner: tonic::transport::Channel,
    token: Option<tonic::codegen::http::HeaderValue>,
}

impl tower::Service<tonic::codegen::http::Request<tonic::body::Body>> for ApiChannel {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = <tonic::transport::Channel as tower::Service<
        tonic::codegen::http::Request<tonic::body::Body>,
    >>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, mut req: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        if let Some(t) = &self.token {
            req.headers_mut().insert("authorization", t.clone());
        }
        tower::Service::call(&mut self.inner, req)
    }
}

/// A channel to a daemon at `endpoint`: `unix:///path/to/api.sock`, a bare socket path,
/// `http://host:port`, or `https://host:port`, with no credentials.
pub async fn connect(endpoint: &str) -> Result<ApiChannel, ConnectError> {
    connect_with(endpoint, &ClientAuth::default()).await
}

/// A channel to a daemon at `endpoint`, proving itself with `auth`.
pub async fn connect_with(endpoint: &str, auth: &ClientAuth) -> Result<ApiChannel, ConnectError> {
    use tonic::transport::Endpoint;
    let fail = |e: &dyn std::fmt::Display| ConnectError {
        endpoint: endpoint.to_string(),
        reason: e.to_string(),
    };
    let token = match &auth.token {
        None => None,
        Some(t) => Some(
            tonic::codegen::http::HeaderValue::from_str(&format!("Bearer {}", t.trim()))
                .map_err(|_| fail(&"the token holds characters a header cannot carry"))?,
        ),
    };
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.starts_with('/').then_some(endpoint));
    let inner = if let Some(path) = path {
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
            .map_err(|e| fail(&error_chain(&e)))?
    } else if let Some(rest) = endpoint.strip_prefix("https://") {
        let tls = tls::client_config(auth).map_err(|e| fail(&e))?;
        let hostport = rest.trim_end_matches('/').to_string();
        let host = tls::host_of(&hostport).map_err(|e| fail(&e))?;
        Endpoint::from_shared(format!("http://{hostport}"))
            .map_err(|e| fail(&e))?
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let (tls, hostport, host) = (tls.clone(), hostport.clone(), host.clone());
                async move {
                    let tcp = tokio::net::TcpStream::connect(&hostport).await?;
                    let s = tokio_rustls::TlsConnector::from(tls)
                        .connect(host, tcp)
                        .await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .map_err(|e| fail(&error_chain(&e)))?
    } else {
        Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| fail(&e))?
            .connect_timeout(CONNECT_TIMEOUT)
            .connect()
            .await
            .map_err(|e| fail(&error_chain(&e)))?
    };
    Ok(ApiChannel { inner, token })
}

/// TLS for `https://` endpoints, with rustls.
mod tls {
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    use super::ClientAuth;

    fn certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
        CertificateDer::pem_file_iter(path)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("read certificates from {}: {e}", path.display()))
    }

    /// The client's TLS settings: the daemon's CA, and a client certificate if given.
    pub fn client_config(auth: &ClientAuth) -> Result<Arc<rustls::ClientConfig>, String> {
        let Some(ca) = &auth.ca else {
            return Err(
                "https:// needs the CA certificate that signed the daemon's \
                        certificate (--tls-ca)"
                    .into(),
            );
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(ca)? {
            roots
                .add(c)
                .map_err(|e| format!("use {} as a CA certificate: {e}", ca.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let mut config = match &auth.identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("read the private key {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(certs(cert)?, key)
                    .map_err(|e| format!("use client certificate {}: {e}", cert.display()))?
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The name the daemon's certificate must carry: the host of `host:port`.
    pub fn host_of(hostport: &str) -> Result<ServerName<'static>, String> {
        let host = match hostport.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => h,
            _ => hostport,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_string()).map_err(|e| format!("host {host:?}: {e}"))
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
