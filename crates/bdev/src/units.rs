//! Serde helpers for settings that people write by hand: sizes as a number of bytes or with a
//! binary unit (`"64M"`), durations as seconds (`30`, `0.5`). Every crate's settings struct uses
//! them, so a size or a duration reads the same in every section of a configuration file.
//!
//! ```
//! #[derive(serde::Deserialize)]
//! struct Settings {
//!     #[serde(with = "strata_bdev::units::size")]
//!     cache: u64,
//!     #[serde(with = "strata_bdev::units::secs")]
//!     timeout: std::time::Duration,
//! }
//! ```

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

/// The longest duration a setting may name: about 31 years. Anything longer is a mistake, and
/// refusing it keeps arithmetic on deadlines from overflowing.
pub const MAX_SECS: f64 = 1e9;

/// A duration written as text: a number of seconds, or with a unit (`"250ms"`, `"30s"`,
/// `"5m"`, `"1h"`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 30, \"500ms\" or \"5m\""))?;
    let scale = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 1e-3,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} (use ms, s, m or h)"
            ))
        }
    };
    duration_from_secs(n * scale)
}

/// A duration from seconds, refusing what is not a finite, non-negative number of seconds no
/// larger than [`MAX_SECS`].
pub fn duration_from_secs(secs: f64) -> Result<Duration, String> {
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{secs} is not a number of seconds (0 or more)"));
    }
    if secs > MAX_SECS {
        return Err(format!("{secs} seconds is more than {MAX_SECS} (31 years)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `u64` bytes: `4096`, `"64K"`, `"1GiB"`.
pub mod size {
    use super::*;

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(SizeVisitor)
    }

    struct SizeVisitor;

    impl Visitor<'_> for SizeVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size: a number of bytes, or a string such as \"64M\" or \"1G\"")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("size {v} is negative")))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
            Err(E::custom(format!(
                "size {v} is not a whole number of bytes"
            )))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            crate::parse_size(v).map_err(E::custom)
        }
    }
}

/// `Duration` as seconds: `30`, `0.25`.
pub mod secs {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(v.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(SecsVisitor)
    }

    pub(super) struct SecsVisitor;

    impl Visitor<'_> for SecsVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number of seconds, or a duration such as \"500ms\" or \"5m\"")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            duration_from_secs(v as f64).map_err(E::custom)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            duration_from_secs(v as f64).map_err(E::custom)
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            duration_from_secs(v).map_err(E::custom)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse_duration(v).map_err(E::custom)
        }
    }
}

/// `Option<Duration>` as seconds, absent (or `null`) for none.
pub mod secs_opt {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        struct OptVisitor;
        impl<'de> Visitor<'de> for OptVisitor {
            type Value = Option<Duration>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of seconds, or nothing")
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_any(secs::SecsVisitor).map(Some)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                secs::SecsVisitor.visit_u64(v).map(Some)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                secs::SecsVisitor.visit_i64(v).map(Some)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                secs::SecsVisitor.visit_f64(v).map(Some)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                secs::SecsVisitor.visit_str(v).map(Some)
            }
        }
        d.deserialize_option(OptVisitor)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Debug, serde::Deserialize, serde::Serialize, PartialEq)]
    struct S {
        #[serde(with = "size", default)]
        size: u64,
        #[serde(with = "secs", default)]
        every: Duration,
        #[serde(with = "secs_opt", default)]
        limit: Option<Duration>,
    }

    fn parse(json: &str) -> Result<S, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn sizes_and_durations_read_as_people_write_them() {
        let s = parse(r#"{"size": "64M", "every": "500ms", "limit": 30}"#).unwrap();
        assert_eq!(
            parse(r#"{"every": "2m"}"#).unwrap().every,
            Duration::from_secs(120)
        );
        assert_eq!(s.size, 64 << 20);
        assert_eq!(s.every, Duration::from_millis(500));
        assert_eq!(s.limit, Some(Duration::from_secs(30)));
        assert_eq!(parse(r#"{"size": 4096}"#).unwrap().size, 4096);
        assert_eq!(parse(r#"{"limit": null}"#).unwrap().limit, None);
        let back = serde_json::to_string(&s).unwrap();
        assert_eq!(parse(&back).unwrap(), s);
    }

    #[test]
    fn nonsense_is_refused_with_the_reason() {
        assert!(parse(r#"{"size": "12Q"}"#).unwrap_err().contains("unit"));
        assert!(parse(r#"{"size": -1}"#).unwrap_err().contains("negative"));
        assert!(parse(r#"{"size": 1.5}"#).unwrap_err().contains("whole"));
        assert!(parse(r#"{"every": -2}"#).unwrap_err().contains("seconds"));
        assert!(parse(r#"{"limit": 1e300}"#)
            .unwrap_err()
            .contains("31 years"));
    }
}
