#!/usr/bin/env python3
"""Commit two pages atomically on a Strata page-store export over raw NBD.

Usage: nbd_transaction.py HOST PORT EXPORT

Speaks fixed-newstyle NBD with simple replies and the transaction commands
BEGIN_TXN (64), COMMIT_TXN (65), ROLLBACK_TXN (66) and LOCK_TXN (67).
"""
import socket
import struct
import sys

BEGIN_TXN, COMMIT_TXN, ROLLBACK_TXN, LOCK_TXN = 64, 65, 66, 67
WRITE = 1
PAGE = 4096


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    return buf


def connect(host, port, export):
    s = socket.create_connection((host, port))
    assert recv_exact(s, 16) == b"NBDMAGICIHAVEOPT"
    recv_exact(s, 2)  # handshake flags
    s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    name = export.encode()
    # Ask for NBD_INFO_BLOCK_SIZE: page-store exports take whole pages only.
    data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, 3)
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(data)) + data)  # NBD_OPT_GO
    while True:
        _, _, kind, length = struct.unpack(">QIII", recv_exact(s, 20))
        payload = recv_exact(s, length)
        if kind == 1:  # NBD_REP_ACK
            return s
        if kind & (1 << 31):
            raise RuntimeError(f"export refused: {payload.decode(errors='replace')}")


cookie = 0


def request(s, command, offset=0, data=b""):
    """Send one request; return its NBD error (0 = success)."""
    global cookie
    cookie += 1
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, command, cookie, offset, len(data)) + data)
    magic, error, got = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == 0x67446698 and got == cookie
    return error


def main():
    host, port, export = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    s = connect(host, port, export)
    assert request(s, BEGIN_TXN) == 0
    for page in (0, 1):
        assert request(s, WRITE, page * PAGE, b"T" * PAGE) == 0
    if request(s, LOCK_TXN) != 0:  # EPERM: a page it touched changed since BEGIN
        request(s, ROLLBACK_TXN)
        sys.exit("conflict: rolled back; retry")
    error = request(s, COMMIT_TXN)
    if error:
        sys.exit(f"commit failed with NBD error {error}; nothing of it was applied")
    print("committed")


if __name__ == "__main__":
    main()
