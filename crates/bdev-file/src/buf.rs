//! I/O buffers that own their memory, so that an engine can hand a raw pointer to the kernel and
//! keep the buffer alive and unmoved (the heap block never moves) until the kernel is done.
//!
//! Allocation is fallible here: a request for a huge buffer becomes an error, not an abort.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

use bytes::Bytes;

/// A zeroed heap allocation aligned for `O_DIRECT`.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively (like a `Box<[u8]>`); nothing aliases it.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only read the bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zeroed bytes aligned to `align` (a power of two); `None` if `len` is 0 or the
    /// allocation fails.
    pub(crate) fn zeroed(len: usize, align: usize) -> Option<AlignedBuf> {
        if len == 0 {
            return None;
        }
        let layout = Layout::from_size_align(len, align).ok()?;
        // SAFETY: the layout has a non-zero size (checked above).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        NonNull::new(ptr).map(|ptr| AlignedBuf { ptr, layout })
    }

    /// A copy of `data` in an aligned buffer (a bounce buffer for unaligned direct writes).
    pub(crate) fn copy_of(data: &[u8], align: usize) -> Option<AlignedBuf> {
        let mut buf = AlignedBuf::zeroed(data.len(), align)?;
        buf.as_mut_slice().copy_from_slice(data);
        Some(buf)
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points at `layout.size()` initialised (zeroed, then written) bytes that
        // this buffer owns for its whole life.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed` with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

/// A zeroed `Vec<u8>` of `len` bytes, or `None` if the allocation fails. Zeroed memory comes from
/// `calloc`, which gets large buffers as fresh (already zero) pages; it also means a read that
/// meets the end of the file leaves zeroes behind, and no uninitialised byte is ever exposed.
fn zeroed_vec(len: usize) -> Option<Vec<u8>> {
    if len == 0 {
        return Some(Vec::new());
    }
    let layout = Layout::array::<u8>(len).ok()?;
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: `ptr` came from the global allocator with the layout of `[u8; len]`, which is what
    // a `Vec<u8>` of capacity `len` owns, and its `len` bytes are initialised (zero).
    Some(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// The destination of a read: plain heap memory, or aligned memory for `O_DIRECT`.
pub(crate) enum ReadBuf {
    Plain(Vec<u8>),
    Aligned(AlignedBuf),
}

impl ReadBuf {
    /// `len` zeroed bytes, aligned to `align` when given.
    pub(crate) fn zeroed(len: usize, align: Option<usize>) -> Option<ReadBuf> {
        match align {
            Some(align) => AlignedBuf::zeroed(len, align).map(ReadBuf::Aligned),
            None => zeroed_vec(len).map(ReadBuf::Plain),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            ReadBuf::Plain(v) => v,
            ReadBuf::Aligned(a) => a.as_slice(),
        }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            ReadBuf::Plain(v) => v,
            ReadBuf::Aligned(a) => a.as_mut_slice(),
        }
    }

    /// The filled buffer as `Bytes`, without copying (a `Vec` whose length is its capacity
    /// converts for free; an aligned buffer costs one small allocation for its owner record).
    pub(crate) fn into_bytes(self) -> Bytes {
        match self {
            ReadBuf::Plain(v) => Bytes::from(v),
            ReadBuf::Aligned(a) => Bytes::from_owner(a),
        }
    }
}

/// The source of a write: the caller's `Bytes` as given, or an aligned bounce copy.
pub(crate) enum WriteBuf {
    Bytes(Bytes),
    Aligned(AlignedBuf),
}

impl WriteBuf {
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            WriteBuf::Bytes(b) => b,
            WriteBuf::Aligned(a) => a.as_slice(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.as_slice().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_zeroed_and_convert() {
        let buf = AlignedBuf::zeroed(8192, 4096).unwrap();
        assert_eq!(buf.as_slice().as_ptr() as usize % 4096, 0);
        assert!(buf.as_slice().iter().all(|&b| b == 0));
        let copy = AlignedBuf::copy_of(b"hello", 512).unwrap();
        assert_eq!(copy.as_slice(), b"hello");
        let bytes = ReadBuf::Aligned(copy).into_bytes();
        assert_eq!(&bytes[..], b"hello");
        assert!(AlignedBuf::zeroed(0, 512).is_none());
        assert!(ReadBuf::zeroed(usize::MAX / 2, None).is_none());
        assert_eq!(ReadBuf::zeroed(3, None).unwrap().into_bytes(), vec![0u8; 3]);
    }
}
