"""The ``router`` command: check a config, send events (or dry-run them), list plugins, serve
the HTTP API, manage dead letters, and salvage a damaged spool."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import sqlite3
import sys
import time
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, UTC
from pathlib import Path
from typing import Any, TextIO

import orjson
from pydantic.fields import FieldInfo

from router import logs
from router.config import LoadedConfig, load_config, parse_duration
from router.dead_letters import DLQ_LIST_LIMIT, require_spool, run_dlq_command
from router.delivery.egress import check_url
from router.destination import HttpRequest
from router.errors import (PLUGIN_FAILURES, ConfigError, DestinationError, SpoolInUse, StorageFull,
                           StorageUnavailable)
from router.input import Unreadable, UnreadableDocument, read_events
from router.process_stats import build_info
from router.redaction import Masker, redacted_url
from router.registry import create_registry
from router.routing import (DEFAULT_SOURCE, DestinationResult, RouteResult, Router, Status,
                            duplicate_reason)
from router.storage.base import DeadLetterFilter, Storage
from router.terminal import printable, write_json_line

log = logging.getLogger("router")

EXIT_OK, EXIT_PROBLEM = 0, 1
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
"""Files read as JSON Lines whatever their first line holds."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is dlq_command:
        _check_dlq_options(parser, args)
    # A terminal or pipe that cannot write some character (PYTHONIOENCODING=ascii, a C
    # locale on an old Python) would end the command with a traceback after its work was
    # done (events delivered, letters replayed): such a character is written as its escape.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        logs.configure()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    try:
        return int(args.run(args) or EXIT_OK)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except (StorageFull, StorageUnavailable) as exc:  # a full disk, Redis gone: no traceback
        print(f"error: the storage cannot be used now: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader left (``router send ... | head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PROBLEM


def _check_dlq_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Options an action would accept and ignore: `purge --limit 5` purged every letter that
    matched, and `bury --since 1h` buried every queued job (CLI audit)."""
    if args.action != "list" and (args.limit is not None or args.json):
        parser.error(f"--limit and --json apply to `router dlq list` only, not {args.action}")
    if args.action == "bury" and (args.since is not None or args.reason is not None):
        parser.error("--since and --reason select dead letters; `router dlq bury` takes "
                     "every job queued for --destination")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 2**62:
        raise argparse.ArgumentTypeError("expected a whole number of at least 1")
    return int(text)


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError("expected a port number from 0 to 65535")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="router", description=__doc__)
    build = build_info()
    parser.add_argument("--version", action="version",
                        version=f"router {build['version']} (Python {build['python']})")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    check = commands.add_parser("check", help="validate a config, load its plugins and templates")
    check.add_argument("-c", "--config", required=True)
    check.add_argument("--storage", action="store_true",
                       help="also open the storage: a Redis that can be reached and keeps "
                            "its data, a SQLite file that can be written")
    check.set_defaults(run=check_command)

    send = commands.add_parser("send", help="route events from a file or stdin")
    send.add_argument("-c", "--config", required=True)
    send.add_argument("input", nargs="?", default="-", help="EVENTS.json, .jsonl, or - for stdin")
    send.add_argument("--dry-run", action="store_true",
                      help="print the exact requests instead of sending; changes nothing")
    send.add_argument("--json", action="store_true", help="one JSON object a line")
    send.add_argument("--source", default=DEFAULT_SOURCE, help="source name for dedup")
    send.add_argument("--wait", type=_duration, default=60.0,
                      help="how long to wait for delivery before leaving the rest queued")
    send.set_defaults(run=send_command)

    plugins = commands.add_parser("plugins", help="list the destination plugins found")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(run=plugins_command)

    serve = commands.add_parser("serve", help="run the HTTP ingest API and delivery")
    serve.add_argument("-c", "--config", required=True)
    serve.add_argument("--host")
    serve.add_argument("--port", type=_port)
    serve.set_defaults(run=serve_command)

    dlq = commands.add_parser("dlq", help="list, replay or purge dead letters, or bury the "
                                          "queue of a destination the config no longer has")
    dlq.add_argument("action", choices=("list", "replay", "purge", "bury"))
    dlq.add_argument("-c", "--config", required=True)
    dlq.add_argument("--destination")
    dlq.add_argument("--reason", help="only dead letters whose reason contains this text")
    dlq.add_argument("--since", type=_duration,
                     help="only those failed within this long, e.g. 2h")
    dlq.add_argument("--limit", type=_positive_int,
                     help=f"list: how many of the newest to show ({DLQ_LIST_LIMIT})")
    dlq.add_argument("--json", action="store_true", help="list: one JSON object a line")
    dlq.set_defaults(run=dlq_command)

    salvage = commands.add_parser(
        "salvage", help="put back what can be read of a damaged SQLite spool, keeping a copy "
                        "of the damaged file (run with every router stopped)")
    salvage.add_argument("-c", "--config", required=True)
    salvage.set_defaults(run=salvage_command)
    return parser


# -- check ------------------------------------------------------------------------------------

def check_command(args: argparse.Namespace) -> int:
    loaded = load_config(args.config)
    router = Router(loaded, deliver=False)
    config = loaded.config
    if args.storage:  # before "OK": a storage that cannot be used is a failed check
        asyncio.run(_open_and_close(loaded, router.storage))
    print(f"{args.config}: OK")
    print(f"  storage: {redacted_url(config.storage)}")
    print(f"  dedup window: {_seconds(config.dedup.window)}")
    sources = ", ".join(s.name for s in config.sources)
    print(f"  sources: {sources or '(none: the HTTP API accepts no write key)'}")
    print(f"  destinations ({len(router.destinations)} enabled):")
    for destination in router.destinations:
        delivery = destination.delivery
        flags = [] if destination.default_on else ["off by default"]
        print(f"    {destination.name:<24} plugin {destination.plugin.name} "
              f"({destination.plugin.package} {destination.plugin.version}); batch "
              f"{delivery.batch_size}, concurrency {delivery.concurrency}, timeout "
              f"{_seconds(delivery.timeout)}{', ' + ', '.join(flags) if flags else ''}")
    disabled = [d.name for d in config.destinations if not d.enabled]
    if disabled:
        print(f"  disabled: {', '.join(disabled)}")
    if args.storage:
        print("  storage: opened, with room for intake (it can be reached and used as "
              "configured)")
    return EXIT_OK


async def _open_and_close(loaded: LoadedConfig, storage: Storage) -> None:
    """Open the storage as a router would, without taking back any leases; ``ConfigError``
    at the ``storage`` line if it cannot be (down, a wrong password, a Redis that evicts
    keys, a directory that cannot be written, a damaged spool) or if intake would be refused
    for want of room (a disk smaller than ``min_free_bytes``, say)."""
    await loaded.open_storage(storage, recover=False)
    try:
        damage = await storage.damage()
        if damage is not None:
            raise StorageUnavailable(damage)
        await storage.ping()
    except (StorageFull, StorageUnavailable) as exc:
        raise loaded.source.error(("storage",), f"the storage cannot be used now: {exc}"
                                  ) from None
    finally:
        await storage.close()


# -- send -------------------------------------------------------------------------------------

SEND_CHUNK = 1_000
"""Events routed (or planned, in a dry run) at a time. Parsed, an event and its requests
take about 7 KB: a file of 100,000 took 1 GB when routed at once (CLI audit). Routed a
chunk at a time, a send holds a line of what became of each, and a dry run prints each
chunk as it goes."""


@dataclass(slots=True)
class _Shown:
    """What ``router send`` prints of one event: its lines, not the event itself."""

    title: str
    message_id: str | None
    results: list[DestinationResult]
    invalid: bool


def send_command(args: argparse.Namespace) -> int:
    data = _read_stdin() if args.input == "-" else _read_input(args.input)
    router = Router(load_config(args.config), deliver=not args.dry_run)
    sources = {source.name for source in router.loaded.config.sources}
    if args.source != DEFAULT_SOURCE and args.source not in sources:
        # A misspelt source has a dedup window of its own: what the HTTP API took from the
        # one meant goes again (CLI audit).
        print(f"note: the config has no source named {args.source!r}; the events are "
              f"deduplicated apart from those of its sources ({', '.join(sorted(sources))})"
              if sources else f"note: the config has no sources; {args.source!r} has a dedup "
              "window of its own", file=sys.stderr)
    items = read_events(data, json_lines=args.input.endswith(JSON_LINES_SUFFIXES))
    try:
        first = list(itertools.islice(items, SEND_CHUNK))  # a document is parsed whole here
    except UnreadableDocument as exc:  # nothing is sent from a file cut short
        raise ConfigError(f"cannot read events: {exc}; nothing was sent",
                          file="stdin" if args.input == "-" else args.input) from None
    if not first:  # an empty file or pipe printed nothing at all, as if events had gone;
        # it still runs as usual: a send of nothing delivers what the storage holds (--wait)
        print(f"note: {'standard input' if args.input == '-' else args.input} holds no "
              "events", file=sys.stderr)
    chunks = itertools.chain([first], iter(lambda: list(itertools.islice(items, SEND_CHUNK)),
                                           []))
    printer = _print_json if args.json else _print_table
    index, invalid, dead_lettered = 0, False, 0
    if args.dry_run:
        in_input: set[str] = set()
        for chunk in chunks:
            for result in dry_run(router, chunk, source=args.source, in_input=in_input):
                line = _shown(result)
                printer(router, index, line, sys.stdout, requests=True)
                invalid |= _say_refusals(index, line)
                index += 1
    else:
        shown: list[_Shown] = []
        try:
            dead_lettered = asyncio.run(_send(router, chunks, args.source, args.wait, shown))
            for index, line in enumerate(shown):
                printer(router, index, line, sys.stdout, requests=False)
                invalid |= _say_refusals(index, line)
        except KeyboardInterrupt:  # Ctrl-C at any point: exit 130, but say what is done
            _say_queued_on_interrupt(shown)
            raise
    return EXIT_PROBLEM if dead_lettered or invalid else EXIT_OK


def _say_refusals(index: int, line: _Shown) -> bool:
    """Whether the event is invalid, for the router or for a destination, naming on stderr
    each destination that refused it and why. An event one destination's translator refuses
    (``EventRejected``: an amount it cannot read, a template that fails) never reaches that
    destination: a dry run that exited 0 on it sent an operator's script on to the real
    send, which lost it there (plugin author audit)."""
    refused = [item for item in line.results
               if item.status is Status.INVALID and item.destination is not None]
    for item in refused:
        print(printable(f"event {index} (messageId {line.message_id!r}) refused by "
                        f"{item.destination}: {item.reason}"), file=sys.stderr)
    return line.invalid or bool(refused)


def _shown(result: RouteResult, *, requests: bool = True) -> _Shown:
    """The lines of ``result``; without ``requests``, without the payloads they hold."""
    event = result.event
    title = f"{event.type} {event.event or event.name or ''}".strip() if event else "invalid event"
    results = result.results if requests else [
        DestinationResult(item.destination, item.status, item.reason) for item in result.results]
    return _Shown(title, result.message_id, results, result.invalid)


def _read_stdin() -> bytes:
    if sys.stdin is None:  # started with it closed (`<&-`): an AttributeError traceback
        raise ConfigError("cannot read events: standard input is closed; name a file of "
                          "events", file="stdin")
    return sys.stdin.buffer.read()


def _read_input(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read events: {exc.strerror}", file=path) from None


def dry_run(router: Router, items: Sequence[Any], *, source: str = DEFAULT_SOURCE,
            in_input: set[str] | None = None) -> list[RouteResult]:
    """Plan every event without writing to the storage. A duplicate is a messageId repeated
    in the input (``in_input``: the ids of the input's earlier chunks, to which this adds),
    or one the storage took from ``source`` within the dedup window."""
    received = datetime.now(UTC)
    results = [_unreadable(item) if isinstance(item, Unreadable)
               else router.plan(item, received_at=received) for item in items]
    planned = [result for result in results if result.event is not None]
    stored = _seen_before(router, source, [result.message_id or "" for result in planned])
    in_input = set() if in_input is None else in_input
    for result in planned:
        message_id = result.message_id or ""
        reason = (f"messageId {message_id!r} appeared earlier in the input"
                  if message_id in in_input else
                  duplicate_reason(message_id) if message_id in stored else None)
        in_input.add(message_id)
        if reason is not None:
            result.results = [DestinationResult(r.destination, Status.DUPLICATE, reason)
                              for r in result.results]
        result.results = [_egress_checked(router, item) for item in result.results]
    return results


def _seen_before(router: Router, source: str, message_ids: list[str]) -> set[str]:
    """What the storage remembers of ``message_ids``; nothing, with a warning, when it cannot
    be read (a Redis out of reach): the preview is still worth having."""
    try:
        return asyncio.run(router.storage.seen_before(source, message_ids, now=time.time()))
    except (StorageUnavailable, OSError, sqlite3.Error) as exc:
        log.warning("cannot read the dedup window from the storage, so duplicates of events "
                    "sent earlier are not shown: %s", exc)
        return set()


def _egress_checked(router: Router, item: DestinationResult) -> DestinationResult:
    """The requests a dry run shows, checked as delivery would check them: built by the
    plugin (a plugin that fails costs only its own destination, as in delivery, where the
    event would be dead-lettered), then the same egress rule the transport applies at
    connect time, so a preview never promises a request that would be refused."""
    if item.status is not Status.SEND or item.destination is None:
        return item
    destination = router.destination(item.destination)
    try:
        requests = router.requests_for(item)
    except DestinationError as exc:
        return DestinationResult(item.destination, Status.INVALID,
                                 destination.masker.mask(exc.reason))
    except PLUGIN_FAILURES as exc:  # the message may quote settings: masked, no traceback
        log.error("destination %s: %s failed to build a request: %s", item.destination,
                  destination.plugin.name,
                  destination.masker.mask(f"{type(exc).__name__}: {exc}"))
        return DestinationResult(item.destination, Status.INVALID,
                                 f"{destination.plugin.name} failed to build a request: "
                                 f"{type(exc).__name__}")
    for request in requests:
        refused = check_url(request.url, router.egress)
        if refused:
            return DestinationResult(item.destination, Status.INVALID,
                                     f"egress refused: {refused}")
    return item


async def _send(router: Router, chunks: Iterable[list[Any]], source: str, wait: float,
                shown: list[_Shown]) -> int:
    """Route the events a chunk at a time, adding what is printed of each to ``shown`` as
    soon as it is queued; how many of their deliveries were dead-lettered within ``wait``.
    A chunk being routed when Ctrl-C comes is let finish: its write may be committed
    whatever, and ``shown`` must count it (it said 1,000 fewer than were queued: review)."""
    try:
        await router.start()
    except SpoolInUse:  # `router serve` delivers from this spool: leave the events to it
        print("note: a running router delivers from this storage; the events are queued for "
              "it", file=sys.stderr)
        router = Router(router.loaded, registry=router.registry, deliver=False)
        await router.start()
    dead_lettered = 0
    try:
        started, started_monotonic = time.time(), time.monotonic()
        for chunk in chunks:
            events = [item for item in chunk if not isinstance(item, Unreadable)]
            routing = asyncio.ensure_future(router.route_many(events, source=source))
            try:
                await asyncio.shield(routing)
            except asyncio.CancelledError:
                await routing  # finished, and so counted below
                raise
            finally:
                if routing.done() and not routing.cancelled() and not routing.exception():
                    routed = iter(routing.result())
                    shown.extend(_shown(_unreadable(item) if isinstance(item, Unreadable)
                                        else next(routed), requests=False) for item in chunk)
        if router.delivers:
            drained = await router.drain(timeout=wait)
            # When the send began, in the wall time of either side of a clock step during
            # the wait: the earlier of the two, so no dead letter of this send is missed.
            began = min(started, time.time() - (time.monotonic() - started_monotonic)) - 1
            dead_lettered = await _note_outcomes(router, shown, since=began,
                                                 drained=drained, wait=wait)
    finally:
        await router.close()
    return dead_lettered


def _say_queued_on_interrupt(shown: list[_Shown]) -> None:
    """Interrupted, a send had queued the events it had routed, and said nothing: sent
    again, they were delivered twice wherever the file gave them no messageId (CLI
    audit)."""
    queued = sum(1 for line in shown if any(item.status is Status.SEND for item in line.results))
    print(f"interrupted: {queued} event(s) were already accepted and queued; the next router "
          "to run on this storage delivers them, so do not send them again", file=sys.stderr)


async def _note_outcomes(router: Router, results: list[_Shown], *, since: float,
                         drained: bool, wait: float) -> int:
    """Say in each sent result what became of it within ``--wait``: delivered, dead-lettered
    (with why), or still queued. Returns how many were dead-lettered."""
    sent = [(result, item, item.destination) for result in results for item in result.results
            if item.status is Status.SEND and item.destination]
    failed: dict[tuple[str, str | None], str] = {
        (letter.destination, letter.message_id): letter.reason for letter in
              await router.storage.dead_letters(DeadLetterFilter(since=since),
                                                limit=max(1, len(sent) * 2))}
    dead_lettered = 0
    for result, item, destination in sent:
        reason = failed.get((destination, result.message_id))
        if reason is not None:
            masker = router.destination(destination).masker
            item.reason = f"dead-lettered: {masker.mask(reason)}"
            dead_lettered += 1
        elif drained:
            item.reason = "delivered"
        else:
            item.reason = (f"still queued after --wait {wait:g}s; delivered by the next "
                           "router to run on this storage")
    return dead_lettered


def _unreadable(item: Unreadable) -> RouteResult:
    return RouteResult(None, None, [DestinationResult(None, Status.INVALID, item.reason)])


def _request_json(router: Router, destination: str, request: HttpRequest) -> dict[str, Any]:
    masker = router.destination(destination).masker
    body = None if request.body is None else masker.mask_json(request.body)
    return {"method": request.method, "url": masker.mask_url(request.url),
            "headers": masker.mask_headers(request.headers), "body": body}


def _print_json(router: Router, index: int, result: _Shown, out: TextIO, *,
                requests: bool) -> None:
    for item in result.results:
        line: dict[str, Any] = {"event_index": index, "message_id": result.message_id,
                                "destination": item.destination, "status": str(item.status),
                                "reason": item.reason, "requests": []}
        # Every line has the contract's fields. Outside a dry run the list stays empty:
        # delivery puts events together in requests of its own.
        if requests and item.status is Status.SEND and item.destination:
            line["requests"] = [_request_json(router, item.destination, request)
                                for request in router.requests_for(item)]
        write_json_line(line, out)


def _print_table(router: Router, index: int, result: _Shown, out: TextIO, *,
                 requests: bool) -> None:
    out.write(printable(f"event {index}: {result.title}  (messageId "
                        f"{result.message_id or '-'})") + "\n")
    for item in result.results:
        name = item.destination or "-"
        detail = printable(item.reason) or ("queued for delivery" if not requests else "")
        out.write(f"  {name:<22} {item.status:<9} {detail}".rstrip() + "\n")
        if requests and item.status is Status.SEND and item.destination:
            masker = router.destination(item.destination).masker
            for request in router.requests_for(item):
                shown = _request_json(router, item.destination, request)
                out.write(printable(f"      {shown['method']} {shown['url']}") + "\n")
                for header, value in shown["headers"].items():
                    out.write(printable(f"      {header}: {value}") + "\n")
                text = _body_as_sent(masker, request.body)
                out.write("".join(f"      {printable(line)}\n" for line in text.splitlines()))
    out.write("\n")


def _body_as_sent(masker: Masker, body: bytes | None) -> str:
    """A request's body for a person to read, secrets masked: JSON indented where that
    loses nothing, else the text as it is sent. Parsed and written again, a template's
    output lost what the receiver gets (a key twice, a number too large for a float, the
    zero of 1.10), and the dry run promises the exact requests."""
    if body is None:
        return ""
    try:
        exact = orjson.dumps(orjson.loads(body)) == body
    except orjson.JSONDecodeError:
        exact = False
    if exact:
        return orjson.dumps(masker.mask_json(body), option=orjson.OPT_INDENT_2).decode()
    return masker.mask(body.decode("utf-8", errors="replace"))


# -- plugins ----------------------------------------------------------------------------------

def plugins_command(args: argparse.Namespace) -> int:
    registry = create_registry()
    rows: list[dict[str, Any]] = []
    for name in sorted(registry.types):
        kind = registry.types[name]
        fields = [_setting(field_name, info)
                  for field_name, info in kind.cls.Settings.model_fields.items()]
        rows.append({"name": name, "package": kind.package, "version": kind.version,
                     "settings": fields})
    if args.json:
        for row in rows:
            print(orjson.dumps(row).decode())
    else:
        width = max([22, *(len(field["name"]) for row in rows for field in row["settings"])])
        for row in rows:
            print(f"{row['name']}  ({row['package']} {row['version']})")
            for field in row["settings"]:
                required = "required" if field["required"] else "optional"
                print(f"    {field['name']:<{width}} {required:<9} {field['description']}"
                      f"{_choices_and_default(field)}")
    for name, error in sorted(registry.broken.items()):
        print(f"{name}  FAILED TO LOAD: {error}", file=sys.stderr)
    return EXIT_OK


def _setting(name: str, info: FieldInfo) -> dict[str, Any]:
    """A settings field as ``router plugins`` shows it: its name, whether it is required,
    its description, and what an operator cannot tell from those: the values a ``Literal``
    allows, and the default (a value, not one a factory makes each time)."""
    field: dict[str, Any] = {"name": name, "required": info.is_required(),
                             "description": info.description or ""}
    choices = _literal_choices(info.annotation)
    if choices:
        field["choices"] = choices
    if not info.is_required() and info.default_factory is None:
        # as JSON has it (a SecretStr is masked by its str, a URL type written out)
        field["default"] = orjson.loads(orjson.dumps(info.default, default=str))
    return field


def _literal_choices(annotation: Any) -> list[Any]:
    """The values of a ``Literal`` annotation, also inside ``Optional`` or a union."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [choice for arg in typing.get_args(annotation) for choice in _literal_choices(arg)]


def _choices_and_default(field: dict[str, Any]) -> str:
    said = []
    if "choices" in field:
        said.append("one of " + ", ".join(orjson.dumps(c).decode() for c in field["choices"]))
    if "default" in field:
        said.append(f"default {orjson.dumps(field['default']).decode()}")
    return f" ({'; '.join(said)})" if said else ""


# -- serve / dlq ------------------------------------------------------------------------------

def serve_command(args: argparse.Namespace) -> int:
    from router.server.run import serve
    return serve(args.config, host=args.host, port=args.port)


def dlq_command(args: argparse.Namespace) -> int:
    return asyncio.run(run_dlq_command(args))


# -- salvage ----------------------------------------------------------------------------------

def salvage_command(args: argparse.Namespace) -> int:
    from router.storage import storage_for_url
    from router.storage.salvage import LOST_LANE, salvage
    from router.storage.sqlite import SqliteStorage, lock_delivery

    loaded = load_config(args.config)
    storage = storage_for_url(loaded.config.storage, base_dir=Path.cwd())
    if not isinstance(storage, SqliteStorage):
        raise loaded.source.error(("storage",), "router salvage repairs a SQLite spool "
                                  "(sqlite:///...); this storage is not one")
    require_spool(loaded, storage.path, "there is nothing to salvage")
    lock = lock_delivery(storage.path)
    if lock is None:
        print(f"error: a router is delivering from {storage.path}: stop it first",
              file=sys.stderr)
        return EXIT_PROBLEM
    try:
        report = salvage(storage.path, datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"))
    except sqlite3.Error as exc:  # a file SQLite cannot take at all: said, not a traceback
        print(f"error: cannot salvage {storage.path}: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    finally:
        os.close(lock)
    if report.damage is None:
        print(f"{storage.path}: intact, nothing to salvage")
        return EXIT_OK
    print(f"{storage.path}: damaged ({report.damage})")
    print(f"  the damaged file is kept as {', '.join(map(str, report.kept_as))}")
    for table, result in report.tables.items():
        lost = (f"; {result.unreadable_stretches} stretch(es) could not be read, and any "
                "rows there are lost" if result.unreadable_stretches else "")
        print(f"  {table}: {result.copied} row(s) put back{lost}")
    for number, jobs in report.lost_lanes.items():
        print(f"  {jobs} job(s) of a destination whose name was lost are dead letters of "
              f"{LOST_LANE.format(number=number)!r}")
    print(f"{storage.path}: salvaged; start the router again")
    return EXIT_OK


def _seconds(value: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size and value % size == 0:
            return f"{int(value // size)}{unit}"
    return f"{value:g}s"
