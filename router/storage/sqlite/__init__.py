"""``sqlite:///path``: the embedded default. One file holds the dedup window, the spool and the
dead letters, so one transaction accepts an event (dedup record and jobs together).

All access goes through one writer thread with one connection. Operations queue up and the
thread runs whatever has gathered in a single transaction (group commit), so a burst of
events costs one commit, not one per event, while each caller still waits for its own change
to be durable. WAL with ``synchronous=NORMAL`` survives a process crash (``kill -9``) without
losing a committed event; ``?synchronous=full`` also survives power loss, at a higher cost.

The spool has two tables, because most jobs never fail:

- ``bundles``, where new jobs are appended: each accept writes one row per destination
  holding all of that destination's jobs from it, packed (``router.storage.bundle_format``).
  Each destination has a *lane* of job ids (its lane number in the high bits, a sequence in
  the low ones); a bundle takes a run of them and is keyed by its last, so a destination's
  bundles are one id range in arrival order. A worker reads its lane past an in-memory
  cursor, so leasing writes nothing, and a bundle whose jobs are all delivered is one
  delete: the spool costs a row per ``accept`` and destination, not per event.
- ``jobs``, indexed by due time and by user: jobs waiting for a retry, replayed dead letters,
  and every job of a destination that keeps per-user order (the per-user check needs the
  index). A job keeps its id when it moves here.

Jobs of a bundle that are settled while others of its bundle are still out (delivered,
retried or dead-lettered) are noted in ``settled_runs``, a row per run of consecutive ids
(a delivered batch is one run), so that the bundle, read again after a restart, gives back
only what is unfinished; those rows go with their bundle. A process keeps each bundle it
reads unpacked until the bundle is finished, so the leases that take it a batch at a time
read and parse it once.

Leases live in the process (one process delivers from a SQLite file): after a crash or restart,
every job not yet completed is read again, so nothing is lost and duplicates carry the same
``messageId``.

The code, one concern a module:

- ``storage``: ``SqliteStorage`` itself, its state, opening and closing, and the ``Storage``
  interface (accept, lease, complete, retry, dead_letter, release, ping, stats); the rest of
  its work is done by its bases, one module each:
- ``writer``: the writer thread, the group commit, and the undoing of what an operation
  changed in memory when its SQL is rolled back (``_on_rollback``);
- ``schema``: the file's layout, the writer's connection to it, the conversion of earlier
  layouts, and the damage check;
- ``dedup``: the dedup window (``seen``, and this process's dedup index beside the spool);
- ``lanes``: job ids, bundles, and the lanes this process reads (cursors, open bundles,
  settled runs);
- ``letters``: the dead letters as ``router dlq`` sees them (list, replay, purge);
- ``budget``: the room the spool may take (``max_bytes``, ``min_free_bytes``);
- ``errors``: SQLite's errors said as the router's own.

A constant is defined in the module of its concern, and the other modules that read it
import it. A test that changes one patches it in each module whose reading the test depends
on (``LOCK_TIMEOUT``: ``writer`` for the wait for the write lock, ``errors`` for the message
that names it), never here: this package re-exports only what other modules import, and
leaves out ``CLAIM_WAIT``, ``LOCK_TIMEOUT``, ``MAX_BUNDLE_JOBS`` and ``REPLAY_PAGE``, so that
patching one of them here fails instead of changing nothing.
"""

from router.storage.sqlite.lanes import LANE_BITS
from router.storage.sqlite.schema import LAYOUT, PAGE_SIZE, SCHEMA, damage_in
from router.storage.sqlite.storage import PURGE_AFTER_EVENTS, SqliteStorage, lock_delivery

__all__ = ["LANE_BITS", "LAYOUT", "PAGE_SIZE", "PURGE_AFTER_EVENTS", "SCHEMA", "SqliteStorage",
           "damage_in", "lock_delivery"]
