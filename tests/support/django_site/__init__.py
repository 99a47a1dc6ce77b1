"""A minimal Django project for tests/integration/test_django.py: only the admin, served by
gunicorn, its sqlite database wherever ``DJANGO_SITE_DB`` says (the test's tmp directory)."""
