"""The original ``two_fast_auth`` middleware on FastAPI, as its README shows it, for row 7.

Runs only in bench/.venv-original (fastapi, two-fast-auth, uvicorn[standard]); never a
project dependency. ``TwoFactorMiddleware`` reads ``request.scope["user"]`` (``.id``,
``.is_authenticated``), so Starlette's ``AuthenticationMiddleware`` in front of it takes the
user from ``Remote-User``, as the gateway's header identity mode does. The secret is stored
Fernet-encrypted (the README's "Advanced Configuration") in a dict: no store round trip.

Environment: ``BENCH_ORIGINAL_SECRET`` (base32) and ``BENCH_ORIGINAL_KEY`` (a Fernet key).
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from starlette.authentication import AuthCredentials, AuthenticationBackend, BaseUser
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from two_fast_auth import TwoFactorAuth, TwoFactorMiddleware

KEY = os.environ["BENCH_ORIGINAL_KEY"]
SECRETS = {"alice": TwoFactorAuth.encrypt_secret(os.environ["BENCH_ORIGINAL_SECRET"], encryption_key=KEY)}


class User(BaseUser):
    def __init__(self, user_id: str) -> None:
        self.id = user_id

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.id


class RemoteUser(AuthenticationBackend):
    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        user = conn.headers.get("remote-user")
        return (AuthCredentials(["authenticated"]), User(user)) if user else None


async def get_user_secret(user_id: str) -> str | None:
    return SECRETS.get(user_id)


app = FastAPI()
# add_middleware wraps: the last added runs first, so authentication precedes the 2FA check.
app.add_middleware(
    TwoFactorMiddleware,
    get_user_secret_callback=get_user_secret,
    excluded_paths=["/docs", "/redoc"],
    header_name="X-2FA-Code",
    encryption_key=KEY,
)
app.add_middleware(AuthenticationMiddleware, backend=RemoteUser())


@app.get("/app", response_class=PlainTextResponse)
async def protected() -> str:
    return "hello"
