"""Delivery in a process of its own (``delivery.own_process: true``).

One Python process runs on one core at a time, and a router that accepts and delivers at
full speed needs more than that. With this option the router's process keeps intake
(parsing, dedup, translation, the durable write) and a child process does the delivery,
reading the same storage, which both can open: SQLite in WAL mode takes one writer at a
time and readers alongside, Redis is shared anyway. Nothing passes between them but two sockets:

- parent to child, on a datagram socket: the names of the destinations that new work was
  queued for (else the child would find it at its next poll). These are hints, so the
  parent never waits to send one: when the child is not reading (stopped, or stuck) and the
  socket is full, the names wait for the next send and the child's poll finds the work;
- parent to child, on a stream socket pair carrying ``multiprocessing`` messages (the
  "pipe" of the comments below): the config at start, ``("stop", grace)`` at shutdown, and
  ``("stop", 0)`` again if the shutdown is cut short (a second Ctrl-C): a ``stop`` that
  comes while the child is stopping can only shorten what is left of the grace;
- child to parent, on the pipe: ``("ready", None)`` once delivering, ``("failed", (type
  name, message))`` if it cannot start, and ``("metrics", snapshot)`` whenever its
  counters change, so ``/metrics`` stays whole in the parent;
- both ways, for ``Router.drain``: ``("settled?", n)`` from the parent, answered with
  ``("settled", n)`` once the child's workers have counted every job they settled, right
  after the snapshot that holds those counts.

When the parent dies, even by ``kill -9``, the pipe closes and the child stops at once, even
in the middle of a graceful stop (requests in flight are abandoned) or of its start-up:
nothing is lost, since every job stays in the storage until it is delivered. When the child
dies, the parent starts another one. A ``stop`` during the child's start-up gives the start
up; a child that cannot start exits with 1.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from router import logs
from router.config import LoadedConfig
from router.delivery.telemetry import DeliveryMetrics, Snapshot, added
from router.errors import SpoolInUse
from router.runtime import LoopWatchdog, tune_garbage_collector, until_stopped

if TYPE_CHECKING:
    from router.delivery.egress import EgressPolicy
    from router.delivery.service import DeliveryService
    from router.storage.base import Storage

log = logging.getLogger("router.delivery")

_PARENTS_SIGNALS = frozenset({signal.SIGINT, signal.SIGHUP})
"""Signals a terminal sends the whole process group, which the router alone acts on."""
_BLOCKED_AT_START = _PARENTS_SIGNALS | {signal.SIGTERM}
"""The signals the child starts with blocked: the parent's, which it then ignores, and
SIGTERM, which it acts on once it delivers. systemd's ``KillMode=control-group`` (or ``kill
-TERM -- -PGID``) sends SIGTERM to the whole group: one that reached the child during its
start-up killed it, and the router, stopping on its own SIGTERM, failed instead ("delivery
process exited during start", exit 1)."""
START_TIMEOUT = 60.0
METRICS_INTERVAL = 0.05
"""How often the child sends its counters when they changed."""
RESTART_DELAY = 1.0
WAKE_DATAGRAM_BYTES = 1 << 16
"""The most a wake-up datagram may carry: the JSON list of destination names, or ``null``
for all of them when the names would not fit (hundreds of destinations with long names)."""
WAKE_ALL = b"null"
EXIT_POLL_INTERVAL = 0.02
"""How often the parent looks whether the child has exited while it waits for it."""
STOP_AT_ONCE_WAIT = 2.0
"""How long a parent whose stop was cut short waits for the child before killing it."""
SETTLED_POLL_INTERVAL = 0.005
"""How often the child, asked whether it has counted what it settled, looks again."""
CUT_INTERVAL = 0.05
"""How often the child, told to stop at once, ends the waits of its stop still under way."""


class DeliveryProcess:
    """The parent's handle on the delivery process: the same ``start``/``wake``/``stop`` as
    the in-process ``DeliveryService``."""

    def __init__(self, loaded: LoadedConfig, metrics: DeliveryMetrics, *, base_dir: Path
                 ) -> None:
        self.loaded = loaded
        self.metrics = metrics
        self.base_dir = base_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._connection: Connection | None = None
        self._wake_socket: socket.socket | None = None
        self._ready: asyncio.Future[None] | None = None
        self._to_wake: set[str] = set()
        self._wake_scheduled = False
        self._stopping = False
        self._started = False
        """Once the first child delivers, a child that exits is replaced; before, its
        failure is ``start``'s error and nothing is started again."""
        self._restart: asyncio.TimerHandle | None = None
        self._counted: Snapshot = {}
        """The running child's last metrics snapshot."""
        self._carried: Snapshot = {}
        """What the children that have exited counted, under the running one's counts."""
        self.restarts = 0
        """Children started to replace one that exited, since ``start``."""
        self._questions: dict[int, asyncio.Future[bool]] = {}
        """``counts_settled``'s questions to the child not answered yet, by number."""
        self._question_numbers = itertools.count()

    async def start(self) -> None:
        """Start the child and wait until it delivers. If it cannot: ``SpoolInUse`` when
        another router delivers from the spool (as ``DeliveryService.start`` raises it, so
        ``router send`` can leave its events to that router), ``TimeoutError`` when it is not
        delivering within ``START_TIMEOUT``, else ``RuntimeError`` naming the child's error."""
        self._spawn()
        assert self._ready is not None
        await asyncio.wait_for(self._ready, START_TIMEOUT)
        self._started = True

    @property
    def running_pid(self) -> int | None:
        """The process id of the child while it delivers: started, ready, not exited."""
        process, ready = self._process, self._ready
        if process is None or process.poll() is not None or ready is None or not ready.done():
            return None
        return None if ready.cancelled() or ready.exception() is not None else process.pid

    def _spawn(self) -> None:
        """A fresh interpreter (``python -m router.delivery.process FD WAKE_FD``), not a
        fork or multiprocessing's spawn: it inherits no threads or sockets and never
        re-imports the embedding program's main module. Its config comes as the first
        message."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        wake_ours, wake_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        with theirs, wake_theirs:
            fds = [theirs.fileno(), wake_theirs.fileno()]
            # Ctrl-C, a closing terminal and a supervisor's SIGTERM signal the router's whole
            # group, the child too, and reached it before it could ignore them or take them
            # as `stop` (a SIGHUP during start-up killed it and failed the start). Started
            # with them blocked, it sets what each does before it unblocks it. (A group of
            # its own instead stopped it at its first log line on a terminal set to
            # `tostop`, as a background job.)
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED_AT_START)
            try:
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "router.delivery.process", *map(str, fds)],
                    pass_fds=fds, stdin=subprocess.DEVNULL)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        wake_ours.setblocking(False)
        self._wake_socket = wake_ours
        self._connection = Connection(ours.detach())
        self._connection.send(("config", (self.loaded, str(self.base_dir))))
        self._ready = loop.create_future()
        loop.add_reader(self._connection.fileno(), self._on_message)

    async def counts_settled(self, *, timeout: float) -> bool:
        """Whether ``metrics`` count every job the storage shows settled, as
        ``DeliveryService.counts_settled``. The child's counts come with its snapshots, a
        moment after the storage shows the jobs settled, so the child is asked: it answers
        once its workers have counted what they settled, right after sending those counts.
        False when no answer comes within ``timeout`` (the child busy, or gone)."""
        if self._connection is None:
            return False
        number = next(self._question_numbers)
        answer = self._questions[number] = asyncio.get_running_loop().create_future()
        self._send(("settled?", number))
        try:
            return await asyncio.wait_for(answer, timeout)
        except TimeoutError:
            return False
        finally:
            del self._questions[number]

    def wake(self, destinations: Iterable[str]) -> None:
        """New work for these destinations; sent once per turn of the event loop."""
        if not self._wake_scheduled:
            self._wake_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_wake)
        self._to_wake.update(destinations)

    def _send_wake(self) -> None:
        self._wake_scheduled = False
        if self._wake_socket is None or not self._to_wake:
            return
        names = orjson.dumps(sorted(self._to_wake))
        try:
            self._wake_socket.send(names if len(names) <= WAKE_DATAGRAM_BYTES else WAKE_ALL)
        except BlockingIOError:
            return  # the child is not reading: the names go with the next wake-up
        except OSError:
            pass  # the child is gone; _on_message sees the pipe close and starts another
        self._to_wake = set()

    def _send(self, message: tuple[str, Any]) -> None:
        try:
            if self._connection is not None:
                self._connection.send(message)
        except OSError:
            pass  # the child is gone; _on_message sees the pipe close and starts another

    def _on_message(self) -> None:
        assert self._connection is not None
        try:
            while self._connection.poll():
                kind, payload = self._connection.recv()
                if kind == "metrics":
                    self._counted = payload
                    self.metrics.restore(payload, carried=self._carried)
                elif kind == "settled" and payload in self._questions:
                    self._questions[payload].set_result(True)
                elif kind == "ready" and self._ready and not self._ready.done():
                    self._ready.set_result(None)
                elif kind == "failed" and self._ready and not self._ready.done():
                    self._ready.set_exception(_start_error(*payload))
        except (EOFError, OSError):
            self._child_gone()

    def _child_gone(self) -> None:
        """The pipe closed: the child exited. During ``start`` that is ``start``'s error;
        later, unless the router is stopping, another child is started."""
        loop = asyncio.get_running_loop()
        if self._connection is not None:
            loop.remove_reader(self._connection.fileno())
            self._connection.close()
            self._connection = None
        if self._wake_socket is not None:
            self._wake_socket.close()
            self._wake_socket = None
        self._carried, self._counted = added(self._carried, self._counted), {}
        for question in self._questions.values():  # its replacement is asked next time
            if not question.done():
                question.set_result(False)
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_exception(RuntimeError("delivery process exited during start"))
        if self._stopping or not self._started:
            return  # stopping, or the first start failed: start() raises it
        if ready is not None and ready.exception() is not None:  # a replacement's failure
            log.error("%s", ready.exception())
        self._restart = loop.call_later(RESTART_DELAY, self._respawn)

    def _respawn(self) -> None:
        # Said here, not when the pipe closed: the child is reaped by then, and its exit
        # code known (it read "code None" after a kill -9: observability audit).
        log.error("delivery process exited (code %s); starting another",
                  self._process.poll() if self._process else None)
        self.restarts += 1
        self._spawn()

    async def stop(self, *, grace: float) -> None:
        """Ask the child to finish (in-flight requests within ``grace``, the rest back to
        the queue) and wait for it; kill it if it overstays."""
        self._stopping = True
        if self._restart is not None:
            self._restart.cancel()
        process = self._process
        if process is None:
            return
        self._send(("stop", grace))
        try:
            if not await _exited(process, grace + 10):
                log.error("delivery process did not stop within %g s; killing it", grace + 10)
                process.kill()
                await _exited(process, 5)
        except BaseException:
            # Cancelled: a second Ctrl-C (asyncio.run cancels what is left), or a timeout
            # around close(). The child stops now too rather than after its grace; the
            # requests it abandons go back to the queue. (No thread waits for it either: at
            # exit asyncio.run would join that thread, for as long as the grace.)
            self._send(("stop", 0.0))
            if not await _exited(process, STOP_AT_ONCE_WAIT):
                process.kill()
            raise
        if self._connection is not None:
            self._on_message()  # the last metrics, then the pipe's end
        self._process = None


def _start_error(kind: str, message: str) -> Exception:
    """The error a child reported by its type's name and message. ``SpoolInUse`` stays
    itself, so that a caller can tell "another router delivers from this file" from a
    failure."""
    if kind == SpoolInUse.__name__:
        return SpoolInUse(message)
    return RuntimeError(f"delivery process: {kind}: {message}")


async def _exited(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to ``timeout`` for ``process`` to exit (and reap it); True if it did."""
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(EXIT_POLL_INTERVAL)
    return True


# -- the child --------------------------------------------------------------------------------

def main(fd: int, wake_fd: int) -> None:
    """The delivery process's entry point. Ctrl-C and a closing terminal signal the whole
    group; the parent decides when to stop, so the child ignores SIGINT and SIGHUP (it starts
    with them blocked, so none is lost or fatal before this) and takes SIGTERM as ``stop``
    once it delivers: a SIGTERM during start-up waits, blocked, until then.

    Exits with 1 when it cannot start, so that the parent's log does not say "code 0" for a
    replacement that failed."""
    for signum in _PARENTS_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _PARENTS_SIGNALS)
    logs.configure()  # the parent checked the environment it passed on
    connection = Connection(fd)
    try:
        kind, (loaded, base_dir) = connection.recv()
    except (EOFError, OSError):
        return  # the parent died before it sent the config: nothing to deliver for
    assert kind == "config"
    wake_socket = socket.socket(fileno=wake_fd)
    wake_socket.setblocking(False)
    if not asyncio.run(_deliver_until_stopped(loaded, connection, wake_socket, Path(base_dir))):
        sys.exit(1)


async def _deliver_until_stopped(loaded: LoadedConfig, connection: Connection,
                                 wake_socket: socket.socket, base_dir: Path) -> bool:
    """Start, say so, deliver until the parent says stop (or is gone, or SIGTERM comes), and
    stop. False if it could not start (the parent is told why); True after a stop, one that
    came during the start (which is then given up) included."""
    from router.destinations import egress_policy
    from router.storage import storage_for_url

    config = loaded.config
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    grace = [config.server.shutdown_grace]
    at_once = asyncio.Event()
    """Set when the stop must not wait any longer: the parent is gone, or said so."""
    questions: asyncio.Queue[int] = asyncio.Queue()
    """The parent's ``settled?`` questions, answered once delivering."""

    def parent_gone() -> None:
        # Stop at once, even in the middle of a graceful stop, so that a restarted router
        # can take the spool; requests in flight are sent again by it, never lost.
        grace[0] = 0.0
        stop.set()
        at_once.set()

    def on_message() -> None:
        try:
            while connection.poll():
                kind, payload = connection.recv()
                if kind == "stop" and stop.is_set():  # already stopping: a stop now
                    loop.call_later(payload, at_once.set)  # shortens what is left
                elif kind == "stop":
                    grace[0] = payload
                    stop.set()
                elif kind == "settled?":
                    questions.put_nowait(payload)
        except (EOFError, OSError):  # the parent is gone (killed)
            loop.remove_reader(connection.fileno())
            parent_gone()

    # From the first moment, not once started: a parent killed with -9 while this process
    # started went unnoticed until then (it waited up to 5 s for the spool's delivery lock,
    # and could start leasing), and a parent stopped meanwhile was not heard either.
    loop.add_reader(connection.fileno(), on_message)
    egress = egress_policy(config)
    storage = storage_for_url(config.storage, base_dir=base_dir)
    # Told to stop, or the parent gone, while it starts: the start is given up.
    starting = await until_stopped(_start_service(loaded, storage, egress), stop)
    if starting.cancelled() or starting.exception() is not None:
        if not starting.cancelled():  # reported to the parent, which fails its start
            exc = starting.exception()
            _tell_parent(connection, ("failed", (type(exc).__name__, str(exc))))
        await storage.close()
        return starting.cancelled()
    service, metrics = starting.result()
    tune_garbage_collector()
    watchdog = LoopWatchdog(holds_up="deliveries (in the delivery process)")
    watchdog.start()

    def on_wake() -> None:
        try:
            while datagram := wake_socket.recv(WAKE_DATAGRAM_BYTES):
                names = orjson.loads(datagram)  # the parent sends what fits (WAKE_ALL else)
                service.wake(service.workers if names is None else names)
        except BlockingIOError:
            return
        except OSError:
            pass
        loop.remove_reader(wake_socket.fileno())  # the parent is gone: the pipe says so too

    loop.add_reader(wake_socket.fileno(), on_wake)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Only now: a SIGTERM sent to the group during start-up killed this process and failed
    # the router's start. One that came since is acted on here, the stop beginning at once.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    if not _tell_parent(connection, ("ready", None)):
        parent_gone()
    sender = MetricsSender(connection)  # from here on, the only one to send
    answering = asyncio.create_task(_answer_settled(questions, service, metrics, sender))
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), METRICS_INTERVAL)
            except TimeoutError:
                pass
            sender.offer(metrics.snapshot())
    finally:
        answering.cancel()
        started = time.monotonic()
        await _stop_service(service, grace[0], at_once)
        watchdog.stop()
        await storage.close()
        sender.offer(metrics.snapshot())
        await asyncio.to_thread(sender.close, timeout=1.0 if at_once.is_set() else grace[0] + 1)
        log.debug("delivery process stopped in %.2f s", time.monotonic() - started)
    return True


async def _start_service(loaded: LoadedConfig, storage: Storage, egress: EgressPolicy
                         ) -> tuple[DeliveryService, DeliveryMetrics]:
    """Build the destinations, open the storage and start delivering from it. The caller
    closes the storage, also when this fails or is cancelled."""
    from router.delivery.service import DeliveryService
    from router.destinations import build_destinations
    from router.registry import create_registry

    destinations = build_destinations(loaded, create_registry(), egress)
    metrics = DeliveryMetrics(d.name for d in destinations)
    await storage.open()
    service = DeliveryService(
        destinations, storage, egress=egress, metrics=metrics,
        dead_letter_retention=loaded.config.delivery.dead_letter_retention)
    await service.start()  # claims the spool: another router may hold it
    return service, metrics


async def _answer_settled(questions: asyncio.Queue[int], service: DeliveryService,
                          metrics: DeliveryMetrics, sender: MetricsSender) -> None:
    """Answer each of the parent's ``settled?`` questions once the workers have counted
    every job they settled, with the snapshot holding those counts sent first."""
    while True:
        number = await questions.get()
        while not service.settled:
            await asyncio.sleep(SETTLED_POLL_INTERVAL)
        sender.offer(metrics.snapshot())
        sender.answer(number)


def _tell_parent(connection: Connection, message: tuple[str, Any]) -> bool:
    """Send ``message``; False when the parent is gone (killed while this process started):
    a send then raised BrokenPipeError, and this process died with a traceback rather than
    stop quietly."""
    try:
        connection.send(message)
    except OSError:
        return False
    return True


async def _stop_service(service: DeliveryService, grace: float, at_once: asyncio.Event
                        ) -> None:
    """``service.stop(grace=grace)``, cut short once ``at_once`` is set: what is in flight
    then is abandoned and goes back to the queue, as when the grace runs out."""
    stopping = asyncio.create_task(service.stop(grace=grace))
    cut = asyncio.create_task(at_once.wait())
    try:
        await asyncio.wait([stopping, cut], return_when=asyncio.FIRST_COMPLETED)
        while not stopping.done():
            service.cut_stop_short()
            await asyncio.wait([stopping], timeout=CUT_INTERVAL)
    finally:
        cut.cancel()
    await stopping


class MetricsSender:
    """Sends the child's counters to the parent from a thread of its own. A send waits while
    the parent is not reading and the socket's buffer is full: from the event loop, that
    would stall delivery. Snapshots are cumulative, so one that has not gone out yet is
    simply replaced by the next."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._latest: dict[str, Any] | None = None
        self._offered: dict[str, Any] | None = None
        self._answers: list[int] = []
        self._changed = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._send_forever, name="metrics-sender",
                                        daemon=True)
        self._thread.start()

    def offer(self, snapshot: dict[str, Any]) -> None:
        """Queue ``snapshot`` in place of any not sent yet, unless nothing changed since the
        last one; never waits for the parent."""
        if snapshot == self._offered:
            return
        self._offered = snapshot
        with self._changed:
            self._latest = snapshot
            self._changed.notify()

    def answer(self, number: int) -> None:
        """Answer the parent's ``settled?`` question ``number``, after any snapshot offered
        before."""
        with self._changed:
            self._answers.append(number)
            self._changed.notify()

    def close(self, *, timeout: float) -> None:
        """Send what is queued, then stop; waits at most ``timeout`` for a parent that does
        not read."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        self._thread.join(timeout)

    def _send_forever(self) -> None:
        while True:
            with self._changed:
                while self._latest is None and not self._answers and not self._closing:
                    self._changed.wait()
                snapshot, self._latest = self._latest, None
                answers, self._answers = self._answers, []
            if snapshot is None and not answers:
                return  # closing, and everything is sent
            messages: list[tuple[str, Any]] = [("settled", number) for number in answers]
            if snapshot is not None:  # first: the answers say it is counted
                messages.insert(0, ("metrics", snapshot))
            try:
                for message in messages:
                    self._connection.send(message)
            except OSError:
                return  # the parent is gone


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
