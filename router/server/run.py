"""``router serve``: the ingest API and delivery (in this process, or with ``own_process`` in
a second one), until SIGINT, SIGTERM or SIGHUP.

Shutdown order is what keeps the promise that nothing accepted is lost: first stop accepting
(close the listening socket, let requests in progress finish — each of them answers 200 only
once its events are durable), then stop delivery (``Router.close``: requests in flight finish
within the grace period, the rest go back to the queue untouched), then close the storage.
A second Ctrl-C during that wait stops at once; the storage still holds every accepted event,
and the next start takes the unfinished work back. A stop signal during the start gives the
start up: the port is never opened.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time

from router.config import LoadedConfig, load_config
from router.errors import ConfigError, StorageFull, StorageUnavailable
from router.logs import announce, to_stdout
from router.redaction import redacted_url
from router.routing import Router
from router.runtime import (expect_http_api, reserve_descriptors, tune_garbage_collector,
                            until_stopped)
from router.server.accesslog import ACCESS_LOGGER, log_turned_away
from router.server.app import METRICS, create_app, create_runner
from router.server.listen import (TOO_MANY_CONNECTIONS, TURN_AWAY, TURN_AWAY_STATUS,
                                  say_accept_failures_once_a_minute,
                                  UNREAD_ENDPOINT, listen)

log = logging.getLogger("router.server")

# SIGHUP too: a closing terminal sends it, and an operator expecting a reload gets a clean
# stop (a supervisor's restart then reads the config again), not an abrupt one.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def serve(config_path: str | os.PathLike[str], host: str | None = None,
          port: int | None = None) -> int:
    """Run until a stop signal; 0 after a clean shutdown, 1 when it cannot listen.

    ``ConfigError`` propagates: the command line prints it (file, line, field)."""
    loaded = load_config(config_path)
    _log_access_to_stdout()
    return asyncio.run(_serve(loaded, host=host, port=port))


async def _serve(loaded: LoadedConfig, *, host: str | None, port: int | None) -> int:
    config = loaded.config
    grace = config.server.shutdown_grace
    router = Router(loaded)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in _STOP_SIGNALS:
        # One the caller ignores stays ignored: `nohup router serve &` stopped when its
        # terminal closed, and a script's `router serve &` on Ctrl-C (deployment audit).
        if signal.getsignal(signum) is not signal.SIG_IGN:
            loop.add_signal_handler(signum, _on_stop_signal, loop, stop, signum)
    expect_http_api()  # before the destinations' pool reserves its open files
    try:
        try:
            started = await _start_unless_stopped(router, stop)
        except Exception as exc:  # noqa: BLE001 - say what failed, without a traceback
            what = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            print(f"error: cannot start the router: {what}", file=sys.stderr)
            await router.close()
            return 1
        if not started:
            await router.close(grace=grace)  # a start that ended as it was given up
            announce("router: stopped")
            return 0
        tune_garbage_collector()
        await _say_if_intake_is_refused(router)
        await _say_what_waits_for_no_destination(router)
        stop_began: float | None = None
        try:
            status, stop_began = await _run_api(router, host or config.server.host,
                                                config.server.port if port is None else port,
                                                stop)
        finally:
            # Finish or persist in-flight deliveries, within what the HTTP drain left of the
            # grace: the whole stop takes at most the grace it announces.
            drained = 0.0 if stop_began is None else time.monotonic() - stop_began
            await router.close(grace=max(0.0, grace - drained))
    finally:
        for signum in _STOP_SIGNALS:
            loop.remove_signal_handler(signum)
    if status == 0:
        announce("router: stopped")
    return status


async def _start_unless_stopped(router: Router, stop: asyncio.Event) -> bool:
    """``router.start()``, given up when a stop signal comes first: True once started,
    False when a stop signal came first or meanwhile (then ``router.close()`` remains to be
    called). A start given up is cancelled, which closes what it opened and tells a delivery
    process to stop. A SIGTERM during the start (the dedup index of a
    spool of a million ids takes 2.5 s to build) was acted on only once the start had ended
    and the port was open and accepting.

    Raises what ``router.start()`` raises, unless it was given up."""
    starting = await until_stopped(router.start(), stop)
    if starting.cancelled():
        return False
    starting.result()
    return not stop.is_set()


async def _say_if_intake_is_refused(router: Router) -> None:
    """A storage without room refuses every event from the first: said at start, not only
    by ``/health`` once something asks (a spool on a disk smaller than ``min_free_bytes``
    started without a word and refused everything)."""
    try:
        await router.storage.ping()
    except (StorageFull, StorageUnavailable) as exc:
        log.warning("intake refuses every event until the storage has room or answers "
                    "(GET /health says when): %s", exc)


async def _say_what_waits_for_no_destination(router: Router) -> None:
    """Jobs of a destination the config no longer has (removed, renamed, disabled) wait in
    the storage for good, taking its room and showing in ``/metrics``' queue depth; nothing
    said why. Said at start, with what to do."""
    try:
        stats = await router.storage.stats(now=time.time())
    except Exception as exc:  # noqa: BLE001 - a hint: it must not keep the server from starting
        log.warning("cannot tell whether jobs wait for a destination the config does not "
                    "have: %s: %s", type(exc).__name__, exc)
        return
    configured = {destination.name.lower(): destination.name
                  for destination in router.destinations}
    for name, queue in sorted(stats.queues.items()):
        if name in configured.values() or not queue.pending:
            continue
        differs_in_case = configured.get(name.lower())
        has = (f"which the config now names {differs_in_case!r} (queues keep the very name)"
               if differs_in_case else "which the config does not have (removed, renamed or "
               "disabled)")
        others = ("; other routers on this storage may have it and be delivering them: "
                  "bury them only once none has" if router.storage.leases_lapse else "")
        log.warning("%d job(s) wait in the storage for destination %r, %s: they are sent "
                    "once it is back (enabled, under that name), or `router dlq bury -c CONFIG "
                    "--destination %s` moves them to the dead letters%s", queue.pending, name,
                    has, name, others)


async def _run_api(router: Router, host: str, port: int, stop: asyncio.Event
                   ) -> tuple[int, float | None]:
    """Serve until ``stop`` is set; then stop accepting and let requests in progress
    finish (each answers only once its events are durable). Returns the exit status and
    when the stop began, so that delivery gets what the drain leaves of the grace."""
    server_config = router.config.server
    grace = server_config.shutdown_grace
    max_connections = reserve_descriptors(server_config.max_connections,
                                          "client connections (server.max_connections)")
    app = create_app(router)
    metrics = app[METRICS]

    def turned_away(remote: str | None) -> None:
        metrics.refusals.inc(TOO_MANY_CONNECTIONS)
        metrics.requests.inc(UNREAD_ENDPOINT, str(TURN_AWAY_STATUS))
        log_turned_away(remote, TURN_AWAY_STATUS, len(TURN_AWAY), TOO_MANY_CONNECTIONS)

    say_accept_failures_once_a_minute(asyncio.get_running_loop())
    runner = create_runner(app, shutdown_timeout=grace)
    await runner.setup()
    try:
        if stop.is_set():  # it came since the start ended: the port is never opened
            return 0, None
        try:
            listening = await listen(
                runner, host, port, max_connections=max_connections,
                turned_away=turned_away)
        except OSError as exc:
            print(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 1, None
        try:
            _announce(router, listening)
            await stop.wait()
        finally:
            listening.close()
        began = time.monotonic()
        announce(f"router: stopping (in-flight work finishes within {grace:g} s or goes back "
                 "to the queue; Ctrl-C again to stop at once)")
        return 0, began
    finally:
        await runner.cleanup()


def _on_stop_signal(loop: asyncio.AbstractEventLoop, stop: asyncio.Event, signum: int
                    ) -> None:
    """First signal: drain gracefully. Our handlers are then removed, so a second one has
    its default effect (Ctrl-C raises KeyboardInterrupt, SIGTERM and SIGHUP terminate)."""
    stop.set()  # first: whatever saying so costs, the router stops
    for stop_signal in _STOP_SIGNALS:
        loop.remove_signal_handler(stop_signal)
    announce(f"router: {signal.Signals(signum).name} received")


def _announce(router: Router, listening: asyncio.Server) -> None:
    config = router.config
    for address in (sock.getsockname() for sock in listening.sockets):
        host, port = address[0], address[1]
        shown = f"[{host}]" if ":" in host else host
        announce(f"router: listening on http://{shown}:{port}  (POST /v1/batch, /v1/track, "
                 "...; GET /health, /metrics)")
    announce(f"  storage: {redacted_url(config.storage)}")
    sources = ", ".join(source.name for source in config.sources)
    announce(f"  sources: {sources}" if sources else
             "  WARNING: no sources are configured: every request is refused with 401 "
             "(add sources with write_keys)")
    if router.destinations:
        announce("  destinations: " + ", ".join(
            f"{destination.name} ({destination.plugin.name})"
            for destination in router.destinations))
    else:
        announce("  destinations: none enabled (events are accepted and deduplicated only)")


def _log_access_to_stdout() -> None:
    """One JSON line per request on stdout, whatever the root logger's level."""
    to_stdout(ACCESS_LOGGER)


