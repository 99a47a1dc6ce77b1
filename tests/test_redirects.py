"""gateway/redirects.py: where a browser goes to fix a denial."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import Reason
from gateway.redirects import LoginRedirects
from tests.support.servers import make_config


@pytest.mark.parametrize(
    ("reason", "location"),
    [
        (Reason.CODE_REQUIRED, "/verify-2fa?next=/a/b%3Fc%3D1"),
        (Reason.INVALID_CODE, "/verify-2fa?next=/a/b%3Fc%3D1"),
        (Reason.REPLAYED_CODE, "/verify-2fa?next=/a/b%3Fc%3D1"),
        (Reason.NOT_ENROLLED, "/setup-2fa?next=/a/b%3Fc%3D1"),
        (Reason.IDENTITY_REQUIRED, "/login?next=/a/b%3Fc%3D1"),
        (Reason.INVALID_IDENTITY, "/login?next=/a/b%3Fc%3D1"),
        (Reason.LOCKED, None),
        (Reason.AMBIGUOUS_IDENTITY, None),
        (Reason.STORE_UNAVAILABLE, None),
    ],
)
def test_location(tmp_path: Path, reason: Reason, location: str | None) -> None:
    redirects = LoginRedirects(make_config(tmp_path, identity={"login_url": "/login?next={next}"}))
    assert redirects.location(reason, "/a/b?c=1") == location


def test_without_a_login_url_the_first_factor_has_nowhere_to_go(tmp_path: Path) -> None:
    redirects = LoginRedirects(make_config(tmp_path))
    assert redirects.location(Reason.IDENTITY_REQUIRED, "/x") is None
    assert redirects.setup("/x y") == "/setup-2fa?next=/x%20y"
