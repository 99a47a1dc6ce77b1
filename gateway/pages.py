"""The HTML pages of enrolment and verification: Jinja2 templates in ``gateway/templates/``.

Pages are plain server-rendered HTML with one small inline stylesheet and, on the recovery
codes page only, one small inline script (copy and download, ``gateway/static/codes.js``); no
external asset (the gateway often runs in closed networks, and the fronts route only the
page paths to it), and every page works without JavaScript. The Content-Security-Policy
allows exactly that stylesheet and that script (by hash), ``data:`` images (the QR code) and
forms posting to this origin; framing is refused, so no other site can overlay the code form
(clickjacking). The icon is ``data:,``, so no page makes the browser ask for ``/favicon.ico``.

Every template is read and compiled when the app is built, and kept: a running gateway whose
installed files are replaced under it (``pip install`` into its venv, issue 12 §2.1) keeps
serving its pages. When the templates are missing at start-up, that is logged once and each
page answers 503 (:class:`PagesUnavailable`); the decision (proxy, ``/auth``) never renders a
template it needs, so it is untouched.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from pathlib import Path
from typing import Any

import jinja2

from gateway.config import Config

log = logging.getLogger("gateway.pages")

DIRECTORY = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
TEMPLATES = (
    "codes.html",
    "locked.html",
    "logout.html",
    "recovery.html",
    "setup.html",
    "setup_start.html",
    "verify.html",
    "verified.html",
)
MISSING = "The gateway's page templates are missing: reinstall the gateway."


class PagesUnavailable(Exception):
    """The templates could not be loaded at start-up; every page answers 503."""


def _hash(source: str) -> str:
    return base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii")


class Pages:
    """Renders the templates with what every page needs (issuer, routes, code length)."""

    def __init__(self, config: Config, directory: Path | None = None, static: Path | None = None) -> None:
        directory = directory or DIRECTORY  # read now, so a test can point it elsewhere
        static = static or STATIC
        digits = config.totp.digits
        self.common: dict[str, Any] = {
            "issuer": config.totp.issuer,
            "routes": config.routes,
            "digits": digits,
            "code_pattern": f"[0-9]{{{digits}}}",
            "error": None,
            "user": None,
        }
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(directory),
            autoescape=True,
            undefined=jinja2.StrictUndefined,  # a missing variable is a bug, not an empty string
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=False,  # compiled once, kept even if the files go away
        )
        self._templates: dict[str, jinja2.Template] = {}
        css = script = ""
        try:
            css = (directory / "style.css").read_text(encoding="utf-8").strip()
            script = (static / "codes.js").read_text(encoding="utf-8").strip()
            # base.html too: "extends" loads it at render time, from the environment's cache.
            env.get_template("base.html")
            self._templates = {name: env.get_template(name) for name in TEMPLATES}
        except (OSError, jinja2.TemplateError) as exc:
            self._templates = {}
            log.error("%s (%s: %s)", MISSING, type(exc).__name__, exc)
        self.common["css"] = css  # our own file, hashed into the CSP below; the template marks it safe
        self.common["script"] = script  # likewise
        # Referrer-Policy "same-origin", not "no-referrer": under no-referrer a browser sends
        # "Origin: null" on same-origin form posts (Fetch §3.1), which the CSRF check must refuse.
        self.headers: list[tuple[bytes, bytes]] = [
            (b"content-type", b"text/html; charset=utf-8"),
            (b"cache-control", b"no-store"),
            (
                b"content-security-policy",
                f"default-src 'none'; style-src 'sha256-{_hash(css)}'; script-src 'sha256-{_hash(script)}'; "
                "img-src data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'".encode(),
            ),
            (b"x-frame-options", b"DENY"),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"same-origin"),
        ]

    @property
    def available(self) -> bool:
        return bool(self._templates)

    def render(self, template: str, **context: Any) -> bytes:
        """The page, or :class:`PagesUnavailable` when the templates did not load."""
        found = self._templates.get(template)
        if found is None:
            raise PagesUnavailable(template)
        return found.render({**self.common, **context}).encode("utf-8")


def group_secret(secret: str) -> str:
    """``JBSW Y3DP EHPK 3PXP``: groups of four are easier to type; apps ignore the spaces."""
    return " ".join(secret[i : i + 4] for i in range(0, len(secret), 4))
