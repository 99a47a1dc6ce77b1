"""How the configuration keys with rules of their own are read and checked (store URL, Redis
prefix, encryption keys, recovery pepper, JWT algorithms and audience, login URL, issuer,
cookie name, listen address), and the environment variables the gateway reads. The keys
themselves are declared in ``gateway/config_keys.py``, each naming its reader here.
"""

from __future__ import annotations

import ipaddress
from functools import partial

from gateway.crypto import SecretBox
from gateway.http import is_token, split_host
from gateway.store import is_key_prefix, is_multi_host_url, parse_store_url
from gateway.tables import Table, http_url, public_http_url, route_path, split_url

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The environment variables the gateway reads (only in gateway/config.py, once, at load).
ENV_CONFIG = "GATEWAY_CONFIG"
ENV_KEYS = "GATEWAY_ENCRYPTION_KEYS"
ENV_PEPPER = "GATEWAY_RECOVERY_PEPPER"
ENV_JWT_SECRET = "GATEWAY_JWT_SECRET"  # noqa: S105 - a variable name, not a secret
ENV_STORE_URL = "GATEWAY_STORE_URL"


# -- readers of keys with rules of their own --------------------------------------------------


def url(t: Table, name: str, default: str | None) -> str | None:
    return http_url(t, name, t.opt_str(name))


def public_url(t: Table, name: str, default: str | None) -> str | None:
    return public_http_url(t, name, t.opt_str(name))


def network(text: str) -> IPNetwork:
    return ipaddress.ip_network(text, strict=True)


def store_url(t: Table, name: str, default: str) -> str:
    url = t.secret(name, t.env, ENV_STORE_URL) or default
    # urllib reads one host:port; a Sentinel or Cluster URL lists several, which parse_store_url checks.
    if is_multi_host_url(url) or split_url(t, name, url) is not None:
        try:
            parse_store_url(url)  # the rules open_store_from_url applies, so they fail at load
        except ValueError as exc:
            t.problem(name, str(exc))
    return url


def key_prefix(t: Table, name: str, default: str) -> str:
    prefix = t.get(name, str, default)
    # The rule RedisStore applies, checked here too so a bad prefix fails at load.
    if not is_key_prefix(prefix):
        t.problem(name, f'"{prefix}" may only use letters, digits and _.:- (and not be empty)')
    return prefix


def split_keys(text: str) -> list[str]:
    out: list[str] = []
    for line in text.replace(",", "\n").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def encryption_keys(t: Table, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    inline = t.strings(name, ())
    path = t.opt_str(f"{name}_file")
    from_env = t.env.get(ENV_KEYS, "")
    given = [n for n, v in ((t.key(name), inline), (t.key(f"{name}_file"), path), (ENV_KEYS, from_env)) if v]
    keys: list[str] = []
    if len(given) > 1:
        t.problem(name, f"given more than once ({', '.join(given)}); choose one")
    elif path:
        text = t.read_file(f"{name}_file", path)
        keys = split_keys(text) if text is not None else []
    elif inline:
        keys = list(inline)
    elif from_env:
        keys = split_keys(from_env)
    if not keys and len(given) <= 1:
        t.problem(name, f"no encryption key: set {ENV_KEYS} or encryption.keys_file (`gateway keygen` makes one)")
    elif keys:
        try:
            SecretBox(keys)
        except ValueError as exc:
            t.problem(name, str(exc))
    return tuple(keys)


def pepper(t: Table, name: str, default: bytes) -> bytes:
    before = len(t.problems)
    pepper = t.secret(name, t.env, ENV_PEPPER)
    if pepper is not None and len(pepper) < 32:
        t.problem(name, "must be at least 32 characters (`gateway keygen` makes one)")
        return default
    if pepper is None and len(t.problems) == before:
        t.problem(name, f"missing: set {ENV_PEPPER} or encryption.recovery_pepper_file (`gateway keygen` makes one)")
    return (pepper or "").encode()


HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
KEY_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA"})


def algorithms(t: Table, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    algorithms = t.strings(name, default)
    for i, alg in enumerate(algorithms):
        if alg not in HMAC_ALGORITHMS | KEY_ALGORITHMS:
            t.problems.append(f'{t.key(name)}[{i}]: "{alg}" is not a supported algorithm ("none" never is)')
    if not algorithms:
        t.problem(name, "must name at least one algorithm")
    return algorithms


def audience(t: Table, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    audience: list[str] | str = t.get(name, (str, list), list(default))
    return (audience,) if isinstance(audience, str) else tuple(str(a) for a in audience)


def login_url(t: Table, name: str, default: str | None) -> str | None:
    url = t.opt_str(name)
    if url is None:
        return None
    # A local path (not "//host", which a browser reads as another host), or an absolute http(s)
    # URL with a host; either may carry a query, where "{next}" usually goes.
    if url.startswith("/"):
        ok = not url.startswith(("//", "/\\"))
    else:
        parts = split_url(t, name, url.replace("{next}", ""))
        ok = parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname)
    if not ok:
        t.problem(name, 'must be a local path like "/login?next={next}" or an http(s) URL')
        return None
    return url


def issuer(t: Table, name: str, default: str) -> str:
    issuer = t.get(name, str, default)
    if not issuer or ":" in issuer:
        t.problem(name, "must be non-empty and contain no colon (Key-Uri-Format)")
    return issuer


def cookie_name(t: Table, name: str, default: str) -> str:
    cookie = t.get(name, str, default)
    if not is_token(cookie):  # RFC 6265 §4.1.1: a cookie name is a token
        t.problem(name, f'"{cookie}" is not a valid cookie name')
    return cookie


switchable_route = partial(route_path, switchable=True)


def listen(t: Table, name: str, default: str | None) -> str | None:
    value = t.opt_str(name)
    if value is None:
        return default
    parsed = split_host(value)
    if parsed is None or parsed[1] is None:
        t.problem(name, f'"{value}" is not host:port (an IPv6 address goes in [])')
        return default
    return value
