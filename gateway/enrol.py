"""The gateway's own routes: enrolment, verification, recovery codes and 2FA sign-out.

    GET  /setup-2fa        page: start enrolment (an enrolled user confirms with a code first)
    POST /setup-2fa        a new pending secret: PNG, JSON or page, by ``Accept``
    GET  /verify-2fa       page: type a code or a recovery code
    POST /verify-2fa       {code} finishes a pending enrolment (recovery codes, once) or opens a
                           2FA session; {recovery_code} opens one and is used up
    GET  /recovery-codes   page: make a new set
    POST /recovery-codes   {code}: a new set; the old one stops working at once
    GET  /logout-2fa       page: confirm
    POST /logout-2fa       revoke this browser's 2FA session and clear its cookie

Every route needs the first factor (the trusted header or the JWT), like a protected path.
Bodies are JSON or a form (urlencoded or multipart; ``inputs.py`` reads them). Programs get JSON
(``{"error", "detail"}`` when refused); browsers get pages, and forms that fail come back
with the error on the same page. A wrong code counts toward the lockout wherever it is typed.

CSRF: no token; the cross-origin check of Go 1.25's ``net/http.CrossOriginProtection``
(F. Valsorda, "Cross-Site Request Forgery", 2025), done before anything else on every POST:

1. ``Sec-Fetch-Site`` present (every browser since 2023): only ``same-origin`` or ``none``
   (typed by the user) pass;
2. else ``Origin`` present (every browser on every POST since 2020): its host must be the
   request's ``Host`` or ``server.public_url``'s; ``null`` never passes;
3. else the request is not from a browser: a program sends its credentials on purpose.

Refusals are 403 ``csrf_failed``. Without a token, an application behind the gateway can put
a plain ``<form method="post" action="/logout-2fa">`` on its own pages. The session cookie's
``SameSite=Lax`` is a second wall.

Secrets, URIs and recovery codes travel only in bodies marked ``Cache-Control: no-store``,
never in a header, a URL or a log line. Audit events go to the ``gateway.audit`` logger.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from starlette.datastructures import Headers
from starlette.types import Message, Receive, Scope, Send

from gateway.errors import DENIALS, DecryptError, Reason, StoreError
from gateway.factors import Accepted, Refused
from gateway.http import negotiate
from gateway.identity import Denied, cookie_values
from gateway.inputs import BadInput, read_fields, read_query, safe_target
from gateway.pages import PAGE_HEADERS, Pages, group_secret
from gateway.qr import png_data_url, qr_png
from gateway.responses import send_denial, send_json, send_response

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway.enrol")
audit = logging.getLogger("gateway.audit")

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]

_JSON, _HTML, _PNG = "application/json", "text/html", "image/png"


@dataclass
class _Call:
    """One request to a gateway route, after identity and CSRF checks."""

    scope: Scope
    headers: Headers
    client: str | None
    user: str
    label: str
    html: bool
    next: str = "/"
    fields: dict[str, str] = field(default_factory=dict)
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class Enrolment:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.config = gateway.config
        self.factors = gateway.factors
        r = self.config.routes
        self.own = frozenset({r.setup, r.verify, r.recovery, r.logout})
        public = self.config.server.public_url
        self.public_host = urlsplit(public).netloc.lower() if public else None
        self.pages = Pages(self.config)
        self.minutes = max(1, self.config.totp.pending_ttl // 60)

    def routes(self) -> dict[str, Handler]:
        r = self.config.routes
        return {
            r.setup: self._route(self.setup_page, self.setup),
            r.verify: self._route(self.verify_page, self.verify),
            r.recovery: self._route(self.recovery_page, self.recovery),
            r.logout: self._route(self.logout_page, self.logout),
        }

    def _route(
        self,
        get: Callable[[_Call, Send], Awaitable[None]],
        post: Callable[[_Call, Send], Awaitable[None]],
    ) -> Handler:
        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            await self._handle(scope, receive, send, get, post)

        return handle

    # -- the common part of every route ------------------------------------------------------

    async def _handle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        get: Callable[[_Call, Send], Awaitable[None]],
        post: Callable[[_Call, Send], Awaitable[None]],
    ) -> None:
        facts, headers = self.gateway.facts(scope)
        html = negotiate(headers.get("accept"), (_JSON, _HTML)) == _HTML
        accept = "text/html" if html else None  # what send_denial understands
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        method = scope["method"]
        try:
            if method not in ("GET", "HEAD", "POST"):
                await send_denial(tracked, Reason.METHOD_NOT_ALLOWED, accept, headers=[(b"allow", b"GET, HEAD, POST")])
                return
            if method == "POST" and self._cross_origin(headers):
                audit.warning("csrf refused route=%s client=%s", scope["path"], facts.client)
                await send_denial(tracked, Reason.CSRF, accept)
                return
            identity = self.gateway.decider.identity.read(headers, facts.peer_trusted)
            if isinstance(identity, Denied):
                await send_denial(tracked, identity.reason, accept)
                return
            call = _Call(scope, headers, facts.client, identity.user, identity.label, html)
            query = read_query(scope)
            if method == "POST":
                call.fields = await read_fields(scope, receive, headers)
            call.next = safe_target(call.fields.get("next") or query.get("next"), self.own)
            await (post if method == "POST" else get)(call, tracked)
        except BadInput as exc:
            log.info("refused a malformed body on %s: %s", scope["path"], exc)
            if not started:
                # BadInput's message names the field and what was wrong (never its value).
                await send_denial(tracked, Reason.INVALID_INPUT, accept, detail=str(exc))
        except StoreError as exc:
            log.error("store unavailable on %s: %s", scope["path"], exc)
            if not started:
                await send_denial(tracked, Reason.STORE_UNAVAILABLE, accept)
        except Exception as exc:
            # DecryptError is logged where it happens (factors); anything else is a bug. Either
            # way the client gets a generic 500, never a traceback.
            if not isinstance(exc, DecryptError):
                log.exception("unexpected error on %s", scope["path"])
            if not started:
                await send_denial(tracked, Reason.INTERNAL, accept)

    def _cross_origin(self, headers: Headers) -> bool:
        """True when a browser sent this POST from another origin (see the module docstring)."""
        site = headers.get("sec-fetch-site")
        if site is not None:
            return site.strip().lower() not in ("same-origin", "none")
        origin = headers.get("origin")
        if origin is None:
            return False
        parts = urlsplit(origin.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return True  # "null" and anything else that names no origin
        host = parts.netloc.lower()
        return host != (headers.get("host") or "").strip().lower() and host != self.public_host

    # -- responses -----------------------------------------------------------------------------

    async def _page(self, call: _Call, send: Send, template: str, status: int = 200, **context: Any) -> None:
        body = self.pages.render(template, user=call.user, next=call.next, **context)
        await send_response(send, status, PAGE_HEADERS + call.extra_headers, body)

    async def _redirect(self, call: _Call, send: Send, location: str) -> None:
        # 303: after a POST the browser follows with a GET (RFC 9110 §15.4.4).
        headers = [(b"location", location.encode("ascii")), (b"cache-control", b"no-store")]
        await send_response(send, 303, headers + call.extra_headers, b"")

    def _setup_location(self, call: _Call) -> str:
        return f"{self.config.routes.setup}?next={quote(call.next, safe='/')}"

    async def _refuse(self, call: _Call, send: Send, outcome: Refused, template: str, **context: Any) -> None:
        """A failed code: the form again with the error for a browser, a denial for a program."""
        reason = outcome.reason
        if call.html and reason is Reason.NOT_ENROLLED:
            await self._redirect(call, send, self._setup_location(call))
            return
        if call.html and reason is Reason.LOCKED and outcome.retry_after is not None:
            # Issue 10: say how long, in minutes (Retry-After rounded up), and where to go back.
            call.extra_headers.append((b"retry-after", str(outcome.retry_after).encode()))
            minutes = (outcome.retry_after + 59) // 60
            await self._page(call, send, "locked.html", 429, title="Code entry locked", minutes=minutes)
            return
        if call.html:
            status, detail = DENIALS.get(reason, DENIALS[Reason.INVALID_CODE])
            if outcome.retry_after is not None:
                call.extra_headers.append((b"retry-after", str(outcome.retry_after).encode()))
                detail = f"Too many failed attempts: try again in {_duration(outcome.retry_after)}."
            await self._page(call, send, template, status, error=detail, **context)
            return
        fields: dict[str, Any] = {"setup": self.config.routes.setup} if reason is Reason.NOT_ENROLLED else {}
        await send_denial(send, reason, None, retry_after=outcome.retry_after, **fields)

    async def _open_session(self, call: _Call, outcome: Accepted) -> bool:
        """A fresh 2FA session for this browser; a session id it already held is revoked, so an
        id planted before verification (session fixation) never becomes a verified one. False
        when the authenticator ``outcome`` was judged against has changed since (reset, new)."""
        for old in cookie_values(call.headers.getlist("cookie"), self.config.session.cookie):
            if old:
                await self.factors.revoke_session(old)
        session = await self.factors.open_session(call.user, outcome.proof)
        if session is None:
            return False
        call.extra_headers.append(self.gateway.session_cookie(session))
        return True

    async def _codes(self, call: _Call, send: Send, status: str, codes: list[str], lead: str) -> None:
        if call.html:
            await self._page(call, send, "codes.html", title="Save your recovery codes", codes=codes, lead=lead)
        else:
            body: dict[str, Any] = {"status": status, "recovery_codes": codes}
            if status == "enrolled":
                body["expires_in"] = self.config.session.ttl
            await send_json(send, 200, body, call.extra_headers)

    # -- /setup-2fa ------------------------------------------------------------------------------

    async def setup_page(self, call: _Call, send: Send) -> None:
        enrolled = await self.factors.is_enrolled(call.user)
        await self._page(call, send, "setup_start.html", title="Set up two-factor authentication", enrolled=enrolled)

    async def setup(self, call: _Call, send: Send) -> None:
        user = call.user
        # Read from the store, not the worker's cache: whether a code is needed is a grant.
        enrolled = await self.factors.is_enrolled(user, fresh=True)
        proof = None  # which authenticator this request proved, if it is enrolled
        if enrolled:
            # A pending secret never replaces the active one until verified, but starting one
            # at all needs the second factor: the first alone must not re-bind the account.
            code, recovery = call.fields.get("code"), call.fields.get("recovery_code")
            if not code and not recovery:
                audit.info("re-enrolment refused user=%r client=%s: no code", user, call.client)
                await self._refuse_reenrol(call, send, DENIALS[Reason.ALREADY_ENROLLED][1])
                return
            outcome = await (
                self.factors.check_code(user, code, call.client)
                if code
                else self.factors.check_recovery(user, recovery, call.client)
            )
            if isinstance(outcome, Refused):
                audit.info("re-enrolment refused user=%r client=%s: %s", user, call.client, outcome.reason)
                if outcome.reason is Reason.LOCKED:
                    await self._refuse(
                        call, send, outcome, "setup_start.html", title="Set up two-factor authentication", enrolled=True
                    )
                else:
                    await self._refuse_reenrol(call, send, DENIALS[Reason.INVALID_CODE][1], Reason.INVALID_CODE)
                return
            proof = outcome.proof
        secret = await self.factors.begin_enrolment(user, proof)
        if secret is None:  # enrolled, or re-enrolled, meanwhile (another request, another worker)
            audit.info("re-enrolment refused user=%r client=%s: no code", user, call.client)
            await self._refuse_reenrol(call, send, DENIALS[Reason.ALREADY_ENROLLED][1])
            return
        uri = self.factors.provisioning_uri(secret, call.label)
        audit.info("enrolment started user=%r client=%s", user, call.client)
        kind = negotiate(call.headers.get("accept"), (_JSON, _PNG, _HTML))
        if kind == _PNG:
            await send_response(
                send, 200, [(b"content-type", b"image/png"), (b"cache-control", b"no-store")], qr_png(uri)
            )
        elif kind == _HTML:
            await self._setup_qr_page(call, send, secret, uri)
        else:
            png = png_data_url(qr_png(uri))
            await send_json(send, 200, {"otpauth_uri": uri, "qr_png": png, "expires_in": self.config.totp.pending_ttl})

    async def _setup_qr_page(
        self, call: _Call, send: Send, secret: str, uri: str, status: int = 200, error: str | None = None
    ) -> None:
        await self._page(
            call,
            send,
            "setup.html",
            status,
            title="Scan the QR code",
            error=error,
            qr=png_data_url(qr_png(uri)),
            uri=uri,
            secret_groups=group_secret(secret),
            minutes=self.minutes,
        )

    async def _refuse_reenrol(self, call: _Call, send: Send, detail: str, reason: Reason | None = None) -> None:
        if call.html:
            await self._page(
                call,
                send,
                "setup_start.html",
                403,
                title="Set up two-factor authentication",
                enrolled=True,
                error=detail,
            )
        else:
            error = (reason or Reason.ALREADY_ENROLLED).value
            await send_json(send, 403, {"error": error, "detail": detail})

    # -- /verify-2fa -----------------------------------------------------------------------------

    async def verify_page(self, call: _Call, send: Send) -> None:
        if not await self.factors.is_enrolled(call.user):
            await self._redirect(call, send, self._setup_location(call))
            return
        await self._page(call, send, "verify.html", title="Enter your code")

    async def verify(self, call: _Call, send: Send) -> None:
        user, client = call.user, call.client
        code, recovery = call.fields.get("code"), call.fields.get("recovery_code")
        if not code and not recovery:
            raise BadInput(f"code: expected {self.config.totp.digits} digits (or a recovery_code)")
        method = "code" if code else "recovery_code"
        if code:
            # A pending enrolment is finished by a code from the new secret, else the code is
            # checked against the active one: one attempt for both (factors.verify_code).
            outcome = await self.factors.verify_code(user, code, client)
            if isinstance(outcome, Accepted) and outcome.activated:
                await self._enrolled(call, send, outcome)
                return
        else:
            outcome = await self.factors.check_recovery(user, recovery, client)
        if isinstance(outcome, Refused):
            audit.info("verification failed user=%r client=%s method=%s: %s", user, client, method, outcome.reason)
            pending = None
            if call.html and outcome.reason is not Reason.LOCKED and not await self.factors.is_enrolled(user):
                pending = await self.factors.pending_secret(user)
            if pending is not None:  # a mistyped first code: the same QR code again
                status, detail = DENIALS[outcome.reason]
                uri = self.factors.provisioning_uri(pending, call.label)
                await self._setup_qr_page(call, send, pending, uri, status, detail)
            else:
                await self._refuse(call, send, outcome, "verify.html", title="Enter your code")
            return
        if not await self._open_session(call, outcome):
            await self._refuse(call, send, Refused(Reason.INVALID_CODE), "verify.html", title="Enter your code")
            return
        audit.info("verified user=%r client=%s method=%s, session opened", user, client, method)
        if call.html:
            await self._redirect(call, send, call.next)
            return
        body: dict[str, Any] = {"status": "verified", "expires_in": self.config.session.ttl}
        if method == "recovery_code":
            state = await self.gateway.store.user_state(user, self.factors.clock())
            body["recovery_codes_left"] = state.recovery_codes_left
        await send_json(send, 200, body, call.extra_headers)

    async def _enrolled(self, call: _Call, send: Send, outcome: Accepted) -> None:
        if not await self._open_session(call, outcome):
            await self._refuse(call, send, Refused(Reason.INVALID_CODE), "verify.html", title="Enter your code")
            return
        codes = await self.factors.new_recovery_codes(call.user)
        audit.info(
            "enrolment finished user=%r client=%s, recovery codes issued, session opened", call.user, call.client
        )
        await self._codes(call, send, "enrolled", codes, "Two-factor authentication is on.")

    # -- /recovery-codes -------------------------------------------------------------------------

    async def recovery_page(self, call: _Call, send: Send) -> None:
        if not await self.factors.is_enrolled(call.user):
            await self._redirect(call, send, self._setup_location(call))
            return
        await self._page(call, send, "recovery.html", title="New recovery codes")

    async def recovery(self, call: _Call, send: Send) -> None:
        code = call.fields.get("code")
        if not code:
            raise BadInput(f"code: expected {self.config.totp.digits} digits")
        outcome = await self.factors.check_code(call.user, code, call.client)
        if isinstance(outcome, Refused):
            audit.info("recovery codes refused user=%r client=%s: %s", call.user, call.client, outcome.reason)
            await self._refuse(call, send, outcome, "recovery.html", title="New recovery codes")
            return
        codes = await self.factors.new_recovery_codes(call.user)
        audit.info("recovery codes regenerated user=%r client=%s, the old set is void", call.user, call.client)
        await self._codes(call, send, "regenerated", codes, "New recovery codes made: the old ones no longer work.")

    # -- /logout-2fa -----------------------------------------------------------------------------

    async def logout_page(self, call: _Call, send: Send) -> None:
        await self._page(call, send, "logout.html", title="Sign out of two-factor session", done=False)

    async def logout(self, call: _Call, send: Send) -> None:
        s = self.config.session
        # Every session cookie the request carries: two different ones are refused by the
        # decision, but a logout ends whatever it is shown.
        for session in cookie_values(call.headers.getlist("cookie"), s.cookie):
            if session:
                await self.factors.revoke_session(session)
        audit.info("2fa session ended user=%r client=%s", call.user, call.client)
        # RFC 6265 §3.1: the same name, path and attributes with Max-Age=0 removes the cookie.
        clear = f"{s.cookie}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax" + ("; Secure" if s.secure else "")
        call.extra_headers.append((b"set-cookie", clear.encode()))
        if call.html:
            await self._page(call, send, "logout.html", title="Signed out of two-factor session", done=True)
        else:
            await send_json(send, 200, {"status": "signed_out"}, call.extra_headers)


def _duration(seconds: int) -> str:
    return f"{seconds} seconds" if seconds < 120 else f"{(seconds + 59) // 60} minutes"
