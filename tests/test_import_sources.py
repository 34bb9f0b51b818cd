"""load_source: JSON errors with line and column; a pickle reader that never runs the file."""

from __future__ import annotations

import collections
import datetime
import decimal
import enum
import os
import pickle
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

import snaptree


class Colour(enum.Enum):
    """A user class a pickle may contain once it is allowed."""

    RED = 1


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A file that hostile payloads try to create; its absence proves they did not run."""
    return tmp_path / "pwned"


def write(path: Path, content: bytes | str) -> Path:
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


# -- JSON -----------------------------------------------------------------------


def test_json_is_loaded_as_plain_data(tmp_path: Path) -> None:
    source = write(tmp_path / "m.json", '{"a": [1, 2.5, "x", null, true], "b": {}}')
    assert snaptree.load_source(source) == {"a": [1, 2.5, "x", None, True], "b": {}}


def test_malformed_json_names_file_line_and_column(tmp_path: Path) -> None:
    """The error points at the first mistake: file, line, column, what was expected."""
    source = write(tmp_path / "broken.json", '{\n  "a": 1,\n  "b": [1, 2,, 3]\n}\n')
    with pytest.raises(snaptree.InputError) as info:
        snaptree.load_source(source)
    message = str(info.value)
    assert str(source) in message
    assert "line 3, column 14" in message
    assert "Expecting value" in message


def test_truncated_json_is_reported(tmp_path: Path) -> None:
    source = write(tmp_path / "cut.json", '{"a": [1, 2')
    with pytest.raises(snaptree.InputError, match="line 1, column 12"):
        snaptree.load_source(source)


def test_json_that_is_not_utf8_is_reported(tmp_path: Path) -> None:
    source = write(tmp_path / "latin.json", b'{"name": "caf\xe9"}')
    with pytest.raises(snaptree.InputError, match="UTF-8"):
        snaptree.load_source(source)


def test_json_with_a_utf8_bom_is_accepted(tmp_path: Path) -> None:
    source = write(tmp_path / "bom.json", b'\xef\xbb\xbf{"a": "\xc3\xa9"}')
    assert snaptree.load_source(source) == {"a": "é"}


def test_json_nested_beyond_the_parser_is_reported(tmp_path: Path) -> None:
    source = write(tmp_path / "deep.json", "[" * 200_000 + "]" * 200_000)
    with pytest.raises(snaptree.InputError, match="nested too deeply"):
        snaptree.load_source(source)


def test_format_comes_from_the_name_or_the_first_bytes(tmp_path: Path) -> None:
    """.json/.pickle decide; otherwise the first bytes do; an unknown start is an error."""
    assert snaptree.load_source(write(tmp_path / "x.data", ' [1, {"a": 2}]')) == [1, {"a": 2}]
    assert snaptree.load_source(write(tmp_path / "y.bin", pickle.dumps({"a": 1}))) == {"a": 1}
    assert snaptree.load_source(write(tmp_path / "z.txt", "[3]"), format="json") == [3]
    with pytest.raises(snaptree.InputError, match="--format"):
        snaptree.load_source(write(tmp_path / "w.bin", "hello"))
    with pytest.raises(snaptree.ArgumentError, match="unknown format 'xml'"):
        snaptree.load_source(tmp_path / "x.data", format="xml")


def test_an_int_past_pythons_digit_limit_is_an_input_error_with_its_place(tmp_path: Path) -> None:
    """int() refuses more than 4,300 digits; the error says where, not a bare ValueError."""
    digits = "7" * 5000
    source = write(tmp_path / "big.json", f'{{"a": 1,\n "note": "{digits}",\n "n": {digits}}}')
    with pytest.raises(
        snaptree.InputError,
        match=r"big\.json: an integer of more than 4300 digits at line 3, column 7",
    ):
        snaptree.load_source(source)
    assert snaptree.load_source(write(tmp_path / "ok.json", f'{{"n": "{digits}"}}'))["n"] == digits


def test_a_lone_surrogate_in_json_is_accepted_as_python_does(tmp_path: Path) -> None:
    """JSON escapes may spell a lone surrogate; json.loads accepts it, and so does import."""
    assert snaptree.load_source(write(tmp_path / "s.json", '{"a": "x\\ud800"}')) == {"a": "x\ud800"}


def test_a_zodb_export_is_recognised_by_name_and_by_header(
    store: snaptree.Store, tmp_path: Path
) -> None:
    """.zexp, or a file starting with ZEXP, is read as a zodb export; format="zodb" forces it."""
    store.run(lambda root: root.__setitem__("a", {"b": [1, 2]}))
    dump = store.export(tmp_path / "d.zexp").path
    copy = write(tmp_path / "copy.bin", dump.read_bytes())
    expected = {"a": {"b": [1, 2]}}
    assert snaptree.load_source(dump) == snaptree.load_source(copy) == expected
    assert snaptree.load_source(copy, format="zodb") == expected
    with pytest.raises(snaptree.InputError, match="not a ZODB export"):
        snaptree.load_source(write(tmp_path / "x.zexp", b"PK\x03\x04"))


def test_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(snaptree.InputError, match="cannot read"):
        snaptree.load_source(tmp_path / "nope.json")


# -- pickle: what loads -----------------------------------------------------------

ALLOWED_VALUES = {
    "ints": [0, -1, 2**70],
    "floats": [0.5, float("inf")],
    "text": "é",
    "bytes": b"\x00\xff",
    "empty_bytes": b"",
    "bytearray": bytearray(b"ab"),
    "tuple": (1, (2, 3)),
    "set": {1, 2},
    "frozenset": frozenset({"a"}),
    "complex": 1 + 2j,
    "bool": True,
    "none": None,
    "when": datetime.datetime(2026, 11, 25, 17, 0, 1, 5, tzinfo=datetime.UTC),
    "day": datetime.date(2026, 1, 2),
    "time": datetime.time(3, 4),
    "delta": datetime.timedelta(days=2, seconds=3),
    "tz": datetime.timezone(datetime.timedelta(hours=2), "X"),
    "money": decimal.Decimal("19.99"),
    "ordered": collections.OrderedDict([("b", 1), ("a", 2)]),
    "default": collections.defaultdict(list, {"k": [1]}),
}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_builtin_containers_scalars_datetime_and_decimal_load(
    tmp_path: Path, protocol: int
) -> None:
    """Everything an old pickle.dump of a plain model contains loads, in every protocol."""
    source = write(tmp_path / "model.pickle", pickle.dumps(ALLOWED_VALUES, protocol=protocol))
    assert snaptree.load_source(source) == ALLOWED_VALUES


def test_allowed_class_loads_when_named(tmp_path: Path) -> None:
    """Classes outside the allow-list load once named, as "module:Class" or as the class."""
    source = write(tmp_path / "c.pickle", pickle.dumps({"c": Colour.RED}))
    with pytest.raises(snaptree.InputError, match=r"refused global test_import_sources\.Colour"):
        snaptree.load_source(source)
    assert snaptree.load_source(source, allow=[f"{__name__}:Colour"]) == {"c": Colour.RED}
    assert snaptree.load_source(source, allow=[Colour]) == {"c": Colour.RED}


def test_badly_written_allow_entry_is_an_error(tmp_path: Path) -> None:
    source = write(tmp_path / "c.pickle", pickle.dumps(1))
    with pytest.raises(snaptree.InputError, match="module:Class"):
        snaptree.load_source(source, allow=["os.system"])


def test_truncated_pickle_is_a_clear_error(tmp_path: Path) -> None:
    whole = pickle.dumps({"a": list(range(1000)), "b": "x" * 100})
    for cut in (len(whole) // 2, len(whole) - 1, 1):
        source = write(tmp_path / f"cut{cut}.pickle", whole[:cut])
        with pytest.raises(snaptree.InputError, match="truncated"):
            snaptree.load_source(source)
    with pytest.raises(snaptree.InputError, match="empty or truncated"):
        snaptree.load_source(write(tmp_path / "empty.pickle", b""))


def test_bytes_after_the_pickle_are_refused(tmp_path: Path) -> None:
    """Two pickles in one file: loading only the first would silently drop the rest."""
    source = write(tmp_path / "two.pickle", pickle.dumps({"a": 1}) + pickle.dumps({"b": 2}))
    with pytest.raises(snaptree.InputError, match="bytes after the end of the pickle"):
        snaptree.load_source(source)


def test_garbage_pickle_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(snaptree.InputError, match="not a valid pickle"):
        snaptree.load_source(write(tmp_path / "g.pickle", b"\x80\x04\xff\xfe\xfd"))


# -- pickle: what is refused, without running ---------------------------------------


class _Call:
    """Pickles as a call to *func* with *args*: what a hostile file does."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> Any:
        return self.func, self.args


def _hostile_payloads(canary: Path) -> dict[str, bytes]:
    touch = f"touch {canary}"
    return {
        "posix.system": pickle.dumps(_Call(os.system, touch)),
        "builtins.eval": pickle.dumps(_Call(eval, f"open({str(canary)!r}, 'w').close()")),
        # Protocols 0-2 write Python 2 module names.
        "__builtin__.eval": pickle.dumps(
            _Call(eval, f"open({str(canary)!r}, 'w').close()"), protocol=2
        ),
        "builtins.exec": pickle.dumps(_Call(exec, f"open({str(canary)!r}, 'w').close()")),
        "subprocess.Popen": pickle.dumps(_Call(subprocess.Popen, ["touch", str(canary)])),
        # Hand-written protocol 0, as an attacker would, hidden inside a dict.
        "os.system": b"(dp0\nS'x'\ncos\nsystem\n(S'touch " + str(canary).encode() + b"'\ntRs.",
        # getattr would reach anything from an allowed class.
        "builtins.getattr": b"cbuiltins\ngetattr\n(cbuiltins\ndict\nS'fromkeys'\ntR.",
        # A dotted name through an allowed module (protocol 4 STACK_GLOBAL).
        "builtins.dict.fromkeys": b"\x80\x04\x8c\x08builtins\x8c\rdict.fromkeys\x93.",
    }


@pytest.mark.parametrize(
    "name",
    [
        "posix.system",
        "builtins.eval",
        "__builtin__.eval",
        "builtins.exec",
        "subprocess.Popen",
        "os.system",
        "builtins.getattr",
        "builtins.dict.fromkeys",
    ],
)
def test_hostile_pickle_is_refused_naming_the_global_and_runs_nothing(
    tmp_path: Path, canary: Path, name: str
) -> None:
    """A pickle that names a global outside the allow-list is refused before any call."""
    source = write(tmp_path / "evil.pickle", _hostile_payloads(canary)[name])
    with pytest.raises(snaptree.InputError) as info:
        snaptree.load_source(source)
    assert f"refused global {name}:" in str(info.value)
    assert str(source) in str(info.value)
    assert not canary.exists()


def test_hostile_payload_would_have_run_with_the_plain_unpickler(
    tmp_path: Path, canary: Path
) -> None:
    """Control: the payload above really does run code when loaded the usual way."""
    pickle.loads(_hostile_payloads(canary)["posix.system"])
    assert canary.exists()


def test_allowed_constructors_cannot_be_abused(tmp_path: Path) -> None:
    """bytes(n), zlib via _codecs.encode and _reconstructor on a non-class are refused."""
    huge_bytes = b"cbuiltins\nbytes\n(I100000000000\ntR."
    zlib_bomb = b"c_codecs\nencode\n(Vx\nVzlib\ntR."
    not_a_class = b"ccopyreg\n_reconstructor\n(S'x'\ncbuiltins\nobject\nNtR."
    huge_array = b"\x80\x02c__builtin__\nbytearray\nJ\x00\xe1\xf5\x05\x85R."
    cases = {
        "bytes(n)": huge_bytes,
        "codec 'zlib'": zlib_bomb,
        "non-class": not_a_class,
        "bytearray(n)": huge_array,
    }
    for expected, payload in cases.items():
        source = write(tmp_path / "a.pickle", payload)
        with pytest.raises(snaptree.InputError, match=re.escape(expected)):
            snaptree.load_source(source)


def test_persistent_ids_are_refused(tmp_path: Path) -> None:
    """A pickle written with persistent ids (ZODB records) cannot smuggle references in."""
    source = write(tmp_path / "pid.pickle", b"\x80\x02X\x03\x00\x00\x00oidQ.")
    with pytest.raises(snaptree.InputError, match=r"not a valid pickle.*persistent"):
        snaptree.load_source(source)


def test_refused_pickle_commits_nothing(store: snaptree.Store, tmp_path: Path) -> None:
    """Loading fails before the store is touched: the tree and its last tid are unchanged."""
    store.import_tree({"a": 1})
    before = store.last_tid()
    source = write(tmp_path / "evil.pickle", pickle.dumps({"b": _Call(os.system, "true")}))
    with pytest.raises(snaptree.InputError):
        store.import_tree(snaptree.load_source(source))
    assert store.last_tid() == before
    assert store.run(lambda root: root) == {"a": 1}


def test_inst_and_extension_opcodes_go_through_the_allow_list(tmp_path: Path, canary: Path) -> None:
    """INST (protocol 0 calls by name) and EXT1 (the copyreg registry) cannot bypass it."""
    inst = b"(S'touch " + str(canary).encode() + b"'\nios\nsystem\n."
    with pytest.raises(snaptree.InputError, match=r"refused global os\.system"):
        snaptree.load_source(write(tmp_path / "inst.pickle", inst))
    ext = b"\x80\x02\x82\x01)R."
    with pytest.raises(snaptree.InputError, match="not a valid pickle"):
        snaptree.load_source(write(tmp_path / "ext.pickle", ext))
    assert not canary.exists()


def test_only_classes_can_be_allowed_so_an_allowed_function_is_never_called(
    tmp_path: Path,
) -> None:
    """--allow os:system would let the file run a shell command with its own argument."""
    marker = tmp_path / "ran"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    source = write(tmp_path / "evil.pickle", payload)
    with pytest.raises(snaptree.InputError, match=r"os\.system is allowed .* not a class"):
        snaptree.load_source(source, allow=["os:system"])
    assert not marker.exists()


class Allowed:
    """A class a test allows; a pickle must not change it for the rest of the process."""

    limit = 100


def test_a_pickle_that_changes_an_allowed_class_itself_is_refused_and_the_class_put_back(
    tmp_path: Path,
) -> None:
    """BUILD applied to the class GLOBAL returned, not to an instance of it."""
    here = f"{__name__}\nAllowed\n"
    payload = (  # GLOBAL Allowed; BUILD (None, {"limit": 0, "extra": 1}); STOP
        b"\x80\x04c" + here.encode() + b"N}(\x8c\x05limitK\x00\x8c\x05extraK\x01u\x86b."
    )
    source = write(tmp_path / "poison.pickle", payload)
    with pytest.raises(snaptree.InputError, match=r"changed Allowed itself .* put back"):
        snaptree.load_source(source, allow=[Allowed])
    assert Allowed.limit == 100 and not hasattr(Allowed, "extra")
