"""``RedisStorage``: its URL, its connection and the checks at ``open``, and the ``Storage``
interface. Each change is one of the Lua scripts of ``scripts``, which also holds the key
layout (``_Keys``); Redis's errors are said as the router's own by ``errors``
(``router.storage.redis`` lists the modules)."""

from __future__ import annotations

import heapq
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson

from router.errors import RouterError, StorageFull, StorageMisconfigured, StorageUnavailable
from router.storage.base import (Acceptance, DeadLetter, DeadLetterFilter, Failure, Job,
                                 QueueStats, Storage, StorageStats, amount_of_bytes)
from router.storage.redis.errors import NEEDED_ACL, _translated_errors
from router.storage.redis.scripts import (ACCEPT, COMPLETE, DEAD_LETTER, INDEX, LEASE, PLACE,
                                         PURGE, RECLAIM, RELEASE, RENEW, REPLAY, RETRY, _Keys)

try:  # an optional dependency: ``pip install event-router[redis]``
    import redis.asyncio as aioredis
    from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS
    from redis.asyncio.connection import parse_url as _parse_redis_url
    from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
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
"""Most users an ordered ``lease`` looks at, in the order of their oldest ready job, however
many jobs each has queued. Only users whose earlier job holds back every ready one of theirs
(in flight, or waiting for a retry) cost a look without giving a job; past 5,000 of those
ahead of the others, a lease may return fewer jobs than are available (never a wrong one),
and later calls find them as those earlier jobs finish."""
ORDERED_PAGE = 200
"""Users an ordered lease reads from the index at a time."""
ORDERED_SWEEP = 500
"""Ready jobs an ordered lease that comes back short looks at for some the index lacks
(queued or put back by a router of an earlier version, which keeps no index): each pass
over the ready queue goes on where the last stopped."""
INDEX_STEP = 1000
"""Ready jobs one step of building a destination's index reads: a step is one script, which
Redis runs alone, so intake and the other routers go on between steps."""
LETTER_PAGE = 500
"""Dead letters read, and queued by a replay, at a time."""
PLACE_STEP = 1000
"""Letters one step of bringing a destination's index of letters by place up to date reads
(a script, as ``INDEX_STEP``'s)."""
DEDUP_BUCKET = 60
"""Width in seconds of the buckets that count dedup entries by expiry (``stats``)."""
CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 30.0
MAX_CONNECTIONS = 64
"""Connections one process keeps to Redis. More concurrent calls wait for a free one (up to
``COMMAND_TIMEOUT``) rather than fail: a burst of intake requests queues, it is not refused."""
_WARNED: set[tuple[Any, ...]] = set()


_SCRIPTS = {"accept": ACCEPT, "lease": LEASE, "reclaim": RECLAIM, "complete": COMPLETE,
            "retry": RETRY, "dead_letter": DEAD_LETTER, "release": RELEASE,
            "renew": RENEW, "replay": REPLAY, "purge": PURGE, "index": INDEX,
            "place": PLACE}


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
        args = [destination, _num(now), _num(now + lease_for), limit, 1 if ordered else 0,
                self.token, MOVE_CAP, ORDERED_SCAN_MAX, ORDERED_PAGE, hold_attempts or 0,
                ORDERED_SWEEP]
        rows = await self._run("lease", args)
        while not isinstance(rows, list):  # ordered, and its users are not indexed yet
            await self._index_users(destination)
            rows = await self._run("lease", args)
        return [Job(int(row[0]), destination, row[1].decode(), row[2].decode(), row[3].decode(),
                    bytes(row[4]), float(row[5]), int(row[6]),
                    float(row[7]) if row[7] is not None else None) for row in rows]

    async def _index_users(self, destination: str) -> None:
        """Build the index of the destination's users with ready jobs, which its ordered
        leases walk (its first ordered lease, whether the destination was just made ordered
        or its jobs were queued by a version that kept no index), ``INDEX_STEP`` jobs a
        script: bounded steps, resumed by whichever router takes the next, while the others
        go on queuing and delivering (each script keeps the index from the first step on)."""
        steps = 1
        while not (done := await self._run("index", [destination, INDEX_STEP])):
            steps += 1
        if done == 1:  # built by these steps, not found built (2)
            log.info("redis storage: indexed the ready jobs of %r by user for ordered leasing "
                     "(%d %s)", destination, steps, "step" if steps == 1 else "steps")

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
        """In the order the letters' events were accepted (``_place``), not the order they
        failed in, which on an ``ordered`` destination put a user's event that had gone
        through more retries, or had been replayed and failed again, after the user's later
        ones. Each selected destination's letters are walked in that order through its index
        by place (``letters-placed``), a page at a time, and the walks merged, so the letters
        go in the order of their places across destinations too, ``LETTER_PAGE`` a script:
        what is held is a page per destination, however many letters there are (before, the
        places of all of them, about 130 bytes a letter, were read and sorted first, and
        nothing was queued until all were read)."""
        # Only letters that exist now: a replayed job failing again during a long replay
        # becomes a newer letter, which this replay must not pick up again.
        upto = await self._last_id()
        if where.ids is not None:  # the caller's list: its places are read and sorted
            chosen = sorted([(*_place(letter), letter.destination)
                             async for chunk in self._matching_letters(where, upto=upto)
                             for letter in chunk])
            return await self._replay_in_pages(
                [(letter_id, destination) for _, letter_id, destination in chosen], now=now)
        named = [d for d in await self._destinations() if where.selects(d)]
        for destination in named:
            await self._place_letters(destination, upto)
        walks = [self._placed_walk(destination, where, upto) for destination in named]
        return await self._replay_in_pages(
            ((letter_id, destination) async for _, _, letter_id, destination in _merged(walks)),
            now=now)

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

    async def _replay_in_pages(self, letters: AsyncIterable[tuple[int, str]]
                               | Iterable[tuple[int, str]], *, now: float) -> int:
        """Queue ``letters`` (each an id, and the destination whose index listed it), in
        their order, ``LETTER_PAGE`` a script."""
        replayed, page = 0, []
        async for letter_id, destination in _async(letters):
            page += [letter_id, destination]
            if len(page) >= 2 * LETTER_PAGE:
                replayed += await self._run("replay", [_num(now), *page])
                page = []
        if page:
            replayed += await self._run("replay", [_num(now), *page])
        return replayed

    async def _place_letters(self, destination: str, upto: int) -> None:
        """Bring the destination's index of letters by place up to ``upto`` (``PLACE``):
        built from every letter the first time (letters written by a version that kept no
        such index), afterwards from where the last replay stopped (letters a router of that
        version wrote since, during a rolling upgrade). ``PLACE_STEP`` letters a script,
        resumed by whichever replay takes the next step, as ``_index_users``'s."""
        steps = 1
        while not (done := await self._run("place", [destination, upto, PLACE_STEP])):
            steps += 1
        if done == 1:  # built by these steps, not brought up to date (2)
            log.info("redis storage: indexed the dead letters of %r by the order their events "
                     "were accepted, for replays (%d %s)", destination, steps,
                     "step" if steps == 1 else "steps")

    async def _placed_walk(self, destination: str, where: DeadLetterFilter, upto: int
                           ) -> AsyncIterator[tuple[float, bytes, int, str]]:
        """The destination's letters that ``where`` selects, up to id ``upto``, in the order
        of their places, a page of the index at a time: (place, index member, letter id,
        destination). An entry whose letter is gone comes too (replayed or purged by a router
        of an earlier version, which left it), for ``REPLAY`` to drop."""
        client = self._require_client()
        key = self.keys.letters_placed(destination)
        after: tuple[float, bytes] | None = None
        while rows := await self._placed_page(key, after):
            after = (rows[-1][1], rows[-1][0])
            async with client.pipeline(transaction=False) as pipe:
                for member, _ in rows:
                    pipe.hmget(self.keys.letter(int(member)), "reason", "failed_at")
                found = await pipe.execute()
            for (member, place), (reason, failed_at) in zip(rows, found):
                letter_id = int(member)
                if reason is None or (letter_id <= upto and _selected(
                        where, destination, reason.decode(), float(failed_at))):
                    yield place, member, letter_id, destination

    async def _placed_page(self, key: str, after: tuple[float, bytes] | None
                           ) -> list[tuple[bytes, float]]:
        """The next ``LETTER_PAGE`` entries of an index by place past ``after`` (a place and
        a member: Redis orders entries of one place by member). The entries of ``after``'s
        place are read again and those up to it left out; a page of nothing but those (a
        page of letters of one place, which only a Redis that lost writes can hold) is
        followed by the next."""
        client = self._require_client()
        if after is None:
            return await client.zrangebyscore(key, "-inf", "+inf", start=0, num=LETTER_PAGE,
                                              withscores=True)
        skip = 0
        while True:
            rows = await client.zrangebyscore(key, after[0], "+inf", start=skip,
                                              num=LETTER_PAGE, withscores=True)
            fresh = [(member, place) for member, place in rows if (place, member) > after]
            if fresh or len(rows) < LETTER_PAGE:
                return fresh
            skip += len(rows)

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
    accepted_id = record.get(b"accepted_id")
    return DeadLetter(letter_id, text("destination"), text("message_id"), text("user_key"),
                      text("group"), bytes(record[b"body"]), int(record[b"attempts"]),
                      float(record[b"created_at"]), float(record[b"failed_at"]), text("reason"),
                      int(status) if status is not None else None,
                      orjson.loads(request) if request is not None else None,
                      response.decode() if response is not None else None,
                      float(first_attempt_at) if first_attempt_at is not None else None,
                      int(accepted_id) if accepted_id is not None else None)


def _place(letter: DeadLetter) -> tuple[int, int]:
    """Where a replay queues the letter: by the id its event was accepted as. A letter
    written before letters kept it takes its own id, from the same counter as job ids: as
    if its event had been accepted when it was dead-lettered."""
    place = letter.id if letter.accepted_id is None else letter.accepted_id
    return int(place), int(letter.id)


def _matches(letter: DeadLetter, where: DeadLetterFilter) -> bool:
    """The filter as the other backends apply it (ids are handled by the lookup)."""
    return _selected(where, letter.destination, letter.reason, letter.failed_at)


def _selected(where: DeadLetterFilter, destination: str, reason: str, failed_at: float
              ) -> bool:
    """Whether a letter of ``destination`` that failed at ``failed_at`` for ``reason`` is
    one ``where`` selects (ids aside)."""
    return (where.selects(destination)
            and (where.reason is None or where.reason.lower() in reason.lower())
            and (where.since is None or failed_at >= where.since)
            and (where.until is None or failed_at <= where.until))


_T = TypeVar("_T")


async def _merged(walks: Sequence[AsyncIterator[_T]]) -> AsyncIterator[_T]:
    """The items of walks, each in order, in one walk in order (``heapq.merge`` for async
    iterators): each walk is read only as far as the item it offers next."""
    heads: list[tuple[_T, int]] = []
    for n, walk in enumerate(walks):
        if (head := await anext(walk, None)) is not None:
            heads.append((head, n))
    heapq.heapify(heads)
    while heads:
        head, n = heads[0]
        yield head
        if (following := await anext(walks[n], None)) is None:
            heapq.heappop(heads)
        else:
            heapq.heapreplace(heads, (following, n))


async def _async(items: AsyncIterable[_T] | Iterable[_T]) -> AsyncIterator[_T]:
    """Either kind of iterable, walked with ``async for``."""
    if isinstance(items, AsyncIterable):
        async for each in items:
            yield each
    else:
        for each in items:
            yield each


def _is_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.isdigit()


def _num(value: float) -> str:
    """A number as Lua and Redis read it back exactly (``repr`` of a float round-trips)."""
    return repr(float(value))
