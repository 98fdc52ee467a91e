"""``redis://host:port/db``: storage shared by several router processes.

Every router pointed at the same Redis (and key prefix) shares one dedup window and one set
of queues: an event accepted by any of them is remembered by all, and any of them may deliver
it. Each change that must be atomic — accepting an event (dedup record and jobs), leasing,
recording a job's fate, replaying — is one Lua script, so Redis runs it without interleaving
another process's commands. See ``docs/storage.md`` for the key layout and the guarantees.

Takeover is lease based: a leased job is hidden from the other processes until its lease
lapses; then the next ``lease`` of that destination, in whichever process, puts it back in the
ready queue. A process killed with ``kill -9`` cannot hand its work back, so its in-flight jobs
wait out their lease (the delivery service leases for ``max(300 s, 4 × timeout)``) and are then
sent again by the others: at least once, never lost. ``open(recover=True)`` takes back only
lapsed leases, because the other holders may be alive.

Needs a standalone Redis (or a primary with replicas): the scripts build key names at run
time, which Redis Cluster forbids.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson

from router.errors import RouterError, StorageFull, StorageMisconfigured, StorageUnavailable
from router.storage.base import (Acceptance, DeadLetter, DeadLetterFilter, Failure, Job,
                                 QueueStats, Storage, StorageStats, amount_of_bytes)

try:  # an optional dependency: ``pip install event-router[redis]``
    import redis.asyncio as aioredis
    from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS
    from redis.asyncio.connection import parse_url as _parse_redis_url
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import (AuthenticationError, MasterDownError, NoPermissionError,
                                  OutOfMemoryError, ReadOnlyError, ResponseError)
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError:  # pragma: no cover - reported when a redis:// URL is used
    aioredis = None  # type: ignore[assignment]

log = logging.getLogger("router.storage.redis")

DEFAULT_PREFIX = "router"
HEALTH_PROBE_TTL_MS = 10_000
"""How long the key ``ping``'s probe write sets lives."""
MOVE_CAP = 5000
"""Most jobs one ``lease`` call moves from lapsed leases, and from retries come due, to the
ready queue. Bounds how long one script blocks Redis after an outage; the next call moves more."""
ORDERED_SCAN_MAX = 5000
"""Most ready jobs an ordered ``lease`` looks at to find users' heads. Past it, a lease may
return fewer jobs than are available (never a wrong one); later calls find them as the
blocked users' earlier jobs finish."""
ORDERED_PAGE = 200
LETTER_PAGE = 500
DEDUP_BUCKET = 60
"""Width in seconds of the buckets that count dedup entries by expiry (``stats``)."""
CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 30.0
MAX_CONNECTIONS = 64
"""Connections one process keeps to Redis. More concurrent calls wait for a free one (up to
``COMMAND_TIMEOUT``) rather than fail: a burst of intake requests queues, it is not refused."""
NEEDED_ACL = ("; the router runs Lua scripts, so its Redis user needs +evalsha, +eval and "
              "+script|load, and the commands the scripts call (+@read +@write) on its keys, "
              "and +ping and +info for its checks")
"""Appended to a NOPERM error, at open or at run time."""
_WARNED: set[tuple[Any, ...]] = set()

# -- Lua --------------------------------------------------------------------------------------
#
# Every script gets the key prefix as ARGV[1] and builds key names from it with the helpers
# below, which ``_Keys`` mirrors in Python. Numbers that must survive exactly (timestamps)
# arrive as strings from Python and are stored as given; scores given to ZADD as Lua numbers
# are formatted by Redis with 17 significant digits, so they round-trip as well.
#
# Job states, per destination d: ready (zset ready:d, score = job id, so the lowest id —
# the oldest job — comes first), waiting for a retry (zset waiting:d, score = due time) and
# leased (zset leased:d, score = lease expiry; the job hash's ``owner`` names the holder).
# Every job is also in jobs:d (score = created_at: pending count and oldest) and in
# user:<len(d)>:d:<user> (score = id: the user's head, for ordered leasing).

_HELPERS = """
local P = ARGV[1]
local IDS = P .. ':ids'
local DESTINATIONS = P .. ':destinations'
local SEEN_COUNT = P .. ':seen-count'
local SEEN_PRUNED = P .. ':seen-pruned'
local LETTERS_ALL = P .. ':letters-all'
local function job_key(id) return P .. ':job:' .. id end
local function ready_key(d) return P .. ':ready:' .. d end
local function waiting_key(d) return P .. ':waiting:' .. d end
local function leased_key(d) return P .. ':leased:' .. d end
local function jobs_key(d) return P .. ':jobs:' .. d end
-- length-prefixed: destination 'a:b' with user 'c' must not share a key with 'a' and 'b:c'
local function user_key(d, u) return P .. ':user:' .. #d .. ':' .. d .. ':' .. u end
local function letter_key(id) return P .. ':letter:' .. id end
local function letters_key(d) return P .. ':letters:' .. d end

-- A new job, due at once: in every index it belongs to.
local function enqueue(id, d, message_id, user, group, body, created)
  redis.call('HSET', job_key(id), 'destination', d, 'message_id', message_id,
             'user_key', user, 'group', group, 'body', body, 'created_at', created,
             'attempts', 0)
  redis.call('ZADD', ready_key(d), id, id)
  redis.call('ZADD', jobs_key(d), created, id)
  redis.call('ZADD', user_key(d, user), id, id)
  redis.call('SADD', DESTINATIONS, d)
end

-- A job gone for good (delivered or dead-lettered): out of every index, whatever its state.
local function forget(id, d, user)
  redis.call('ZREM', ready_key(d), id)
  redis.call('ZREM', waiting_key(d), id)
  redis.call('ZREM', leased_key(d), id)
  redis.call('ZREM', jobs_key(d), id)
  redis.call('ZREM', user_key(d, user), id)
  redis.call('DEL', job_key(id))
end

-- The job's destination when ``token`` holds its lease, else nil: a process whose lease
-- lapsed (and was taken over) must not record a fate for a job it no longer holds.
local function held_by(id, token)
  local fields = redis.call('HMGET', job_key(id), 'destination', 'owner')
  local d, owner = fields[1], fields[2]
  if not d or owner ~= token then return nil end
  if not redis.call('ZSCORE', leased_key(d), id) then return nil end
  return d
end

-- Takeover: leases that lapsed at or before ``now`` go back to the ready queue, whoever held
-- them (their holder is presumed dead). At most ``cap`` per call.
local function take_back_lapsed(d, now, cap)
  local lapsed = redis.call('ZRANGEBYSCORE', leased_key(d), '-inf', now, 'LIMIT', 0, cap)
  for _, id in ipairs(lapsed) do
    redis.call('ZREM', leased_key(d), id)
    redis.call('HDEL', job_key(id), 'owner')
    redis.call('ZADD', ready_key(d), id, id)
  end
  return #lapsed
end
"""

ACCEPT = _HELPERS + """
-- accept: remember each event's (source, messageId) and queue its jobs, all or nothing per
-- call (Redis runs the script alone). A key present with a logical expiry after ``now`` is a
-- duplicate; an expired one (still present because PX counts real time, or because ``now``
-- is a test's clock) is overwritten, starting a new window.
-- ARGV: prefix, now, expires_at, px, expiry_bucket, current_bucket, n_events; then per event:
--   dedup_key, n_jobs, and per job: destination, message_id, user_key, group, body.
-- Returns one 1 (accepted) or 0 (duplicate) per event.
local now = tonumber(ARGV[2])
local created, expires_at, px = ARGV[2], ARGV[3], ARGV[4]
local i = 8
local results = {}
local admitted = 0
for e = 1, tonumber(ARGV[7]) do
  local seen_key, n_jobs = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  local prior = redis.call('GET', seen_key)
  if prior and (tonumber(prior) or 0) > now then
    results[e] = 0
  else
    redis.call('SET', seen_key, expires_at, 'PX', px)
    for j = 0, n_jobs - 1 do
      local at = i + 5 * j
      enqueue(redis.call('INCR', IDS), ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3],
              ARGV[at + 4], created)
    end
    admitted = admitted + 1
    results[e] = 1
  end
  i = i + 5 * n_jobs
end
-- dedup entries counted per minute of expiry (stats); buckets wholly in the past are dropped
-- once a minute, so the hash stays at about window / 60 fields.
if admitted > 0 then redis.call('HINCRBY', SEEN_COUNT, ARGV[5], admitted) end
local current = ARGV[6]
if redis.call('GET', SEEN_PRUNED) ~= current then
  for _, bucket in ipairs(redis.call('HKEYS', SEEN_COUNT)) do
    if tonumber(bucket) < tonumber(current) then redis.call('HDEL', SEEN_COUNT, bucket) end
  end
  redis.call('SET', SEEN_PRUNED, current)
end
return results
"""

LEASE = _HELPERS + """
-- lease: take back lapsed leases, promote retries come due, then take up to ``limit`` ready
-- jobs, lowest id (oldest) first, leasing them to ``token`` until ``lease_until``.
-- With ``ordered``, a job is taken only when no lower id of its (destination, user) holds
-- the user's line, in any state (ready, leased, waiting): every earlier job holds it, or
-- with ``hold`` (0: none) those that have failed fewer than ``hold`` attempts.
-- ARGV: prefix, destination, now, lease_until, limit, ordered (0/1), token, cap, scan_max,
-- page, hold
-- Returns per job: id, message_id, user_key, group, body, created_at, attempts, first_attempt_at
local d, now, lease_until = ARGV[2], ARGV[3], ARGV[4]
local limit, ordered, token = tonumber(ARGV[5]), ARGV[6] == '1', ARGV[7]
local cap, scan_max, page = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local hold = tonumber(ARGV[11])

-- The id of the user's first job that holds the line, or false: the user's head, or with
-- ``hold`` the first that has failed fewer attempts than that.
local function first_holding(user)
  local start = 0
  while true do
    local ids = redis.call('ZRANGE', user_key(d, user), start, start + 9)
    if #ids == 0 then return false end
    for _, id in ipairs(ids) do
      if hold == 0 or tonumber(redis.call('HGET', job_key(id), 'attempts') or '0') < hold then
        return tonumber(id)
      end
    end
    start = start + 10
  end
end
take_back_lapsed(d, now, cap)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', waiting_key(d), '-inf', now, 'LIMIT', 0, cap)) do
  redis.call('ZREM', waiting_key(d), id)
  redis.call('ZADD', ready_key(d), id, id)
end
if limit < 1 then return {} end

local chosen = {}
if ordered then
  local holder = {}  -- per user: the first job that holds the line, false for none
  local offset = 0
  while #chosen < limit and offset < scan_max do
    local ids = redis.call('ZRANGE', ready_key(d), offset, offset + page - 1)
    if #ids == 0 then break end
    for _, id in ipairs(ids) do
      local user = redis.call('HGET', job_key(id), 'user_key')
      if user then
        if holder[user] == nil then holder[user] = first_holding(user) end
        if not holder[user] or tonumber(id) <= holder[user] then
          chosen[#chosen + 1] = id
          if #chosen >= limit then break end
        end
      end
    end
    offset = offset + page
  end
else
  chosen = redis.call('ZRANGE', ready_key(d), 0, limit - 1)
end

local leased = {}
for _, id in ipairs(chosen) do
  redis.call('ZREM', ready_key(d), id)
  local f = redis.call('HMGET', job_key(id), 'message_id', 'user_key', 'group', 'body',
                       'created_at', 'attempts', 'first_attempt_at')
  if f[1] then  -- a queue entry without its job cannot happen; if it did, drop the entry
    redis.call('ZADD', leased_key(d), lease_until, id)
    redis.call('HSET', job_key(id), 'owner', token)
    leased[#leased + 1] = {id, f[1], f[2], f[3], f[4], f[5], f[6], f[7]}
  end
end
return leased
"""

RECLAIM = _HELPERS + """
-- open(recover=True): take back lapsed leases of the given destinations (never live ones:
-- their holders may be other routers at work). ARGV: prefix, now, cap, destinations...
-- Returns how many jobs went back to their ready queues.
local moved = 0
for a = 4, #ARGV do moved = moved + take_back_lapsed(ARGV[a], ARGV[2], tonumber(ARGV[3])) end
return moved
"""

COMPLETE = _HELPERS + """
-- complete: the jobs were delivered; forget them in whatever state they are. Deliberately
-- not restricted to the caller's lease: a success is final, so a late completion by a
-- process whose lease lapsed only saves a duplicate. But only a job that still carries the
-- delivered event's messageId: after Redis loses writes, its id counter may hand an id out
-- again, and the new job must not go with the old one.
-- ARGV: prefix, then id and messageId pairs. Returns how many were found.
local done = 0
for a = 2, #ARGV, 2 do
  local f = redis.call('HMGET', job_key(ARGV[a]), 'destination', 'user_key', 'message_id')
  if f[1] and f[3] == ARGV[a + 1] then
    forget(ARGV[a], f[1], f[2])
    done = done + 1
  end
end
return done
"""

# RETRY and DEAD_LETTER begin with a ZREM of the lease: over `maxmemory`, Redis refuses a
# script's first write when it may grow memory (HSET, INCR), and lets the rest of a script
# through once it has written. Begun with ZREM, which frees memory and is never refused,
# delivery records its retries and dead letters on a full Redis, as it records deliveries.
# Refused, every failed job went back to the queue and was sent again at once, without
# backoff or an attempt counted, for as long as Redis stayed full.
RETRY = _HELPERS + """
-- retry: leased jobs wait until their due time, with their new attempt counts; only jobs
-- still leased by ``token``. ARGV: prefix, token, then per job: id, due, attempts,
-- first_attempt_at ('' for none), reason. Returns how many were put back.
local token, done = ARGV[2], 0
for a = 3, #ARGV, 5 do
  local id = ARGV[a]
  local d = held_by(id, token)
  if d then
    redis.call('ZREM', leased_key(d), id)  -- first: see the note above RETRY
    redis.call('HSET', job_key(id), 'attempts', ARGV[a + 2], 'last_error', ARGV[a + 4])
    if ARGV[a + 3] == '' then
      redis.call('HDEL', job_key(id), 'first_attempt_at', 'owner')
    else
      redis.call('HSET', job_key(id), 'first_attempt_at', ARGV[a + 3])
      redis.call('HDEL', job_key(id), 'owner')
    end
    redis.call('ZADD', waiting_key(d), ARGV[a + 1], id)
    done = done + 1
  end
end
return done
"""

DEAD_LETTER = _HELPERS + """
-- dead_letter: move jobs still leased by ``token`` to the dead-letter store (a hash per
-- letter, indexed per destination and overall, by letter id).
-- ARGV: prefix, token, failed_at, n, then n/2 (field, value) pairs of the failure (reason,
-- and status / request / response when known), then per job: id, attempts, first_attempt_at
-- ('' when it was never sent).
-- Returns how many letters were written.
local token, failed_at, n = ARGV[2], ARGV[3], tonumber(ARGV[4])
local failure = {}
for a = 5, 4 + n do failure[#failure + 1] = ARGV[a] end
local done = 0
for a = 5 + n, #ARGV, 3 do
  local id = ARGV[a]
  local d = held_by(id, token)
  if d then
    redis.call('ZREM', leased_key(d), id)  -- first: see the note above RETRY
    local f = redis.call('HMGET', job_key(id), 'message_id', 'user_key', 'group', 'body',
                         'created_at')
    local letter = redis.call('INCR', IDS)
    redis.call('HSET', letter_key(letter), 'destination', d, 'message_id', f[1],
               'user_key', f[2], 'group', f[3], 'body', f[4], 'created_at', f[5],
               'attempts', ARGV[a + 1], 'failed_at', failed_at, unpack(failure))
    if ARGV[a + 2] ~= '' then
      redis.call('HSET', letter_key(letter), 'first_attempt_at', ARGV[a + 2])
    end
    redis.call('ZADD', letters_key(d), letter, letter)
    redis.call('ZADD', LETTERS_ALL, letter, letter)
    forget(id, d, f[2])
    done = done + 1
  end
end
return done
"""

RELEASE = _HELPERS + """
-- release: jobs still leased by ``token`` go back to the ready queue untouched (shutdown).
-- ARGV: prefix, token, ids... Returns how many went back.
local token, done = ARGV[2], 0
for a = 3, #ARGV do
  local id = ARGV[a]
  local d = held_by(id, token)
  if d then
    redis.call('ZREM', leased_key(d), id)
    redis.call('HDEL', job_key(id), 'owner')
    redis.call('ZADD', ready_key(d), id, id)
    done = done + 1
  end
end
return done
"""

REPLAY = _HELPERS + """
-- replay: each dead letter that still exists becomes a new job of its own destination, due
-- at once, attempts reset, and the letter is deleted — atomically, so two concurrent replays
-- queue a letter once. ARGV: prefix, now, letter ids... Returns how many were queued.
local created, done = ARGV[2], 0
for a = 3, #ARGV do
  local lid = ARGV[a]
  local f = redis.call('HMGET', letter_key(lid), 'destination', 'message_id', 'user_key',
                       'group', 'body')
  if f[1] then
    enqueue(redis.call('INCR', IDS), f[1], f[2], f[3], f[4], f[5], created)
    redis.call('DEL', letter_key(lid))
    redis.call('ZREM', letters_key(f[1]), lid)
    redis.call('ZREM', LETTERS_ALL, lid)
    done = done + 1
  end
end
return done
"""

PURGE = _HELPERS + """
-- purge: delete dead letters that still exist. ARGV: prefix, letter ids...
-- Returns how many were deleted.
local done = 0
for a = 2, #ARGV do
  local lid = ARGV[a]
  local d = redis.call('HGET', letter_key(lid), 'destination')
  if d then
    redis.call('DEL', letter_key(lid))
    redis.call('ZREM', letters_key(d), lid)
    redis.call('ZREM', LETTERS_ALL, lid)
    done = done + 1
  end
end
return done
"""

# RENEW takes each lease out and puts it back, rather than moving its score with ZADD XX:
# a ZREM first is never refused, so a renewal goes through on a full Redis too. A Redis
# filled by a destination that stays down refused every renewal, and the leases of a live
# worker lapsed and were taken over: its jobs were sent twice.
RENEW = _HELPERS + """
-- renew: extend the leases of jobs still leased by ``token`` to ``lease_until`` (a worker
-- kept waiting by its destination). ARGV: prefix, token, lease_until, ids...
-- Returns how many were extended.
local token, lease_until, done = ARGV[2], ARGV[3], 0
for a = 4, #ARGV do
  local id = ARGV[a]
  local d = held_by(id, token)
  if d then
    redis.call('ZREM', leased_key(d), id)
    redis.call('ZADD', leased_key(d), lease_until, id)
    done = done + 1
  end
end
return done
"""

_SCRIPTS = {"accept": ACCEPT, "lease": LEASE, "reclaim": RECLAIM, "complete": COMPLETE,
            "retry": RETRY, "dead_letter": DEAD_LETTER, "release": RELEASE,
            "renew": RENEW, "replay": REPLAY, "purge": PURGE}


class _Keys:
    """Key names, built exactly as the Lua helpers build them (``_HELPERS``)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.ids = f"{prefix}:ids"
        self.destinations = f"{prefix}:destinations"
        self.seen_count = f"{prefix}:seen-count"
        self.letters_all = f"{prefix}:letters-all"
        self.health = f"{prefix}:health"

    def seen(self, source: str, message_id: str) -> str:
        # length-prefixed source: ("a:b", "c") and ("a", "b:c") are different events
        return f"{self.prefix}:seen:{len(source.encode())}:{source}:{message_id}"

    def job(self, job_id: int | str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def ready(self, destination: str) -> str:
        return f"{self.prefix}:ready:{destination}"

    def waiting(self, destination: str) -> str:
        return f"{self.prefix}:waiting:{destination}"

    def leased(self, destination: str) -> str:
        return f"{self.prefix}:leased:{destination}"

    def jobs(self, destination: str) -> str:
        return f"{self.prefix}:jobs:{destination}"

    def letter(self, letter_id: int | str) -> str:
        return f"{self.prefix}:letter:{letter_id}"

    def letters(self, destination: str) -> str:
        return f"{self.prefix}:letters:{destination}"


_TEXT_URL_OPTIONS = frozenset(("client_name", "username", "password", "lib_name",
                               "lib_version", "encoding", "encoding_errors"))
"""Connection arguments redis-py takes as they come in a URL's query, as text."""


def _redis_url_options() -> frozenset[str]:
    """The names redis-py takes in a URL's query: those it parses (they vary between its
    versions), and the connection arguments that are text. A misspelt name, or one that
    wants an object (``retry``, ``credential_provider``), is then refused when the config
    loads, not found by a TypeError when the router first connects."""
    return frozenset(URL_QUERY_ARGUMENT_PARSERS) | _TEXT_URL_OPTIONS


class RedisStorage(Storage):
    """The storage in one Redis database, under a key prefix (default ``router``).

    Each instance leases under its own owner token, so two instances in one process behave
    like two router processes (the tests rely on that).
    """

    leases_lapse = True

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX,
                 allow_eviction: bool = False) -> None:
        if aioredis is None:
            raise RouterError("redis:// storage needs the redis package: "
                              "pip install 'event-router[redis]'")
        self._url = url  # may hold a password: never logged, never in an error message
        self.prefix = prefix
        self.allow_eviction = allow_eviction
        self.keys = _Keys(prefix)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._client: Any = None
        self._scripts: dict[str, Any] = {}

    @classmethod
    def from_url(cls, url: str) -> RedisStorage:
        """``redis://[:password@]host:port/db?prefix=router``. ``prefix`` namespaces every key,
        so several routers (or test runs) can share one database; other query options go to
        redis-py (``socket_timeout``, ...). Does not connect: ``open`` does."""
        parts = urlsplit(url)
        prefix = DEFAULT_PREFIX
        allow_eviction = False
        rest: list[tuple[str, str]] = []
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name == "prefix":
                prefix = value
            elif name.startswith("ssl"):  # redis-py takes them for rediss:// only
                raise ValueError("TLS to Redis (rediss://, ssl options) is not supported yet")
            elif name == "eviction":
                if value != "allowed":
                    raise ValueError("the eviction option of a redis:// storage URL takes "
                                     "only `allowed`")
                allow_eviction = True
            elif aioredis is not None and name not in _redis_url_options():
                raise ValueError(f"unknown redis:// storage option {name!r}; the router's own "
                                 "are prefix and eviction, and redis-py takes its connection "
                                 "options such as socket_timeout")
            else:
                rest.append((name, value))
        if not prefix:
            raise ValueError("the prefix of a redis:// storage URL must not be empty")
        plain = urlunsplit(parts._replace(query=urlencode(rest)))
        if aioredis is not None:
            try:
                _parse_redis_url(plain)
            except ValueError as exc:  # the message names the bad part, not the password
                raise ValueError(f"invalid redis:// storage URL: {exc}") from None
        return cls(plain, prefix=prefix, allow_eviction=allow_eviction)

    def __repr__(self) -> str:
        return f"RedisStorage(prefix={self.prefix!r}, token={self.token!r})"

    # -- life cycle -------------------------------------------------------------------------

    async def open(self, *, recover: bool = True) -> None:
        pool = aioredis.BlockingConnectionPool.from_url(
            self._url, max_connections=MAX_CONNECTIONS, timeout=COMMAND_TIMEOUT,
            **self._client_defaults())
        client = aioredis.Redis.from_pool(pool)
        try:
            await client.ping()
        except AuthenticationError:
            await client.aclose()
            if urlsplit(self._url).password is None:  # redis-py says "HELLO must be called..."
                raise StorageMisconfigured(
                    "Redis asks for a password and the storage URL gives none: write it as "
                    "redis://:PASSWORD@host (or USER:PASSWORD), from an environment variable"
                    ) from None
            raise
        except BaseException:
            await client.aclose()
            raise
        self._client = client
        self._scripts = {name: client.register_script(source)
                         for name, source in _SCRIPTS.items()}
        try:
            await self._check_server()
            await self._check_scripts_allowed()
        except BaseException:
            await self.close()
            raise
        if recover:
            await self._reclaim_lapsed(now=time.time())

    def _client_defaults(self) -> dict[str, Any]:
        """Timeouts unless the URL sets them: a hung Redis must fail an intake request, not
        hold it forever."""
        query = dict(parse_qsl(urlsplit(self._url).query))
        defaults: dict[str, Any] = {}
        if "socket_connect_timeout" not in query:
            defaults["socket_connect_timeout"] = CONNECT_TIMEOUT
        if "socket_timeout" not in query:
            defaults["socket_timeout"] = COMMAND_TIMEOUT
        return defaults

    async def _check_server(self) -> None:
        """Refuse a Redis that evicts keys when memory runs short (any maxmemory-policy but
        noeviction): it drops queued jobs, or the dedup entries (they expire, so the
        ``volatile-*`` policies, a managed Redis's usual default, take them first), without a
        word, and an evicted id counter makes new jobs overwrite old ones. ``?eviction=allowed``
        accepts that knowingly. Warn when Redis runs without AOF (a restart loses what came
        since its last snapshot), or when INFO is forbidden and none of this can be checked.
        Warnings come once per server and process: ``router dlq`` and tests open often."""
        assert self._client is not None
        try:
            persistence = await self._client.info("persistence")
            memory = await self._client.info("memory")
        except ResponseError:  # INFO may be forbidden by an ACL
            self._warn_once("redis storage: INFO is not allowed for this user, so the router "
                            "cannot check that Redis keeps its data (appendonly yes) and never "
                            "evicts it (maxmemory-policy noeviction); make sure it does")
            return
        policy = memory.get("maxmemory_policy", "noeviction")
        if policy != "noeviction":
            if not self.allow_eviction:
                raise StorageMisconfigured(
                    f"Redis's maxmemory-policy is {policy}: when memory runs short it evicts "
                    "queued jobs or dedup entries without a word (events lost or sent twice); "
                    "set maxmemory-policy noeviction, or add ?eviction=allowed to the storage "
                    "URL to accept that")
            self._warn_once(f"redis storage: maxmemory-policy is {policy} and eviction is "
                            "allowed: Redis may drop queued jobs and dedup entries when memory "
                            "runs short")
        if not int(persistence.get("aof_enabled", 0)):
            self._warn_once("redis storage: Redis runs without AOF (appendonly no); events "
                            "acknowledged since its last snapshot are lost if Redis restarts")

    async def _check_scripts_allowed(self) -> None:
        """Run a script that changes nothing (a renewal of no job). A user whose ACL forbids
        scripts passed every check at start, ``/health`` included, and then every event was
        answered 500."""
        try:
            await self._scripts["renew"](args=[self.prefix, self.token, "0"])
        except NoPermissionError as exc:
            raise StorageMisconfigured(f"Redis refuses this user the router's scripts: "
                                       f"{exc}{NEEDED_ACL}") from None

    def _warn_once(self, message: str) -> None:
        assert self._client is not None
        where = self._client.connection_pool.connection_kwargs
        key = (where.get("host"), where.get("port"), where.get("path"), where.get("db"),
               message)
        if key not in _WARNED:
            _WARNED.add(key)
            log.warning("%s", message)

    async def _reclaim_lapsed(self, *, now: float) -> int:
        destinations = await self._destinations()
        moved = 0
        if destinations:
            while True:
                step = await self._run("reclaim", [_num(now), MOVE_CAP, *destinations])
                moved += step
                if step < MOVE_CAP:
                    break
        if moved:
            log.info("redis storage: took back %d job(s) whose lease had lapsed", moved)
        return moved

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def _run(self, script: str, args: Sequence[Any]) -> Any:
        """Run one of the scripts, its errors translated (``_translated_errors``): intake
        answers "try later" instead of acknowledging what it could not keep."""
        if self._client is None:
            raise RuntimeError("storage is not open")
        with _translated_errors():
            return await self._scripts[script](args=[self.prefix, *args])

    # -- the interface ----------------------------------------------------------------------

    async def accept(self, items: Sequence[Acceptance], *, window: float, now: float
                     ) -> list[bool]:
        if not items:
            return []
        expires_at = now + window
        args: list[Any] = [_num(now), _num(expires_at), max(1, math.ceil(window * 1000)),
                           math.floor(expires_at / DEDUP_BUCKET),
                           math.floor(now / DEDUP_BUCKET), len(items)]
        for item in items:
            args += [self.keys.seen(item.source, item.message_id), len(item.jobs)]
            for job in item.jobs:
                args += [job.destination, job.message_id, job.user_key, job.group, job.body]
        return [bool(flag) for flag in await self._run("accept", args)]

    async def seen_before(self, source: str, message_ids: Sequence[str], *, now: float
                          ) -> set[str]:
        """Each id's key holds its expiry, and Redis drops it then (its own clock; ``now``
        is for the backends that keep expired entries). A client of its own, opened and
        closed here: the storage need not be open."""
        if not message_ids:
            return set()
        client = aioredis.Redis.from_url(self._url, **self._client_defaults())
        try:
            with _translated_errors():
                async with client.pipeline(transaction=False) as pipeline:
                    for message_id in message_ids:
                        pipeline.exists(self.keys.seen(source, message_id))
                    found = await pipeline.execute()
        finally:
            await client.aclose()
        return {message_id for message_id, exists in zip(message_ids, found) if exists}

    async def lease(self, destination: str, limit: int, *, now: float, lease_for: float,
                    ordered: bool = False, hold_attempts: int | None = None) -> list[Job]:
        rows = await self._run("lease", [destination, _num(now), _num(now + lease_for), limit,
                                         1 if ordered else 0, self.token, MOVE_CAP,
                                         ORDERED_SCAN_MAX, ORDERED_PAGE, hold_attempts or 0])
        return [Job(int(row[0]), destination, row[1].decode(), row[2].decode(), row[3].decode(),
                    bytes(row[4]), float(row[5]), int(row[6]),
                    float(row[7]) if row[7] is not None else None) for row in rows]

    async def complete(self, jobs: Sequence[Job]) -> None:
        if jobs:
            await self._run("complete", [value for job in jobs
                                         for value in (str(job.id), job.message_id)])

    async def retry(self, jobs: Sequence[Job], *, not_before: Sequence[float], now: float,
                    failure: Failure) -> None:
        args: list[Any] = [self.token]
        for job, due in zip(jobs, not_before):
            args += [str(job.id), _num(due), job.attempts,
                     "" if job.first_attempt_at is None else _num(job.first_attempt_at),
                     failure.reason]
        if len(args) > 1:
            await self._run("retry", args)

    async def dead_letter(self, jobs: Sequence[Job], *, now: float, failure: Failure) -> None:
        if not jobs:
            return
        fields: list[Any] = ["reason", failure.reason]
        if failure.status is not None:
            fields += ["status", failure.status]
        if failure.request is not None:
            fields += ["request", orjson.dumps(failure.request)]
        if failure.response is not None:
            fields += ["response", failure.response]
        args: list[Any] = [self.token, _num(now), len(fields), *fields]
        for job in jobs:
            args += [str(job.id), job.attempts,
                     "" if job.first_attempt_at is None else _num(job.first_attempt_at)]
        await self._run("dead_letter", args)

    async def release(self, job_ids: Sequence[int | str]) -> None:
        if job_ids:
            await self._run("release", [self.token, *(str(job_id) for job_id in job_ids)])

    async def renew(self, job_ids: Sequence[int | str], *, now: float, lease_for: float
                    ) -> None:
        if job_ids:
            await self._run("renew", [self.token, _num(now + lease_for),
                                      *(str(job_id) for job_id in job_ids)])

    async def dead_letters(self, where: DeadLetterFilter, *, limit: int = 100) -> list[DeadLetter]:
        found: list[DeadLetter] = []
        if limit <= 0:
            return found
        async for chunk in self._matching_letters(where, newest_first=True):
            found.extend(chunk)
            if len(found) >= limit:
                break
        return list(reversed(found[:limit]))

    async def replay(self, where: DeadLetterFilter, *, now: float) -> int:
        # Only letters that exist now: a replayed job failing again during a long replay
        # becomes a newer letter, which this replay must not pick up again.
        upto = await self._last_id()
        replayed = 0
        async for chunk in self._matching_letters(where, upto=upto):
            replayed += await self._run("replay", [_num(now), *(letter.id for letter in chunk)])
        return replayed

    async def purge(self, where: DeadLetterFilter) -> int:
        upto = await self._last_id()
        purged = 0
        async for chunk in self._matching_letters(where, upto=upto):
            purged += await self._run("purge", [letter.id for letter in chunk])
        return purged

    async def stats(self, *, now: float) -> StorageStats:
        client = self._require_client()
        with _translated_errors():  # as every other call: /metrics and serve's start read it
            destinations = await self._destinations()
            async with client.pipeline(transaction=False) as pipe:
                for destination in destinations:
                    pipe.zcard(self.keys.jobs(destination))
                    pipe.zrange(self.keys.jobs(destination), 0, 0, withscores=True)
                    pipe.zcard(self.keys.letters(destination))
                pipe.hgetall(self.keys.seen_count)
                replies = await pipe.execute()
        stats = StorageStats()
        for index, destination in enumerate(destinations):
            pending, oldest, letters = replies[3 * index:3 * index + 3]
            if pending or letters:
                stats.queues[destination] = QueueStats(
                    pending, float(oldest[0][1]) if oldest else None, letters)
        current = math.floor(now / DEDUP_BUCKET)
        stats.dedup_entries = sum(int(count) for bucket, count in replies[-1].items()
                                  if int(bucket) >= current)
        return stats

    async def ping(self) -> bool:
        """Redis answers and takes new work: over ``maxmemory`` it refuses every accept
        (``StorageFull``), and a replica refuses every write (``StorageUnavailable``), so
        ``/health`` says so rather than "ok" (a load balancer kept sending every event to a
        router whose Redis had become a replica in a failover). Where the user may not run
        ``INFO``, answering a ``PING`` is all that is asked."""
        client = self._require_client()
        with _translated_errors():
            try:  # one section a call: Redis 6 takes no more (7 does)
                memory = await client.info("memory")
                role = (await client.info("replication")).get("role")
            except ResponseError:  # NOPERM: a user without INFO
                return bool(await client.ping())
        policy = memory.get("maxmemory_policy", "noeviction")
        if policy != "noeviction" and not self.allow_eviction:
            # Checked at start; set since (CONFIG SET), it went unnoticed while Redis could
            # drop queued jobs and dedup entries without a word.
            raise StorageUnavailable(f"Redis's maxmemory-policy is {policy} since the router "
                                     "started: it may evict queued jobs or dedup entries; set "
                                     "it back to noeviction (or add ?eviction=allowed to the "
                                     "storage URL to accept that)")
        if role == "slave":
            raise StorageUnavailable("Redis is a replica, which refuses writes (after a "
                                     "failover, the storage URL may name the old primary): "
                                     "intake is refused until it is a primary again")
        # As Redis counts it when it refuses writes: replication and AOF buffers left out.
        used = int(memory.get("used_memory") or 0) - int(
            memory.get("mem_not_counted_for_evict") or 0)
        limit = int(memory.get("maxmemory") or 0)
        if limit and used > limit:
            raise StorageFull(f"Redis is out of memory ({amount_of_bytes(used)} used of its "
                              f"maxmemory {amount_of_bytes(limit)}): intake is refused until "
                              "delivery frees room")
        with _translated_errors():
            # A write, as every accept makes: a primary with too few replicas for its
            # min-replicas-to-write refused every event while this said ok.
            await client.set(self.keys.health, b"1", px=HEALTH_PROBE_TTL_MS)
        return True

    # -- helpers ----------------------------------------------------------------------------

    def _require_client(self) -> Any:
        if self._client is None:
            raise RuntimeError("storage is not open")
        return self._client

    async def _destinations(self) -> list[str]:
        members = await self._require_client().smembers(self.keys.destinations)
        return sorted(member.decode() for member in members)

    async def _last_id(self) -> int:
        return int(await self._require_client().get(self.keys.ids) or 0)

    async def _matching_letters(self, where: DeadLetterFilter, *, upto: int | None = None,
                                newest_first: bool = False) -> AsyncIterator[list[DeadLetter]]:
        """The dead letters ``where`` selects, in id order (or the reverse), a page at a
        time. Letters are never changed once written, so a filter checked here still holds
        when a script then acts on the page (which skips letters deleted in between)."""
        if where.ids is not None:
            wanted = sorted({int(i) for i in where.ids if _is_id(i)}, reverse=newest_first)
            if upto is not None:
                wanted = [i for i in wanted if i <= upto]
            for start in range(0, len(wanted), LETTER_PAGE):
                page = [letter for letter in await self._letters(wanted[start:start + LETTER_PAGE])
                        if _matches(letter, where)]
                if page:
                    yield page
            return
        index = self.keys.letters_all
        if where.destination is not None:
            named = [d for d in await self._destinations() if where.selects(d)]
            if not named:
                return
            if len(named) == 1:
                index = self.keys.letters(named[0])
        client = self._require_client()
        lowest, highest = "-inf", "+inf" if upto is None else upto
        while True:
            if newest_first:
                ids = await client.zrevrangebyscore(index, highest, lowest,
                                                    start=0, num=LETTER_PAGE)
            else:
                ids = await client.zrangebyscore(index, lowest, highest,
                                                 start=0, num=LETTER_PAGE)
            if not ids:
                return
            if newest_first:
                highest = f"({int(ids[-1])}"
            else:
                lowest = f"({int(ids[-1])}"
            page = [letter for letter in await self._letters([int(i) for i in ids])
                    if _matches(letter, where)]
            if page:
                yield page

    async def _letters(self, letter_ids: Sequence[int]) -> list[DeadLetter]:
        async with self._require_client().pipeline(transaction=False) as pipe:
            for letter_id in letter_ids:
                pipe.hgetall(self.keys.letter(letter_id))
            records = await pipe.execute()
        return [_letter(letter_id, record) for letter_id, record in zip(letter_ids, records)
                if record]


def _letter(letter_id: int, record: dict[bytes, bytes]) -> DeadLetter:
    def text(name: str) -> str:
        return record[name.encode()].decode()

    status = record.get(b"status")
    request = record.get(b"request")
    response = record.get(b"response")
    first_attempt_at = record.get(b"first_attempt_at")
    return DeadLetter(letter_id, text("destination"), text("message_id"), text("user_key"),
                      text("group"), bytes(record[b"body"]), int(record[b"attempts"]),
                      float(record[b"created_at"]), float(record[b"failed_at"]), text("reason"),
                      int(status) if status is not None else None,
                      orjson.loads(request) if request is not None else None,
                      response.decode() if response is not None else None,
                      float(first_attempt_at) if first_attempt_at is not None else None)


def _matches(letter: DeadLetter, where: DeadLetterFilter) -> bool:
    """The filter as the other backends apply it (ids are handled by the lookup)."""
    return (where.selects(letter.destination)
            and (where.reason is None or where.reason.lower() in letter.reason.lower())
            and (where.since is None or letter.failed_at >= where.since)
            and (where.until is None or letter.failed_at <= where.until))


def _is_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.isdigit()


def _num(value: float) -> str:
    """A number as Lua and Redis read it back exactly (``repr`` of a float round-trips)."""
    return repr(float(value))


@contextlib.contextmanager
def _translated_errors() -> Iterator[None]:
    """Redis refusing writes (out of memory, or persistence failing) as ``StorageFull``, and
    Redis out of reach (down, hung past the timeout, loading, no free connection) as
    ``StorageUnavailable``."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as exc:  # BusyLoadingError is one
        raise StorageUnavailable(f"Redis cannot be reached: {type(exc).__name__}: {exc}"
                                 ) from exc
    except ResponseError as exc:
        refusal = _refusal(exc)
        if refusal == "OOM":
            raise StorageFull(f"Redis is out of memory (maxmemory reached): {exc}") from exc
        if refusal == "MISCONF":
            raise StorageFull(f"Redis refuses writes, its persistence is failing: {exc}"
                              ) from exc
        if refusal == "READONLY":  # a replica: after a failover, say
            raise StorageUnavailable(f"Redis refuses writes, it is a read-only replica: "
                                     f"{exc}") from exc
        if refusal == "NOPERM":  # an ACL changed under a running router
            raise StorageUnavailable(f"Redis refuses this user a command: {exc}{NEEDED_ACL}"
                                     ) from exc
        if refusal in _UNAVAILABLE:
            raise StorageUnavailable(f"{_UNAVAILABLE[refusal]}: {exc}") from exc
        raise


_UNAVAILABLE = {
    "BUSY": "Redis is busy running another client's script, and answers nothing else until "
            "it ends or is killed (SCRIPT KILL)",
    "NOREPLICAS": "Redis refuses writes: fewer replicas are connected than its "
                  "min-replicas-to-write asks",
    "MASTERDOWN": "Redis is a replica cut off from its primary",
}
"""Refusals that pass: answered 500 each, with a traceback, they read as a bug of the router
(Redis server faults audit), not as the 503 with why that clients retry."""


_WRAPPED_IN_SCRIPT = re.compile(r"Error running script \(call to [^)]*\):.*?: -([A-Z]+) ")
_REFUSED_IN_SCRIPT = ("The user executing the script can't", "ACL failure in script")


def _refusal(exc: ResponseError) -> str | None:
    """Which of Redis's refusals ``exc`` is (``OOM``, ``MISCONF``, ``READONLY``, ``NOPERM``,
    ``BUSY``, ``NOREPLICAS``, ``MASTERDOWN``),
    also when a script's reply hides its code: Redis before 7.0 wraps an error raised inside
    a script under ``ERR`` (``Error running script (call to f_...): @user_script:80:
    @user_script: 80: -OOM command not allowed ...``), and every version, Valkey too, words
    an ACL refusal inside a script in its own way. Read as a plain ``ResponseError``, each was
    answered 500, a bug, instead of 503 with why (Redis 6.0 and 6.2, audit)."""
    if isinstance(exc, OutOfMemoryError):
        return "OOM"
    if isinstance(exc, ReadOnlyError):
        return "READONLY"
    if isinstance(exc, NoPermissionError):
        return "NOPERM"
    if isinstance(exc, MasterDownError):
        return "MASTERDOWN"
    message = str(exc)
    for code in ("MISCONF", "BUSY", "NOREPLICAS"):  # codes redis-py keeps in the message
        if message.startswith(code + " "):
            return code
    wrapped = _WRAPPED_IN_SCRIPT.match(message)
    if wrapped:
        return wrapped.group(1)
    if any(words in message for words in _REFUSED_IN_SCRIPT):
        return "NOPERM"
    return None
