"""The soak test (issue 14 §3): ``python -m soak``. Proxy mode and ``/auth`` under a mixed load
at half the measured capacity for a long time; reports unexpected answers, latency over time
and whether the gateway's memory, file descriptors or asyncio tasks grew.

Run from the checkout, like ``python -m bench``; everything it starts is on loopback and is
stopped when it ends.
"""
