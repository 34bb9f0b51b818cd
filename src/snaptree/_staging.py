"""An import's staging area: its batches are committed where no reader looks, then linked at once.

A large import cannot be one ZODB transaction in bounded memory: ZODB keeps
per-object bookkeeping for a transaction (its savepoint file's index, the
connection's lists of created objects, the storage's transaction index),
about 0.4 KiB per object, until the commit. So an import commits its nodes
in batches, each an ordinary small transaction, into a *staging* entry that
the tree never references:

* ZODB's root holds the tree under ``"snaptree"`` and, beside it,
  ``STAGING_KEY``: a BTree of the imports under way, one entry each (a
  PersistentMapping: who runs it, since when, its last heartbeat, and the
  chain of what its batches committed). Only standard ZODB classes are used,
  so nothing about staging becomes part of the storage format.
* Each batch commit makes its new nodes reachable from the entry (a new
  PersistentList holding them and the previous one). Reachable matters: a
  pack running meanwhile removes unreachable objects, and the import would
  then link nodes that no longer exist.
* The last commit (``snaptree.imports``' link) puts the finished value
  into the tree and deletes the entry (:meth:`Staging.drop`), in one transaction: a reader sees the
  whole import or none of it. What the entry held is garbage from then on,
  reachable only through the tree, and the next pack reclaims the rest.

Batches run through ``store.run``, so they get the store's retries, guards
and synchronizers. A batch writes only new objects and its own entry: it
conflicts with nothing a well-behaved writer does, and a transient error
(a ZEO reconnection, a forced conflict) retries that batch alone. The nodes
built so far are not lost by its abort (ZODB leaves new objects with their
state and no jar), so the retry commits them again.

All batches must use one ZODB connection: nodes committed in one batch are
objects of that connection, and the next batch's nodes refer to them. A
thread's store calls get the same connection back from the pool (see
:mod:`snaptree._pool`); should the pool lend another (more threads than
connections), the import stops with an error rather than commit a
reference ZODB would refuse.

**Leftovers.** A process killed in the middle leaves its entry behind:
invisible to readers, but its batches take space. Every import, when it
registers and when it links, removes the entries whose owner is gone:

* an entry from this machine (same host name and boot) is abandoned when
  its process is no longer running (its pid is free, a zombie, or another
  process with a different start time): exact, whatever its age;
* an entry from another machine is abandoned when its heartbeat, written
  at every batch commit, is older than :data:`STALE_AFTER`; that is the
  only sign a remote process gives. Host names must therefore differ
  between the machines (and containers) that import into one store.

A live import's entry is never removed on this machine. If a remote one is
(it stalled longer than STALE_AFTER), it finds its entry gone at its next
batch or at its link, and fails: nothing of it reaches the tree.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from BTrees.OOBTree import OOBTree
from persistent.list import PersistentList
from persistent.mapping import PersistentMapping

from .errors import Error

#: Key of the imports under way in ZODB's root (the tree is under "snaptree").
STAGING_KEY = "snaptree.staging"

#: Seconds without a batch commit after which another machine's import is abandoned.
STALE_AFTER = 3600.0


@dataclass(frozen=True)
class StagedImport:
    """One entry of the staging area: an import under way, or what a dead one left."""

    #: The entry's key.
    id: str
    #: Who runs (ran) it.
    host: str
    pid: int
    #: When it registered, and when it last committed a batch.
    began: datetime.datetime
    heartbeat: datetime.datetime
    #: Batches committed so far.
    batches: int
    #: What it imports (the file, or "data in memory") and where to.
    source: str
    path: str
    #: Whether the next import would remove it (its owner is gone).
    abandoned: bool


def _boot_id() -> str:
    """This machine's boot, so that a pid from before a reboot is not taken for a live one."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_token(pid: int) -> str | None:
    """A token naming process *pid* for as long as it runs (its start time); None if none runs.

    Linux: field 22 of ``/proc/PID/stat``, so a pid reused by a later process
    gives another token; a zombie (killed, not reaped yet) counts as gone.
    Elsewhere only whether the pid exists can be told.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        stat = ""
    if stat:
        fields = stat[stat.rindex(")") + 2 :].split()
        return None if fields[0] == "Z" else fields[19]
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: assume it runs
        return "running"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "running"


def _this_process() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "boot": _boot_id(),
        "pid": pid,
        "process": _process_token(pid),
    }


def is_abandoned(entry: Any, now: float) -> bool:
    """Whether the import that owns *entry* is gone (the rules are in the module docstring)."""
    owner = entry["owner"]
    if owner["host"] == socket.gethostname():
        if owner["boot"] != _boot_id():
            return True  # this machine rebooted since
        return _process_token(owner["pid"]) != owner["process"]
    return now - entry["heartbeat"] > STALE_AFTER


def _container(root: Any, create: bool) -> Any:
    """The staging BTree in ZODB's root, given the tree's root from a store call."""
    zodb_root = root._p_jar.root()
    container = zodb_root.get(STAGING_KEY)
    if container is None and create:
        container = zodb_root[STAGING_KEY] = OOBTree()
    return container


def remove_abandoned(root: Any, keep: str | None = None) -> int:
    """Delete the entries whose owner is gone (not *keep*); inside a store call. How many."""
    container = _container(root, create=False)
    if container is None:
        return 0
    now = time.time()
    dead = [key for key, entry in container.items() if key != keep and is_abandoned(entry, now)]
    for key in dead:
        del container[key]
    return len(dead)


def list_staged(root: Any) -> list[StagedImport]:
    """The staging area's entries, read from the tree's *root* in a snapshot or store call."""
    container = _container(root, create=False)
    if container is None:
        return []
    now = time.time()
    moment = datetime.datetime.fromtimestamp
    return [
        StagedImport(
            id=key,
            host=entry["owner"]["host"],
            pid=entry["owner"]["pid"],
            began=moment(entry["began"], datetime.UTC),
            heartbeat=moment(entry["heartbeat"], datetime.UTC),
            batches=entry["batches"],
            source=entry["source"],
            path=entry["path"],
            abandoned=is_abandoned(entry, now),
        )
        for key, entry in container.items()
    ]


class Staging:
    """One import's entry in the staging area, and the one connection its batches use."""

    def __init__(self, source: str, path: str) -> None:
        self.id = uuid.uuid4().hex
        self.source = source
        self.path = path
        self.batches = 0  # committed
        self._conn: Any = None

    @property
    def started(self) -> bool:
        """Whether a batch was committed (the entry exists in the database)."""
        return self.batches > 0

    def own(self, root: Any) -> None:
        """Check that this store call runs on the connection every batch so far used."""
        conn = root._p_jar
        if self._conn is None:
            self._conn = conn
        elif conn is not self._conn:
            raise Error(
                "the import lost its database connection between two batches (the store "
                "lent this thread another one: more threads use the store than its "
                "pool_size allows); nothing was imported. Import again, or open the store "
                "with a larger pool_size"
            )

    def add_batch(self, root: Any, nodes: list[Any]) -> None:
        """Inside a store call: make *nodes* reachable from the entry (registering it first)."""
        self.own(root)
        now = time.time()
        if not self.started:
            remove_abandoned(root)
            entry = PersistentMapping(
                owner=_this_process(),
                began=now,
                source=self.source,
                path=self.path,
                chunk=None,
            )
            _container(root, create=True)[self.id] = entry
        else:
            entry = self.entry(root)
        if nodes:
            entry["chunk"] = PersistentList([entry["chunk"], *nodes])
        entry["heartbeat"] = now
        entry["batches"] = self.batches + 1

    def batch_committed(self) -> None:
        self.batches += 1

    def entry(self, root: Any) -> Any:
        """This import's entry, inside a store call; an Error if another import removed it."""
        container = _container(root, create=False)
        entry = None if container is None else container.get(self.id)
        if entry is None:
            raise Error(
                f"the staging area of this import ({self.id}) was removed by another "
                f"process that took it for abandoned (no batch committed for "
                f"{STALE_AFTER:g} s); nothing was imported. Import again"
            )
        return entry

    def drop(self, root: Any) -> None:
        """Inside a store call: delete the entry (at the link, or after a failure)."""
        container = _container(root, create=False)
        if container is not None:
            container.pop(self.id, None)
