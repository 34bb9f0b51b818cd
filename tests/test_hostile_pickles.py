"""Pickles that attack the C unpickler with data alone: refused before it reads them.

No global is involved, so the allow-list has nothing to refuse: a memo
index that makes the unpickler allocate gigabytes, tuples nested deep
enough that hashing one as a dict key crashes the process. The pickle
scan (snaptree._pickle_scan) refuses both; real pickles of every protocol
still load as ``pickle.loads`` loads them.
"""

from __future__ import annotations

import collections
import datetime
import decimal
import pickle
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings

import snaptree
from _cli import snaptree as run_snaptree
from _strategies import json_trees
from snaptree._pickle_scan import MAX_HASH_DEPTH, OpcodeScan

PROTO2 = b"\x80\x02"
HERE = Path(__file__).parent

#: A tuple subclass a user may allow (``--allow test_hostile_pickles:Point``).
Point = collections.namedtuple("Point", "x")


def _deep_tuple_key(levels: int) -> bytes:
    """{((...(),),): None}, the key nested *levels* deep: one opcode per level."""
    return PROTO2 + b"}" + b")" + b"\x85" * levels + b"N" + b"s" + b"."


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_deep_tuple_used_as_a_key_is_refused_instead_of_crashing_the_process(tmp_path):
    """A million levels: the C hash of the key recursed until the process died (SIGSEGV)."""
    source = _write(tmp_path / "deep.pickle", _deep_tuple_key(1_000_000))
    db = tmp_path / "Data.fs"
    result = run_snaptree("import", source, "--db", db)
    assert result.returncode == 3, result.stderr
    assert "nested more than" in result.stderr and "deep.pickle" in result.stderr
    with snaptree.open(str(db)) as store:
        assert store.run(lambda root: dict(root)) == {}


def _levels(nested: tuple[Any, ...]) -> int:
    levels = 0
    while nested:
        (nested,) = nested
        levels += 1
    return levels


def test_a_tuple_key_just_within_the_limit_loads(tmp_path):
    data = _deep_tuple_key(MAX_HASH_DEPTH - 1)
    ((key, value),) = snaptree.load_source(_write(tmp_path / "ok.pickle", data)).items()
    assert value is None and _levels(key) == MAX_HASH_DEPTH - 1


def test_a_deep_tuple_hidden_behind_the_memo_is_still_counted(tmp_path):
    """Stored in the memo, fetched again, wrapped again: the depth travels with it."""
    half = MAX_HASH_DEPTH // 2 + 10
    data = (
        PROTO2
        + b")"
        + b"\x85" * half
        + b"q\x01"  # BINPUT 1
        + b"0"  # POP
        + b"h\x01"  # BINGET 1
        + b"\x85" * half
        + b"."
    )
    with pytest.raises(snaptree.InputError, match="nested more than"):
        snaptree.load_source(_write(tmp_path / "memo.pickle", data))


@pytest.mark.parametrize("index", [2**24, 2**32 - 1])
def test_a_memo_index_far_past_the_pickle_is_refused_before_any_allocation(tmp_path, index):
    """Nine bytes of file: LONG_BINPUT 2**27 had the unpickler allocate and zero 2 GB."""
    data = b"\x80\x04}r" + index.to_bytes(4, "little") + b"."
    source = _write(tmp_path / "memo.pickle", data)
    with pytest.raises(snaptree.InputError, match=f"memo index {index:,}") as refused:
        snaptree.load_source(source)
    assert "memo.pickle" in str(refused.value) and "byte 3" in str(refused.value)


@pytest.mark.slow
def test_a_deep_tuple_in_a_zexp_record_is_refused_instead_of_crashing(tmp_path):
    """A .zexp record's state is read by the same unpickler, its two pickles scanned."""
    meta = b"\x80\x03cpersistent.mapping\nPersistentMapping\nN\x86."
    key = b")" + b"\x85" * 1_000_000
    state = b"\x80\x03}X\x04\x00\x00\x00data}" + key + b"Ns" + b"s."
    record = (1).to_bytes(8, "big") + len(meta + state).to_bytes(8, "big") + meta + state
    forged = _write(tmp_path / "forged.zexp", b"ZEXP" + record + b"\xff" * 16)
    result = run_snaptree("import", forged, "--db", tmp_path / "Data.fs")
    assert result.returncode == 3, result.stderr
    assert "record 0x0000000000000001" in result.stderr and "nested more than" in result.stderr


def _import_exit(tmp_path: Path, data: bytes) -> tuple[int, str]:
    """``snaptree import`` of *data* in a process of its own: a crash is an exit code."""
    source = _write(tmp_path / "hostile.pickle", data)
    result = run_snaptree("import", source, "--db", tmp_path / "Data.fs")
    return result.returncode, result.stderr


@pytest.mark.slow
def test_a_deep_tuple_made_by_a_call_from_a_list_is_counted(tmp_path):
    """tuple([inner]) through REDUCE: a list hid its item's depth, and the key crashed."""
    levels = 1_000_000
    data = (
        PROTO2
        + b"}"
        + b"c__builtin__\ntuple\nq\x01"
        + b"0"  # GLOBAL tuple, BINPUT 1, POP
        + b"h\x01]" * levels  # BINGET 1 (tuple), EMPTY_LIST
        + b")"
        + b"a\x85R" * levels  # APPEND, TUPLE1, REDUCE: tuple([inner])
        + b"Ns."
    )
    code, stderr = _import_exit(tmp_path, data)
    assert code == 3 and "no pickler writes one" in stderr, (code, stderr)


@pytest.mark.slow
def test_memoize_after_a_gap_in_the_memo_is_followed_as_the_unpickler_follows_it(tmp_path):
    """MEMOIZE stores at the number of entries stored, not after the highest index: the
    scan counted a deep tuple fetched back through the gap as depth 0."""
    level, gap = 9_000, 50_000
    parts = [b"\x80\x04}", b"N", b"r" + gap.to_bytes(4, "little"), b"0"]
    parts.append(b")" + b"\x85" * level + b"\x94" + b"0")
    for entry in range(1, 4):
        parts.append(b"j" + entry.to_bytes(4, "little") + b"\x85" * level + b"\x94" + b"0")
    parts.append(b"j" + (4).to_bytes(4, "little") + b"Ns.")
    code, stderr = _import_exit(tmp_path, b"".join(parts))
    assert code == 3 and "nested more than" in stderr, (code, stderr)


def test_an_opcode_cut_by_the_end_of_a_large_frame_is_refused(tmp_path):
    """The C unpickler reads the rest of such an opcode afresh after the frame: it ran bytes
    the scan had read as the argument (here a 2 GB memo index)."""
    size = 200_000
    tail = b"B\x00\x00"  # BINBYTES and half of its length, at the frame's end
    body = b"(N1" + b"N0" * ((size - 3 - len(tail)) // 2) + tail
    after = b"\x00\x00.\x00"
    evil = b"0" + b"N" + b"r" + (2**27).to_bytes(4, "little") + b"."
    data = (
        b"\x80\x04\x95"
        + size.to_bytes(8, "little")
        + body
        + after
        + bytes(int.from_bytes(after, "little"))
        + evil
    )
    with pytest.raises(snaptree.InputError, match="runs past the end of its frame"):
        snaptree.load_source(_write(tmp_path / "frame.pickle", data))


@pytest.mark.slow
def test_a_long_chain_of_defaultdicts_is_freed_without_crashing(tmp_path):
    """collections.defaultdict is freed without CPython's guard against deep recursion:
    a chain of them crashed the process when it was dropped (here inside the load, by POP)."""
    head = b"\x80\x02ccollections\ndefaultdict\nq\x010N"
    body = b"h\x01)R\x8c\x01a" * 200_000 + b"N" + b"s" * 200_000
    code, stderr = _import_exit(tmp_path, head + body + b"0.")
    assert code == 3, (code, stderr)  # refused as a tree (None at the root), not a crash


def test_a_memo_index_counts_against_entries_stored_not_bytes_read(tmp_path):
    """Padding of large bytes, which zstd shrinks to nothing, let the index grow with it."""
    padding = (b"B" + (1 << 20).to_bytes(4, "little") + bytes(1 << 20) + b"0") * 8
    data = b"\x80\x04" + padding + b"}r" + (4_000_000).to_bytes(4, "little") + b"."
    with pytest.raises(snaptree.InputError, match="entries stored"):
        snaptree.load_source(_write(tmp_path / "padded.pickle", data))


def test_a_protocol_0_pickle_of_a_long_string_loads(tmp_path):
    """Its one line spans many reads of the scan (searched once, not again per read)."""
    value = {"text": "x" * 3_000_000, "n": list(range(10))}
    data = pickle.dumps(value, protocol=0)
    assert snaptree.load_source(_write(tmp_path / "long.pickle", data)) == value


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_an_allowed_tuple_subclass_loads_in_every_protocol(tmp_path, protocol):
    """Protocols 0-1 write it as copyreg._reconstructor(Point, builtins.tuple, state)."""
    value = {"points": [Point(1), Point((2, Point(3)))]}
    source = _write(tmp_path / "points.pickle", pickle.dumps(value, protocol=protocol))
    loaded = snaptree.load_source(source, allow=[Point])
    assert loaded == value and type(loaded["points"][1].x[1]) is Point


@pytest.mark.slow
def test_an_allowed_tuple_subclass_cannot_nest_tuples_out_of_the_scans_sight(tmp_path):
    """Point(x=Point(x=...)) built by NEWOBJ_EX from dicts of fields: hashed, it crashed."""
    levels = 200_000
    data = (
        b"\x80\x04}"
        + b"\x8c\x14test_hostile_pickles\x94\x8c\x05Point\x94\x93\x94"
        + b"0\x8c\x01x\x940"
        + b"h\x02)}h\x03" * levels  # Point, (), {'x': ...
        + b"K\x00"
        + b"s\x92" * levels  # SETITEM, NEWOBJ_EX
        + b"K\x01s."
    )
    source = _write(tmp_path / "chain.pickle", data)
    result = run_snaptree(
        "import",
        source,
        "--db",
        tmp_path / "Data.fs",
        "--allow",
        "test_hostile_pickles:Point",
        env={"PYTHONPATH": str(HERE)},
    )
    assert result.returncode == 3 and "no pickler writes one" in result.stderr, result


@pytest.mark.slow
def test_a_chain_of_buckets_built_inside_a_zexp_record_is_refused_without_crashing(tmp_path):
    """Buckets linked by BUILD inside one record: freeing the chain recursed in C."""
    count = 200_000
    state = bytearray(b"\x80\x02cBTrees.OOBTree\nOOBucket\nq\x000")
    for i in range(1, count + 1):
        state += b"h\x00)Rr" + i.to_bytes(4, "little") + b"0"
    for i in range(1, count):
        state += b"j" + i.to_bytes(4, "little") + b")j" + (i + 1).to_bytes(4, "little")
        state += b"\x86b0"
    state += b"j" + (1).to_bytes(4, "little") + b"."
    data = b"\x80\x02cpersistent.mapping\nPersistentMapping\n." + bytes(state)
    record = (1).to_bytes(8, "big") + len(data).to_bytes(8, "big") + data
    source = _write(tmp_path / "chain.zexp", b"ZEXP" + record + b"\xff" * 16)
    result = run_snaptree("import", source, "--db", tmp_path / "Data.fs")
    assert result.returncode == 3 and "built inside a record" in result.stderr, result


def test_a_malformed_pickle_is_still_not_a_valid_pickle(tmp_path):
    for data in (b"\x80\x02\x85.", b"\x80\x02t.", b"\x80\x02h\x07.", b"\x80\x02\xff"):
        with pytest.raises(snaptree.InputError, match="not a valid pickle"):
            snaptree.load_source(_write(tmp_path / "bad.pickle", data))


def _varied_tree(seed: int) -> Any:
    """Plain data of every kind a pickle source holds, shared values and long strings too."""
    rng = random.Random(seed)
    shared = ["shared", (1, 2)]
    return {
        "ints": [rng.randrange(-(2**70), 2**70) for _ in range(200)],
        "floats": [rng.random() for _ in range(50)] + [float("inf"), -0.0],
        "text": "é" * 70_000,  # longer than one read of the scan
        "bytes": bytes(rng.randrange(256) for _ in range(300)) * 300,
        "tuple keys": {(i, str(i), (i, None)): i for i in range(300)},
        "sets": [{1, 2, 3}, frozenset({"a", (1, 2)})],
        "shared": [shared, shared, {"again": shared}],
        "nested": [[[[{"deep": True}]]]],
        "when": datetime.datetime(2026, 11, 30, 12, 0, tzinfo=datetime.UTC),
        "money": decimal.Decimal("12.50"),
        "dicts": [{str(i): [i] * 5} for i in range(2_000)],
    }


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_real_pickles_of_every_protocol_load_as_pickle_loads_them(tmp_path, protocol):
    tree = _varied_tree(protocol)
    data = pickle.dumps(tree, protocol=protocol)
    assert snaptree.load_source(_write(tmp_path / "t.pickle", data)) == pickle.loads(data)


@pytest.mark.slow
def test_a_dump_with_a_dict_call_per_node_loads_however_many_nodes(tmp_path):
    """Dumps write every mapping as a call (builtins.dict, REDUCE): many calls side by side
    must not add up to depth (a first fix of the scan counted them so, and refused dumps)."""
    tree = {
        "accounts": {i: {"log": [{"n": i, "when": (i, "x")}]} for i in range(3 * MAX_HASH_DEPTH)}
    }
    with snaptree.open(str(tmp_path / "Data.fs")) as store:
        store.import_tree(tree)
        info = store.export(tmp_path / "dump.pickle")
    assert snaptree.load_source(info.path) == tree
    assert snaptree.verify(info.path).objects == info.objects


def test_a_deep_tree_of_dicts_is_not_limited(tmp_path):
    """Dicts and lists cannot be hashed: only tuples and objects count towards the limit."""
    levels = 3 * MAX_HASH_DEPTH  # too deep for the pickler: written by hand
    key = b"\x8c\x01a"  # SHORT_BINUNICODE "a"
    data = PROTO2 + (b"}" + key + b"]") * levels + b"N" + b"as" * levels + b"."
    deep = snaptree.load_source(_write(tmp_path / "deep.pickle", data))
    for _ in range(levels):
        (deep,) = deep["a"]
    assert deep is None


def _feed_in_pieces(data: bytes, sizes: list[int], pickles: int = 1) -> None:
    scan = OpcodeScan("test", pickles)
    position = 0
    for size in sizes:
        scan.feed(data[position : position + size])
        position += size
    scan.feed(data[position:])


@settings(max_examples=60, deadline=None)
@given(value=json_trees)
def test_any_cut_of_a_real_pickle_into_pieces_scans_the_same(value):
    """Opcodes and their arguments split across reads at every place: nothing refused."""
    for protocol in (0, 2, 5):
        data = pickle.dumps(value, protocol=protocol)
        rng = random.Random(len(data))
        _feed_in_pieces(data, [rng.randint(1, 9) for _ in range(len(data))])
        _feed_in_pieces(data, [1] * len(data))


def test_a_deep_key_fed_one_byte_at_a_time_is_refused():
    with pytest.raises(snaptree.InputError, match="nested more than"):
        _feed_in_pieces(_deep_tuple_key(MAX_HASH_DEPTH + 1), [1] * (MAX_HASH_DEPTH + 10))


def _doubling_tuples(levels: int, *, by_call: bool = False) -> bytes:
    """{t: None} where t0 = () and each t holds the one before twice: 2**levels tuples.

    With *by_call*, each is ``tuple([previous, previous])`` (REDUCE), out of the
    scan's sight; the unpickler measures it.
    """
    parts = [PROTO2, b"}"]
    if by_call:
        parts.append(b"c__builtin__\ntuple\nq\x000")  # GLOBAL tuple, BINPUT 0, POP
    parts.append(b")q\x010")  # EMPTY_TUPLE, BINPUT 1, POP
    for level in range(2, levels + 2):
        previous = b"h" + bytes([level - 1])
        if by_call:
            parts.append(b"h\x00](" + previous + previous + b"e\x85R")  # tuple([p, p])
        else:
            parts.append(previous + previous + b"\x86")  # TUPLE2
        parts.append(b"q" + bytes([level]) + (b"0" if level < levels + 1 else b""))
    parts.append(b"Ns.")
    return b"".join(parts)


@pytest.mark.parametrize("by_call", [False, True], ids=["tuples", "tuple() calls"])
def test_tuples_that_hold_the_same_tuple_twice_over_and_over_are_refused(tmp_path, by_call):
    """A few hundred bytes: hashing the key visited 2**60 tuples, and the import hung."""
    data = _doubling_tuples(60, by_call=by_call)
    assert len(data) < 1_000
    code, stderr = _import_exit(tmp_path, data)
    assert code == 3, (code, stderr)
    refusal = "no pickler writes one" if by_call else "counting repeats"
    assert "hostile.pickle" in stderr and refusal in stderr
    with snaptree.open(str(tmp_path / "Data.fs")) as store:
        assert store.run(lambda root: dict(root)) == {}


@pytest.mark.slow
def test_a_tuple_made_from_a_lists_items_cannot_hide_its_size_from_the_scan(tmp_path):
    """The scan counted tuple([d, d]) as a call of 4 values: 21 doublings built on it
    looked like 8 million values and were 2**44, and hashing the key hung the import."""
    parts = [PROTO2, b"}", b"c__builtin__\ntuple\nq\x000", b")q\x010"]
    for level in range(2, 23):  # d: 21 doublings the scan sees, 2**22 values
        previous = b"h" + bytes([level - 1])
        parts.append(previous + previous + b"\x86q" + bytes([level]) + b"0")
    parts.append(b"h\x00](h\x16h\x16e\x85Rq\x170")  # t = tuple([d, d])
    parts.append(b"h\x17h\x17\x86q\x170" * 21)  # t = (t, t), 21 times
    parts.append(b"h\x17Ns.")  # {t: None}
    source = _write(tmp_path / "hidden.pickle", b"".join(parts))
    result = run_snaptree("import", source, "--db", tmp_path / "Data.fs", timeout=60)
    assert result.returncode == 3 and "no pickler writes one" in result.stderr, result


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL, -1, -1))  # 0 is slowest
def test_tuples_repeated_through_the_memo_load_as_pickle_loads_them(tmp_path, protocol):
    """Repeats are real pickles too: up to 20 million values counting repeats, in a few
    hundred KB (a review found the first bound refused the smaller of these)."""
    tags = tuple(f"tag{i}" for i in range(200))
    values = [
        {"rows": tuple([tuple(range(100))] * 200_000)},
        {"k": tuple((i, tags) for i in range(10_000))},
        {"k": frozenset((i, tags) for i in range(10_000))},
    ]
    for number, value in enumerate(values):
        source = _write(tmp_path / f"repeats{number}.pickle", pickle.dumps(value, protocol))
        assert snaptree.load_source(source) == value


def _one_tuple_hashed_again_and_again(levels: int, copies: int, how: str) -> bytes:
    """The same doubling tuple (2**levels leaves) stored *copies* times, each a hash of it.

    ``how``: "keys" (one dict per copy, the tuple its key: SETITEM), "additems" (a set,
    ADDITEMS), or a constructor called with a list of the copies ("set", "frozenset"; for
    "dict", a list of (tuple, None) pairs). Each copy costs five bytes of file.
    """
    build = bytearray(b"\x80\x04\x8c\x04leaf\x85\x94")  # ('leaf',), memo 0
    for i in range(levels):
        build += b"j" + i.to_bytes(4, "little") + b"2\x86\x94"  # (t, t), memo i + 1
    build += b"0"  # the tuple stays in the memo only
    get = b"j" + levels.to_bytes(4, "little")
    if how == "keys":
        body = b"](" + (b"}" + get + b"Ns") * copies + b"e"
    elif how == "additems":
        body = b"\x8f(" + get * copies + b"\x90"
    else:
        item = get + b"N\x86" if how == "dict" else get
        name = how.encode()
        body = b"\x8c\x08builtins\x8c" + bytes([len(name)]) + name + b"\x93"
        body += b"](" + item * copies + b"e\x85R"
    return bytes(build + body + b".")


@pytest.mark.parametrize("how", ["keys", "additems", "set", "frozenset", "dict"])
def test_one_large_tuple_hashed_again_and_again_is_refused(tmp_path, how):
    """Each hash of the tuple is within bounds; forty of them were 250 million values hashed
    for a 500-byte file (as long as plain pickle.load takes: the same tuple is hashed anew
    each time), and with more copies an import ran for hours."""
    data = _one_tuple_hashed_again_and_again(21, 40, how)
    assert len(data) < 1_000
    with pytest.raises(snaptree.InputError, match="hashing its keys and set elements"):
        snaptree.load_source(_write(tmp_path / f"{how}.pickle", data))


@pytest.mark.parametrize("how", ["keys", "additems", "set", "frozenset", "dict"])
def test_the_import_command_refuses_a_tuple_hashed_again_and_again(tmp_path, how):
    """The same refusal through ``snaptree import``: bad input, exit 3, one line."""
    code, stderr = _import_exit(tmp_path, _one_tuple_hashed_again_and_again(21, 40, how))
    assert code == 3 and "counting repeats" in stderr, (code, stderr)


@pytest.mark.parametrize("how", ["keys", "additems", "set", "frozenset", "dict"])
def test_the_same_tuple_hashed_a_few_times_loads(tmp_path, how):
    """Four hashes of a tuple of three million values (twelve million in all) are within the
    budget: it loads."""
    data = _one_tuple_hashed_again_and_again(20, 4, how)
    assert snaptree.load_source(_write(tmp_path / f"{how}.pickle", data)) == pickle.loads(data)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_sets_frozensets_and_dicts_of_every_kind_load_as_pickle_loads_them(tmp_path, protocol):
    """The constructors a pickle calls to hash (set, frozenset, dict, OrderedDict, defaultdict)
    are stand-ins that charge the work first: what they make is the real thing."""
    value = [
        {1, 2, (3, 4)},
        frozenset({(1, 2), "x"}),
        collections.OrderedDict([((1, 2), 3), ("a", 4)]),
        collections.defaultdict(list, {(1,): [1], "k": []}),
        {(1, 2): {3: frozenset({4})}},
        [{(i, "same key"): i} for i in range(10_000)],  # one small key in many dicts
    ]
    loaded = snaptree.load_source(_write(tmp_path / "kinds.pickle", pickle.dumps(value, protocol)))
    assert loaded == value
    assert [type(v) for v in loaded[:3]] == [set, frozenset, collections.OrderedDict]
    assert isinstance(loaded[3], collections.defaultdict) and loaded[3].default_factory is list


class Countdown:
    """An allowed class that is its own iterator: what set() is given may be read once only."""

    def __init__(self, start: int) -> None:
        self.left = start

    def __iter__(self) -> Countdown:
        return self

    def __next__(self) -> int:
        if self.left <= 0:
            raise StopIteration
        self.left -= 1
        return self.left + 1


class _SetOfCountdown:
    def __reduce__(self) -> Any:
        return (set, (Countdown(3),))


def test_a_set_made_from_an_iterator_gets_its_items_after_they_are_charged(tmp_path):
    """Charging set()'s contents reads them: an iterator is read into a list first, and the
    list is what set() gets (reading the iterator itself left set() an empty one)."""
    data = pickle.dumps(_SetOfCountdown(), 2)
    loaded = snaptree.load_source(_write(tmp_path / "countdown.pickle", data), allow=[Countdown])
    assert loaded == {1, 2, 3}
