//! The control channel of one front-end, relayed message by message between the front-end's
//! socket and vhost-user-backend's message handler.
//!
//! ```text
//!  front-end ──socket──► relay ──socket pair──► vhost-user-backend (VhostUserDaemon)
//!            ◄─────────        ◄─────────────
//!            ◄── back-end channel (SET_BACKEND_REQ_FD, kept here): CONFIG_CHANGE_MSG
//! ```
//!
//! vhost-user-backend hands the back-end channel to a back end as a `vhost::Backend`, which has
//! no way to send `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`. So the relay keeps that one message
//! for itself (answering it as the protocol asks) and forwards every other message, with its
//! file descriptors, unchanged. It also bounds what reaches the handler: a header claiming more
//! than [`MAX_PAYLOAD`] bytes ends the connection. The data path (shared memory, eventfds)
//! never crosses the relay.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tracing::debug;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// A vhost-user message header: request (le32), flags (le32), payload size (le32).
const HEADER_LEN: usize = 12;
/// The largest payload of any vhost-user message (the vhost crate's limit, 4 KiB).
pub(crate) const MAX_PAYLOAD: usize = vhost::vhost_user::message::MAX_MSG_SIZE;
/// The most file descriptors one message carries.
const MAX_FDS: usize = vhost::vhost_user::message::MAX_ATTACHED_FD_ENTRIES;

/// Front-end requests the relay looks at.
const SET_BACKEND_REQ_FD: u32 = 21;
/// The back-end request that announces a configuration change.
const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;

/// Header flags.
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// One framed message: header, payload, and the descriptors that came with it.
struct Message {
    header: [u8; HEADER_LEN],
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes([
            self.header[0],
            self.header[1],
            self.header[2],
            self.header[3],
        ])
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes([
            self.header[4],
            self.header[5],
            self.header[6],
            self.header[7],
        ])
    }
}

/// Reads one message; `Ok(None)` at a clean end of stream.
fn read_message(stream: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER_LEN];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    }];
    // SAFETY: the iovec points at `header`, which lives across the call and may take any bytes.
    let (read, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fds: Vec<OwnedFd> = raw_fds[..nfds]
        .iter()
        // SAFETY: recvmsg handed us these descriptors; nothing else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if read == 0 {
        return Ok(None);
    }
    if read < HEADER_LEN {
        (&*stream).read_exact(&mut header[read..])?;
    }
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a vhost-user message of {size} bytes (the limit is {MAX_PAYLOAD})"),
        ));
    }
    let mut payload = vec![0u8; size];
    (&*stream).read_exact(&mut payload)?;
    Ok(Some(Message {
        header,
        payload,
        fds,
    }))
}

/// Writes one message with its descriptors.
fn write_message(stream: &UnixStream, message: &Message) -> io::Result<()> {
    let raw: Vec<RawFd> = message.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut bytes = Vec::with_capacity(HEADER_LEN + message.payload.len());
    bytes.extend_from_slice(&message.header);
    bytes.extend_from_slice(&message.payload);
    let sent = stream
        .send_with_fds(&[&bytes[..]], &raw)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if sent < bytes.len() {
        (&*stream).write_all(&bytes[sent..])?;
    }
    Ok(())
}

/// The back-end channel the front-end gave (SET_BACKEND_REQ_FD), if it gave one.
#[derive(Debug, Default)]
pub(crate) struct BackendChannel {
    stream: Mutex<Option<UnixStream>>,
}

impl BackendChannel {
    fn lock(&self) -> MutexGuard<'_, Option<UnixStream>> {
        self.stream
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set(&self, stream: UnixStream) {
        *self.lock() = Some(stream);
    }

    /// Tells the front-end that the configuration space changed (it reads it again and, for a
    /// new capacity, raises the guest's config interrupt). `Ok(false)` when the front-end gave
    /// no back-end channel. Asks for no reply, so that a front-end that never reads the channel
    /// cannot block the caller beyond a full socket buffer (the write does not wait).
    pub(crate) fn config_changed(&self) -> io::Result<bool> {
        let guard = self.lock();
        let Some(stream) = guard.as_ref() else {
            return Ok(false);
        };
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&BACKEND_CONFIG_CHANGE_MSG.to_le_bytes());
        header[4..8].copy_from_slice(&FLAG_VERSION_1.to_le_bytes());
        // SAFETY: `header` is a valid buffer of HEADER_LEN bytes for the duration of the call.
        let sent = unsafe {
            libc::send(
                stream.as_raw_fd(),
                header.as_ptr().cast(),
                header.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        if sent as usize != HEADER_LEN {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the back-end channel took part of a message",
            ));
        }
        Ok(true)
    }
}

/// A running relay: two threads, one per direction. Each ends at the end of its input, shuts
/// the other socket down so that its partner ends too, and the front-to-back one signals
/// `done` as it goes.
#[derive(Debug)]
pub(crate) struct Relay {
    front: Arc<UnixStream>,
    back: Arc<UnixStream>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Starts relaying between `front` (the front-end) and `back` (vhost-user-backend).
    pub(crate) fn start(
        name: &str,
        front: UnixStream,
        back: UnixStream,
        channel: Arc<BackendChannel>,
        done: EventFd,
    ) -> io::Result<Relay> {
        let front = Arc::new(front);
        let back = Arc::new(back);
        // Both directions write to the front-end: replies from the handler, and the relay's own
        // answers to SET_BACKEND_REQ_FD. One lock keeps their messages whole.
        let front_writer = Arc::new(Mutex::new(()));
        let mut threads = Vec::with_capacity(2);
        {
            let (front, back, writer) = (front.clone(), back.clone(), front_writer.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("vu-relay-in/{name}"))
                    .spawn(move || {
                        if let Err(e) = front_to_back(&front, &back, &channel, &writer) {
                            debug!(error = %e, "vhost-user control channel from the front-end ended");
                        }
                        let _ = back.shutdown(Shutdown::Both);
                        let _ = front.shutdown(Shutdown::Both);
                        let _ = done.write(1);
                    })?,
            );
        }
        {
            let (thread_front, thread_back) = (front.clone(), back.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("vu-relay-out/{name}"))
                .spawn(move || {
                    if let Err(e) = back_to_front(&thread_back, &thread_front, &front_writer) {
                        debug!(error = %e, "vhost-user control channel to the front-end ended");
                    }
                    let _ = thread_front.shutdown(Shutdown::Both);
                    let _ = thread_back.shutdown(Shutdown::Both);
                });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    let _ = front.shutdown(Shutdown::Both);
                    let _ = back.shutdown(Shutdown::Both);
                    return Err(e);
                }
            }
        }
        Ok(Relay {
            front,
            back,
            threads,
        })
    }

    /// Cuts the front-end off: both threads end.
    pub(crate) fn disconnect(&self) {
        let _ = self.front.shutdown(Shutdown::Both);
        let _ = self.back.shutdown(Shutdown::Both);
    }

    /// Waits for both threads.
    pub(crate) fn join(mut self) {
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn lock(writer: &Mutex<()>) -> MutexGuard<'_, ()> {
    writer
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn front_to_back(
    front: &UnixStream,
    back: &UnixStream,
    channel: &BackendChannel,
    writer: &Mutex<()>,
) -> io::Result<()> {
    while let Some(mut message) = read_message(front)? {
        if message.request() != SET_BACKEND_REQ_FD {
            write_message(back, &message)?;
            continue;
        }
        // Keep the channel; the handler never sees it.
        let ok = match (message.fds.pop(), message.fds.is_empty()) {
            (Some(fd), true) => {
                channel.set(UnixStream::from(fd));
                true
            }
            _ => false,
        };
        if message.flags() & FLAG_NEED_REPLY != 0 {
            let mut header = [0u8; HEADER_LEN];
            header[0..4].copy_from_slice(&SET_BACKEND_REQ_FD.to_le_bytes());
            header[4..8].copy_from_slice(&(FLAG_VERSION_1 | FLAG_REPLY).to_le_bytes());
            header[8..12].copy_from_slice(&8u32.to_le_bytes());
            let reply = Message {
                header,
                payload: u64::from(!ok).to_le_bytes().to_vec(),
                fds: Vec::new(),
            };
            let _guard = lock(writer);
            write_message(front, &reply)?;
        }
        if !ok {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "SET_BACKEND_REQ_FD without exactly one descriptor",
            ));
        }
    }
    Ok(())
}

fn back_to_front(back: &UnixStream, front: &UnixStream, writer: &Mutex<()>) -> io::Result<()> {
    while let Some(message) = read_message(back)? {
        let _guard = lock(writer);
        write_message(front, &message)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&request.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn forwards_messages_and_keeps_the_backend_channel() {
        let (mut qemu, front) = UnixStream::pair().expect("socket pair");
        let (back, mut handler) = UnixStream::pair().expect("socket pair");
        let channel = Arc::new(BackendChannel::default());
        let done = EventFd::new(0).expect("eventfd");
        let relay = Relay::start("t", front, back, channel.clone(), done.try_clone().unwrap())
            .expect("relay");

        // An ordinary request reaches the handler, its reply the front-end.
        qemu.write_all(&message(1, FLAG_VERSION_1, &[])).unwrap();
        let mut got = [0u8; 12];
        handler.read_exact(&mut got).unwrap();
        assert_eq!(got.to_vec(), message(1, FLAG_VERSION_1, &[]));
        handler
            .write_all(&message(
                1,
                FLAG_VERSION_1 | FLAG_REPLY,
                &7u64.to_le_bytes(),
            ))
            .unwrap();
        let mut reply = [0u8; 20];
        qemu.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[12..], &7u64.to_le_bytes());

        // SET_BACKEND_REQ_FD is kept and acknowledged, and config changes then go out on it.
        assert!(!channel.config_changed().unwrap());
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        qemu.send_with_fds(
            &[&message(SET_BACKEND_REQ_FD, FLAG_VERSION_1 | FLAG_NEED_REPLY, &[])[..]],
            &[ours.as_raw_fd()],
        )
        .unwrap();
        drop(ours);
        let mut ack = [0u8; 20];
        qemu.read_exact(&mut ack).unwrap();
        assert_eq!(&ack[0..4], &SET_BACKEND_REQ_FD.to_le_bytes());
        assert_eq!(&ack[12..], &0u64.to_le_bytes());
        assert!(channel.config_changed().unwrap());
        let mut change = [0u8; 12];
        theirs.read_exact(&mut change).unwrap();
        assert_eq!(&change[0..4], &BACKEND_CONFIG_CHANGE_MSG.to_le_bytes());

        // An oversized message ends the relay.
        qemu.write_all(&message(1, FLAG_VERSION_1, &[])[..8])
            .unwrap();
        qemu.write_all(&(1u32 << 20).to_le_bytes()).unwrap();
        relay.join();
        assert_eq!(done.read().unwrap(), 1);
        let mut rest = Vec::new();
        handler.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "the handler saw {rest:?}");
    }
}
