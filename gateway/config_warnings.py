"""What ``gateway check-config`` warns about: settings that load (they are not errors) but that
open a hole or quietly break logins. Each warning starts with the key to change.

Errors stay errors (``ConfigError`` at load); these are for a config that is valid yet
probably not what its author meant. ``check-config --strict`` turns them into a failure.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from gateway.config import Config
from gateway.paths import Exclusions

# A trusted network larger than this (fewer prefix bits) is "wide": more than one LAN's worth
# of peers that may each assert any user in the identity header.
_WIDE_V4 = 24
_WIDE_V6 = 64


def warnings(config: Config) -> list[str]:
    """Every warning for ``config``, each starting with the key it concerns; [] for a safe one."""
    return [
        *_trust(config),
        *_cookie_scheme(config),
        *_exclusions(config),
        *_login_url(config),
        *_hosts(config),
    ]


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _trust(config: Config) -> list[str]:
    if config.identity.mode != "header":
        return []  # a JWT is verified by its signature, not believed because of who relayed it
    out: list[str] = []
    header = config.identity.header
    for i, net in enumerate(config.server.trusted_proxies):
        if net.prefixlen == 0:
            out.append(
                f'server.trusted_proxies[{i}]: "{net}" trusts every address with identity.mode = "header": '
                f"anyone who can reach the gateway can claim any user in {header}"
            )
    wide = [
        str(net)
        for net in config.server.trusted_proxies
        if net.prefixlen < (_WIDE_V4 if net.version == 4 else _WIDE_V6)
    ]
    if wide and _unspecified(config.server.host):
        out.append(
            f'server.host: "{config.server.host}" listens on every interface while server.trusted_proxies '
            f"trusts {', '.join(wide)} to set {header}: any host in that range can claim any user "
            '(listen on the front proxy\'s interface, e.g. "127.0.0.1", or narrow the list)'
        )
    return out


def _cookie_scheme(config: Config) -> list[str]:
    public_url = config.server.public_url
    if public_url is None:
        return []
    scheme = urlsplit(public_url).scheme
    if scheme == "http" and config.session.secure:
        # RFC 6265 §5.4: a Secure cookie is only sent over a secure channel.
        return [
            "session.secure: true while server.public_url is http://: browsers do not send a Secure "
            "cookie over plain http, so no 2FA session will stick (serve https, or set false for development)"
        ]
    if scheme == "https" and not config.session.secure:
        return [
            "session.secure: false while server.public_url is https://: the session cookie would also "
            "be sent over plain http, where anyone on the path can copy it"
        ]
    return []


def _exclusions(config: Config) -> list[str]:
    routes = config.routes
    named = [(name, getattr(routes, name)) for name in routes.__dataclass_fields__]
    out: list[str] = []
    for i, rule in enumerate(config.paths.exclude):
        one = Exclusions([rule])
        covered = [
            f'routes.{name} ("{path}")' for name, path in named if path and one.matches(rule.method or "GET", path)
        ]
        if covered:
            out.append(
                f'paths.exclude[{i}]: "{rule}" covers {", ".join(covered)}, served by the gateway itself: '
                "a rule that wide probably opens more of the app than meant"
            )
    return out


def _authority(url: str) -> tuple[str, int | None]:
    parts = urlsplit(url)
    return (parts.hostname or "", parts.port)


def _login_url(config: Config) -> list[str]:
    login_url = config.identity.login_url
    if login_url is None or login_url.startswith("/"):
        return []
    public_url = config.server.public_url
    if public_url is not None and _authority(login_url.replace("{next}", "")) == _authority(public_url):
        return []
    where = "another host than server.public_url" if public_url else "an absolute URL, and server.public_url is unset"
    return [
        f"identity.login_url: {where}: users are sent off-site to log in, and {{next}} is a local path "
        "that host must send back here (use a local path, or set server.public_url to that host)"
    ]


def _hosts(config: Config) -> list[str]:
    if config.server.public_url or config.server.allowed_hosts:
        return []
    if config.upstream.url is not None:
        return [
            "server.allowed_hosts: empty and server.public_url unset in proxy mode: a request with any Host "
            "is passed to the app, which may build links or cache entries from it (set either one)"
        ]
    # Forward-auth: the front may relay any Host, and the gateway's redirects to its verify page
    # are built from it (attacker A, issue 14: Host: evil.example -> Location: http://evil.example/).
    return [
        "server.allowed_hosts: empty and server.public_url unset: /auth accepts any forwarded host, and "
        "the redirect to the verify page is built from the Host the client sent (set either one)"
    ]
