"""Starting a command as it is started from a shell on a terminal, whatever runs the suite."""

from __future__ import annotations

import signal


def as_from_a_terminal() -> None:
    """A ``preexec_fn``: SIGINT and SIGHUP at their defaults in the child. The suite may run
    with either ignored (``nohup`` ignores SIGHUP; a script's background job, ``make test &``,
    SIGINT), and a child inherits that; ``router serve`` and ``router send`` then keep
    ignoring them, by design (``test_a_stop_signal_the_caller_ignores_stays_ignored``). A
    test of what Ctrl-C or a closing terminal does must not depend on it."""
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
