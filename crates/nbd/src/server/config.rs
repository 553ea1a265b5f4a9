//! The server's settings: [`ServerConfig`], loadable with serde under the names of the daemon's
//! `[nbd]` table (sizes as `"64M"` or bytes, durations in seconds), and checked by
//! [`ServerConfig::validate`].

use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::TlsSettings;

/// Server settings; [`ServerConfig::default`] holds the documented defaults. The TLS
/// certificate is not part of what is deserialized: the embedding program loads it and sets
/// [`ServerConfig::tls`].
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Connections served at once, negotiating or not; further clients wait in the listen
    /// backlog (connections idle for `idle_timeout_secs` are closed to make room). Default 256.
    pub max_connections: usize,
    /// Connections one peer (an IP address; over a unix socket, a user id) may hold at once;
    /// further ones from it are closed at once unless one of its own can be reclaimed.
    /// Default 128.
    pub max_connections_per_peer: usize,
    /// Connections negotiating at once (at most half of `max_connections`); beyond it the one
    /// negotiating longest is closed to make room, so that clients which never negotiate
    /// cannot hold the server's slots. Default 64.
    pub max_handshakes: usize,
    /// Connections one peer may have negotiating at once (at most half of its
    /// `max_connections_per_peer`); beyond it that peer's longest negotiating connection is
    /// closed. Default 16.
    pub max_handshakes_per_peer: usize,
    /// Bytes of requests in flight per connection (read and write payloads, block status
    /// replies, a small amount per other request); the server stops reading a connection that
    /// reaches it until replies drain. Default 64 MiB.
    #[serde(deserialize_with = "size_usize")]
    pub max_in_flight_bytes: usize,
    /// Requests of any kind in flight per connection; like the byte budget, reaching it stops
    /// reading the connection until replies drain. Default 1024.
    pub max_in_flight_requests: usize,
    /// The largest READ or WRITE payload accepted (advertised as the maximum block size).
    /// Default 32 MiB.
    #[serde(deserialize_with = "size_u32")]
    pub max_payload: u32,
    /// Time a client has to finish negotiation. Default 60 s.
    #[serde(rename = "handshake_timeout_secs", deserialize_with = "seconds")]
    pub handshake_timeout: Duration,
    /// How long a negotiated connection with nothing in flight keeps its slot when another
    /// client needs one (the server is full, or its peer is at its limit). Idle connections are
    /// never closed while slots are free. Default 120 s.
    #[serde(rename = "idle_timeout_secs", deserialize_with = "seconds")]
    pub idle_timeout: Duration,
    /// When a client connects again with the same identity (an access token's `client_id`)
    /// to the same export, how long its previous connection may take to answer what it has in
    /// flight; after that its unsent replies are dropped, and after as long again the new
    /// connection is refused. Default 10 s.
    #[serde(rename = "takeover_timeout_secs", deserialize_with = "seconds")]
    pub takeover_timeout: Duration,
    /// The export an empty name selects.
    pub default_export: Option<String>,
    /// TLS, if configured (set by the embedding program; never deserialized).
    #[serde(skip)]
    pub tls: Option<TlsSettings>,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            max_connections: 256,
            max_connections_per_peer: 128,
            max_handshakes: 64,
            max_handshakes_per_peer: 16,
            max_in_flight_bytes: 64 << 20,
            max_in_flight_requests: 1024,
            max_payload: 32 << 20,
            handshake_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(120),
            takeover_timeout: Duration::from_secs(10),
            default_export: None,
            tls: None,
        }
    }
}

/// A setting out of its range; the message names the setting as the `[nbd]` table spells it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("[nbd] {setting}: {why}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub why: String,
}

fn refuse(setting: &'static str, why: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        why: why.into(),
    }
}

impl ServerConfig {
    /// Check every setting against what the server can work with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let counts = [
            ("max_connections", self.max_connections),
            ("max_connections_per_peer", self.max_connections_per_peer),
            ("max_handshakes", self.max_handshakes),
            ("max_handshakes_per_peer", self.max_handshakes_per_peer),
            ("max_in_flight_requests", self.max_in_flight_requests),
        ];
        for (setting, n) in counts {
            if n == 0 {
                return Err(refuse(
                    setting,
                    "must be at least 1 (0 would refuse every client)",
                ));
            }
        }
        if !(4096..=1 << 30).contains(&self.max_payload) {
            return Err(refuse(
                "max_payload",
                format!("{} is not between 4096 bytes and 1 GiB", self.max_payload),
            ));
        }
        if self.max_in_flight_bytes < self.max_payload as usize {
            return Err(refuse(
                "max_in_flight_bytes",
                format!(
                    "{} is below max_payload ({}): one request would not fit",
                    self.max_in_flight_bytes, self.max_payload
                ),
            ));
        }
        let durations = [
            ("handshake_timeout_secs", self.handshake_timeout),
            ("idle_timeout_secs", self.idle_timeout),
            ("takeover_timeout_secs", self.takeover_timeout),
        ];
        for (setting, d) in durations {
            if d.is_zero() || d > MAX_DURATION {
                return Err(refuse(
                    setting,
                    format!(
                        "{d:?} is not between 0 and {} seconds",
                        MAX_DURATION.as_secs()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Connections one peer may hold: never more than the server's total.
    pub(crate) fn per_peer(&self) -> usize {
        self.max_connections_per_peer
            .clamp(1, self.max_connections.max(1))
    }

    /// Connections that may negotiate at once: at most half the server's total, so that
    /// negotiating connections never fill it.
    pub(crate) fn handshakes(&self) -> usize {
        self.max_handshakes
            .clamp(1, (self.max_connections / 2).max(1))
    }

    /// Connections one peer may have negotiating: at most half its share, and the total's.
    pub(crate) fn handshakes_per_peer(&self) -> usize {
        let bound = self.handshakes().min((self.per_peer() / 2).max(1));
        self.max_handshakes_per_peer.clamp(1, bound)
    }
}

/// The longest duration a setting may name (a day).
const MAX_DURATION: Duration = Duration::from_secs(86_400);

fn size_usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = strata_bdev::units::size::deserialize(d)?;
    usize::try_from(n).map_err(|_| serde::de::Error::custom(format!("{n} bytes is too large")))
}

fn size_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = strata_bdev::units::size::deserialize(d)?;
    u32::try_from(n).map_err(|_| serde::de::Error::custom(format!("{n} bytes is over 4 GiB")))
}

/// A duration as a number of seconds (whole or not); its range is checked by
/// [`ServerConfig::validate`].
fn seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    strata_bdev::units::secs::deserialize(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<ServerConfig, String> {
        toml::from_str(toml_text).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_hold_and_are_valid() {
        let c = parse("").unwrap();
        assert_eq!(c.max_connections, 256);
        assert_eq!(c.max_in_flight_bytes, 64 << 20);
        assert_eq!(c.handshake_timeout, Duration::from_secs(60));
        c.validate().unwrap();
    }

    #[test]
    fn sizes_and_seconds_are_human_readable() {
        let c = parse(
            r#"
                max_in_flight_bytes = "128M"
                max_payload = 65536
                handshake_timeout_secs = 2.5
                idle_timeout_secs = 30
                default_export = "demo"
            "#,
        )
        .unwrap();
        assert_eq!(c.max_in_flight_bytes, 128 << 20);
        assert_eq!(c.max_payload, 65536);
        assert_eq!(c.handshake_timeout, Duration::from_millis(2500));
        assert_eq!(c.idle_timeout, Duration::from_secs(30));
        assert_eq!(c.default_export.as_deref(), Some("demo"));
        assert!(parse(r#"max_payload = "8G""#)
            .unwrap_err()
            .contains("over 4 GiB"));
        assert!(parse("handshake_timeout_secs = 1e300").is_err());
        assert!(parse("idle_timeout_secs = 0").unwrap().validate().is_err());
        assert!(parse(r#"max_payload = "64Q""#)
            .unwrap_err()
            .contains("unit"));
    }

    #[test]
    fn nonsense_is_refused_with_the_setting_named() {
        let zero = ServerConfig {
            max_handshakes: 0,
            ..ServerConfig::default()
        };
        let e = zero.validate().unwrap_err();
        assert_eq!(e.setting, "max_handshakes");
        assert!(e.to_string().contains("must be at least 1"), "{e}");
        let small_budget = ServerConfig {
            max_in_flight_bytes: 4096,
            ..ServerConfig::default()
        };
        assert_eq!(
            small_budget.validate().unwrap_err().setting,
            "max_in_flight_bytes"
        );
        let tiny_payload = ServerConfig {
            max_payload: 512,
            ..ServerConfig::default()
        };
        assert_eq!(tiny_payload.validate().unwrap_err().setting, "max_payload");
    }

    #[test]
    fn limits_never_exceed_the_total() {
        let c = ServerConfig {
            max_connections: 2,
            ..ServerConfig::default()
        };
        assert_eq!(
            (c.per_peer(), c.handshakes(), c.handshakes_per_peer()),
            (2, 1, 1)
        );
    }
}
