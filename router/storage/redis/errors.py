"""Redis's errors said as the router's own (``_translated_errors``): Redis refusing writes
(out of memory, persistence failing) is ``StorageFull``, Redis out of reach or refusing for a
while (down, hung, loading, busy, a replica, an ACL changed) is ``StorageUnavailable``, also
when a script's reply hides the refusal's code (``_refusal``)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from router.errors import StorageFull, StorageUnavailable

try:  # an optional dependency: ``pip install event-router[redis]``
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import (MasterDownError, NoPermissionError, OutOfMemoryError,
                                  ReadOnlyError, ResponseError)
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError:  # pragma: no cover - reported when a redis:// URL is used
    pass

NEEDED_ACL = ("; the router runs Lua scripts, so its Redis user needs +evalsha, +eval and "
              "+script|load, and the commands the scripts call (+@read +@write) on its keys, "
              "and +ping and +info for its checks")
"""Appended to a NOPERM error, at open or at run time."""


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
