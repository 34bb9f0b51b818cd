"""Conflict-retry tests for applications: force conflicts, check retry safety, race operations.

A function given to ``store.run`` runs again whenever its commit conflicts.
Application authors need to prove two things: *my functions are safe to run
again*, and *my invariants hold when my operations race*. This package gives
them the tools snaptree's own suite uses (docs/testing.md):

- :func:`force_conflicts`: the next commits of ``store.run`` calls fail with a
  genuine ``ZODB.POSException.ConflictError`` at commit, so the store's own
  retry path runs, exactly as under a real conflict (``_conflicts``).
- :func:`assert_retry_safe`: one run without a conflict and one with forced
  conflicts, from the same starting state, must agree: committed tree,
  return value, arguments, and state outside the tree (``_retry_safety``,
  with ``_reach`` finding what a function can change outside the tree).
- :func:`interleave`: a deterministic race of two functions (both read,
  ``first`` commits, then ``second``), to show write skew and its cure; and
  :func:`race`: worker threads run randomly chosen operations while the
  caller checks an invariant on snapshots, ZODB's racetest for applications
  (``_races``).
- :class:`Chaos`: every retried call's first commit conflicts with a given
  probability, in every store opened meanwhile (the pytest plugin's
  ``--snaptree-chaos``; ``_chaos``).

Nothing here imports pytest: failures are ``AssertionError`` with a message
meant to be read, so the kit works under any test runner.
"""

from ._chaos import Chaos
from ._conflicts import ForcedConflicts, force_conflicts
from ._races import Interleaving, RaceReport, interleave, race
from ._retry_safety import assert_retry_safe

__all__ = [
    "Chaos",
    "ForcedConflicts",
    "Interleaving",
    "RaceReport",
    "assert_retry_safe",
    "force_conflicts",
    "interleave",
    "race",
]
