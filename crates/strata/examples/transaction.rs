//! Write pages atomically on a page-store export with the NBD transaction commands (64–67),
//! over a raw socket: `transaction HOST:PORT EXPORT`. Commits pages 0 and 1 filled with `R`.
//!
//! The two functions after `main` are the client; the README shows them.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (addr, export) = (&args[1], &args[2]);
    let mut s = TcpStream::connect(addr)?;
    negotiate(&mut s, export)?;
    let page = vec![b'R'; 4096];
    if transact(&mut s, &[(0, page.clone()), (4096, page)])? {
        println!("committed");
    } else {
        println!("conflict: rolled back");
    }
    Ok(())
}

/// Fixed-newstyle negotiation: NBD_OPT_GO for `export`, asking for its block sizes.
fn negotiate(s: &mut TcpStream, export: &str) -> std::io::Result<()> {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting)?;
    s.write_all(&3u32.to_be_bytes())?; // fixed newstyle, no zeroes
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&[0, 1, 0, 3]); // one info request: NBD_INFO_BLOCK_SIZE
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
    opt.extend_from_slice(&data);
    s.write_all(&opt)?;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut payload = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        s.read_exact(&mut payload)?;
        match kind {
            1 => return Ok(()), // NBD_REP_ACK
            k if k & (1 << 31) != 0 => {
                let why = String::from_utf8_lossy(&payload);
                return Err(std::io::Error::other(format!("export refused: {why}")));
            }
            _ => {} // NBD_REP_INFO
        }
    }
}

/// Send one NBD request and return its error (0 = success).
fn request(
    s: &mut (impl Read + Write),
    cookie: u64,
    command: u16,
    offset: u64,
    data: &[u8],
) -> std::io::Result<u32> {
    let mut r = Vec::with_capacity(28 + data.len());
    r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&command.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&(data.len() as u32).to_be_bytes());
    r.extend_from_slice(data);
    s.write_all(&r)?;
    let mut h = [0u8; 16];
    s.read_exact(&mut h)?;
    Ok(u32::from_be_bytes(h[4..8].try_into().unwrap()))
}

/// Write `pages` (offset, bytes) atomically: Ok(true) committed, Ok(false) conflict, rolled back.
fn transact(s: &mut (impl Read + Write), pages: &[(u64, Vec<u8>)]) -> std::io::Result<bool> {
    request(s, 1, 64, 0, &[])?; // BEGIN_TXN
    for (i, (offset, data)) in pages.iter().enumerate() {
        request(s, 2 + i as u64, 1, *offset, data)?; // WRITE
    }
    if request(s, 1000, 67, 0, &[])? != 0 {
        // LOCK_TXN answered EPERM: a page it touched changed since BEGIN.
        request(s, 1001, 66, 0, &[])?; // ROLLBACK_TXN
        return Ok(false);
    }
    Ok(request(s, 1002, 65, 0, &[])? == 0) // COMMIT_TXN
}
