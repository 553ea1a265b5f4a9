//! What the node plugin asks of the host: programs it runs (mount, mkfs, losetup, …), the mount
//! table (`/proc/self/mountinfo`), device numbers and sizes. Nothing here knows CSI.

use std::ffi::OsStr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use tonic::Status;
use tracing::debug;

/// Run `program` with `args`; its standard output, or an error with its standard error.
pub async fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<String, Status> {
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    debug!(program, args = ?shown, "run");
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| Status::internal(format!("run {program}: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Status::internal(format!(
            "{program} {}: {} {}",
            shown.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `major:minor` of the device the mount shows.
    pub dev: (u32, u32),
    /// The directory of that device's file system it shows.
    pub root: String,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`/`ro`, …).
    pub options: String,
    pub fs_type: String,
    pub source: String,
}

impl Mount {
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// `\040` and the like back into characters.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse the text of a mountinfo file.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 6 || r.len() < 2 {
                return None;
            }
            let (maj, min) = l[2].split_once(':')?;
            Some(Mount {
                dev: (maj.parse().ok()?, min.parse().ok()?),
                root: unescape(l[3]),
                mount_point: PathBuf::from(unescape(l[4])),
                options: l[5].to_string(),
                fs_type: r[0].to_string(),
                source: unescape(r[1]),
            })
        })
        .collect()
}

/// The mount table as it is now.
pub fn mounts() -> Result<Vec<Mount>, Status> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Status::internal(format!("read /proc/self/mountinfo: {e}")))?;
    Ok(parse_mountinfo(&text))
}

/// The topmost mount at `path`, if it is a mount point.
pub fn mounted_at(path: &Path) -> Result<Option<Mount>, Status> {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok(mounts()?.into_iter().rev().find(|m| m.mount_point == path))
}

/// The device number (`major:minor`) of a block device node.
pub fn rdev(device: &Path) -> Option<(u32, u32)> {
    let m = std::fs::metadata(device).ok()?;
    if !m.file_type().is_block_device() {
        return None;
    }
    let r = m.rdev();
    Some((libc::major(r), libc::minor(r)))
}

/// The size in bytes of a block device (or file).
pub fn size_of(device: &Path) -> Result<u64, Status> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(device)
        .map_err(|e| Status::internal(format!("open {}: {e}", device.display())))?;
    f.seek(SeekFrom::End(0))
        .map_err(|e| Status::internal(format!("size of {}: {e}", device.display())))
}

/// Unmount `path` while it is a mount point (stacked mounts too).
pub async fn unmount_all(path: &Path) -> Result<(), Status> {
    for _ in 0..16 {
        if mounted_at(path)?.is_none() {
            return Ok(());
        }
        run("umount", &[path]).await?;
    }
    Err(Status::internal(format!(
        "{} is still mounted after 16 unmounts",
        path.display()
    )))
}

/// Bytes and inodes of the file system holding `path`: (total, available, used) of each.
pub fn fs_usage(path: &Path) -> Result<([u64; 3], [u64; 3]), Status> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Status::invalid_argument("a path with a NUL byte"))?;
    // SAFETY: a zeroed statvfs is a valid out-parameter.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `s` is sized for the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(Status::internal(format!(
            "statvfs {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        )));
    }
    let f = s.f_frsize as u64;
    let bytes = [
        s.f_blocks as u64 * f,
        s.f_bavail as u64 * f,
        (s.f_blocks as u64 - s.f_bfree as u64) * f,
    ];
    let inodes = [
        s.f_files as u64,
        s.f_favail as u64,
        s.f_files as u64 - s.f_ffree as u64,
    ];
    Ok((bytes, inodes))
}

/// The file system type on a device, if any (`blkid`).
pub async fn fs_type_of(device: &Path) -> Result<Option<String>, Status> {
    let out = tokio::process::Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(device)
        .output()
        .await
        .map_err(|e| Status::internal(format!("run blkid: {e}")))?;
    // blkid exits 2 when it finds nothing.
    match out.status.code() {
        Some(0) => {
            let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
            Ok((!t.is_empty()).then_some(t))
        }
        Some(2) => Ok(None),
        _ => Err(Status::internal(format!(
            "blkid {}: {}",
            device.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn mountinfo_lines_parse() {
        let text = "36 35 98:0 /mnt1 /mnt/parent\\040dir rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 36 7:3 / /var/lib/k\\134x ro shared:2 - ext4 /dev/loop3 ro\n\
                    bogus line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/parent dir"));
        assert_eq!(m[0].dev, (98, 0));
        assert_eq!(m[1].mount_point, PathBuf::from("/var/lib/k\\x"));
        assert!(m[1].read_only() && !m[0].read_only());
        assert_eq!(
            (m[1].fs_type.as_str(), m[1].source.as_str()),
            ("ext4", "/dev/loop3")
        );
    }
}
