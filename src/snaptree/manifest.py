"""What a dump is: its format, its manifest (written and read here only), and ``verify``.

Every dump ``<name>.<ext>`` has a manifest ``<name>.<ext>.manifest.json``
beside it: format, tid, commit time, object count, size, sha256, subtree,
source (password masked), the seconds the export took and the snaptree
version. An export writes it (:func:`manifest_bytes`) before renaming the
dump into place, so a dump under a final name is always vouched for; every
reader goes through :func:`read_manifest`, which checks each field it
relies on, so a damaged manifest is one :class:`VerifyError` wherever it is
met. :func:`verify` checks a dump against its manifest and loads it the way
``snaptree import`` would, so that a forged dump with a matching manifest
still cannot run code.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ._compression import (
    COMPRESSIONS,
    ZSTD_SUFFIX,
    compression_of,
    decompressor_error,
    is_zstd,
    open_for_reading,
    uncompressed_name,
)
from ._unpickler import load_pickle
from ._zexp import read_zexp
from .errors import ArgumentError, Error, VerifyError

FORMATS = ("pickle", "json", "zodb")
#: File name suffix of each format.
SUFFIXES = {"pickle": ".pickle", "json": ".json", "zodb": ".zexp"}
MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_VERSION = 1

#: The format each file name suffix means (case-insensitive).
_SUFFIX_FORMATS = {".json": "json", ".pickle": "pickle", ".pkl": "pickle", ".zexp": "zodb"}


def check_format(format: str) -> str:  # noqa: A002 - the name users know from the CLI
    """*format* if it is one snaptree writes; an unknown one is a bad argument."""
    if format not in FORMATS:
        raise ArgumentError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    return format


def resolve_format(path: str | os.PathLike[str], format: str | None) -> str:  # noqa: A002
    """The format of a dump at *path*: *format*, or the one its suffix names.

    A suffix of another format contradicts *format* (``x.json`` written as a
    pickle would mislead every reader that trusts the name), and without
    *format* the suffix must name one: both are ArgumentErrors. A suffix
    no format claims (``app.dump``) is fine with an explicit *format*. A
    compressed dump's ``.zst`` is looked through (``x.json.zst`` is json).
    """
    if format is not None:
        check_format(format)
    suffix = uncompressed_name(path).suffix.lower()
    implied = _SUFFIX_FORMATS.get(suffix)
    if format is None:
        if implied is None:
            raise ArgumentError(
                f"cannot tell the export format of {os.fspath(path)} from its name: end it "
                "in .pickle (or .pkl), .json or .zexp, or pass the format (format= / "
                f"--format {'|'.join(FORMATS)})"
            )
        return implied
    if implied is not None and implied != format:
        stem = uncompressed_name(path).stem
        zst = ZSTD_SUFFIX if compression_of(path) else ""
        raise ArgumentError(
            f"{os.fspath(path)}: the name says {implied}, but the format asked for is "
            f"{format}; name the file {stem}{SUFFIXES[format]}{zst}, or ask for {implied}"
        )
    return format


def check_compression(compress: str | None) -> str | None:
    """A compression an export can write: ``"zstd"``, or None for none."""
    if compress is not None and compress not in COMPRESSIONS:
        raise ArgumentError(
            f"unknown compression {compress!r}; choose {', '.join(COMPRESSIONS)} (or none)"
        )
    return compress


def resolve_compression(path: str | os.PathLike[str], compress: str | None) -> str | None:
    """The compression of a dump at *path*: *compress*, or ``"zstd"`` if its name ends in .zst.

    Asked for, it must show in the name (``dump.pickle.zst``), for the same
    reason as the format: a reader that trusts ``dump.pickle`` to be a
    pickle would get zstd. An ArgumentError says which name to use.
    """
    check_compression(compress)
    implied = compression_of(path)
    if compress is not None and implied is None:
        raise ArgumentError(
            f"{os.fspath(path)}: a {compress} dump is named with {ZSTD_SUFFIX} after its "
            f"format's suffix, so that readers see it is compressed; name the file "
            f"{Path(path).name}{ZSTD_SUFFIX}"
        )
    return implied


@dataclass(frozen=True)
class ExportInfo:
    """What an export wrote (or what :func:`verify` found): one dump and its manifest."""

    path: Path
    format: str
    tid: str
    committed_at: datetime.datetime
    objects: int
    bytes: int
    sha256: str
    subtree: str = "/"
    source: str = ""
    seconds: float = 0.0
    snaptree_version: str = ""
    #: "zstd" for a compressed dump (``bytes`` and ``sha256`` are the compressed
    #: file's), None for an uncompressed one.
    compression: str | None = None
    #: Seconds spent waiting for the disk to make the dump and its manifest
    #: durable (fsyncs): the share of the disk an export takes from writers'
    #: commits, which the schedule uses to pace back-to-back exports. Not
    #: kept in the manifest.
    flush_seconds: float = field(default=0.0, compare=False)
    #: Filled in by :func:`verify`: a short description of what the dump holds.
    summary: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def manifest_path(self) -> Path:
        return manifest_path(self.path)

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON-ready values (the ``--json`` output and the manifest)."""
        data = asdict(self)
        data["path"] = str(self.path)
        data["committed_at"] = self.committed_at.isoformat()
        return data


def manifest_path(dump: Path | str) -> Path:
    dump = Path(dump)
    return dump.with_name(dump.name + MANIFEST_SUFFIX)


def manifest_bytes(info: ExportInfo) -> bytes:
    """The manifest of the dump *info* describes, as written beside it."""
    data = info.to_json()
    del data["summary"], data["flush_seconds"]
    data["path"] = info.path.name  # relative: the pair can be moved together
    data = {"snaptree_manifest": MANIFEST_VERSION, **data}
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


# -- reading ---------------------------------------------------------------------------

_HEX = frozenset("0123456789abcdef")


def read_manifest(dump: Path) -> ExportInfo:
    """What the manifest of *dump* says, every field checked; VerifyError if it cannot be trusted.

    Only the manifest is read: whether the dump matches it is :func:`verify`'s job.
    """
    path = manifest_path(dump)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise VerifyError(
            f"{dump}: no manifest ({path.name}); the export did not finish, or the "
            "manifest was not copied with the dump"
        ) from None
    except (OSError, ValueError) as exc:
        raise VerifyError(f"{path}: unreadable manifest: {exc}") from None
    except RecursionError:  # json nests in C frames: a hostile "[[[[..." manifest
        raise VerifyError(f"{path}: unreadable manifest: nested too deeply") from None
    if not isinstance(data, dict) or "snaptree_manifest" not in data:
        raise VerifyError(f"{path}: not a snaptree manifest")
    fmt = data.get("format")
    if fmt not in FORMATS:
        raise VerifyError(f"{dump}: the manifest names an unknown format {fmt!r}")
    problems = [
        f"{name} {data.get(name, '(missing)')!r} is not {what}"
        for name, what, valid in (
            ("tid", "16 hex digits", lambda v: _is_hex(v, 16)),
            ("sha256", "64 hex digits", lambda v: _is_hex(v, 64)),
            ("bytes", "a count", _is_count),
            ("objects", "a count", _is_count),
            ("committed_at", "an ISO 8601 time with its UTC offset", _is_aware_time),
        )
        if not valid(data.get(name))
    ]
    if data.get("compression") not in (None, *COMPRESSIONS):
        problems.append(f"compression {data['compression']!r} is not one snaptree writes")
    if problems:
        raise VerifyError(
            f"{path}: damaged manifest: {'; '.join(problems)}; export the dump again, or "
            "restore the manifest that was written with it"
        )
    return ExportInfo(
        path=dump,
        format=fmt,
        tid=data["tid"],
        committed_at=datetime.datetime.fromisoformat(data["committed_at"]),
        objects=data["objects"],
        bytes=data["bytes"],
        sha256=data["sha256"],
        subtree=data.get("subtree", "/"),
        source=data.get("source", ""),
        seconds=data.get("seconds", 0.0),
        snaptree_version=data.get("snaptree_version", ""),
        compression=data.get("compression"),
    )


def _is_hex(value: Any, digits: int) -> bool:
    return isinstance(value, str) and len(value) == digits and set(value) <= _HEX


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_aware_time(value: Any) -> bool:
    """An aware time that has a UTC equivalent: retention and status take periods and ages
    in UTC (``0001-01-01T00:00+14:00`` has none, and stopped every later retention)."""
    if not isinstance(value, str):
        return False
    try:
        moment = datetime.datetime.fromisoformat(value)
        return moment.tzinfo is not None and moment.astimezone(datetime.UTC) is not None
    except (ValueError, OverflowError):
        return False


# -- verify ----------------------------------------------------------------------------


def verify(path: str | os.PathLike[str], *, allow: Iterable[str | type] = ()) -> ExportInfo:
    """Check a dump against its manifest (size, sha256) and load it; return what it holds.

    The dump is read the way ``snaptree import`` reads it, so a forged dump
    with a matching manifest still cannot run code: a pickle with the
    allow-list unpickler (plain containers and scalars, datetime, decimal,
    plus the classes named in *allow*); a zodb dump record by record with
    the same unpickler, never with ZODB's importFile (see
    :func:`snaptree._zexp.read_zexp`); JSON with the standard parser.
    Raises VerifyError saying what does not match or does not load.
    """
    dump = Path(path)
    if dump.name.endswith(MANIFEST_SUFFIX):
        dump = dump.with_name(dump.name[: -len(MANIFEST_SUFFIX)])
    dump = Path(os.path.realpath(dump)) if dump.is_symlink() else dump
    info = read_manifest(dump)
    check_checksum(info)
    return replace(info, summary=_load_dump(dump, info, allow))


def check_checksum(info: ExportInfo) -> None:
    """Raise VerifyError unless the dump *info* describes has the size and sha256 it records."""
    dump = info.path
    try:
        size = dump.stat().st_size
    except FileNotFoundError:
        raise VerifyError(f"{dump}: the dump is missing (its manifest exists)") from None
    except OSError as exc:
        raise VerifyError(f"{dump}: cannot read the dump: {exc.strerror or exc}") from None
    if size != info.bytes:
        raise VerifyError(
            f"{dump}: {size} bytes, but the manifest says {info.bytes}; "
            "the file is truncated or was changed after the export"
        )
    digest = hashlib.sha256()
    try:
        with open(dump, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:  # a monitoring user without read access, an I/O error
        raise VerifyError(f"{dump}: cannot read the dump: {exc.strerror or exc}") from None
    if digest.hexdigest() != info.sha256:
        raise VerifyError(
            f"{dump}: sha256 {digest.hexdigest()} does not match the manifest's "
            f"{info.sha256}; the file was changed after the export"
        )


def describe(value: Any) -> dict[str, Any]:
    """A short summary of a loaded plain tree: its type, size and first keys."""
    summary: dict[str, Any] = {"type": type(value).__name__}
    if isinstance(value, dict):
        keys = list(value)
        summary["keys"] = len(keys)
        summary["first_keys"] = [str(k) for k in keys[:10]]
    elif isinstance(value, list):
        summary["items"] = len(value)
    return summary


def _load_dump(dump: Path, info: ExportInfo, allow: Iterable[str | type]) -> dict[str, Any]:
    """Load *dump* as import would, and describe it; any failure is a VerifyError."""
    source = str(dump)
    with open(dump, "rb") as raw:
        compressed = "zstd" if is_zstd(raw.read(4)) else None
    if compressed != info.compression:
        raise VerifyError(
            f"{dump}: the manifest says {info.compression or 'uncompressed'}, but the file is "
            f"{compressed or 'not compressed'}; the dump and its manifest do not belong together"
        )
    try:
        with open_for_reading(dump) as file:
            if info.format == "pickle":
                return describe(load_pickle(file, source, allow))
            if info.format == "json":
                return describe(_load_json(file.read(), source))
            value, records = read_zexp(file, source, allow)
    except Error as exc:
        raise VerifyError(f"the dump does not load: {exc}") from None
    except decompressor_error() as exc:
        raise VerifyError(f"the dump does not load: {source}: damaged zstd data: {exc}") from None
    if records != info.objects:
        raise VerifyError(f"{dump}: {records} records, but the manifest says {info.objects}")
    return {"records": records, **describe(value)}


def _load_json(raw: bytes, source: str) -> Any:
    """A JSON dump, parsed whole; what the parser refuses as one VerifyError.

    Not the import's reader: a dump snaptree wrote is UTF-8 without a BOM
    and holds no over-long integer, so anything the parser refuses means
    the file is damaged.
    """
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        detail = f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
    except RecursionError:
        detail = "the JSON is nested too deeply for Python's JSON parser"
    except ValueError as exc:  # not UTF-8, or an integer past sys.get_int_max_str_digits()
        detail = f"not a JSON dump snaptree writes: {exc}"
    raise VerifyError(f"the dump does not load: {source}: {detail}")
