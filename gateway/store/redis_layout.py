"""What the Redis store keeps in Redis: the key layout, the packing of expiring values, and the
Lua scripts that make its compare-and-set steps atomic. ``gateway.store.redis`` is the client.

Key layout, ``P`` being the prefix and ``{u}`` the escaped user in a Redis Cluster hash tag,
so every key of one user lives in one slot and the Lua scripts stay cluster-safe::

    P:{u}:secret      string  active ciphertext
    P:{u}:pending     string  packed (expires_at, ciphertext), expires at expires_at
    P:{u}:step        string  last accepted TOTP time step
    P:{u}:recovery    set     recovery-code hashes
    P:{u}:sessions    set     session hashes of the user (found again by delete_user)
    P:{scope}:attempts hash   n, reset_at, locked_until: the attempts taken in the window
                              ending at reset_at, when the key also expires (scope escaped
                              like a user: "user%3Aalice"); locked_until while n is at its limit
    P:s:<hash>        string  packed (expires_at, user), expires at expires_at
    P:ready           string  written by each readiness probe (store.ping), expires in 60 s

On a Redis Cluster every multi-key step stays in one slot, so it runs as one step there too:
the scripts (ACTIVATE_LUA and DELETE_USER_LUA touch several keys, all ``P:{u}:*``), and the
MULTI of set_secret (secret, pending) and set_recovery_codes (one key). Each quota of an
attempt (``P:{user%3Aalice}:attempts``, ``P:{ip%3A192.0.2.1}:attempts``) is its own key and its
own script call, atomic alone: an attempt is taken from every quota before its code is judged,
so no burst gets more attempts past a quota than its limit, on any topology; what is not one
step is the set of quotas (a quota with room counts an attempt that another refused, as the
store contract says: counts never fall short). Across slots nothing is atomic, and the store
does not need it to be: a session (``P:s:<hash>``, slots spread by hash) and its user's index
are two steps that create_session checks afterwards (a revocation between them wins), and
revoking or deleting takes the index in one step, then deletes the sessions it named (and
delete_user the user's attempts key, in its own slot).

Inside the braces ``%``, ``{``, ``}`` and ``:`` are percent-encoded, so no user name can
close the hash tag early or spell another user's key; the empty name is ``%00``, as ``{}``
is no hash tag. Expiring values carry their expiry alongside the payload: Redis deletes them
in real time, and reads also compare with ``now`` so a frozen clock in tests sees the same
answers as the SQLite store.

What a failover may lose (Sentinel, or one server with replicas): Redis replicates
asynchronously, so the promoted replica may lack the master's last writes. Losing some writes
fails closed: a new session (the user enters a new code), an attempt count, an unlock. Others
must not be lost: a used time step (a replayed code would pass again, RFC 6238 §5.2), a
revoked session (logout, ``users logout``/``reset``, a re-enrolment's revocation), a
re-enrolment itself (the old authenticator would return). With ``store.replicas_ack = N``
the store follows each of those with ``WAIT N 100`` on the connection that made the write (a
pipeline). WAIT waits for the master's replication offset at that point, which covers every
earlier write on any connection. Too few acks within 100 ms is logged and the call answers as
the master did: the write happened, and the master answers every request until a failover, so
a denial there would help nothing. WAIT narrows the window a failover can lose; it does not
close it (Redis's WAIT is not a consensus). It is refused on a Cluster, where the pipeline's
WAIT would reach some node, not the one holding the key.
"""

from __future__ import annotations

import struct
from urllib.parse import unquote

_EXPIRY = struct.Struct(">d")
_ESCAPES = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D", ":": "%3A"})

# KEYS: step. ARGV: step. Compare-and-set so one time step is accepted once (RFC 6238 §5.2).
ADVANCE_STEP_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""

# KEYS: secret. ARGV: old, new.
COMPARE_AND_SET_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""

# KEYS: secret, pending, recovery. ARGV: "1" and the expected secret, or "0" (no secret
# expected); new.
ACTIVATE_LUA = """
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if cur ~= ARGV[2] then return 0 end
elseif cur then
  return 0
end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('DEL', KEYS[2], KEYS[3])
return 1
"""

# KEYS: attempts. ARGV: now, limit, until (= now + window), until in ms, k. Takes up to k
# attempts (k callers of one event-loop turn on the same scope, redis_batch.Batcher), as many as
# there is room for. Returns {taken, until or ""} (until: they used the last room, the scope is
# now locked), or {0, locked_until} when the quota was already full. Times travel as Python
# reprs and come back unchanged: Lua would truncate a returned float. The common case (room
# left, no stale lock) is HMGET, HSET, PEXPIREAT.
TAKE_ATTEMPT_LUA = """
local h = redis.call('HMGET', KEYS[1], 'n', 'reset_at', 'locked_until')
local limit = tonumber(ARGV[2])
local n = 0
if h[1] and tonumber(h[2]) > tonumber(ARGV[1]) then n = tonumber(h[1]) end
if n >= limit then return {0, h[2]} end
local k = math.min(tonumber(ARGV[5]), limit - n)
n = n + k
if n >= limit then
  redis.call('HSET', KEYS[1], 'n', n, 'reset_at', ARGV[3], 'locked_until', ARGV[3])
else
  redis.call('HSET', KEYS[1], 'n', n, 'reset_at', ARGV[3])
  if h[3] then redis.call('HDEL', KEYS[1], 'locked_until') end
end
redis.call('PEXPIREAT', KEYS[1], ARGV[4])
if n >= limit then return {k, ARGV[3]} end
return {k, ''}
"""

# KEYS: attempts. One attempt given back; the count is then below its limit, so no lock.
RELEASE_ATTEMPT_LUA = """
local n = tonumber(redis.call('HGET', KEYS[1], 'n'))
if not n then return 0 end
if n > 0 then redis.call('HSET', KEYS[1], 'n', n - 1) end
redis.call('HDEL', KEYS[1], 'locked_until')
return 1
"""

# KEYS: sessions. ARGV: session hash, expires_at in ms. The index lives as long as its
# longest session (PEXPIRETIME is -1 on a fresh key, so the first session always sets it).
INDEX_SESSION_LUA = """
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PEXPIRETIME', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIREAT', KEYS[1], ARGV[2])
end
return 1
"""

# KEYS: secret, pending, step, recovery, sessions. Returns the session hashes it dropped.
# Take the whole session index at once: a session opened after this is a new one, kept.
TAKE_SESSIONS_LUA = """
local sessions = redis.call('SMEMBERS', KEYS[1])
redis.call('DEL', KEYS[1])
return sessions
"""

DELETE_USER_LUA = """
local sessions = redis.call('SMEMBERS', KEYS[5])
redis.call('DEL', unpack(KEYS))
return sessions
"""


# The empty name's tag: an empty hash tag "{}" does not count as one (Redis then hashes the
# whole key, and one user's keys would scatter over several slots). Escaping never writes a
# "%" that is not "%25", so no other name spells it.
_EMPTY = "%00"


def escape_name(name: str) -> str:
    return name.translate(_ESCAPES) if name else _EMPTY


def unescape_name(escaped: str) -> str:
    """The name ``escape_name`` turned into ``escaped``."""
    return "" if escaped == _EMPTY else unquote(escaped)


def to_ms(t: float) -> int:
    return int(t * 1000)


def pack_expiring(expires_at: float, payload: bytes) -> bytes:
    return _EXPIRY.pack(expires_at) + payload


def unpack_live(value: bytes | str | None, now: float) -> bytes | None:
    """The payload of a packed value, or None when absent or expired at ``now``."""
    if not isinstance(value, bytes) or len(value) < _EXPIRY.size:
        return None
    (expires_at,) = _EXPIRY.unpack_from(value)
    return value[_EXPIRY.size :] if expires_at > now else None


def user_key(prefix: str, name: str, kind: str) -> str:
    """``P:{name}:kind``: a key of one user (or one lockout scope), in that user's slot."""
    return f"{prefix}:{{{escape_name(name)}}}:{kind}"


def session_key(prefix: str, session_hash: str) -> str:
    """``P:s:<hash>``: one 2FA session."""
    return f"{prefix}:s:{session_hash}"
