//! Access tokens: HS256 JWTs (RFC 7519) as the MVPS transaction engine takes them, whose claims
//! select a page-store image and authorize a client to use it.

use anyhow::{anyhow, bail};
use base64::Engine;

/// Verifies access tokens: HS256 JWTs (RFC 7519) as the MVPS transaction engine takes them.
#[derive(Debug)]
pub struct Jwt {
    key: ring::hmac::Key,
    store: String,
}

/// What a token grants.
#[derive(Debug, serde::Deserialize)]
pub struct Claims {
    pub image_id: String,
    pub image_size: u64,
    pub page_size_bits: u32,
    pub exp: u64,
    /// Not valid before this Unix time.
    #[serde(default)]
    pub nbf: Option<u64>,
    #[serde(default)]
    pub client_id: Option<String>,
}

impl Jwt {
    pub fn new(secret: &[u8], store: &str) -> Jwt {
        Jwt {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
            store: store.to_string(),
        }
    }

    /// What every image id a token names ends with.
    pub const IMAGE_SUFFIX: &'static str = ".mvps-image";

    /// The store token images live in.
    pub fn store(&self) -> &str {
        &self.store
    }

    /// Whether an export name has the shape of a token (and is not an image or volume name).
    pub fn looks_like(name: &str) -> bool {
        name.split('.').count() == 3
            && name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            && name.starts_with("eyJ")
    }

    /// Check a token's form, signature, expiry and claims.
    pub fn verify(&self, token: &str) -> anyhow::Result<Claims> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            bail!("access token: not a JWT (three base64url parts)");
        };
        let header: serde_json::Value = b64
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| anyhow!("access token: malformed header"))?;
        if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
            bail!("access token: only HS256-signed tokens are accepted");
        }
        let sig = b64
            .decode(sig)
            .map_err(|_| anyhow!("access token: malformed signature"))?;
        ring::hmac::verify(&self.key, format!("{h}.{p}").as_bytes(), &sig)
            .map_err(|_| anyhow!("access token: bad signature (signed with another secret?)"))?;
        let payload = b64
            .decode(p)
            .map_err(|_| anyhow!("access token: malformed payload"))?;
        let c: Claims =
            serde_json::from_slice(&payload).map_err(|e| anyhow!("access token: claims: {e}"))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Some(nbf) = c.nbf.filter(|&nbf| nbf > now) {
            bail!("access token: not valid before {nbf} (now {now})");
        }
        if c.exp <= now {
            bail!("access token: expired at {} (now {now})", c.exp);
        }
        let stem = c.image_id.strip_suffix(Self::IMAGE_SUFFIX).unwrap_or("");
        let ok = (1..=64).contains(&stem.len())
            && stem
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
        if !ok {
            bail!(
                "access token: image_id {:?} must be 1 to 64 of A-Z a-z 0-9 - _ followed by .mvps-image",
                c.image_id
            );
        }
        if !(9..=16).contains(&c.page_size_bits) {
            bail!(
                "access token: page_size_bits {} must be 9 to 16",
                c.page_size_bits
            );
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn token(secret: &[u8], claims: serde_json::Value) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let h = b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let p = b64.encode(claims.to_string());
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let sig = b64.encode(ring::hmac::sign(&key, format!("{h}.{p}").as_bytes()).as_ref());
        format!("{h}.{p}.{sig}")
    }

    #[test]
    fn tokens_are_checked_whole() {
        let jwt = Jwt::new(b"secret", "local");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = |extra: serde_json::Value| {
            let mut c = serde_json::json!({
                "image_id": "a.mvps-image", "image_size": 1048576, "page_size_bits": 12,
                "exp": now + 600
            });
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            c
        };
        jwt.verify(&token(b"secret", claims(serde_json::json!({}))))
            .unwrap();
        let e = jwt
            .verify(&token(
                b"secret",
                claims(serde_json::json!({"nbf": now + 600})),
            ))
            .unwrap_err();
        assert!(e.to_string().contains("not valid before"), "{e}");
        jwt.verify(&token(
            b"secret",
            claims(serde_json::json!({"nbf": now - 1})),
        ))
        .unwrap();
        let e = jwt
            .verify(&token(b"other", claims(serde_json::json!({}))))
            .unwrap_err();
        assert!(e.to_string().contains("bad signature"), "{e}");
        let e = jwt
            .verify(&token(
                b"secret",
                claims(serde_json::json!({"exp": now - 1})),
            ))
            .unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");
    }
}
