"""How the gateway listens to a WebSocket: uvicorn's websockets-sansio protocol, closing with
1001 on shutdown (``gateway.shutdown``), and dropping a client that stopped reading.

The threat is the HTTP one of ``gateway.server`` ("a response the client does not read"): a
relay whose client reads nothing holds its upstream WebSocket, and the upstream connection under
it, for as long as the client keeps the socket open.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn

from gateway.server_limits import ClientLimits
from gateway.shutdown import GoingAwayWebSocketProtocol

log = logging.getLogger("gateway.server")


class LimitedWebSocketProtocol(GoingAwayWebSocketProtocol):
    """The WebSocket protocol, dropping a client that has read nothing for ``server.send_timeout``
    while the gateway had something to write (its writes paused all that time), as the HTTP
    protocol does: the relay then closes the upstream WebSocket (gateway/websocket.py)."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._send_timeout = getattr(config, "limits", ClientLimits()).send_timeout
        self._stalled: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stalled is None:
            self._stalled = self.loop.call_later(self._send_timeout, self._drop_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_stalled()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_stalled()
        super().connection_lost(exc)

    def _cancel_stalled(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _drop_stalled(self) -> None:
        self._stalled = None
        log.info("dropping a WebSocket that read nothing for %g s", self._send_timeout)
        self.transport.abort()
