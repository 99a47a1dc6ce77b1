"""gateway/config.py in-process: the [totp] table becomes TotpParams in one place.

(Kept apart from tests/test_config.py while another change is under way there; merge later.)
"""

from __future__ import annotations

from cryptography.fernet import Fernet

from gateway.config import ENV_KEYS, ENV_PEPPER, parse
from gateway.totp import TotpParams

_ENV = {ENV_KEYS: Fernet.generate_key().decode(), ENV_PEPPER: Fernet.generate_key().decode()}


def test_totp_params_come_from_the_totp_table() -> None:
    data = {"totp": {"digits": 8, "period": 60, "algorithm": "SHA256", "window": 2}}
    params = parse(data, env=_ENV).totp.params
    assert params == TotpParams(digits=8, period=60, algorithm="SHA256", window=2)
    assert parse({}, env=_ENV).totp.params == TotpParams()
