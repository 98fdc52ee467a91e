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

An ordered lease walks an index of the destination's users with ready jobs, so one user's
backlog costs it one look, not one per job; the destination's first ordered lease builds the
index from its ready queue in bounded steps (``INDEX``), and every script keeps it from then on.

Needs a standalone Redis (or a primary with replicas): the scripts build key names at run
time, which Redis Cluster forbids.

The code, one concern a module:

- ``storage``: ``RedisStorage`` itself: its URL (``from_url``) and the options it takes, its
  connection and the checks at ``open`` (eviction, persistence, scripts allowed), and the
  ``Storage`` interface, each change run as one of the scripts, by the name ``_SCRIPTS``
  gives it; the dead letters are read a page at a time;
- ``scripts``: the Lua scripts, and the key layout they share with Python (``_Keys``), which
  change together;
- ``errors``: Redis's errors said as the router's own (``_translated_errors``): a refusal
  to write is ``StorageFull``, Redis out of reach or refusing for a while
  ``StorageUnavailable``, also when a script's reply hides the refusal's code.

A constant is defined in the module of its concern, and another module that reads it imports
it (``NEEDED_ACL``, in ``errors``, is read by ``storage`` too). A test that changes one patches
it in the module that reads it (``LETTER_PAGE``: ``storage``); this package re-exports only
``RedisStorage``, which other modules import, so patching a constant here fails instead of
changing nothing.
"""

from router.storage.redis.storage import RedisStorage

__all__ = ["RedisStorage"]
