"""The HTML pages of enrolment and verification: Jinja2 templates in ``gateway/templates/``.

Pages are plain server-rendered HTML with one small inline stylesheet: no script, no external
asset (the gateway often runs in closed networks), and they work without JavaScript. The
Content-Security-Policy allows exactly that stylesheet (by hash), ``data:`` images (the QR
code) and forms posting to this origin; framing is refused, so no other site can overlay the
code form (clickjacking).
"""

from __future__ import annotations

import base64
import hashlib
from importlib.resources import files
from typing import Any

import jinja2

from gateway.config import Config

_CSS = (files("gateway") / "templates" / "style.css").read_text(encoding="utf-8").strip()
_CSS_HASH = base64.b64encode(hashlib.sha256(_CSS.encode("utf-8")).digest()).decode("ascii")

# Referrer-Policy "same-origin", not "no-referrer": under no-referrer a browser sends
# "Origin: null" on same-origin form posts (Fetch §3.1), which the CSRF check must refuse.
PAGE_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (
        b"content-security-policy",
        f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; img-src data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'".encode(),
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("gateway", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,  # a missing variable is a bug, not an empty string
    trim_blocks=True,
    lstrip_blocks=True,
)


class Pages:
    """Renders the templates with what every page needs (issuer, routes, code length)."""

    def __init__(self, config: Config) -> None:
        digits = config.totp.digits
        self.common: dict[str, Any] = {
            "css": _CSS,  # our own file, hashed into the CSP above; the template marks it safe
            "issuer": config.totp.issuer,
            "routes": config.routes,
            "digits": digits,
            "code_pattern": f"[0-9]{{{digits}}}",
            "error": None,
            "user": None,
        }

    def render(self, template: str, **context: Any) -> bytes:
        return _ENV.get_template(template).render({**self.common, **context}).encode("utf-8")


def group_secret(secret: str) -> str:
    """``JBSW Y3DP EHPK 3PXP``: groups of four are easier to type; apps ignore the spaces."""
    return " ".join(secret[i : i + 4] for i in range(0, len(secret), 4))
