//! Errors: one [`Error`] type for every block device, carrying an [`ErrorKind`] that callers match
//! on and that maps to an errno (and so to an NBD, iSCSI or NVMe status) for the wire.

use std::borrow::Cow;
use std::fmt;

/// What kind of failure an I/O met. Every kind maps to one errno so that a target can answer its
/// client precisely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The medium or a peer failed (EIO).
    Io,
    /// No space left to complete a write (ENOSPC).
    NoSpace,
    /// A malformed request: bad alignment, bad flags, bad arguments (EINVAL).
    InvalidInput,
    /// The range reaches past the end of the device (EINVAL for reads, ENOSPC for writes on NBD).
    OutOfRange,
    /// The device or export is read-only, or the caller may not do this (EPERM).
    PermissionDenied,
    /// The device does not implement this operation, or cannot do it fast when asked to (ENOTSUP).
    Unsupported,
    /// The request is larger than the device accepts at once (EOVERFLOW).
    TooLarge,
    /// The operation did not complete in time; the peer may still be alive (EIO on the wire).
    TimedOut,
    /// The device is shutting down (ESHUTDOWN).
    Shutdown,
    /// A transaction cannot commit: a write it depends on was overtaken, or it was aborted
    /// (EPERM, as the NBD transaction extension answers).
    Conflict,
    /// What an administrative request names does not exist (an image, a snapshot). Never the
    /// outcome of I/O; reported as EINVAL if it reaches a wire.
    NotFound,
    /// What an administrative request would create exists already. Reported as EINVAL.
    AlreadyExists,
}

impl ErrorKind {
    /// The errno this kind is reported as.
    pub fn errno(self) -> i32 {
        match self {
            ErrorKind::Io | ErrorKind::TimedOut => libc_errno::EIO,
            ErrorKind::NoSpace => libc_errno::ENOSPC,
            ErrorKind::InvalidInput
            | ErrorKind::OutOfRange
            | ErrorKind::NotFound
            | ErrorKind::AlreadyExists => libc_errno::EINVAL,
            ErrorKind::PermissionDenied | ErrorKind::Conflict => libc_errno::EPERM,
            ErrorKind::Unsupported => libc_errno::ENOTSUP,
            ErrorKind::TooLarge => libc_errno::EOVERFLOW,
            ErrorKind::Shutdown => libc_errno::ESHUTDOWN,
        }
    }

    /// The kind an OS error number belongs to.
    pub fn from_errno(errno: i32) -> ErrorKind {
        match errno {
            libc_errno::ENOSPC | libc_errno::EDQUOT | libc_errno::EFBIG => ErrorKind::NoSpace,
            libc_errno::EINVAL => ErrorKind::InvalidInput,
            libc_errno::EPERM | libc_errno::EACCES | libc_errno::EROFS => {
                ErrorKind::PermissionDenied
            }
            libc_errno::ENOTSUP => ErrorKind::Unsupported,
            libc_errno::EOVERFLOW => ErrorKind::TooLarge,
            libc_errno::ETIMEDOUT => ErrorKind::TimedOut,
            libc_errno::ESHUTDOWN => ErrorKind::Shutdown,
            _ => ErrorKind::Io,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::NoSpace => "no space left",
            ErrorKind::InvalidInput => "invalid request",
            ErrorKind::OutOfRange => "beyond the end of the device",
            ErrorKind::PermissionDenied => "not permitted",
            ErrorKind::Unsupported => "not supported",
            ErrorKind::TooLarge => "request too large",
            ErrorKind::TimedOut => "timed out",
            ErrorKind::Shutdown => "shutting down",
            ErrorKind::Conflict => "transaction conflict",
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
        })
    }
}

/// Linux errno values, spelled out so that this crate needs no libc binding.
mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const EIO: i32 = 5;
    pub const EACCES: i32 = 13;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const EINVAL: i32 = 22;
    pub const EOVERFLOW: i32 = 75;
    pub const ENOTSUP: i32 = 95;
    pub const ESHUTDOWN: i32 = 108;
    pub const ETIMEDOUT: i32 = 110;
    pub const EDQUOT: i32 = 122;
}

/// A failed block-device operation: what failed (a verb phrase), its [`ErrorKind`], and the
/// underlying cause when there is one.
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
pub struct Error {
    kind: ErrorKind,
    context: Cow<'static, str>,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    /// An error of `kind`; `context` says what failed, e.g. "write 4096 bytes at offset 0".
    pub fn new(kind: ErrorKind, context: impl Into<Cow<'static, str>>) -> Error {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// An error caused by `source`.
    pub fn with_source(
        kind: ErrorKind,
        context: impl Into<Cow<'static, str>>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Error {
            kind,
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// An OS error, classified by its errno.
    pub fn io(context: impl Into<Cow<'static, str>>, source: std::io::Error) -> Error {
        let kind = match source.raw_os_error() {
            Some(errno) => ErrorKind::from_errno(errno),
            None => match source.kind() {
                std::io::ErrorKind::TimedOut => ErrorKind::TimedOut,
                std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
                std::io::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
                std::io::ErrorKind::Unsupported => ErrorKind::Unsupported,
                _ => ErrorKind::Io,
            },
        };
        Error::with_source(kind, context, source)
    }

    /// The kind, to match on.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The errno this error is reported as on the wire.
    pub fn errno(&self) -> i32 {
        self.kind.errno()
    }

    /// This error and its causes on one line, for logs and client messages.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cause = c.source();
        }
        out
    }
}

/// The result of a block-device operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_map_to_kinds_and_back() {
        let e = Error::io("write", std::io::Error::from_raw_os_error(28));
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert_eq!(e.errno(), 28);
        let e = Error::io("open", std::io::Error::from_raw_os_error(30));
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert_eq!(ErrorKind::OutOfRange.errno(), 22);
        assert_eq!(ErrorKind::TooLarge.errno(), 75);
    }

    #[test]
    fn chain_lists_causes_once() {
        let e = Error::io("read segment index", std::io::Error::other("disk on fire"));
        assert_eq!(e.to_string(), "read segment index");
        assert_eq!(e.chain(), "read segment index: disk on fire");
    }
}
