"""verify: a dump is checked against its manifest and loaded; damage is reported clearly."""

from __future__ import annotations

import hashlib
import json

import pytest

import snaptree
from _cli import error_line
from _cli import snaptree as run_snaptree
from snaptree.errors import VerifyError


@pytest.fixture
def dumps(store, tmp_path):
    store.run(lambda root: root.__setitem__("accounts", {f"a{i}": {"b": i} for i in range(200)}))
    return {
        fmt: store.export(tmp_path / f"d.{fmt}", format=fmt) for fmt in ("pickle", "json", "zodb")
    }


@pytest.mark.parametrize("fmt", ["pickle", "json", "zodb"])
def test_verify_accepts_an_intact_dump_and_says_what_it_holds(dumps, fmt):
    info = dumps[fmt]
    checked = snaptree.verify(info.path)
    assert (checked.tid, checked.sha256, checked.objects) == (info.tid, info.sha256, info.objects)
    assert checked.summary["keys"] == 1 and checked.summary["first_keys"] == ["accounts"]


@pytest.mark.parametrize("fmt", ["pickle", "json", "zodb"])
def test_verify_rejects_a_truncated_dump(dumps, fmt):
    path = dumps[fmt].path
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(VerifyError, match="truncated or was changed"):
        snaptree.verify(path)


@pytest.mark.parametrize("fmt", ["pickle", "json", "zodb"])
def test_verify_rejects_an_altered_dump_of_the_same_size(dumps, fmt):
    path = dumps[fmt].path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match=r"sha256 .* does not match"):
        snaptree.verify(path)


def test_verify_without_a_manifest_says_the_export_did_not_finish(dumps):
    dumps["pickle"].manifest_path.unlink()
    with pytest.raises(VerifyError, match="no manifest"):
        snaptree.verify(dumps["pickle"].path)


def test_verify_loads_the_dump_not_only_its_checksum(dumps):
    """A dump rewritten with a matching manifest but unloadable content still fails."""
    info = dumps["json"]
    info.path.write_bytes(b'{"accounts": ')
    manifest = json.loads(info.manifest_path.read_text())
    manifest.update(bytes=13, sha256=hashlib.sha256(b'{"accounts": ').hexdigest())
    info.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(VerifyError, match="does not load"):
        snaptree.verify(info.path)


@pytest.mark.slow
def test_verify_command_exit_codes(dumps):
    """Exit 0 and a summary for a good dump; exit 3 (bad input) and one error line for a bad one."""
    good = run_snaptree("verify", dumps["pickle"].path)
    assert good.returncode == 0, good.stderr
    assert "ok:" in good.stdout and dumps["pickle"].tid in good.stdout
    as_json = run_snaptree("verify", "--json", dumps["zodb"].path)
    assert json.loads(as_json.stdout)["ok"] is True
    path = dumps["json"].path
    path.write_bytes(path.read_bytes()[:-3])
    bad = run_snaptree("verify", path)
    assert bad.returncode == 3
    assert bad.stderr.strip() == error_line(bad) and "truncated" in bad.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("bytes"), r"bytes '\(missing\)' is not a count"),
        (lambda m: m.pop("tid"), r"tid '\(missing\)' is not 16 hex digits"),
        (lambda m: m.update(committed_at="yesterday"), r"committed_at 'yesterday' is not an ISO"),
        (lambda m: m.update(committed_at="2026-01-01T00:00:00"), r"committed_at .* UTC offset"),
        (lambda m: m.update(objects="many"), r"objects 'many' is not a count"),
        (lambda m: m.update(bytes=True), r"bytes True is not a count"),
        (lambda m: m.update(sha256=None), r"sha256 None is not 64 hex digits"),
    ],
    ids=["no-bytes", "no-tid", "bad-time", "naive-time", "bad-objects", "bool-bytes", "no-sha"],
)
def test_a_damaged_manifest_is_one_verify_error_naming_the_field(dumps, change, message):
    """A manifest missing a field or holding a bad one: VerifyError, never a KeyError."""
    info = dumps["pickle"]
    manifest = json.loads(info.manifest_path.read_text())
    change(manifest)
    info.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(VerifyError, match=rf"damaged manifest: .*{message}"):
        snaptree.verify(info.path)


def test_a_very_deep_json_dump_is_a_verify_error_not_a_recursion_error(dumps):
    """100,000 levels under a matching manifest: the parser's limit is reported as one line."""
    info = dumps["json"]
    deep = b"[" * 100_000 + b"]" * 100_000
    info.path.write_bytes(deep)
    manifest = json.loads(info.manifest_path.read_text())
    manifest.update(bytes=len(deep), sha256=hashlib.sha256(deep).hexdigest())
    info.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(VerifyError, match="nested too deeply"):
        snaptree.verify(info.path)
    result = run_snaptree("verify", info.path)
    assert result.returncode == 3
    assert result.stderr.strip() == error_line(result) and "nested too deeply" in result.stderr


def test_a_zodb_dump_is_verified_without_importfile(dumps):
    """The summary comes from reading the records: their number and what the root holds."""
    info = snaptree.verify(dumps["zodb"].path)
    assert info.summary["records"] == dumps["zodb"].objects
    assert info.summary["type"] == "dict" and info.summary["first_keys"] == ["accounts"]


def test_a_pickle_dump_with_bytes_after_its_end_is_refused(dumps):
    """A second pickle appended under a matching manifest would be ignored by pickle.load."""
    info = dumps["pickle"]
    data = info.path.read_bytes() + b"\x80\x04N."
    info.path.write_bytes(data)
    manifest = json.loads(info.manifest_path.read_text())
    manifest.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    info.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(VerifyError, match="bytes after the end of the pickle"):
        snaptree.verify(info.path)


def test_verify_json_prints_one_object_when_the_dump_fails_too(dumps):
    """--json: stdout carries JSON whatever happens; the error line stays on stderr."""
    path = dumps["pickle"].path
    path.write_bytes(path.read_bytes()[:-40])
    result = run_snaptree("verify", path, "--json")
    assert result.returncode == 3
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["path"] == str(path)
    assert "truncated or was changed" in data["error"]
    assert "truncated or was changed" in error_line(result)
