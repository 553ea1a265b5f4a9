//! The command protocol over the guest's serial console (pure: no I/O).
//!
//! The guest's init (`init.sh`) turns echo off on the console and reads lines:
//!
//! ```text
//! host → guest   @@PART <id> <base64 chunk>     (repeated: a command of any length and bytes)
//!                @@RUN <id>                     decode the chunks into a script, run it with sh
//! guest → host   @@BEGIN <id>\n<output of the script, stdout and stderr>\n@@END <id> <status>\n
//!                @@POWEROFF                     sync and power off
//! ```
//!
//! Commands travel base64-encoded in short lines, so no byte of them is taken for a tty control
//! character and no line exceeds the tty's 4 KiB line buffer; replies are found by their id, so
//! whatever else reaches the console (kernel messages, a late reply to a command that timed out)
//! is never taken for an answer. Kernel messages are turned down (`dmesg -n 1`) at boot.

/// The line the guest prints when it is ready for commands.
pub const READY: &str = "@@STRATA READY";
/// The prefix of a line saying a kernel module did not load at boot.
pub const MODULE_FAILED: &str = "@@MODFAIL ";
/// The prefix of a line saying a boot step (network, configfs, …) failed.
pub const SETUP_FAILED: &str = "@@SETUPFAIL ";
/// The line that asks the guest to power off.
pub const POWEROFF: &str = "@@POWEROFF\n";

/// Base64 characters per `@@PART` line: well under the tty's 4095-byte line limit.
const CHUNK: usize = 768;

/// The lines that send `command` as command `id`.
pub fn encode_command(id: u64, command: &str) -> String {
    let encoded = base64(command.as_bytes());
    let mut out = String::with_capacity(encoded.len() + 64);
    for chunk in encoded.as_bytes().chunks(CHUNK) {
        out.push_str(&format!("@@PART {id} "));
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("@@RUN {id}\n"));
    out
}

/// How far command `id` has got, as seen in the console log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The guest has not started it yet.
    Queued,
    /// Started; this is its output so far.
    Running(String),
    /// Finished with this exit status and output.
    Done { status: i32, output: String },
}

/// Where command `id` stands in `log`, looking only at bytes from `from` on.
pub fn progress(log: &[u8], from: usize, id: u64) -> Progress {
    let log = &log[from.min(log.len())..];
    let begin = format!("@@BEGIN {id}\n");
    let Some(start) = find(log, begin.as_bytes()) else {
        return Progress::Queued;
    };
    let body = &log[start + begin.len()..];
    let end = format!("\n@@END {id} ");
    let Some(stop) = find(body, end.as_bytes()) else {
        return Progress::Running(String::from_utf8_lossy(body).into_owned());
    };
    let rest = &body[stop + end.len()..];
    let Some(newline) = rest.iter().position(|&b| b == b'\n') else {
        // The status line is still arriving.
        return Progress::Running(String::from_utf8_lossy(&body[..stop]).into_owned());
    };
    let status = String::from_utf8_lossy(&rest[..newline]);
    let status = status.trim().parse().unwrap_or(-1);
    Progress::Done {
        status,
        output: String::from_utf8_lossy(&body[..stop]).into_owned(),
    }
}

/// The lines of `log` that start with `prefix`, without it.
pub fn lines_starting(log: &[u8], prefix: &str) -> Vec<String> {
    String::from_utf8_lossy(log)
        .lines()
        .filter_map(|line| line.trim_end_matches('\r').strip_prefix(prefix))
        .map(str::to_string)
        .collect()
}

/// Whether `log` has `line` as a whole line.
pub fn has_line(log: &[u8], line: &str) -> bool {
    String::from_utf8_lossy(log)
        .lines()
        .any(|l| l.trim_end_matches('\r') == line)
}

/// The last `lines` lines of `log`.
pub fn tail(log: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(log);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `text` quoted for a POSIX shell.
pub fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for group in data.chunks(3) {
        let bytes = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let word = u32::from(bytes[0]) << 16 | u32::from(bytes[1]) << 8 | u32::from(bytes[2]);
        for index in 0..4 {
            if index <= group.len() {
                out.push(char::from(
                    ALPHABET[(word >> (18 - 6 * index) & 63) as usize],
                ));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn long_commands_are_split_into_short_lines() {
        let command = "echo x; ".repeat(1000);
        let lines = encode_command(7, &command);
        let lines: Vec<&str> = lines.lines().collect();
        assert!(lines.len() > 2);
        assert!(lines.iter().all(|line| line.len() < 1024));
        assert_eq!(lines.last(), Some(&"@@RUN 7"));
        let joined: String = lines[..lines.len() - 1]
            .iter()
            .map(|line| line.strip_prefix("@@PART 7 ").expect("part line"))
            .collect();
        assert_eq!(joined, base64(command.as_bytes()));
    }

    #[test]
    fn replies_are_found_by_id() {
        let log = b"boot noise\n@@BEGIN 1\nold\n@@END 1 0\n@@BEGIN 11\nhello\n\n@@END 11 3\n";
        assert_eq!(
            progress(log, 0, 11),
            Progress::Done {
                status: 3,
                output: "hello\n".into()
            }
        );
        assert_eq!(
            progress(log, 0, 1),
            Progress::Done {
                status: 0,
                output: "old".into()
            }
        );
        assert_eq!(progress(log, 0, 2), Progress::Queued);
        assert_eq!(
            progress(b"@@BEGIN 2\npart", 0, 2),
            Progress::Running("part".into())
        );
        assert_eq!(
            progress(b"@@BEGIN 2\nout\n@@END 2 ", 0, 2),
            Progress::Running("out".into())
        );
        // Output before `from` is not looked at.
        assert_eq!(progress(log, 20, 1), Progress::Queued);
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }
}
