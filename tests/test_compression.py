"""Compressed dumps (zstd): named .zst, streamed, vouched for by the manifest, read back as is.

And the round trip the export issue promised: a dump of any format, compressed
or not, imports with ``snaptree import`` into any path and reads back equal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle

import pytest

import snaptree
from _cli import error_line
from _cli import snaptree as run_snaptree
from snaptree import tree
from snaptree._compression import ZSTD_MAGIC, CompressingWriter, zstd
from snaptree.dump_directory import latest_link
from snaptree.export_run import export_into
from snaptree.manifest import manifest_bytes, read_manifest

SUFFIX = {"pickle": ".pickle", "json": ".json", "zodb": ".zexp"}


def _fill(store: snaptree.Store) -> None:
    def fill(root):
        root["accounts"] = {f"a{i}": {"balance": i, "owner": f"owner {i}" * 3} for i in range(300)}
        root["meta"] = {"tags": ["x", "y"], "n": 0}

    store.run(fill)


def _plain(store: snaptree.Store, path: str = "/") -> object:
    with store.snapshot() as snap:
        node = snap.root
        for segment in [s for s in path.split("/") if s]:
            node = node[segment]
        return tree.to_plain(node)


@pytest.mark.parametrize("fmt", ["pickle", "json", "zodb"])
def test_a_compressed_dump_is_zstd_named_zst_and_its_manifest_says_so(store, tmp_path, fmt):
    _fill(store)
    plain = store.export(tmp_path / f"d{SUFFIX[fmt]}", fragments=None)
    packed = store.export(tmp_path / f"d{SUFFIX[fmt]}.zst", fragments=None)  # the name says zstd
    assert packed.format == fmt and packed.compression == "zstd" and plain.compression is None
    raw = packed.path.read_bytes()
    assert raw[:4] == ZSTD_MAGIC and packed.bytes == len(raw) < plain.bytes
    assert zstd.decompress(raw) == plain.path.read_bytes()  # same dump, only compressed
    manifest = json.loads(packed.manifest_path.read_text())
    assert manifest["compression"] == "zstd" and manifest["bytes"] == len(raw)
    assert read_manifest(packed.path) == packed
    again = store.export(tmp_path / f"e{SUFFIX[fmt]}.zst", format=fmt, compress="zstd")
    assert again.compression == "zstd"


@pytest.mark.parametrize("fmt", ["pickle", "json", "zodb"])
def test_verify_reads_a_compressed_dump_as_it_reads_a_plain_one(store, tmp_path, fmt):
    _fill(store)
    plain = snaptree.verify(store.export(tmp_path / f"d{SUFFIX[fmt]}").path)
    packed = snaptree.verify(store.export(tmp_path / f"d{SUFFIX[fmt]}.zst").path)
    assert packed.summary == plain.summary
    if fmt == "pickle":  # the command is the same for every format: one run is enough
        result = run_snaptree("verify", packed.path, "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["compression"] == "zstd"


def test_a_compressed_zodb_export_imports_with_the_command_and_reads_back_equal(tmp_path):
    """The round trip the export issue promised, through ``snaptree import`` into a path."""
    with snaptree.open(str(tmp_path / "source.fs")) as store:
        _fill(store)
        dump = store.export(tmp_path / "d.zexp.zst").path
        expected = _plain(store)
    target = tmp_path / "other.fs"
    result = run_snaptree("import", dump, "--db", target, "--path", "restored/copy", "-q")
    assert result.returncode == 0, result.stderr
    with snaptree.open(str(target)) as other:
        assert _plain(other, "restored/copy") == expected


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pickle", "json", "zodb"])
@pytest.mark.parametrize("compressed", [False, True])
def test_a_dump_of_any_format_imports_into_any_path_and_reads_back_equal(
    store, tmp_path, fmt, compressed
):
    """The round trip: export, then ``snaptree import`` into a nested path of another store."""
    _fill(store)
    dump = store.export(tmp_path / f"d{SUFFIX[fmt]}{'.zst' if compressed else ''}").path
    target = tmp_path / "other.fs"
    result = run_snaptree("import", dump, "--db", target, "--path", "restored/copy", "-q")
    assert result.returncode == 0, result.stderr
    with snaptree.open(str(target)) as other:
        assert _plain(other, "restored/copy") == _plain(store)


@pytest.mark.slow
def test_a_name_and_a_compression_that_disagree_are_refused_before_anything_is_written(
    store, tmp_path
):
    _fill(store)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(snaptree.ArgumentError, match=r"name the file d\.pickle\.zst"):
        store.export(out / "d.pickle", compress="zstd")
    with pytest.raises(snaptree.ArgumentError, match=r"name the file d\.pickle\.zst"):
        store.export(out / "d.json.zst", format="pickle")
    with pytest.raises(snaptree.ArgumentError, match="unknown compression 'gzip'"):
        store.export(out / "d.pickle", compress="gzip")
    assert os.listdir(out) == []
    db = tmp_path / "cli.fs"
    snaptree.open(str(db)).close()
    result = run_snaptree("export", "--db", db, "-o", out / "d.pickle", "--compress", "zstd")
    assert result.returncode == 2 and "name the file d.pickle.zst" in error_line(result)
    assert os.listdir(out) == []


def test_compression_streams_what_it_is_given_instead_of_holding_the_dump(tmp_path):
    """Compressed blocks reach the file while the dump is still being written."""
    out = io.BytesIO()
    writer = CompressingWriter(out)
    for _ in range(256):  # 16 MiB that do not compress: what zstd gives back is as large
        writer.write(os.urandom(1 << 16))
    before_finish = out.tell()
    writer.finish()
    assert before_finish > 8 << 20  # most of it was handed on before the end
    assert len(zstd.decompress(out.getvalue())) == 256 << 16


def test_verify_tells_a_damaged_zstd_stream_from_a_manifest_of_another_file(store, tmp_path):
    _fill(store)
    packed = store.export(tmp_path / "d.pickle.zst")
    raw = bytearray(packed.path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    packed.path.write_bytes(raw)
    with pytest.raises(snaptree.VerifyError, match="does not match the manifest"):
        snaptree.verify(packed.path)
    # A manifest forged to match the damaged file: the stream itself is checked as it loads.
    forged = dataclasses.replace(packed, sha256=hashlib.sha256(raw).hexdigest())
    packed.manifest_path.write_bytes(manifest_bytes(forged))
    with pytest.raises(snaptree.VerifyError, match="does not load"):
        snaptree.verify(packed.path)
    # A manifest that says uncompressed, over a zstd file.
    plain_claim = dataclasses.replace(forged, compression=None)
    packed.manifest_path.write_bytes(manifest_bytes(plain_claim))
    with pytest.raises(snaptree.VerifyError, match="manifest says uncompressed, but the file is"):
        snaptree.verify(packed.path)


def test_a_schedule_writes_zst_dumps_with_their_own_latest_link(store, tmp_path):
    """Switching compression on in a directory: one history, latest follows the newest kind."""
    store.run(lambda root: root.__setitem__("v", 1))
    first = export_into(store, tmp_path).info
    assert latest_link(tmp_path, "pickle").is_symlink()
    store.run(lambda root: root.__setitem__("v", 2))
    second = export_into(store, tmp_path, compress="zstd", keep=1)
    assert second.info.path.name.endswith(".pickle.zst") and second.deleted == [first.path]
    assert not latest_link(tmp_path, "pickle").exists()  # it would name an older dump
    link = latest_link(tmp_path, "pickle", "zstd")
    assert os.readlink(link) == second.info.path.name
    assert snaptree.verify(link).tid == second.info.tid
    with zstd.open(link, "rb") as f:
        assert pickle.load(f) == {"v": 2}
    skipped = export_into(store, tmp_path)  # nothing new: the .zst dump holds this tid
    assert skipped.skipped


@pytest.mark.slow
def test_the_exporter_process_writes_compressed_dumps(tmp_path):
    db = tmp_path / "Data.fs"
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    with snaptree.open(str(db)) as store:
        store.run(lambda root: root.__setitem__("v", 1))
        exporter = snaptree.Exporter(store, dumps, every=3600, compress="zstd", process=True)
        try:
            result = exporter.export_now()
        finally:
            exporter.stop()
    assert not exporter.in_process
    assert result.info.compression == "zstd" and result.info.path.suffix == ".zst"
    assert snaptree.verify(result.info.path).summary["keys"] == 1


@pytest.mark.slow
def test_export_command_compresses_into_a_directory(tmp_path):
    db = tmp_path / "Data.fs"
    with snaptree.open(str(db)) as store:
        _fill(store)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    result = run_snaptree("export", "--db", db, "--dir", dumps, "--compress", "zstd", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["compression"] == "zstd" and data["path"].endswith(".pickle.zst")
    checked = run_snaptree("verify", dumps / "latest.pickle.zst")
    assert checked.returncode == 0 and checked.stdout.startswith("ok: ")


@pytest.mark.parametrize("damage", ["cut short", "garbage after a good frame", "magic only"])
@pytest.mark.parametrize("suffix", [".pickle.zst", ".zexp", ""])
def test_a_damaged_zstd_source_is_bad_input_for_import_not_an_unexpected_error(
    tmp_path, damage, suffix
):
    good = zstd.compress(pickle.dumps({"a": [1, 2, 3]} if suffix != ".zexp" else b"ZEXP"))
    data = {
        "cut short": good[: len(good) // 2],
        "garbage after a good frame": good + ZSTD_MAGIC + b"\xff" * 16,
        "magic only": ZSTD_MAGIC,
    }[damage]
    source = tmp_path / f"model{suffix}"
    source.write_bytes(data)
    with pytest.raises(snaptree.InputError, match="the zstd compression is damaged"):
        snaptree.load_source(source)
    result = run_snaptree("import", source, "--db", tmp_path / "db.fs", "--path", "m")
    assert result.returncode == 3
    assert "the zstd compression is damaged" in error_line(result)
