"""verify: a dump is checked against its manifest and loaded; damage is reported clearly."""

from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner

import snaptree
from snaptree.cli import main
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


def test_verify_command_exit_codes(dumps):
    """Exit 0 and a summary for a good dump; exit 1 and one error line for a damaged one."""
    runner = CliRunner()
    good = runner.invoke(main, ["verify", str(dumps["pickle"].path)])
    assert good.exit_code == 0, good.output
    assert "ok:" in good.output and dumps["pickle"].tid in good.output
    as_json = runner.invoke(main, ["verify", "--json", str(dumps["zodb"].path)])
    assert json.loads(as_json.stdout)["ok"] is True
    path = dumps["json"].path
    path.write_bytes(path.read_bytes()[:-3])
    bad = runner.invoke(main, ["verify", str(path)])
    assert bad.exit_code == 1
    assert bad.stderr.startswith("snaptree: error:") and "truncated" in bad.stderr
