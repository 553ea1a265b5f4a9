//! A raw NBD client over a TCP socket, for what no packaged client speaks: the transaction
//! commands (64–67) and option replies' error messages.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub const BEGIN_TXN: u16 = 64;
pub const COMMIT_TXN: u16 = 65;
pub const ROLLBACK_TXN: u16 = 66;
pub const LOCK_TXN: u16 = 67;
pub const READ: u16 = 0;
pub const WRITE: u16 = 1;
pub const FLUSH: u16 = 3;

pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// NBD_REP_ERR_POLICY and NBD_REP_ERR_UNKNOWN.
pub const REP_ERR_POLICY: u32 = (1 << 31) | 2;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;

pub struct RawNbd {
    s: TcpStream,
    cookie: u64,
    pub size: u64,
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes(b[i..i + 2].try_into().expect("2 bytes"))
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

impl RawNbd {
    /// Connect to `addr` and select `export` with NBD_OPT_GO. `Err((reply type, message))`
    /// if the server refuses it.
    pub fn connect(addr: &str, export: &str) -> Result<RawNbd, (u32, String)> {
        let mut s = TcpStream::connect(addr).expect("connect to the server");
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .expect("set a read timeout");
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).expect("read the greeting");
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        // Fixed newstyle, no zeroes.
        s.write_all(&3u32.to_be_bytes()).expect("send client flags");
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        // One information request: NBD_INFO_BLOCK_SIZE (page-store exports need it).
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&3u16.to_be_bytes());
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt).expect("send NBD_OPT_GO");
        let mut size = 0;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).expect("read an option reply");
            assert_eq!(u64_at(&h, 0), 0x3e889045565a9, "option reply magic");
            let kind = u32_at(&h, 12);
            let mut payload = vec![0u8; u32_at(&h, 16) as usize];
            s.read_exact(&mut payload).expect("read an option reply");
            match kind {
                1 => break, // ACK
                3 if u16_at(&payload, 0) == 0 => size = u64_at(&payload, 2),
                3 => {}
                k if k & (1 << 31) != 0 => {
                    return Err((k, String::from_utf8_lossy(&payload).into_owned()))
                }
                k => panic!("unexpected option reply type {k}"),
            }
        }
        Ok(RawNbd { s, cookie: 0, size })
    }

    /// Send one request and wait for its simple reply: `(error, data)`. An I/O error means
    /// the server closed the connection.
    pub fn request(
        &mut self,
        command: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> std::io::Result<(u32, Vec<u8>)> {
        self.cookie += 1;
        let mut r = Vec::with_capacity(28 + payload.len());
        r.extend_from_slice(&0x25609513u32.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&command.to_be_bytes());
        r.extend_from_slice(&self.cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&length.to_be_bytes());
        r.extend_from_slice(payload);
        self.s.write_all(&r)?;
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        assert_eq!(u32_at(&h, 0), 0x67446698, "simple reply magic");
        assert_eq!(u64_at(&h, 8), self.cookie, "reply to this request");
        let error = u32_at(&h, 4);
        let mut data = Vec::new();
        if command == READ && error == 0 {
            data = vec![0u8; length as usize];
            self.s.read_exact(&mut data)?;
        }
        Ok((error, data))
    }

    /// Send requests back to back without waiting, then read their simple replies in order
    /// (errors; no reads among them).
    pub fn pipeline(&mut self, reqs: &[(u16, u64, &[u8])]) -> Vec<u32> {
        let mut out = Vec::new();
        for (command, offset, payload) in reqs {
            self.cookie += 1;
            out.extend_from_slice(&0x25609513u32.to_be_bytes());
            out.extend_from_slice(&0u16.to_be_bytes());
            out.extend_from_slice(&command.to_be_bytes());
            out.extend_from_slice(&self.cookie.to_be_bytes());
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            out.extend_from_slice(payload);
        }
        self.s.write_all(&out).expect("send requests");
        let first = self.cookie + 1 - reqs.len() as u64;
        (0..reqs.len() as u64)
            .map(|i| {
                let mut h = [0u8; 16];
                self.s.read_exact(&mut h).expect("read a reply");
                assert_eq!(u64_at(&h, 8), first + i, "replies come in order");
                u32_at(&h, 4)
            })
            .collect()
    }

    /// [`request`](Self::request) on a connection that must stay open.
    pub fn cmd(&mut self, command: u16, offset: u64, length: u32, payload: &[u8]) -> u32 {
        self.request(command, offset, length, payload)
            .expect("the server answers")
            .0
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.cmd(WRITE, offset, data.len() as u32, data)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let (e, d) = self
            .request(READ, offset, len, &[])
            .expect("the server answers");
        assert_eq!(e, 0, "read at {offset}");
        d
    }
}
