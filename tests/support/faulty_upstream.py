"""A misbehaving upstream for the fault tests (issue 14 §1 "Upstream faults"): a raw TCP server on
a free loopback port that reads a request head and then does what the request path's first
segment names (``/reset-head/3`` resets in the middle of the head, ``/ok`` answers properly).

It is a test stand-in for a broken server, not protocol code: it writes fixed byte strings and
reads just enough (the head, a ``Content-Length`` body) to know where one request ends. The
WebSocket handshake of ``/ws-echo-reset`` is done by websockets' sans-I/O ``ServerProtocol``.

Its own view of the connections is what the tests count: :meth:`open_connections` are the
sockets it accepted that neither side has closed yet. After a fault it holds the connection until
the gateway closes it (``hold``), so a gateway that gave up on a connection but kept it (or put
it back in its pool) shows up as an open connection, and a request that arrives on such a
connection afterwards is counted in ``reused``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

from tests.support.servers import free_port

SLOW = 2.5  # seconds a "slow" answer waits: longer than the read_timeout the tests configure
_HOLD_POLL = 0.1


class _Conn:
    """One accepted connection and the bytes read from it but not consumed yet."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def read_head(self) -> bytes | None:
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head + b"\r\n\r\n"

    def read_body(self, head: bytes) -> None:
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self.buffer) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                return
            self.buffer += chunk
        self.buffer = self.buffer[length:]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reset(self) -> None:
        """Close with SO_LINGER 0: the kernel sends RST and drops what was not sent."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


# What a fault handler says happens to the connection after it: served (read the next request),
# "hold" (wait for the gateway to close it), or "closed" (the handler closed it itself).
KEEP, HOLD, CLOSED = "keep", "hold", "closed"
Fault = Callable[[_Conn, bytes], str]

_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
_CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
_UNTIL_CLOSE_HEAD = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
BODY_SENT = 4096  # bytes of body sent before a mid-body fault
_BODY_LENGTH = 100_000  # the Content-Length announced by the mid-body faults


def _ok(conn: _Conn, head: bytes) -> str:
    conn.read_body(head)
    conn.send(_OK)
    return KEEP


def _hang(conn: _Conn, head: bytes) -> str:
    return HOLD


def _no_read(conn: _Conn, head: bytes) -> str:
    """Read the head, never the body (the gateway's upload stalls once the buffers are full);
    gone (a reset: its unread bytes) after SLOW."""
    time.sleep(SLOW)
    conn.reset()
    return CLOSED


def _slow_head(conn: _Conn, head: bytes) -> str:
    time.sleep(SLOW)
    with contextlib.suppress(OSError):
        conn.send(_OK)
    return HOLD


def _slow_body(conn: _Conn, head: bytes) -> str:
    conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % _BODY_LENGTH + b"s" * BODY_SENT)
    time.sleep(SLOW)
    with contextlib.suppress(OSError):
        conn.send(b"s" * (_BODY_LENGTH - BODY_SENT))
    return HOLD


def _reset_after(data: bytes) -> Fault:
    def fault(conn: _Conn, head: bytes) -> str:
        conn.send(data)
        time.sleep(0.05)  # the bytes reach the gateway before the reset does
        conn.reset()
        return CLOSED

    return fault


def _answer(data: bytes) -> Fault:
    def fault(conn: _Conn, head: bytes) -> str:
        conn.send(data)
        return HOLD

    return fault


def _answer_and_close(data: bytes) -> Fault:
    def fault(conn: _Conn, head: bytes) -> str:
        conn.send(data)
        conn.sock.shutdown(socket.SHUT_WR)  # a FIN, not a reset
        return HOLD

    return fault


def _ws_echo_reset(conn: _Conn, head: bytes) -> str:
    """Accept the handshake, echo the first text message, reset on the second."""
    protocol = ServerProtocol()
    protocol.receive_data(head + conn.buffer)
    conn.buffer = b""
    request = protocol.events_received()[0]
    assert isinstance(request, Request)
    protocol.send_response(protocol.accept(request))
    messages = 0
    for data in protocol.data_to_send():
        conn.send(data)
    while True:
        for event in protocol.events_received():
            if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                messages += 1
                if messages > 1:
                    conn.reset()
                    return CLOSED
                protocol.send_text(event.data)
        for data in protocol.data_to_send():
            conn.send(data)
        chunk = conn.sock.recv(65536)
        if not chunk:
            return CLOSED
        protocol.receive_data(chunk)


FAULTS: dict[str, Fault] = {
    "ok": _ok,
    "hang": _hang,
    "slow-head": _slow_head,
    "slow-body": _slow_body,
    "reset-head": _reset_after(b"HTTP/1.1 200 OK\r\nContent-Type: text/pl"),
    "reset-body-length": _reset_after(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % _BODY_LENGTH + b"r" * BODY_SENT
    ),
    "reset-body-chunked": _reset_after(_CHUNKED_HEAD + b"%x\r\n" % BODY_SENT + b"r" * BODY_SENT + b"\r\n"),
    # Neither Content-Length nor chunked: the body ends where the connection does (RFC 9112 §6.3
    # item 8), cut by a reset or ended by a clean close (FIN).
    "reset-body-eof": _reset_after(_UNTIL_CLOSE_HEAD + b"r" * BODY_SENT),
    "close-body-eof": _answer_and_close(_UNTIL_CLOSE_HEAD + b"e" * BODY_SENT),
    "bad-status": _answer(b"HTTP/1.1 2x0 Secret-Upstream-Detail\r\nContent-Length: 2\r\n\r\nok"),
    "bad-status-line": _answer(b"SECRET-UPSTREAM-GARBAGE\r\n\r\n"),
    "bad-chunk-size": _answer(_CHUNKED_HEAD + b"10\r\n" + b"c" * 16 + b"\r\nzz-secret\r\nxx\r\n0\r\n\r\n"),
    "chunk-missing-crlf": _answer(_CHUNKED_HEAD + b"10\r\n" + b"c" * 16 + b"10\r\n" + b"c" * 16 + b"\r\n0\r\n\r\n"),
    "chunk-size-overflow": _answer(_CHUNKED_HEAD + b"10\r\n" + b"c" * 16 + b"\r\nffffffffffffffffffff\r\nc\r\n"),
    "chunk-overrun": _answer_and_close(_CHUNKED_HEAD + b"10\r\n" + b"c" * 16 + b"\r\n1000\r\n" + b"c" * 16),
    "continue-close": _answer_and_close(b"HTTP/1.1 100 Continue\r\n\r\n"),
    "no-read": _no_read,
    "ws-hang": _hang,
    "ws-200": _answer(_OK),
    "ws-echo-reset": _ws_echo_reset,
}


class FaultyUpstream:
    """The server: a thread accepting, a thread per connection. ``port`` may be given (to start
    listening where a gateway already points)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port if port is not None else free_port()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.accepted = 0
        self.reused = 0  # requests that came on a connection after a fault on it
        self.faults: dict[str, int] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    def __enter__(self) -> FaultyUpstream:
        self.listen()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self.stop_listening()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)

    def listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(_HOLD_POLL)
        self._listener = listener
        self._start(self._accept, listener)

    def stop_listening(self) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            listener.close()

    @contextlib.contextmanager
    def refusing(self) -> Iterator[None]:
        """Nothing listens on the port, and the connections open now are closed (FIN), so the
        gateway's pooled ones are gone too; listening again afterwards. With nothing inside the
        block, an upstream restart."""
        self._close_all()
        try:
            yield
        finally:
            self.listen()

    @contextlib.contextmanager
    def blackholing(self) -> Iterator[None]:
        """A listener whose accept queue is full: Linux drops further SYNs (tcp_abort_on_overflow
        0), so a connect hangs, as to a host behind a firewall that drops packets."""
        self._close_all()
        full = socket.socket()
        full.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        full.bind(("127.0.0.1", self.port))
        full.listen(0)
        fillers = [socket.socket() for _ in range(2)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
        time.sleep(2 * _HOLD_POLL)  # the first is queued, the second's SYN dropped
        try:
            yield
        finally:
            for sock in (*fillers, full):
                sock.close()
            self.listen()

    def _close_all(self) -> None:
        self.stop_listening()
        time.sleep(2 * _HOLD_POLL)  # the accept thread has seen its listener go
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _start(self, target: Callable[[socket.socket], None], sock: socket.socket) -> None:
        thread = threading.Thread(target=target, args=(sock,), daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopping.is_set() and self._listener is listener:
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            with self._lock:
                self._open.add(sock)
                self.accepted += 1
            self._start(self._serve, sock)

    def _serve(self, sock: socket.socket) -> None:
        conn = _Conn(sock)
        after = KEEP
        try:
            while after == KEEP:
                head = conn.read_head()
                if head is None:
                    return
                target = head.split(b" ", 2)[1].decode("latin-1")
                name = target.split("/")[1].split("?")[0]
                with self._lock:
                    self.faults[name] = self.faults.get(name, 0) + 1
                after = FAULTS[name](conn, head)
            if after == HOLD:
                self._hold(conn)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(sock)
            sock.close()

    def _hold(self, conn: _Conn) -> None:
        """Wait for the gateway to close the connection; a request on it is a reuse."""
        conn.sock.settimeout(_HOLD_POLL)
        while not self._stopping.is_set():
            try:
                chunk = conn.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return
            with self._lock:
                self.reused += 1
