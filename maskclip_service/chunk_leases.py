"""Leases on a pre-annotation run's chunks: a worker holds a chunk while it works, another takes it over if
the holder goes silent (killed, or its machine gone).

A lease is a field of the run's ``...:leases`` hash, ``chunk -> "<owner>|<expiry>"``.
:class:`.preannotation_runs.PreannotationRun` owns the run's keys and calls these
with them; claiming and renewing are Lua scripts, so each is one atomic step in Redis.
"""

from __future__ import annotations

import time

from redis import Redis

# Atomically: take the next chunk (KEYS[1], the run's todo list), or one whose lease (KEYS[2]) expired.
_CLAIM = """
local chunk = redis.call('lpop', KEYS[1])
if not chunk then
  local leases = redis.call('hgetall', KEYS[2])
  for i = 1, #leases, 2 do
    local expiry = tonumber(string.match(leases[i + 1], '|(.*)$'))
    if expiry < tonumber(ARGV[2]) then chunk = leases[i]; break end
  end
end
if not chunk then return false end
redis.call('hset', KEYS[2], chunk, ARGV[1] .. '|' .. ARGV[3])
return chunk
"""

# Atomically: extend or drop a lease, only while it is still ours.
_RENEW = """
local held = redis.call('hget', KEYS[1], ARGV[1])
if not held or string.sub(held, 1, string.len(ARGV[2]) + 1) ~= ARGV[2] .. '|' then return 0 end
if ARGV[3] == '' then redis.call('hdel', KEYS[1], ARGV[1]) else redis.call('hset', KEYS[1], ARGV[1], ARGV[3]) end
return 1
"""


def claim(connection: Redis, todo_key: str, leases_key: str, owner: str, lease_s: float) -> str | None:
    """The next chunk nobody has taken, or one whose holder went silent; leased to ``owner``. None: nothing left."""
    now = time.time()
    chunk = connection.eval(_CLAIM, 2, todo_key, leases_key, owner, f"{now:.3f}", f"{now + lease_s:.3f}")
    return chunk.decode() if chunk else None


def renew(connection: Redis, leases_key: str, chunk: str, owner: str, lease_s: float | None) -> bool:
    """Extend our lease on ``chunk`` (``lease_s`` None: give it up); False when another worker took it over."""
    value = "" if lease_s is None else f"{owner}|{time.time() + lease_s:.3f}"
    return bool(connection.eval(_RENEW, 1, leases_key, chunk, owner, value))
