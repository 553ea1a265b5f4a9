//! Where the CLI finds the daemon, how it prints (tables for people, `--output json` for
//! scripts), and how it reads the API's errors and progress streams.

use anyhow::bail;
use std::path::PathBuf;
use strata_api::v1 as pb;
use tokio_stream::StreamExt;

use anyhow::Context;
use strata_api::ApiChannel;

use crate::format::Bar;

/// Where to find the daemon, and how to print.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// The daemon's API: unix:///path/api.sock, http://HOST:PORT or https://HOST:PORT
    /// (default: api.sock in the default data directory).
    #[arg(long, global = true, env = "STRATA_ENDPOINT")]
    pub endpoint: Option<String>,
    /// A file holding the bearer token a TCP endpoint asks for (or STRATA_API_TOKEN).
    #[arg(long, global = true, env = "STRATA_API_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// For https://: the CA certificate (PEM) that signed the daemon's certificate.
    #[arg(long, global = true, env = "STRATA_API_CA")]
    pub tls_ca: Option<PathBuf>,
    /// For https:// with client certificates: this client's certificate (PEM).
    #[arg(long, global = true, requires = "tls_key", env = "STRATA_API_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, global = true, requires = "tls_cert", env = "STRATA_API_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Same as --output json.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

impl Target {
    fn endpoint(&self) -> String {
        self.endpoint.clone().unwrap_or_else(|| {
            format!(
                "unix://{}",
                crate::daemon::config::default_data_dir()
                    .join("api.sock")
                    .display()
            )
        })
    }

    pub async fn channel(&self) -> anyhow::Result<ApiChannel> {
        let (endpoint, auth) = self.endpoint_and_auth()?;
        Ok(strata_api::connect_with(&endpoint, &auth).await?)
    }

    /// The daemon's endpoint and the credentials to reach it.
    pub fn endpoint_and_auth(&self) -> anyhow::Result<(String, strata_api::ClientAuth)> {
        let token = match (&self.token_file, std::env::var("STRATA_API_TOKEN")) {
            (Some(f), _) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("read the token file {}", f.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, Ok(t)) => Some(t),
            (None, Err(_)) => None,
        };
        let auth = strata_api::ClientAuth {
            token,
            ca: self.tls_ca.clone(),
            identity: self.tls_cert.clone().zip(self.tls_key.clone()),
        };
        Ok((self.endpoint(), auth))
    }

    pub fn json(&self) -> bool {
        self.json || self.output == Output::Json
    }

    /// Print `value` as JSON when asked to, else run `table`.
    pub fn print<T: serde::Serialize>(
        &self,
        value: &T,
        table: impl FnOnce(&T),
    ) -> anyhow::Result<()> {
        if self.json() {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            table(value);
        }
        Ok(())
    }

    /// Print a message (or, for JSON, `{"message": …}`).
    pub fn done(&self, message: &str) -> anyhow::Result<()> {
        self.print(&serde_json::json!({ "message": message }), |_| {
            println!("{message}")
        })
    }
}

/// What a failed call says: the daemon's message, without gRPC's wrapping.
pub fn api_error(s: tonic::Status) -> anyhow::Error {
    if s.code() == tonic::Code::Unavailable && s.message().contains("transport") {
        return anyhow::anyhow!("the daemon is unreachable: {}", s.message());
    }
    anyhow::anyhow!("{}", s.message())
}

pub async fn follow(
    mut stream: tonic::Streaming<pb::Progress>,
    what: &str,
    unit: &'static str,
) -> anyhow::Result<String> {
    let mut bar = Bar::new(what, unit);
    let mut shown = false;
    while let Some(p) = stream.next().await {
        let p = p.map_err(api_error)?;
        if p.total > 0 {
            bar.update(p.done, p.total, "");
            shown = true;
        }
        if p.finished {
            if shown {
                bar.finish();
            }
            return Ok(p.message);
        }
    }
    bail!("the daemon ended the call without saying whether it finished")
}
