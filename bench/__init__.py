"""The gateway's benchmark: ``python -m bench`` (see bench/README.md).

Everything runs on loopback, in subprocesses this package starts and always stops.
"""
