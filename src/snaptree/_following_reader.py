"""A read-only store that keeps up with new commits between exports, and stays warm.

Used by the exporter process and by ``snaptree export`` (with ``--every``,
the same exporter in the foreground). Before each export, :meth:`catch_up`
reads what was committed since the last one: a FileStorage opened
read-only never looks at its file again by itself, so
:mod:`snaptree._file_follower` reads the transactions appended since
(reopening the file after a pack); ZEO and RelStorage clients follow
commits by themselves. The ZODB cache stays warm across exports, and so do
the pickle fragments of the last export (:attr:`fragments`, passed to each
export), which belong to the store's connections and go when it is opened
again.
"""

from __future__ import annotations

import logging

from . import _file_follower
from ._pickle_fragments import FragmentCaches
from .errors import StoreClosedError
from .store import Store
from .store import open as open_store

log = logging.getLogger(__name__)


class FollowingReader:
    """A read-only :class:`Store` on *uri* that :meth:`catch_up` brings up to date."""

    def __init__(self, uri: str | None, cache_size: int) -> None:
        self.uri = uri
        self.cache_size = cache_size
        self._store: Store | None = self._open()
        self.fragments = FragmentCaches()

    @property
    def store(self) -> Store:
        """The store as of the last :meth:`catch_up` (which opens it again if it must)."""
        if self._store is None:
            raise StoreClosedError(
                "the store could not be opened again after it was replaced; the next "
                "catch_up() tries again"
            )
        return self._store

    def _open(self) -> Store:
        return open_store(self.uri, read_only=True, cache_size=self.cache_size, pool_size=2)

    def catch_up(self) -> None:
        """Read what was committed since the last call; open the store again after a pack.

        If opening it again fails (the file is missing for a moment: between
        a pack's two renames, or while it is restored), the error is raised
        and the next call tries again, rather than every later export
        failing on the closed store.
        """
        if self._store is not None and _file_follower.catch_up(self._store):
            return
        if self._store is not None:
            log.info("%s was packed or replaced; opening it again", self._store.source)
            self._store.close()
            self._store = None
            self.fragments = FragmentCaches()
        self._store = self._open()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
