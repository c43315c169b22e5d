"""The messages between a worker and the inference process, over a Unix socket: a 5-byte header (kind,
payload length) and a small JSON payload. Tensors never cross the socket: they travel through a memfd
both sides map, whose descriptor crosses once per buffer (SCM_RIGHTS with a MAP message)."""

from __future__ import annotations

import array
import json
import socket
import struct

HEADER = struct.Struct("<BI")
MAX_PAYLOAD = 1 << 16
MAX_FDS = 4

OPEN, MAP, RUN, PING = 1, 2, 3, 4  # a worker (or the keeper) asks
OK, ERROR = 10, 11  # the process answers
FLOAT32 = 4


class ProtocolError(Exception):
    """A message that breaks the framing: the connection is dropped."""


def pack(kind: int, payload: dict | None = None) -> bytes:
    body = json.dumps(payload or {}, separators=(",", ":")).encode()
    return HEADER.pack(kind, len(body)) + body


def send(sock: socket.socket, kind: int, payload: dict | None = None, fd: int | None = None) -> None:
    data = pack(kind, payload)
    if fd is None:
        sock.sendall(data)
        return
    sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    if sent < len(data):
        sock.sendall(data[sent:])


def receive(sock: socket.socket) -> tuple[int, dict]:
    """One whole message from a blocking socket (its timeout applies to each read); EOFError when the
    other side closed."""
    header = _exactly(sock, HEADER.size)
    kind, length = HEADER.unpack(header)
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"a payload of {length} bytes")
    return kind, json.loads(_exactly(sock, length)) if length else {}


def _exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise EOFError("the other side closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class Reader:
    """Messages from a non-blocking socket as its bytes and descriptors arrive (the process's side)."""

    def __init__(self) -> None:
        self._data = bytearray()
        self.fds: list[int] = []

    def read(self, sock: socket.socket) -> bool:
        """Take what the socket has; False when the other side closed."""
        data, ancillary, _, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(MAX_FDS * 4))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                self.fds.extend(fds)
        self._data += data
        return bool(data)

    def messages(self) -> list[tuple[int, dict]]:
        found = []
        while len(self._data) >= HEADER.size:
            kind, length = HEADER.unpack_from(self._data)
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"a payload of {length} bytes")
            if len(self._data) < HEADER.size + length:
                break
            body = bytes(self._data[HEADER.size:HEADER.size + length])
            del self._data[:HEADER.size + length]
            found.append((kind, json.loads(body) if body else {}))
        return found
