"""Capacity figures for README "Capacity": what one user and one session cost in Redis, and how
many Redis commands each kind of request sends, measured on a real ``gateway run`` against a
real redis-server (the store code as deployed, nothing modelled).

    python -m bench.capacity            # prints a Markdown table

* bytes: ``MEMORY USAGE`` (Redis' own count, key and value with overhead) of every key that
  appeared after one enrolment, split into the user's keys and the session's;
* commands per request: ``INFO commandstats`` deltas (calls of each command) around one request,
  the median of ``ROUNDS`` requests; the store pipelines, so round trips <= commands.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import pyotp
import redis

from tests.conftest import RedisServer, need_binary
from tests.support.load import CACHE_TTL, SESSION_COOKIE, Replica, fetch, who, wrong_code
from tests.support.servers import UpstreamProcess, fresh_keys

ROUNDS = 3


def calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    # INFO itself is counted: leave it out.
    return sum(int(v["calls"]) for k, v in stats.items() if k not in ("cmdstat_info",))


def delta(client: redis.Redis, request: object) -> int:
    before = calls(client)
    asyncio.run(request)  # type: ignore[arg-type]
    return calls(client) - before


def measure(rounds: int = ROUNDS) -> dict[str, object]:
    server = RedisServer(need_binary("redis-server"))
    upstream = UpstreamProcess()
    server.start()
    upstream.start()
    try:
        client = redis.Redis(port=server.port, decode_responses=True)
        with Replica(Path(tempfile.mkdtemp(prefix="gw-capacity-")), "gw", server.url, upstream.url, fresh_keys()) as gw:
            out: dict[str, object] = {}
            setups, verifies, users, sessions, colds, warms, codes, bads = [], [], [], [], [], [], [], []
            for n in range(rounds):
                user = f"capacity-{n}"
                keys_before = set(client.keys("*"))
                box: dict[str, str] = {}

                async def setup(u: str = user, box: dict[str, str] = box) -> None:
                    r = await fetch("POST", gw.url + "/setup-2fa", who(u))
                    assert r.status_code == 200, r.text
                    box["secret"] = pyotp.parse_uri(r.json()["otpauth_uri"]).secret

                async def verify(u: str = user, box: dict[str, str] = box) -> None:
                    r = await fetch(
                        "POST", gw.url + "/verify-2fa", who(u), json={"code": pyotp.TOTP(box["secret"]).now()}
                    )
                    assert r.status_code == 200, r.text
                    box["session"] = r.cookies[SESSION_COOKIE]

                setups.append(delta(client, setup()))
                verifies.append(delta(client, verify()))
                new = set(client.keys("*")) - keys_before
                # The session's keys name the session id's hash, never the id: tell them apart by
                # asking which keys a logout removes... simpler and exact: the keys a second session
                # of the same user adds (a code opens one).
                headers = {**who(user), "Cookie": f"{SESSION_COOKIE}={box['session']}"}

                async def session_request(h: dict[str, str] = headers) -> None:
                    r = await fetch("GET", gw.url + "/echo/capacity", h)
                    assert r.status_code == 200, r.text

                time.sleep(CACHE_TTL + 0.2)  # the replica's cache has forgotten the session
                colds.append(delta(client, session_request()))
                warms.append(delta(client, session_request()))
                before_code = set(client.keys("*"))
                totp = pyotp.TOTP(box["secret"])
                code = totp.at(time.time() + totp.interval)  # the next step: this one was used

                async def code_request(c: str = code, u: str = user) -> None:
                    r = await fetch("GET", gw.url + "/echo/capacity", {**who(u), "X-2FA-Code": c})
                    assert r.status_code == 200, r.text

                codes.append(delta(client, code_request()))
                session_keys = set(client.keys("*")) - before_code

                async def bad_request(u: str = user, s: str = box["secret"]) -> None:
                    r = await fetch("GET", gw.url + "/echo/capacity", {**who(u), "X-2FA-Code": wrong_code(s)})
                    assert r.status_code == 401, r.text

                bads.append(delta(client, bad_request()))
                size = {k: int(client.memory_usage(k) or 0) for k in new | session_keys}
                # The enrolment opened a session too (gw:s:...): a user's bytes leave it out.
                users.append(sum(v for k, v in size.items() if k in new and ":s:" not in k))
                sessions.append(sum(size[k] for k in session_keys))
                out["user_keys"] = sorted(f"{str(k).rsplit(':', 1)[-1]} {size[k]} B" for k in new if ":s:" not in k)
                out["session_keys"] = sorted(f"s:<hash> {size[k]} B" for k in session_keys)
            med = statistics.median
            out.update(
                setup=med(setups),
                verify=med(verifies),
                session_cold=med(colds),
                session_warm=med(warms),
                code=med(codes),
                bad_code=med(bads),
                bytes_user=med(users),
                bytes_session=med(sessions),
            )
            return out
    finally:
        upstream.stop()
        server.stop()


def main() -> None:
    m = measure()
    print("| figure | value |\n| --- | ---: |")
    for key, value in m.items():
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    main()
