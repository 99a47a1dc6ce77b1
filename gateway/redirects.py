"""Where a browser goes to fix a denial: the application's login page for the first factor,
the gateway's verify or setup page for the second, always with a local return target."""

from __future__ import annotations

from urllib.parse import quote

from gateway.config import Config
from gateway.errors import Reason

# Denials a person in a browser can fix on the gateway's own pages: send them there.
_TO_VERIFY = frozenset({Reason.CODE_REQUIRED, Reason.INVALID_CODE, Reason.REPLAYED_CODE})
# ... and the first factor, on the application's own login page (identity.login_url).
_TO_LOGIN = frozenset({Reason.IDENTITY_REQUIRED, Reason.INVALID_IDENTITY})


class LoginRedirects:
    def __init__(self, config: Config) -> None:
        self.login_url = config.identity.login_url
        self.setup_route = config.routes.setup
        self.verify_route = config.routes.verify

    def location(self, reason: Reason, target: str) -> str | None:
        """Where a browser goes to fix a denial for ``target`` (a local path); None if nowhere."""
        if reason in _TO_LOGIN:
            login = self.login_url
            return login.replace("{next}", quote(target, safe="/")) if login else None
        if reason is Reason.NOT_ENROLLED:
            return self.setup(target)
        if reason in _TO_VERIFY:
            return f"{self.verify_route}?next={quote(target, safe='/')}"
        return None

    def setup(self, target: str) -> str:
        """The setup page, returning to ``target`` when done."""
        return f"{self.setup_route}?next={quote(target, safe='/')}"
