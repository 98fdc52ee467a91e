"""``router dlq list|replay|purge|bury``: dead letters from the command line.

It opens the storage without taking back leases, so it is safe beside a running
``router serve`` on the same file; a replay queues jobs that the server's workers pick up.
``bury`` moves the jobs queued for a destination the config no longer has (removed or
renamed: nothing would ever send them) to the dead letters, where the other actions reach
them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from datetime import datetime, UTC
from pathlib import Path


from router.config import LoadedConfig, load_config
from router.destinations import build_destinations, egress_policy
from router.redaction import Masker
from router.registry import create_registry
from router.storage import storage_for_url
from router.storage.memory import MemoryStorage
from router.storage.sqlite import SqliteStorage
from router.storage.base import DeadLetter, DeadLetterFilter, Failure, Storage
from router.terminal import printable, write_json_line

DLQ_LIST_LIMIT = 100
"""How many of the newest letters ``router dlq list`` shows without ``--limit``."""


async def run_dlq_command(args: argparse.Namespace) -> int:
    loaded = load_config(args.config)
    config = loaded.config
    storage = storage_for_url(config.storage, base_dir=Path.cwd())
    if isinstance(storage, SqliteStorage):
        # Opening would create an empty spool and report nothing: a wrong path or directory
        require_spool(loaded, storage.path, "no router has used this storage yet (check the "
                                            "working directory)")
    if isinstance(storage, MemoryStorage):  # a fresh, empty one: "0 dead letters" would lie
        raise loaded.source.error(("storage",), "memory:// keeps nothing once its router "
                                  "stops: there are no dead letters here for router dlq")
    named = {destination.name.lower() for destination in config.destinations}
    if args.action != "bury" and args.destination and args.destination.lower() not in named:
        print(f"note: the config has no destination named {args.destination!r}; dead "
              "letters of a destination since removed are still listed", file=sys.stderr)
    if args.action == "bury" and not args.destination:
        raise loaded.source.error(("destinations",), "router dlq bury needs --destination: "
                                  "the destination whose queued jobs to bury")
    # `--since 0s` selects nothing yet; as "no filter", a purge took every letter.
    since = None if args.since is None else time.time() - args.since
    where = DeadLetterFilter(destination=args.destination, reason=args.reason, since=since)
    await loaded.open_storage(storage, recover=False)
    try:
        if args.action == "bury":
            name = await _queue_named(storage, args.destination)
            _check_buriable(loaded, {args.destination, name})
            buried, waiting = await _bury(storage, name)
            print(f"buried {buried} job(s) of {name!r} in the dead letters")
            if waiting:
                print(f"{waiting} more wait for a retry that is not due yet, or are leased "
                      "(by a router that still has the destination, or by a `router dlq "
                      "bury` stopped midway: on Redis for a minute, in a SQLite spool until "
                      "`router serve` starts again): run it again later")
        elif args.action == "list":
            limit = args.limit or DLQ_LIST_LIMIT
            # One more than shown tells whether older letters were left out.
            letters = await storage.dead_letters(where, limit=limit + 1)
            older = len(letters) > limit
            letters = letters[1:] if older else letters
            masker = _masker_of(loaded) if args.json else Masker()
            for letter in letters:
                if args.json:
                    write_json_line(_as_json(letter, masker))
                else:
                    print(_as_line(letter))
            summary = f"{len(letters)} dead letter(s)" + (
                ", the newest; older ones are not shown (raise --limit)" if older else "")
            # On stdout a JSON line would break the reader; an export must still learn of it.
            print(f"note: {summary}" if args.json else summary,
                  file=sys.stderr if args.json else sys.stdout)
        elif args.action == "replay":
            await _replay(loaded, storage, where)
        else:
            print(f"purged {await storage.purge(where)} dead letter(s)")
    finally:
        await storage.close()
    return 0


def require_spool(loaded: LoadedConfig, path: Path, missing: str) -> None:
    """The config's storage error when no spool is at ``path`` (``missing`` says what that
    may mean), or when its directory cannot be looked into: a user without the right to
    enter it got a PermissionError traceback (deployment audit)."""
    try:
        if path.exists():
            return
        why = f"{path} does not exist: {missing}"
    except OSError as exc:
        why = f"cannot look for {path}: {exc.strerror} (run as a user who may read it)"
    raise loaded.source.error(("storage",), why)


async def _replay(loaded: LoadedConfig, storage: Storage, where: DeadLetterFilter) -> None:
    """Replay the letters of the destinations the config sends to. A letter of a destination
    it does not (removed, renamed, disabled) would go to a queue no worker sends from and
    leave the list: it stays listed, and the command names the destination."""
    sending = {destination.name for destination in loaded.config.destinations
               if destination.enabled}
    asked = None if where.destination is None else where.destination.lower()
    lettered = [name for name, queue in (await storage.stats(now=time.time())).queues.items()
                if queue.dead_letters and asked in (None, name.lower())]
    replayed = 0
    try:
        for name in lettered:
            if name in sending:
                replayed += await storage.replay(
                    dataclasses.replace(where, destination=name, exact_destination=True),
                    now=time.time())
    except asyncio.CancelledError:  # Ctrl-C: exit 130, but say what is done and what is not
        print("interrupted: the dead letters replayed so far have left the list and are "
              "queued; those still listed were not replayed: run it again for them",
              file=sys.stderr)
        raise
    print(f"replayed {replayed} dead letter(s)")
    if left := sorted(set(lettered) - sending):
        print(f"note: dead letters of {', '.join(map(repr, left))} were not replayed: the "
              "config does not send to it (removed, renamed or disabled); put it back, or "
              "purge them", file=sys.stderr)


async def _queue_named(storage: Storage, destination: str) -> str:
    """The name the storage keeps ``destination``'s queue under: the very name, else one
    that differs only in case (the config's names are, the storage's are not)."""
    queued = (await storage.stats(now=time.time())).queues
    if destination in queued:
        return destination
    return next((name for name in queued if name.lower() == destination.lower()), destination)


def _check_buriable(loaded: LoadedConfig, names: set[str]) -> None:
    """``bury`` takes a queue that the config does not deliver: an enabled destination's
    jobs are its workers' to send (and they may be holding some right now). Its queue is
    the one under its very name: one renamed only in case ("Amp" to "amp") left the old
    name's jobs to no worker. ``names``: the name asked for and the queue's."""
    for index, configured in enumerate(loaded.config.destinations):
        if configured.name in names and configured.enabled:
            raise loaded.source.error(
                ("destinations", index, "name"), f"{configured.name!r} is a destination "
                "of this config, whose workers send its jobs: bury only the queue of one "
                "removed, renamed or disabled")


BURY_PAGE = 500


async def _bury(storage: Storage, name: str) -> tuple[int, int]:
    """Move the jobs queued under ``name`` to the dead letters, leased a page at a time as a
    worker leases them; how many, and how many are left: jobs waiting for a retry not due
    yet, which are not taken early (with Redis, leasing ahead of time would also take over
    the jobs another router still sends)."""
    failure = Failure(f"buried: the config has no destination {name!r} to send it to "
                      "(router dlq bury)")
    buried = 0
    while jobs := await storage.lease(name, BURY_PAGE, now=time.time(), lease_for=60):
        await storage.dead_letter(jobs, now=time.time(), failure=failure)
        buried += len(jobs)
    left = (await storage.stats(now=time.time())).queues.get(name)
    return buried, left.pending if left else 0


def _masker_of(loaded: LoadedConfig) -> Masker:
    """Every configured destination's secrets: a payload may carry one (a webhook body
    template that puts a token from the environment in the body), and a dead letter of a
    destination since renamed should not show it either."""
    destinations = build_destinations(loaded, create_registry(), egress_policy(loaded.config))
    return Masker.joined(destination.masker for destination in destinations)


def _as_json(letter: DeadLetter, masker: Masker) -> dict[str, object]:
    return {"id": letter.id, "destination": letter.destination, "message_id": letter.message_id,
            "attempts": letter.attempts, "failed_at": _time(letter.failed_at),
            "first_attempt_at": (None if letter.first_attempt_at is None
                                 else _time(letter.first_attempt_at)),
            "accepted_at": _time(letter.created_at), "reason": letter.reason,
            "status": letter.status, "request": letter.request, "response": letter.response,
            "payload": masker.mask_json(letter.body)}


def _as_line(letter: DeadLetter) -> str:
    """One line, whatever the letter's messageId (a client's) or reason (an API's) holds."""
    return printable(f"#{letter.id} {_time(letter.failed_at)} {letter.destination} "
                     f"{letter.message_id} attempts={letter.attempts} "
                     f"status={letter.status or '-'} {letter.reason}")


def _time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
