"""The one access decision. Proxy mode and forward-auth mode both call :meth:`Decider.decide`
and differ only in what they do with the answer, so they cannot disagree.

Order: canonical path → excluded? → identity (one, unambiguous) → 2FA session → code (which
takes an attempt, so a lockout refuses it) → allow/deny. A lockout refuses codes, never a live
session of the same user.

Every rule about who may pass is in this file. Every error path denies: an ambiguous path is
a 400, a store outage a 503, anything unexpected a 500, and none of them lets a request
through.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from starlette.datastructures import Headers

from gateway.audit import audit
from gateway.config import Config, IPNetwork
from gateway.errors import ALLOWED, AmbiguousPath, DecryptError, Reason, StoreError
from gateway.factors import Refused, SecondFactor
from gateway.http import TCHARS
from gateway.identity import Denied, IdentityReader, read_one_cookie
from gateway.paths import Exclusions, canonical_path, encode_path

log = logging.getLogger("gateway.decision")


@dataclass(frozen=True, slots=True)
class Facts:
    """What the decision needs to know about one request, however it arrived."""

    method: str
    path: str  # the raw path as sent on the wire, without query or fragment
    client: str | None  # the client address, resolved through trusted proxies
    peer_trusted: bool  # the TCP peer is one of server.trusted_proxies
    headers: Headers


@dataclass(frozen=True, slots=True)
class Decision:
    reason: Reason
    path: str | None = None  # the canonical path: what is forwarded is what was checked
    user: str | None = None
    label: str | None = None
    new_session: str | None = None  # a session opened by this request's code: set the cookie
    retry_after: int | None = None

    @property
    def allowed(self) -> bool:
        return self.reason in ALLOWED

    @property
    def forwarded_user(self) -> str | None:
        """Who the upstream is told the request comes from: the user of a request allowed by a
        2FA session or code; None for an excluded path (no identity is read there) and for
        every denial."""
        return self.user if self.reason is Reason.SESSION or self.reason is Reason.CODE else None


def is_trusted(address: str | None, networks: tuple[IPNetwork, ...]) -> bool:
    if not address or not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_address(peer: str | None, forwarded_for: str | None, networks: tuple[IPNetwork, ...]) -> str | None:
    """The client's address: the rightmost ``X-Forwarded-For`` entry that is not a trusted
    proxy, when the peer itself is trusted; otherwise the peer (a client cannot choose it)."""
    if not forwarded_for or not is_trusted(peer, networks):
        return peer
    for hop in reversed(forwarded_for.split(",")):
        hop = hop.strip()
        if not hop:
            continue
        try:
            ip = ipaddress.ip_address(hop)
        except ValueError:
            return peer  # a malformed chain is not believed
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
            # A zone id (RFC 6874) is any text after "%", and names no client beyond this
            # host's own links: it went to the app as X-Real-IP and to the log verbatim.
            return peer
        if not is_trusted(hop, networks):
            return hop
    return peer


class Decider:
    def __init__(self, config: Config, factors: SecondFactor) -> None:
        self.exclusions = Exclusions(config.paths.exclude)
        self.identity = IdentityReader(config.identity)
        self.factors = factors
        self.code_header = config.totp.header.lower()
        self.cookie = config.session.cookie

    async def decide(self, facts: Facts) -> Decision:
        try:
            return await self._decide(facts)
        except StoreError as exc:
            audit("store.error", client=facts.client, detail=f"store unavailable, denying: {exc}")
            return Decision(Reason.STORE_UNAVAILABLE)
        except DecryptError:
            return Decision(Reason.INTERNAL)
        except Exception:
            log.exception("unexpected error in the decision, denying")
            return Decision(Reason.INTERNAL)

    async def _decide(self, facts: Facts) -> Decision:
        method = facts.method
        # RFC 9110 §9.1: a method is a token (inline, not http.is_token: this runs per request).
        if not method or len(method) > 32 or not all(c in TCHARS for c in method):
            return Decision(Reason.BAD_REQUEST)
        try:
            path = canonical_path(facts.path)
        except AmbiguousPath:
            return Decision(Reason.BAD_REQUEST)
        # An exclusion applies only to a path that arrived already canonical. In forward-auth
        # mode the front proxy, not the gateway, sends the path upstream, and an upstream that
        # resolves "/admin/%2e%2e/public/x" differently from RFC 3986 would be fooled; in proxy
        # mode the same rule keeps both modes deciding alike. Browsers send canonical paths.
        # Methods are case-sensitive (RFC 9110 §9.1): "get" is not "GET".
        if self.exclusions.matches(method, path) and (path == facts.path or encode_path(path) == facts.path):
            return Decision(Reason.EXCLUDED, path=path)

        identity = self.identity.read(facts.headers, facts.peer_trusted)
        if isinstance(identity, Denied):
            return Decision(identity.reason, path=path)
        user = identity.user

        def deny(reason: Reason, retry_after: int | None = None) -> Decision:
            return Decision(reason, path=path, user=user, label=identity.label, retry_after=retry_after)

        # Two different 2FA session cookies: refused, never one picked (the app might read the
        # other one).
        session_id, ambiguous = read_one_cookie(facts.headers, self.cookie)
        if ambiguous:
            audit("identity.ambiguous", user, client=facts.client, reason="session_cookie")
            return deny(Reason.AMBIGUOUS_IDENTITY)
        # A live session passes even while the user or the address is locked out: a lockout
        # stops guessing codes, not the people already in (issue 10). Operators who want a
        # user out end the sessions (`gateway users logout` or `reset`).
        # A session belongs to the user who opened it: someone else's cookie is no session.
        if session_id is not None and await self.factors.session_user(session_id) == user:
            return Decision(Reason.SESSION, path=path, user=user, label=identity.label)

        raw_code = facts.headers.get(self.code_header)
        if raw_code is None:
            if not await self.factors.is_enrolled(user):
                return deny(Reason.NOT_ENROLLED)
            return deny(Reason.CODE_REQUIRED)
        outcome = await self.factors.check_code(user, raw_code, facts.client)
        if isinstance(outcome, Refused):
            return deny(outcome.reason, outcome.retry_after)
        session = await self.factors.open_session(user, outcome.proof)
        if session is None:
            return deny(Reason.INVALID_CODE)
        return Decision(Reason.CODE, path=path, user=user, label=identity.label, new_session=session)
