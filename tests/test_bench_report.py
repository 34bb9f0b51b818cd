"""The benchmark report: measuring one section again replaces it and keeps the others."""

from __future__ import annotations

import importlib.util
from pathlib import Path

RUN = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "run.py"


def _run_module():
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


REPORT = """# Benchmarks

Command: `run.py`

## Machine

| fact | value |

## Exports

old export figures

## Import

import figures
"""


def test_merge_replaces_only_the_section_measured_again():
    run = _run_module()
    merged = run.merge(REPORT, ["## Exports\n\nnew export figures"], "measured again")
    assert "old export figures" not in merged
    assert "## Exports\n\n_measured again_\n\nnew export figures\n\n## Import" in merged
    assert merged.startswith(REPORT.split("## Exports")[0])
    assert merged.endswith("## Import\n\nimport figures\n")


def test_merge_appends_a_section_the_report_lacks():
    run = _run_module()
    merged = run.merge(REPORT, ["## Backends\n\nfigures"], "new")
    assert merged.endswith("import figures\n\n## Backends\n\n_new_\n\nfigures\n")
    assert "old export figures" in merged
