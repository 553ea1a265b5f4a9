//! How Strata writes numbers and progress for people: byte counts, durations, progress bars.
//! The daemon's messages and the CLI's tables use the same words.

use std::io::{IsTerminal, Write};

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[derive(Debug)]
pub struct Bar {
    what: String,
    unit: &'static str,
    tty: bool,
    last: Option<u64>,
}

impl Bar {
    pub fn new(what: &str, unit: &'static str) -> Bar {
        Bar {
            what: what.to_string(),
            unit,
            tty: std::io::stderr().is_terminal(),
            last: None,
        }
    }

    pub fn update(&mut self, done: u64, total: u64, detail: &str) {
        let pct = (done * 100).checked_div(total).unwrap_or(100).min(100);
        let amount = if self.unit == "bytes" {
            format!("{} of {}", human_bytes(done), human_bytes(total))
        } else {
            format!("{done} of {total} {}", self.unit)
        };
        let mut err = std::io::stderr();
        if self.tty {
            let filled = (pct as usize * 30 / 100).min(30);
            let _ = write!(
                err,
                "\r\x1b[2K{} [{}{}] {pct}% ({amount}){detail}",
                self.what,
                "#".repeat(filled),
                ".".repeat(30 - filled)
            );
            let _ = err.flush();
        } else if self.last != Some(pct / 10) {
            let _ = writeln!(err, "{}: {pct}% ({amount}){detail}", self.what);
            self.last = Some(pct / 10);
        }
    }

    pub fn finish(&self) {
        if self.tty {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// "5 s ago", "3 min ago", "2 h ago", "4 days ago" for a Unix time in seconds.
pub fn when(secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let ago = now.saturating_sub(secs);
    match ago {
        0..=119 => format!("{ago} s ago"),
        120..=7199 => format!("{} min ago", ago / 60),
        7200..=172_799 => format!("{} h ago", ago / 3600),
        _ => format!("{} days ago", ago / 86400),
    }
}

/// "1:02:03" for seconds.
pub fn clock(secs: f64) -> String {
    let s = secs.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}
