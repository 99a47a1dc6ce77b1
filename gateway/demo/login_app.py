"""The application ``gateway demo`` protects: a toy with a toy login. DEMO ONLY.

Its "login" (``/`` and ``POST /demo/login``, excluded from the gateway's protection) takes any
name without a password and hands out an HS256 JWT in the ``demo_user_jwt`` cookie: that is
the first factor the gateway reads in ``jwt`` identity mode. Everything else is protected by
the gateway, which sends the verified user in ``Remote-User``.
"""

from __future__ import annotations

import html
import time
from urllib.parse import parse_qsl

import jwt
from starlette.types import Receive, Scope, Send

from gateway.identity import valid_user

COOKIE = "demo_user_jwt"
AUDIENCE = ISSUER = "gateway-demo"
LOGIN_TTL = 8 * 3600

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>
body{{margin:0;font:1.0625rem/1.55 system-ui,sans-serif;color:#1b1b1b;background:#f4f5f7}}
.banner{{background:#8a1c00;color:#fff;padding:.6rem 1rem;font-weight:700;text-align:center}}
main{{max-width:36rem;margin:1.5rem auto;padding:1.5rem;background:#fff;border:1px solid #d0d4da;border-radius:.5rem}}
h1{{font-size:1.5rem;margin:0 0 1rem}} label{{display:block;font-weight:600;margin:0 0 .25rem}}
input{{font:inherit;padding:.5rem .6rem;border:2px solid #5f6672;border-radius:.375rem;width:100%;max-width:18rem}}
button{{font:inherit;font-weight:600;padding:.6rem 1.1rem;border:0;border-radius:.375rem;background:#0b57d0;color:#fff;
cursor:pointer;margin:.5rem .5rem 0 0}} button.secondary{{background:#fff;color:#0b57d0;border:2px solid #0b57d0}}
form.inline{{display:inline}} a{{color:#0b57d0}} .you{{font-size:1.25rem}}
input:focus,button:focus,a:focus{{outline:3px solid #b45309;outline-offset:2px}}
</style></head><body><p class="banner">DEMO ONLY: any name logs in, no password. Never use this in production.</p>
<main><h1>{title}</h1>{body}</main></body></html>"""

_LOGIN = """<p>Step 1 of 2: the first factor. In a real deployment this is your application's own login or
an SSO proxy; here, any name will do.</p>
<form method="post" action="/demo/login"><label for="name">Your name</label>
<input id="name" name="name" autocomplete="username" required maxlength="64" autofocus>
<p><button type="submit">Log in (demo)</button></p></form>
<p>Step 2 is the gateway's: it will ask you to set up an authenticator app, then for a code.</p>"""

_PROTECTED = """<p class="you">You are in: the protected demo page, user <strong>{user}</strong>.</p>
<p>This page came through the gateway, which checked your second factor. The application never saw a code;
it got your name in the <code>Remote-User</code> header.</p>
<p><a href="/recovery-codes">Make new recovery codes</a> · <a href="/setup-2fa">Move to a new authenticator</a></p>
<form class="inline" method="post" action="/logout-2fa"><input type="hidden" name="next" value="/protected">
<button type="submit" class="secondary">End the 2FA session</button></form>
<form class="inline" method="post" action="/demo/logout"><button type="submit" class="secondary">Log out (demo)</button>
</form>"""


def issue_token(secret: str, user: str, now: float | None = None) -> str:
    now = time.time() if now is None else now
    claims = {"sub": user, "aud": AUDIENCE, "iss": ISSUER, "iat": int(now), "exp": int(now) + LOGIN_TTL}
    return jwt.encode(claims, secret, algorithm="HS256")


class DemoApp:
    """A pure ASGI app; ``secret`` signs the demo login's JWTs (the gateway verifies them)."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/demo/login" and method == "POST":
            name = dict(parse_qsl((await _body(receive)).decode("utf-8", "replace"))).get("name", "").strip()
            if not valid_user(name) or len(name) > 64:
                await _send(send, 400, _page("Log in", "<p>That name cannot be used. <a href='/'>Try another</a>.</p>"))
                return
            cookie = f"{COOKIE}={issue_token(self.secret, name)}; Path=/; Max-Age={LOGIN_TTL}; HttpOnly; SameSite=Lax"
            await _send(send, 303, b"", [(b"location", b"/protected"), (b"set-cookie", cookie.encode())])
        elif path == "/demo/logout" and method == "POST":
            await _send(
                send, 303, b"", [(b"location", b"/"), (b"set-cookie", f"{COOKIE}=; Path=/; Max-Age=0".encode())]
            )
        elif path == "/":
            await _send(send, 200, _page("Gateway demo: log in", _LOGIN))
        elif path == "/favicon.ico":
            await _send(send, 404, b"", [], "text/plain")
        else:
            user = dict(scope["headers"]).get(b"remote-user", b"").decode("utf-8", "replace")
            await _send(send, 200, _page("The protected demo page", _PROTECTED.format(user=html.escape(user))))


def _page(title: str, body: str) -> bytes:
    return _PAGE.format(title=html.escape(title), body=body).encode("utf-8")


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body") or sum(map(len, chunks)) > 4096:
            return b"".join(chunks)[:4096]


async def _send(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None, kind: str = "text/html"
) -> None:
    out = [(b"content-type", f"{kind}; charset=utf-8".encode()), (b"cache-control", b"no-store")]
    out += headers or []
    out.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})
