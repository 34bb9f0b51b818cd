"""CPython's own dict and list protocol suites, run against snaptree's nodes.

``test.mapping_tests`` and ``test.list_tests`` are the suites CPython runs
against dict, UserDict, list and UserList. Here they run against Mapping,
FlatMapping and List, free-standing and attached to a store (memory:// and a
FileStorage) inside an open transaction: every node a test creates is put
under the tree's root and added to the connection, so each change goes
through the ownership checks, conversion and commit bookkeeping of a real
store call. The transaction is aborted after each test.

A test that fails only because of a deviation storage imposes is marked as
an expected failure (strict: it must fail, with exactly that error), and
the reason names the deviation; docs/coming-from-dicts.md lists the same.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
import threading
import unittest
from typing import Any

import pytest

import snaptree
from snaptree import UnstorableValueError
from snaptree.tree import FlatMapping, List, Mapping

mapping_tests = pytest.importorskip(
    "test.mapping_tests",
    reason="this interpreter has no test package (on Debian: apt install libpython3-testsuite)",
)
list_tests = pytest.importorskip("test.list_tests", reason="this interpreter has no test package")

#: The tree root of the transaction the running test holds, for nodes to attach to.
_current = threading.local()
_names = itertools.count()


class _Attaching:
    """Mixin for node classes: every new node is placed under the open transaction's root."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        root = _current.root
        root[f"n{next(_names)}"] = self
        root._p_jar.add(self)  # gives it its connection now, not at commit


class AttachedMapping(_Attaching, Mapping):
    pass


class AttachedFlatMapping(_Attaching, FlatMapping):
    pass


class AttachedList(_Attaching, List):
    pass


class _Aborted(Exception):
    pass


class _InStore:
    """Mixin for the suites' TestCases: each test runs in one open store transaction."""

    backend = "memory"

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()  # type: ignore[misc]
        cls._dir = tempfile.TemporaryDirectory()
        uri = "memory://" if cls.backend == "memory" else os.path.join(cls._dir.name, "Data.fs")
        cls._store = snaptree.open(uri)

    @classmethod
    def tearDownClass(cls) -> None:
        cls._store.close()
        cls._dir.cleanup()
        super().tearDownClass()  # type: ignore[misc]

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        self._block = self._store.transaction()
        _current.root = self._block.__enter__()

    def tearDown(self) -> None:
        _current.root = None
        with contextlib.suppress(_Aborted):
            self._block.__exit__(_Aborted, _Aborted(), None)
        super().tearDown()  # type: ignore[misc]


# -- deviations ----------------------------------------------------------------------------

ORDERED_KEYS = (
    "keys must be mutually orderable: a Mapping keeps its keys sorted in a BTree, and this "
    "test's keys define only __hash__/__eq__ (refused with UnstorableValueError)"
)
PLAIN_OBJECTS = (
    "plain class instances are refused (ZODB would store a copy and never see changes "
    "made to it): this test puts test-only objects (ALWAYS_EQ, BadCmp, ...) into the node"
)
HELD_BY_TREE = (
    "a node placed in the tree is referenced by its parent and its connection until the "
    "transaction ends, so it is not freed when the test drops it"
)


def _deviates(reason: str, raises: type[BaseException] = UnstorableValueError) -> Any:
    return pytest.mark.xfail(reason=reason, raises=raises, strict=True)


#: test name -> reason, per suite; "attached" entries apply to nodes in a store only.
MAPPING_DEVIATIONS = {
    "test_repr": PLAIN_OBJECTS,
    "test_getitem": ORDERED_KEYS,
    "test_pop": ORDERED_KEYS,
    "test_setdefault": ORDERED_KEYS,
    "test_eq": ORDERED_KEYS,
}
FLAT_DEVIATIONS = {
    "test_repr": PLAIN_OBJECTS,
    "test_getitem": PLAIN_OBJECTS,
    "test_pop": PLAIN_OBJECTS,
    "test_setdefault": PLAIN_OBJECTS,
    "test_eq": PLAIN_OBJECTS,
}
LIST_DEVIATIONS = {
    "test_contains_fake": PLAIN_OBJECTS,
    "test_contains_order": PLAIN_OBJECTS,
    "test_count": PLAIN_OBJECTS,
    "test_index": PLAIN_OBJECTS,
    "test_remove": PLAIN_OBJECTS,
}
LIST_ATTACHED_DEVIATIONS = {"test_free_after_iterating": (HELD_BY_TREE, AssertionError)}


def _suite(
    name: str,
    base: type[unittest.TestCase],
    node_class: type,
    deviations: dict[str, Any],
    mixins: tuple[type, ...] = (),
    **attributes: Any,
) -> None:
    """Define test class *name*: *base* run against *node_class*, deviations marked."""
    namespace: dict[str, Any] = {"type2test": node_class, **attributes}
    for test, why in deviations.items():
        reason, raises = why if isinstance(why, tuple) else (why, UnstorableValueError)
        original = getattr(base, test)

        def run(self: Any, original: Any = original) -> None:
            original(self)

        run.__name__ = test
        namespace[test] = _deviates(reason, raises)(run)
    globals()[name] = type(name, (*mixins, base), namespace)


_CONTEXTS = {
    "Free": ((), {}),
    "Memory": ((_InStore,), {"backend": "memory"}),
    "File": ((_InStore,), {"backend": "file"}),
}

for _context, (_mixins, _attrs) in _CONTEXTS.items():
    _attached = bool(_mixins)
    _suite(
        f"TestMappingProtocol{_context}",
        mapping_tests.TestHashMappingProtocol,
        AttachedMapping if _attached else Mapping,
        MAPPING_DEVIATIONS,
        _mixins,
        **_attrs,
    )
    _suite(
        f"TestFlatMappingProtocol{_context}",
        mapping_tests.TestHashMappingProtocol,
        AttachedFlatMapping if _attached else FlatMapping,
        FLAT_DEVIATIONS,
        _mixins,
        **_attrs,
    )
    _suite(
        f"TestListProtocol{_context}",
        list_tests.CommonTest,
        AttachedList if _attached else List,
        {**LIST_DEVIATIONS, **(LIST_ATTACHED_DEVIATIONS if _attached else {})},
        _mixins,
        **_attrs,
    )
