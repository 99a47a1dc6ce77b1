"""Stopping: what SIGTERM does, in order, with one worker or many.

uvicorn's own order on SIGTERM is: close the listeners, ask every connection to finish (an idle
keep-alive connection closes, a busy one closes after its response, a WebSocket is closed with
1012), wait up to ``timeout_graceful_shutdown`` for the requests in flight, cancel what is left,
then run the lifespan's shutdown. With ``workers > 1`` the supervisor forwards SIGTERM to every
worker, and each does the same. The gateway changes three things:

1. **Readiness first.** A load balancer learns that a node is leaving from its health check, and
   a refused connection is all it sees once the listener is closed. So the first thing SIGTERM
   does is turn readiness (``routes.ready``) to 503; for ``server.shutdown_delay`` seconds the
   listener stays open and requests are still served, so health checks see the 503 and move
   traffic away before any connection is refused (the Kubernetes "preStop sleep", built in).
2. **WebSockets are closed with 1001**, "going away" (RFC 6455 §7.4.1: "a server going down"),
   not uvicorn's 1012 ("service restart", an IANA-registered code outside the RFC that not
   every client knows). The relay passes the same code upstream.
3. **The supervisor's copy of the listening socket** is closed as soon as it is told to stop:
   the socket stays open as long as any process holds it, so without this the kernel would keep
   accepting connections, unanswered, until the supervisor itself exited.

Then, as uvicorn does: in-flight requests (a long streaming download too) finish within
``server.shutdown_grace`` seconds, and the lifespan closes the session watch, the upstream
client's pool and the store (``gateway.app.Lifespan``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn
from uvicorn._types import ASGISendEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.supervisors import multiprocess

log = logging.getLogger("gateway.shutdown")

# Where the app's lifespan leaves its Drain, in the ASGI lifespan state, for the server to find:
# the one channel from a uvicorn server to the app it loaded in a worker process.
DRAIN_STATE_KEY = "gateway.drain"
# RFC 6455 §7.4.1: "an endpoint is going away, such as a server going down".
GOING_AWAY = 1001


class Drain:
    """Whether this process is stopping; once it is, readiness answers 503."""

    __slots__ = ("draining",)

    def __init__(self) -> None:
        self.draining = False

    def begin(self) -> None:
        if not self.draining:
            log.info("stopping: readiness now answers 503")
        self.draining = True


class GoingAwayWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, closing open sockets with 1001 when the server stops."""

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        # uvicorn (0.54) marks the handshake done after an accept or a close but not after a
        # denial response (the "websocket.http.response" extension, websocket.refuse_handshake),
        # and then logs "returned without completing handshake" at ERROR for one it answered.
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            self.handshake_complete = True

    def shutdown(self) -> None:
        if self.close_sent or not self.handshake_complete:
            super().shutdown()
            return
        self.stop_keepalive()
        # What uvicorn does, with 1001: the app hears the same code (and sends it upstream).
        self.queue.put_nowait({"type": "websocket.disconnect", "code": GOING_AWAY})
        self.conn.send_close(GOING_AWAY, "server shutting down")
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, turning readiness to 503 and waiting ``shutdown_delay`` seconds
    before it closes its listeners."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = getattr(self, "lifespan", None) and self.lifespan.state.get(DRAIN_STATE_KEY)
        if isinstance(drain, Drain):
            drain.begin()
        delay: float = getattr(self.config, "shutdown_delay", 0.0)
        if delay > 0:
            log.info("stopping: the listener closes in %g s", delay)
            loop = asyncio.get_running_loop()
            end = loop.time() + delay
            # A second Ctrl-C (force_exit) cuts the wait short, as it does uvicorn's own.
            while not self.force_exit and loop.time() < end:
                await asyncio.sleep(min(0.1, end - loop.time()))
        await super().shutdown(sockets)


class _Worker(multiprocess.Process):
    """A worker process whose server is a :class:`DrainingServer`."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = DrainingServer(config=self.config)
        return self._server


class Workers(multiprocess.Multiprocess):
    """uvicorn's supervisor of ``server.workers`` processes, with draining workers, closing its
    own copy of the listening socket when it stops (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        self._terminated = False
        # uvicorn's supervisor reads its signal queue every 0.5 s, so readiness stayed 200 for up
        # to half a second after SIGTERM; the workers are told from the handler itself (they
        # turn readiness 503 at once), and the loop still sees the signal and stops.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop_now)

    def _stop_now(self, sig: int, frame: FrameType | None) -> None:
        self.signal_queue.append(sig)
        self.terminate_all()

    def run(self) -> None:
        # uvicorn builds its workers from the module's ``Process`` in four places (start,
        # restart on SIGHUP, replace a dead one, SIGTTIN); naming ours there for the run covers
        # them all, where overriding each would copy uvicorn's code.
        original = multiprocess.Process
        multiprocess.Process = _Worker  # type: ignore[misc]
        try:
            super().run()
        finally:
            multiprocess.Process = original  # type: ignore[misc]

    def terminate_all(self) -> None:
        # Once: a second SIGTERM would make each worker's uvicorn give up its graceful drain.
        if self._terminated:
            return
        self._terminated = True
        for sock in self.sockets:
            sock.close()
        super().terminate_all()
