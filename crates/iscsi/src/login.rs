//! The login phase of a connection (RFC 7143 sections 6 and 13): security negotiation with
//! optional CHAP (MD5), then operational parameter negotiation, ending in the full feature
//! phase with the parameters both sides settled on.

use std::fmt;

use bytes::Bytes;
use md5::{Digest, Md5};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::codec::text::{self, hex_text, parse_binary, parse_bool, parse_number};
use crate::codec::{stage, Digests, Frame, Header, LoginRequest, LoginResponse};
use crate::connection::{write_frame, ConnError, PduReader};

/// The largest login response text Strata accepts (all its PDUs together).
const MAX_LOGIN_TEXT: usize = 64 << 10;
/// Login exchanges at most (a target that keeps asking is broken).
const MAX_ROUNDS: usize = 16;

/// One-way CHAP credentials: the name and secret the initiator proves itself with.
#[derive(Clone, PartialEq, Eq)]
pub struct Chap {
    pub user: String,
    pub secret: String,
}

impl fmt::Debug for Chap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret is never printed.
        f.debug_struct("Chap")
            .field("user", &self.user)
            .field("secret", &"<hidden>")
            .finish()
    }
}

/// What the initiator asks for at login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginParams {
    pub initiator: String,
    pub target: String,
    pub isid: [u8; 6],
    pub chap: Option<Chap>,
    /// Require CRC32C header digests.
    pub header_digest: bool,
    /// Require CRC32C data digests.
    pub data_digest: bool,
    /// The largest data segment Strata receives (declared).
    pub max_recv_data_segment: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub max_outstanding_r2t: u32,
}

/// What login settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub digests: Digests,
    /// The largest data segment the target receives (its declared MaxRecvDataSegmentLength).
    pub max_xmit_data_segment: u32,
    /// The largest data segment Strata receives.
    pub max_recv_data_segment: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_outstanding_r2t: u32,
    pub tsih: u16,
    /// The next CmdSN to use.
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub max_cmd_sn: u32,
}

/// Why login failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error("the target refused the login: {0}")]
    Refused(Refusal),
    #[error("the target requires CHAP authentication; give user= and secret=")]
    NeedsChap,
    #[error("login negotiation failed: {0}")]
    Negotiation(String),
}

/// A login refusal: status class and detail, with their meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub class: u8,
    pub detail: u8,
}

impl Refusal {
    /// Authentication or authorization failed.
    pub fn is_auth(&self) -> bool {
        self.class == 2 && matches!(self.detail, 1 | 2)
    }

    /// The target name is unknown or was removed.
    pub fn is_not_found(&self) -> bool {
        self.class == 2 && matches!(self.detail, 3 | 4)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match (self.class, self.detail) {
            (1, 1) => "target moved temporarily (redirection is not followed)",
            (1, 2) => "target moved permanently (redirection is not followed)",
            (1, _) => "redirected (redirection is not followed)",
            (2, 1) => "authentication failed",
            (2, 2) => "authorization failure",
            (2, 3) => "target not found",
            (2, 4) => "target removed",
            (2, 5) => "unsupported protocol version",
            (2, 6) => "too many connections",
            (2, 7) => "missing parameter",
            (2, 8) => "cannot include the connection in the session",
            (2, 9) => "session type not supported",
            (2, 10) => "session does not exist",
            (2, 11) => "invalid request during login",
            (2, _) => "initiator error",
            (3, 0) => "target error",
            (3, 1) => "service unavailable",
            (3, 2) => "out of resources",
            _ => "unknown status",
        };
        write!(
            f,
            "{what} (status class {:#04x}, detail {:#04x})",
            self.class, self.detail
        )
    }
}

fn negotiation(why: impl Into<String>) -> LoginError {
    LoginError::Negotiation(why.into())
}

/// The state of one login exchange.
struct Exchange<'a, R, W> {
    r: &'a mut PduReader<R>,
    w: &'a mut W,
    params: &'a LoginParams,
    itt: u32,
    cmd_sn: u32,
    exp_stat_sn: u32,
    tsih: u16,
    max_cmd_sn: u32,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Exchange<'_, R, W> {
    /// Send one login request (split if the text is long) and gather the whole response.
    async fn round(
        &mut self,
        csg: u8,
        nsg: Option<u8>,
        pairs: &[(String, String)],
    ) -> Result<(LoginResponse, Vec<(String, String)>), LoginError> {
        let body = text::encode(pairs);
        // 8192 bytes per PDU is the most any target must accept at login.
        let chunks: Vec<&[u8]> = if body.is_empty() {
            vec![&[][..]]
        } else {
            body.chunks(8192).collect()
        };
        let mut resp = None;
        for (i, chunk) in chunks.iter().enumerate() {
            let more = i + 1 < chunks.len();
            let h = LoginRequest {
                transit: nsg.is_some() && !more,
                continue_: more,
                csg,
                nsg: nsg.unwrap_or(0),
                version_max: 0,
                version_min: 0,
                isid: self.params.isid,
                tsih: self.tsih,
                itt: self.itt,
                cid: 0,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
            };
            write_frame(
                self.w,
                &Frame::new(Header::LoginRequest(h), Bytes::copy_from_slice(chunk)),
                Digests::default(),
            )
            .await
            .map_err(ConnError::Io)?;
            let (h, data) = self.response().await?;
            if more && !h.continue_ && !data.is_empty() {
                return Err(negotiation(
                    "the target answered a partial login request with text",
                ));
            }
            resp = Some((h, data));
        }
        let (mut h, mut data) = resp.ok_or_else(|| negotiation("no login response"))?;
        // A long response comes in pieces; an empty request asks for the next one.
        while h.continue_ {
            if data.len() > MAX_LOGIN_TEXT {
                return Err(negotiation("the login response text is too long"));
            }
            let req = LoginRequest {
                transit: false,
                continue_: false,
                csg,
                nsg: 0,
                version_max: 0,
                version_min: 0,
                isid: self.params.isid,
                tsih: self.tsih,
                itt: self.itt,
                cid: 0,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
            };
            write_frame(
                self.w,
                &Frame::new(Header::LoginRequest(req), Bytes::new()),
                Digests::default(),
            )
            .await
            .map_err(ConnError::Io)?;
            let (next, more) = self.response().await?;
            data.extend_from_slice(&more);
            h = next;
        }
        let pairs = text::decode(&data).map_err(ConnError::Codec)?;
        Ok((h, pairs))
    }

    async fn response(&mut self) -> Result<(LoginResponse, Vec<u8>), LoginError> {
        let frame = self.r.read_frame().await?;
        let Header::LoginResponse(h) = frame.header else {
            return Err(ConnError::Protocol(format!(
                "expected a Login Response, got {}",
                frame.header.name()
            ))
            .into());
        };
        if h.status_class != 0 {
            let refusal = Refusal {
                class: h.status_class,
                detail: h.status_detail,
            };
            return Err(LoginError::Refused(refusal));
        }
        if h.itt != self.itt {
            return Err(ConnError::Protocol(format!(
                "the Login Response has task tag {:#x}, not {:#x}",
                h.itt, self.itt
            ))
            .into());
        }
        if h.version_active != 0 {
            return Err(negotiation(format!(
                "the target chose protocol version {}, not 0",
                h.version_active
            )));
        }
        self.exp_stat_sn = h.stat_sn.wrapping_add(1);
        self.max_cmd_sn = h.max_cmd_sn;
        self.tsih = h.tsih;
        Ok((h, frame.data.to_vec()))
    }
}

fn pair(k: &str, v: impl Into<String>) -> (String, String) {
    (k.to_string(), v.into())
}

fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Log in on a connected stream. `r` keeps whatever it read past the last login response.
pub async fn login<R, W>(
    r: &mut PduReader<R>,
    w: &mut W,
    params: &LoginParams,
) -> Result<Negotiated, LoginError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut x = Exchange {
        r,
        w,
        params,
        itt: 0,
        cmd_sn: 1,
        exp_stat_sn: 0,
        tsih: 0,
        max_cmd_sn: 1,
    };

    // Security negotiation.
    let mut first = vec![
        pair("InitiatorName", &params.initiator),
        pair("SessionType", "Normal"),
        pair("TargetName", &params.target),
    ];
    let (mut h, pairs) = if params.chap.is_some() {
        first.push(pair("AuthMethod", "CHAP,None"));
        x.round(stage::SECURITY, None, &first).await?
    } else {
        first.push(pair("AuthMethod", "None"));
        x.round(stage::SECURITY, Some(stage::OPERATIONAL), &first)
            .await
            .map_err(|e| match e {
                // Authentication failed without credentials offered: CHAP is wanted.
                LoginError::Refused(r) if (r.class, r.detail) == (2, 1) => LoginError::NeedsChap,
                e => e,
            })?
    };
    let method = get(&pairs, "AuthMethod").unwrap_or("None");
    match (method, &params.chap) {
        ("CHAP", Some(chap)) => {
            let (_, pairs) = x
                .round(stage::SECURITY, None, &[pair("CHAP_A", "5")])
                .await?;
            if get(&pairs, "CHAP_A") != Some("5") {
                return Err(negotiation(format!(
                    "the target chose CHAP algorithm {:?}; Strata speaks MD5 (5)",
                    get(&pairs, "CHAP_A")
                )));
            }
            let id = get(&pairs, "CHAP_I")
                .and_then(parse_number)
                .filter(|&i| i <= 255)
                .ok_or_else(|| negotiation("the target's CHAP identifier is missing or bad"))?;
            let challenge = get(&pairs, "CHAP_C")
                .and_then(parse_binary)
                .ok_or_else(|| negotiation("the target's CHAP challenge is missing or bad"))?;
            let response = chap_response(id as u8, chap.secret.as_bytes(), &challenge);
            let (next, _) = x
                .round(
                    stage::SECURITY,
                    Some(stage::OPERATIONAL),
                    &[
                        pair("CHAP_N", &chap.user),
                        pair("CHAP_R", hex_text(&response)),
                    ],
                )
                .await?;
            h = next;
        }
        ("None", _) => {
            if params.chap.is_some() && !h.transit {
                // The target chose no authentication; move on.
                let (next, _) = x
                    .round(stage::SECURITY, Some(stage::OPERATIONAL), &[])
                    .await?;
                h = next;
            }
        }
        ("Reject" | "NotUnderstood", _) | (_, None) => {
            return Err(negotiation(format!(
                "the target answered AuthMethod={method}"
            )))
        }
        (other, Some(_)) => {
            return Err(negotiation(format!(
                "the target chose AuthMethod={other}; Strata offers CHAP and None"
            )))
        }
    }
    // The target may have taken us straight to the full feature phase; normally it moves to
    // operational negotiation.
    let mut rounds = 0;
    while !(h.transit && h.nsg == stage::OPERATIONAL) && h.nsg != stage::FULL_FEATURE {
        rounds += 1;
        if rounds > MAX_ROUNDS {
            return Err(negotiation(
                "the target never finished security negotiation",
            ));
        }
        let (next, _) = x
            .round(stage::SECURITY, Some(stage::OPERATIONAL), &[])
            .await?;
        h = next;
    }

    // Operational negotiation.
    let mut neg = Negotiated {
        digests: Digests::default(),
        max_xmit_data_segment: 8192,
        max_recv_data_segment: params.max_recv_data_segment,
        max_burst: 262144,
        first_burst: 65536,
        immediate_data: true,
        initial_r2t: true,
        max_outstanding_r2t: 1,
        tsih: 0,
        cmd_sn: 1,
        exp_stat_sn: 0,
        max_cmd_sn: 1,
    };
    let digest = |on: bool| if on { "CRC32C" } else { "None" };
    let offered = vec![
        pair("HeaderDigest", digest(params.header_digest)),
        pair("DataDigest", digest(params.data_digest)),
        pair(
            "MaxRecvDataSegmentLength",
            params.max_recv_data_segment.to_string(),
        ),
        pair("MaxBurstLength", params.max_burst.to_string()),
        pair("FirstBurstLength", params.first_burst.to_string()),
        pair("ImmediateData", "Yes"),
        pair("InitialR2T", "No"),
        pair("MaxOutstandingR2T", params.max_outstanding_r2t.to_string()),
        pair("MaxConnections", "1"),
        pair("DataPDUInOrder", "Yes"),
        pair("DataSequenceInOrder", "Yes"),
        pair("DefaultTime2Wait", "0"),
        pair("DefaultTime2Retain", "0"),
        pair("ErrorRecoveryLevel", "0"),
    ];
    let mut answered: Vec<String> = Vec::new();
    let mut send = if h.nsg == stage::FULL_FEATURE {
        Vec::new()
    } else {
        offered.clone()
    };
    let mut done = h.nsg == stage::FULL_FEATURE;
    let mut rounds = 0;
    while !done {
        rounds += 1;
        if rounds > MAX_ROUNDS {
            return Err(negotiation(
                "the target never finished operational negotiation",
            ));
        }
        let (resp, pairs) = x
            .round(stage::OPERATIONAL, Some(stage::FULL_FEATURE), &send)
            .await?;
        send = Vec::new();
        for (k, v) in &pairs {
            let ours = offered
                .iter()
                .find(|(o, _)| o == k)
                .map(|(_, v)| v.as_str());
            apply(&mut neg, params, k, v, ours.is_some())?;
            // A key the target proposes that we did not offer needs an answer.
            if ours.is_none() && !is_declarative(k) && !answered.contains(k) {
                answered.push(k.clone());
                send.push(answer(params, k, v));
            }
        }
        done = resp.transit && resp.nsg == stage::FULL_FEATURE;
    }
    if params.header_digest && !neg.digests.header {
        return Err(negotiation("the target refused CRC32C header digests"));
    }
    if params.data_digest && !neg.digests.data {
        return Err(negotiation("the target refused CRC32C data digests"));
    }
    neg.tsih = x.tsih;
    neg.cmd_sn = x.cmd_sn;
    neg.exp_stat_sn = x.exp_stat_sn;
    neg.max_cmd_sn = x.max_cmd_sn;
    neg.first_burst = neg.first_burst.min(neg.max_burst);
    Ok(neg)
}

fn is_declarative(key: &str) -> bool {
    matches!(
        key,
        "MaxRecvDataSegmentLength"
            | "TargetAlias"
            | "TargetAddress"
            | "TargetPortalGroupTag"
            | "InitiatorAlias"
    )
}

/// Our answer to a key the target proposed.
fn answer(params: &LoginParams, key: &str, value: &str) -> (String, String) {
    let v = match key {
        "HeaderDigest" => (if params.header_digest {
            "CRC32C"
        } else {
            "None"
        })
        .to_string(),
        "DataDigest" => (if params.data_digest { "CRC32C" } else { "None" }).to_string(),
        "MaxBurstLength" => params.max_burst.to_string(),
        "FirstBurstLength" => params.first_burst.to_string(),
        "MaxOutstandingR2T" => params.max_outstanding_r2t.to_string(),
        "ImmediateData" => "Yes".into(),
        "InitialR2T" => "No".into(),
        "MaxConnections" => "1".into(),
        "DataPDUInOrder" | "DataSequenceInOrder" => "Yes".into(),
        "ErrorRecoveryLevel" | "DefaultTime2Wait" | "DefaultTime2Retain" => "0".into(),
        "IFMarker" | "OFMarker" => "No".into(),
        "IFMarkInt" | "OFMarkInt" => "Reject".into(),
        _ => {
            let _ = value;
            "NotUnderstood".into()
        }
    };
    (key.to_string(), v)
}

/// Fold one key of the target's response into the negotiated parameters.
fn apply(
    neg: &mut Negotiated,
    params: &LoginParams,
    key: &str,
    value: &str,
    offered: bool,
) -> Result<(), LoginError> {
    let number = |lo: u64, hi: u64| {
        parse_number(value)
            .filter(|n| (lo..=hi).contains(n))
            .map(|n| n as u32)
            .ok_or_else(|| negotiation(format!("the target answered {key}={value}")))
    };
    let boolean = || {
        parse_bool(value).ok_or_else(|| negotiation(format!("the target answered {key}={value}")))
    };
    let special = matches!(value, "Reject" | "Irrelevant" | "NotUnderstood");
    if special {
        // The default stays; digests are checked after negotiation.
        return Ok(());
    }
    match key {
        "HeaderDigest" | "DataDigest" => {
            let on = match value.split(',').next() {
                Some("CRC32C") => true,
                Some("None") => false,
                _ => return Err(negotiation(format!("the target answered {key}={value}"))),
            };
            let want = if key == "HeaderDigest" {
                params.header_digest
            } else {
                params.data_digest
            };
            // Strata offers exactly one value; the target may only pick it.
            let on = if offered { on && want } else { want };
            if key == "HeaderDigest" {
                neg.digests.header = on;
            } else {
                neg.digests.data = on;
            }
        }
        "MaxRecvDataSegmentLength" => neg.max_xmit_data_segment = number(512, (1 << 24) - 1)?,
        "MaxBurstLength" => neg.max_burst = number(512, (1 << 24) - 1)?.min(params.max_burst),
        "FirstBurstLength" => neg.first_burst = number(512, (1 << 24) - 1)?.min(params.first_burst),
        "MaxOutstandingR2T" => {
            neg.max_outstanding_r2t = number(1, 65535)?.min(params.max_outstanding_r2t)
        }
        "ImmediateData" => neg.immediate_data = boolean()?,
        "InitialR2T" => neg.initial_r2t = boolean()?,
        "DataPDUInOrder" | "DataSequenceInOrder" => {
            let in_order = boolean()?;
            if !in_order {
                return Err(negotiation(format!(
                    "the target wants {key}=No; Strata sends data in order only"
                )));
            }
        }
        "ErrorRecoveryLevel" => {
            let level = number(0, 2)?;
            if level != 0 {
                return Err(negotiation(format!(
                    "the target answered ErrorRecoveryLevel={value}; Strata runs at level 0"
                )));
            }
        }
        "MaxConnections" => {
            number(1, 65535)?;
        }
        _ => {}
    }
    Ok(())
}

/// The CHAP (MD5) response: MD5 over the identifier, the secret and the challenge.
pub fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chap_is_md5_of_id_secret_and_challenge() {
        // Computed independently: md5(b"\x01" + b"secret" + bytes(range(16))).
        let challenge: Vec<u8> = (0..16).collect();
        assert_eq!(
            hex_text(&chap_response(1, b"secret", &challenge)),
            "0x740e86463bda3a4d7017d6e0fba0699d"
        );
    }

    #[test]
    fn secrets_are_not_printed() {
        let c = Chap {
            user: "u".into(),
            secret: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn refusals_are_described() {
        let r = Refusal {
            class: 2,
            detail: 1,
        };
        assert!(r.is_auth());
        assert!(r.to_string().starts_with("authentication failed"));
        assert!(Refusal {
            class: 2,
            detail: 3
        }
        .is_not_found());
    }
}
