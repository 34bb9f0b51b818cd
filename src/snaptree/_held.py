"""Per thread, the connections it holds for store calls: whose transaction a new node joins.

Apart from :mod:`snaptree._connection`, which pushes and pops them, so that
:mod:`snaptree.paths` can ask for the current one while the connection asks
paths where an object is.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._connection import OwnedConnection

#: Per thread, the connections it holds for store calls, innermost last.
#: The conversion and the commit check ask for the innermost writable one: a
#: node created outside the tree during a store call belongs to that call's
#: transaction.
held = threading.local()


def current_connection() -> OwnedConnection | None:
    """The connection of the store call the calling thread is in, if it can write; else None."""
    for conn in reversed(getattr(held, "stack", ())):
        if not conn._snaptree_read_only:
            return conn
    return None
