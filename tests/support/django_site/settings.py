"""Django's own defaults wherever they exist: CSRF on, Origin checked against Host (Django >= 4),
no ``CSRF_TRUSTED_ORIGINS``, no ``USE_X_FORWARDED_HOST``: what an app behind the gateway gets
without being told about it."""

from __future__ import annotations

import os

SECRET_KEY = os.environ["DJANGO_SITE_SECRET_KEY"]
DEBUG = False
# Host names only (Django compares without the port): the gateway and the app are both loopback.
ALLOWED_HOSTS = ["127.0.0.1"]
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.support.django_site.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["DJANGO_SITE_DB"]}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
STATIC_URL = "static/"
LOGGING = {
    "version": 1,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    # A refused CSRF check is logged here ("Forbidden (Origin checking failed ...)").
    "loggers": {"django.security": {"handlers": ["stderr"], "level": "WARNING"}},
}
