"""The gateway's exceptions, and the one table that turns a denial into an HTTP answer.

    GatewayError
     ├── ConfigError        the TOML file or the environment is wrong; start-up stops
     ├── StoreError         the store could not be reached or failed; the request is denied (503)
     ├── DecryptError       a stored secret does not decrypt for this user; the user is denied
     └── BadRequest         something the client sent cannot be judged safely (400)
          └── AmbiguousPath a request path that could mean two things; refused, never guessed

Exceptions from the layers below are translated into these at one boundary each:
redis and sqlite3 in ``gateway/store/``, cryptography in ``gateway/crypto.py``,
httpx in ``gateway/proxy.py``. Nothing in this tree ever carries a secret, a code or a
session id in its message.

:class:`Reason` is what ``decision.Decider.decide`` answers, and the key of ``DENIALS``. The
steps before the decision refuse with one too (``identity.Denied``, ``factors.Refused``), but
never use one as a success value: those are ``identity.Identity`` and ``factors.Accepted``.
It lives here, beside the table, not in ``decision.py``: ``identity``, ``factors``, the
responses and the metrics name reasons, and a lower layer never imports the decision.
"""

from __future__ import annotations

import enum


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """Every problem found in a configuration, each naming its key: ``"store.url: ..."``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class StoreError(GatewayError):
    """The store is unreachable or answered with an error. Callers deny (fail closed)."""


class DecryptError(GatewayError):
    """A ciphertext is corrupt, made under an unknown key, or bound to another user."""


class BadRequest(GatewayError):
    """The client sent something the gateway refuses to interpret."""


class AmbiguousPath(BadRequest):
    """A request path that is malformed or could be read two ways (``%2F``, ``..;``, NUL, ...)."""


class Reason(enum.StrEnum):
    """Why a request was allowed or denied. The value is the ``error`` field of a JSON denial."""

    # allowed
    EXCLUDED = "excluded"
    SESSION = "session"
    CODE = "code"
    # denied
    BAD_REQUEST = "bad_request"
    MALFORMED_REQUEST = "malformed_request"
    IDENTITY_REQUIRED = "identity_required"
    INVALID_IDENTITY = "invalid_identity"
    AMBIGUOUS_IDENTITY = "ambiguous_identity"
    NOT_ENROLLED = "2fa_not_enrolled"
    CODE_REQUIRED = "2fa_required"
    INVALID_CODE = "2fa_invalid"
    REPLAYED_CODE = "2fa_replayed"
    LOCKED = "2fa_locked"
    UNTRUSTED_PEER = "untrusted_peer"
    STORE_UNAVAILABLE = "store_unavailable"
    INTERNAL = "internal_error"
    # the upstream, after an allow (proxy mode)
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_BUSY = "upstream_busy"
    # the request named a host the gateway does not answer for (gateway/hosts.py)
    MISDIRECTED = "misdirected_request"
    # the gateway's own routes
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    CSRF = "csrf_failed"
    INVALID_INPUT = "invalid_input"
    ALREADY_ENROLLED = "2fa_already_enrolled"
    PAGES_UNAVAILABLE = "pages_unavailable"


ALLOWED = frozenset({Reason.EXCLUDED, Reason.SESSION, Reason.CODE})

# The one place where a denial becomes a status and a sentence. Keep the sentences free of
# anything the client sent: they are shown to whoever asked.
DENIALS: dict[Reason, tuple[int, str]] = {
    Reason.BAD_REQUEST: (400, "The request path is malformed or ambiguous and was refused."),
    Reason.MALFORMED_REQUEST: (400, "The request's framing or target is malformed or ambiguous and was refused."),
    Reason.IDENTITY_REQUIRED: (401, "No authenticated user: sign in to the application first."),
    Reason.INVALID_IDENTITY: (401, "The credentials identifying the user are invalid or expired."),
    Reason.AMBIGUOUS_IDENTITY: (
        401,
        "The request carries more than one credential or 2FA session, and they differ: send exactly one.",
    ),
    Reason.NOT_ENROLLED: (403, "Two-factor authentication is not set up for this user: enrol first."),
    Reason.CODE_REQUIRED: (401, "A two-factor code or a 2FA session is required."),
    Reason.INVALID_CODE: (401, "The two-factor code is wrong or expired."),
    Reason.REPLAYED_CODE: (401, "This two-factor code was already used: wait for the next one."),
    Reason.LOCKED: (429, "Too many failed attempts: try again later."),
    Reason.UNTRUSTED_PEER: (403, "This endpoint only answers the configured trusted proxies."),
    Reason.STORE_UNAVAILABLE: (503, "The gateway cannot reach its store; access is denied until it can."),
    Reason.INTERNAL: (500, "The gateway failed to decide; access is denied."),
    Reason.UPSTREAM_UNREACHABLE: (502, "The application behind the gateway could not be reached."),
    Reason.UPSTREAM_TIMEOUT: (504, "The application behind the gateway did not answer in time."),
    Reason.UPSTREAM_BUSY: (503, "The gateway has no free connection to the application; try again."),
    # RFC 9110 §15.5.20: not able to answer for this combination of scheme and authority.
    Reason.MISDIRECTED: (421, "This gateway does not answer for the host the request names."),
    Reason.NOT_FOUND: (404, "No such gateway route."),
    Reason.METHOD_NOT_ALLOWED: (405, "This method is not allowed here."),
    Reason.CSRF: (403, "The request did not come from the gateway's own page (CSRF check failed)."),
    Reason.INVALID_INPUT: (400, "The request body is malformed."),
    Reason.ALREADY_ENROLLED: (
        403,
        "Already enrolled: setting up a new authenticator needs a current code or a recovery code in the same request.",
    ),
    # Issue 12 §2.1: the installed templates went missing (a reinstall into the running venv).
    Reason.PAGES_UNAVAILABLE: (503, "The gateway's page templates are missing: reinstall the gateway."),
}

# Forward-auth answers nginx, Caddy and Traefik, not a person. nginx's auth_request turns any
# status but 2xx, 401 and 403 into a 500, so the denials that are not about who the user is
# or what they typed become 403 there: still a deny, and one nginx passes on. 503 and 500
# keep their meaning for Caddy and Traefik (nginx: 500, still a deny).
FORWARD_AUTH_STATUS: dict[Reason, int] = {
    Reason.BAD_REQUEST: 403,
    Reason.LOCKED: 403,
    Reason.NOT_ENROLLED: 403,
    Reason.UNTRUSTED_PEER: 403,
    Reason.MISDIRECTED: 403,
}
