"""``gateway demo``: the gateway in front of a bundled toy app, on the embedded store. DEMO ONLY.

- ``state``: the demo's state directory (keys, SQLite store) and its configuration;
- ``login_app``: the toy app, whose password-less login issues the JWT the gateway reads;
- ``run``: both served from one command.

Nothing outside this package imports the toy app: ``gateway run`` serves the configured
upstream and nothing else, so the password-less login cannot be reached from it.
"""
