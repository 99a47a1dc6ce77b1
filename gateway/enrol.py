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

CSRF: ``gateway/csrf.py`` refuses a cross-origin POST before the router sees it.

The routes run on Starlette's ``Router`` (``page_routes.py``), where errors become denials at
one place, from the one table in ``errors.py``.

Secrets, URIs and recovery codes travel only in bodies marked ``Cache-Control: no-store``,
never in a header, a URL or a log line. Audit events go to the ``gateway.audit`` logger.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from gateway.audit import audit
from gateway.config import Config
from gateway.errors import DENIALS, Reason
from gateway.factors import Accepted, Refused, SecondFactor
from gateway.http import negotiate, wants_html
from gateway.identity import Denied, IdentityReader, cookie_values
from gateway.inputs import BadInput, read_fields, read_query, safe_target
from gateway.page_routes import PageDenial, page_app
from gateway.pages import Pages, group_secret
from gateway.qr import png_data_url, qr_png
from gateway.redirects import LoginRedirects
from gateway.request_facts import RequestFacts
from gateway.responses import denial_response, json_response, raw_response
from gateway.session_cookie import SessionCookie

log = logging.getLogger("gateway.enrol")

_JSON, _HTML, _PNG = "application/json", "text/html", "image/png"
_METHODS = ["GET", "POST"]  # and HEAD, which Starlette adds to every GET route
_RECOVERY_REFUSED = "That recovery code is wrong or was already used."


@dataclass
class _Call:
    """One request to a gateway route, after identity and CSRF checks."""

    headers: Headers
    client: str | None
    user: str
    label: str
    html: bool
    next: str = "/"
    fields: dict[str, str] = field(default_factory=dict)
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)


Endpoint = Callable[[_Call], Awaitable[Response]]


class Enrolment:
    def __init__(
        self,
        config: Config,
        factors: SecondFactor,
        identity: IdentityReader,
        facts: RequestFacts,
        cookie: SessionCookie,
        redirects: LoginRedirects,
        pages: Pages,
    ) -> None:
        self.config = config
        self.factors = factors
        self.identity = identity
        self.facts = facts
        self.cookie = cookie
        self.redirects = redirects
        self.pages = pages
        r = config.routes
        self.own = frozenset({r.setup, r.verify, r.recovery, r.logout})
        self.minutes = max(1, config.totp.pending_ttl // 60)

    def app(self) -> ASGIApp:
        """The four pages as one ASGI app (``page_routes.py``: body limit, CSRF, router, errors)."""
        r = self.config.routes
        routes = [
            Route(r.setup, self._route(self.setup_page, self.setup), methods=_METHODS),
            Route(r.verify, self._route(self.verify_page, self.verify), methods=_METHODS),
            Route(r.recovery, self._route(self.recovery_page, self.recovery), methods=_METHODS),
            Route(r.logout, self._route(self.logout_page, self.logout), methods=_METHODS),
        ]
        return page_app(routes, self.config.server.public_url, lambda scope: self.facts(scope).client)

    def _route(self, get: Endpoint, post: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            call = await self._call(request)
            return await (post if request.method == "POST" else get)(call)

        return endpoint

    async def _call(self, request: Request) -> _Call:
        facts = self.facts(request.scope, headers=request.headers)
        headers = request.headers
        found = self.identity.read(headers, facts.peer_trusted)
        if isinstance(found, Denied):
            raise PageDenial(found.reason)
        html = wants_html(headers.get("accept"))
        call = _Call(headers, facts.client, found.user, found.label, html)
        query = read_query(request.scope)
        if request.method == "POST":
            call.fields = await read_fields(request)
        call.next = safe_target(call.fields.get("next") or query.get("next"), self.own)
        return call

    # -- responses -----------------------------------------------------------------------------

    def _page(self, call: _Call, template: str, status: int = 200, **context: Any) -> Response:
        body = self.pages.render(template, user=call.user, next=call.next, **context)
        return raw_response(status, self.pages.headers + call.extra_headers, body)

    def _redirect(self, call: _Call, location: str) -> Response:
        # 303: after a POST the browser follows with a GET (RFC 9110 §15.4.4).
        headers = [(b"location", location.encode("ascii")), (b"cache-control", b"no-store")]
        return raw_response(303, headers + call.extra_headers, b"")

    def _refuse(self, call: _Call, outcome: Refused, template: str, **context: Any) -> Response:
        """A failed code: the form again with the error for a browser, a denial for a program."""
        reason = outcome.reason
        if call.html and reason is Reason.NOT_ENROLLED:
            return self._redirect(call, self.redirects.setup(call.next))
        if call.html and reason is Reason.LOCKED and outcome.retry_after is not None:
            # Issue 10: say how long, in minutes (Retry-After rounded up), and where to go back.
            call.extra_headers.append((b"retry-after", str(outcome.retry_after).encode()))
            minutes = (outcome.retry_after + 59) // 60
            return self._page(call, "locked.html", 429, title="Code entry locked", minutes=minutes)
        if call.html:
            status, detail = DENIALS.get(reason, DENIALS[Reason.INVALID_CODE])
            if outcome.retry_after is not None:
                call.extra_headers.append((b"retry-after", str(outcome.retry_after).encode()))
                detail = f"Too many failed attempts: try again in {_duration(outcome.retry_after)}."
            elif "recovery_code" in call.fields and "code" not in call.fields:
                # Issue 12 §2.4: say which code was wrong, and keep its form open.
                detail = _RECOVERY_REFUSED
                context["recovery_error"] = True
            return self._page(call, template, status, error=detail, **context)
        fields: dict[str, Any] = {"setup": self.config.routes.setup} if reason is Reason.NOT_ENROLLED else {}
        return denial_response(reason, None, retry_after=outcome.retry_after, **fields)

    async def _open_session(self, call: _Call, outcome: Accepted) -> bool:
        """A fresh 2FA session for this browser; a session id it already held is revoked, so an
        id planted before verification (session fixation) never becomes a verified one. False
        when the authenticator ``outcome`` was judged against has changed since (reset, new)."""
        for old in cookie_values(call.headers.getlist("cookie"), self.cookie.name):
            if old:
                await self.factors.revoke_session(old)
        session = await self.factors.open_session(call.user, outcome.proof)
        if session is None:
            return False
        call.extra_headers.append(self.cookie.set(session))
        return True

    def _codes(self, call: _Call, status: str, codes: list[str], lead: str) -> Response:
        if call.html:
            return self._page(call, "codes.html", title="Save your recovery codes", codes=codes, lead=lead)
        body: dict[str, Any] = {"status": status, "recovery_codes": codes}
        if status == "enrolled":
            body["expires_in"] = self.config.session.ttl
        return json_response(200, body, call.extra_headers)

    # -- /setup-2fa ------------------------------------------------------------------------------

    async def setup_page(self, call: _Call) -> Response:
        enrolled = await self.factors.is_enrolled(call.user)
        return self._page(call, "setup_start.html", title="Set up two-factor authentication", enrolled=enrolled)

    async def setup(self, call: _Call) -> Response:
        user = call.user
        # Read from the store, not the worker's cache: whether a code is needed is a grant.
        enrolled = await self.factors.is_enrolled_fresh(user)
        proof = None  # which authenticator this request proved, if it is enrolled
        if enrolled:
            # A pending secret never replaces the active one until verified, but starting one
            # at all needs the second factor: the first alone must not re-bind the account.
            code, recovery = call.fields.get("code"), call.fields.get("recovery_code")
            if not code and not recovery:
                audit("enrolment.refused", user, reason="no_code")
                return self._refuse_reenrol(call, DENIALS[Reason.ALREADY_ENROLLED][1])
            outcome = await (
                self.factors.check_code(user, code, call.client)
                if code
                else self.factors.check_recovery(user, recovery, call.client)
            )
            if isinstance(outcome, Refused):
                audit("enrolment.refused", user, reason=outcome.reason.value)
                if outcome.reason is Reason.LOCKED:
                    return self._refuse(
                        call, outcome, "setup_start.html", title="Set up two-factor authentication", enrolled=True
                    )
                if not code:
                    return self._refuse_reenrol(call, _RECOVERY_REFUSED, Reason.INVALID_CODE, recovery_error=True)
                return self._refuse_reenrol(call, DENIALS[Reason.INVALID_CODE][1], Reason.INVALID_CODE)
            proof = outcome.proof
        secret = await self.factors.begin_enrolment(user, proof)
        if secret is None:  # enrolled, or re-enrolled, meanwhile (another request, another worker)
            audit("enrolment.refused", user, reason=Reason.ALREADY_ENROLLED.value)
            return self._refuse_reenrol(call, DENIALS[Reason.ALREADY_ENROLLED][1])
        uri = self.factors.provisioning_uri(secret, call.label)
        kind = negotiate(call.headers.get("accept"), (_JSON, _PNG, _HTML))
        if kind == _PNG:
            return raw_response(200, [(b"content-type", b"image/png"), (b"cache-control", b"no-store")], qr_png(uri))
        if kind == _HTML:
            return self._setup_qr_page(call, secret, uri)
        png = png_data_url(qr_png(uri))
        return json_response(200, {"otpauth_uri": uri, "qr_png": png, "expires_in": self.config.totp.pending_ttl})

    def _setup_qr_page(
        self, call: _Call, secret: str, uri: str, status: int = 200, error: str | None = None
    ) -> Response:
        return self._page(
            call,
            "setup.html",
            status,
            title="Scan the QR code",
            error=error,
            qr=png_data_url(qr_png(uri)),
            uri=uri,
            secret_groups=group_secret(secret),
            minutes=self.minutes,
        )

    def _refuse_reenrol(
        self, call: _Call, detail: str, reason: Reason | None = None, recovery_error: bool = False
    ) -> Response:
        if call.html:
            return self._page(
                call,
                "setup_start.html",
                403,
                title="Set up two-factor authentication",
                enrolled=True,
                error=detail,
                recovery_error=recovery_error,
            )
        error = (reason or Reason.ALREADY_ENROLLED).value
        return json_response(403, {"error": error, "detail": DENIALS[reason][1] if reason else detail})

    # -- /verify-2fa -----------------------------------------------------------------------------

    async def verify_page(self, call: _Call) -> Response:
        if not await self.factors.is_enrolled(call.user):
            return self._redirect(call, self.redirects.setup(call.next))
        return self._page(call, "verify.html", title="Enter your code")

    async def verify(self, call: _Call) -> Response:
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
                return await self._enrolled(call, outcome)
        else:
            outcome = await self.factors.check_recovery(user, recovery, client)
        if isinstance(outcome, Refused):
            pending = None
            if call.html and outcome.reason is not Reason.LOCKED and not await self.factors.is_enrolled(user):
                pending = await self.factors.pending_secret(user)
            if pending is not None:  # a mistyped first code: the same QR code again
                status, detail = DENIALS[outcome.reason]
                uri = self.factors.provisioning_uri(pending, call.label)
                return self._setup_qr_page(call, pending, uri, status, detail)
            return self._refuse(call, outcome, "verify.html", title="Enter your code")
        if not await self._open_session(call, outcome):
            return self._refuse(call, Refused(Reason.INVALID_CODE), "verify.html", title="Enter your code")
        left = await self.factors.recovery_codes_left(user) if method == "recovery_code" else None
        if call.html:
            if left is None:
                return self._redirect(call, call.next)
            # Issue 12 §2.4: after a recovery code, say how many are left before going on.
            return self._page(call, "verified.html", title="Signed in", left=left)
        body: dict[str, Any] = {"status": "verified", "expires_in": self.config.session.ttl}
        if left is not None:
            body["recovery_codes_left"] = left
        return json_response(200, body, call.extra_headers)

    async def _enrolled(self, call: _Call, outcome: Accepted) -> Response:
        if not await self._open_session(call, outcome):
            return self._refuse(call, Refused(Reason.INVALID_CODE), "verify.html", title="Enter your code")
        codes = await self.factors.new_recovery_codes(call.user)
        return self._codes(call, "enrolled", codes, "Two-factor authentication is on.")

    # -- /recovery-codes -------------------------------------------------------------------------

    async def recovery_page(self, call: _Call) -> Response:
        if not await self.factors.is_enrolled(call.user):
            return self._redirect(call, self.redirects.setup(call.next))
        return self._page(call, "recovery.html", title="New recovery codes")

    async def recovery(self, call: _Call) -> Response:
        code = call.fields.get("code")
        if not code:
            raise BadInput(f"code: expected {self.config.totp.digits} digits")
        outcome = await self.factors.check_code(call.user, code, call.client)
        if isinstance(outcome, Refused):
            return self._refuse(call, outcome, "recovery.html", title="New recovery codes")
        codes = await self.factors.new_recovery_codes(call.user)
        audit("recovery_codes.regenerated", call.user)
        return self._codes(call, "regenerated", codes, "New recovery codes made: the old ones no longer work.")

    # -- /logout-2fa -----------------------------------------------------------------------------

    async def logout_page(self, call: _Call) -> Response:
        return self._page(call, "logout.html", title="Sign out of two-factor session", done=False)

    async def logout(self, call: _Call) -> Response:
        # Every session cookie the request carries: two different ones are refused by the
        # decision, but a logout ends whatever it is shown.
        for session in cookie_values(call.headers.getlist("cookie"), self.cookie.name):
            if session:
                await self.factors.revoke_session(session, call.user)
        call.extra_headers.append(self.cookie.clear())
        if call.html:
            return self._page(call, "logout.html", title="Signed out of two-factor session", done=True)
        return json_response(200, {"status": "signed_out"}, call.extra_headers)


def _duration(seconds: int) -> str:
    return f"{seconds} seconds" if seconds < 120 else f"{(seconds + 59) // 60} minutes"
