"""Django's admin behind proxy mode: an app with its own login and CSRF protection, served by
gunicorn (WSGI), configured with Django's defaults (issue 12, §1).

Since Django 4.0 a POST with an ``Origin`` header passes the CSRF check only when that origin is
the request's own scheme and ``Host`` (or is listed in ``CSRF_TRUSTED_ORIGINS``). A browser's
``Origin`` is the gateway's, so the admin works through the gateway only when the gateway passes
the client's ``Host`` upstream: the default, ``upstream.pass_host = true``. With ``false`` Django
sees its own address as ``Host`` and refuses the login form (403), which is why that is not the
default.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

import httpx
import pytest

from tests.support.apps import ADMIN_USER, SESSION_COOKIE, DjangoSite, ProxyGateway, running

pytestmark = pytest.mark.integration

_TOKEN = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')


@pytest.fixture(scope="module")
def django_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DjangoSite]:
    with running(DjangoSite(tmp_path_factory.mktemp("django"))) as site:
        yield site


def browser(gateway: ProxyGateway, user: str) -> httpx.Client:
    """A browser on the gateway's origin with a 2FA session; ``Remote-User`` is the first
    factor as the trusted front proxy adds it."""
    client = httpx.Client(
        base_url=gateway.url,
        headers={"Remote-User": user, "Origin": gateway.origin, "Accept": "text/html"},
        timeout=30,
    )
    client.cookies.set(SESSION_COOKIE, gateway.enrol_session(user))
    return client


def form_token(client: httpx.Client, path: str) -> str:
    """GET a form page (Django sets its ``csrftoken`` cookie) and read the form's hidden token."""
    r = client.get(path)
    assert r.status_code == 200, r.text[:500]
    found = _TOKEN.search(r.text)
    assert found, r.text[:500]
    assert client.cookies.get("csrftoken")
    return found.group(1)


def log_in(client: httpx.Client, site: DjangoSite) -> httpx.Response:
    token = form_token(client, "/admin/login/?next=/admin/")
    return client.post(
        "/admin/login/?next=/admin/",
        data={"csrfmiddlewaretoken": token, "username": ADMIN_USER, "password": site.password, "next": "/admin/"},
    )


@pytest.fixture(scope="module")
def gateway(django_site: DjangoSite, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyGateway]:
    with ProxyGateway(tmp_path_factory.mktemp("gw-django"), django_site.url) as gw:
        yield gw


def test_the_admin_login_and_a_change_form_work_through_the_gateway(
    gateway: ProxyGateway, django_site: DjangoSite
) -> None:
    with browser(gateway, "carol") as client:
        r = log_in(client, django_site)
        assert r.status_code == 302, r.text[:1000]
        assert r.headers["location"] == "/admin/"
        r = client.get("/admin/")
        assert r.status_code == 200
        assert "Site administration" in r.text

        # Add a group, then change it: two more CSRF-checked form POSTs.
        name = f"editors-{secrets.token_hex(4)}"
        token = form_token(client, "/admin/auth/group/add/")
        r = client.post("/admin/auth/group/add/", data={"csrfmiddlewaretoken": token, "name": name, "_save": "Save"})
        assert r.status_code == 302, r.text[:1000]
        assert r.headers["location"] == "/admin/auth/group/"
        listing = client.get("/admin/auth/group/", params={"q": name})
        found = re.search(r'href="(/admin/auth/group/(\d+)/change/)[^"]*"', listing.text)
        assert found and name in listing.text, listing.text[:1000]
        change = found.group(1)
        renamed = name.replace("editors", "reviewers")
        token = form_token(client, change)
        r = client.post(change, data={"csrfmiddlewaretoken": token, "name": renamed, "_save": "Save"})
        assert r.status_code == 302, r.text[:1000]
        listing = client.get("/admin/auth/group/", params={"q": renamed})
        assert renamed in listing.text and f">{name}<" not in listing.text


def test_without_a_2fa_session_the_admin_is_not_reached(gateway: ProxyGateway, django_site: DjangoSite) -> None:
    marker = f"/admin/login/?marker={secrets.token_hex(8)}"
    with httpx.Client(base_url=gateway.url, headers={"Remote-User": "carol", "Accept": "application/json"}) as client:
        r = client.get(marker)
    assert r.status_code in (401, 403), r.text
    assert r.json()["error"]
    assert marker not in django_site.log_text()  # gunicorn logs every request it serves


def test_with_pass_host_false_django_refuses_the_login_form(
    django_site: DjangoSite, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Why ``pass_host`` defaults to true: with the upstream's own host as ``Host``, the
    browser's ``Origin`` (the gateway's) no longer matches and Django's CSRF check fails."""
    with (
        ProxyGateway(tmp_path_factory.mktemp("gw-django-nohost"), django_site.url, pass_host=False) as gateway,
        browser(gateway, "dave") as client,
    ):
        r = log_in(client, django_site)
    assert r.status_code == 403, r.text[:1000]
    assert "CSRF verification failed" in r.text
    assert f"Origin checking failed - {gateway.origin} does not match any trusted origins" in django_site.log_text()
