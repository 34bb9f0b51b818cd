"""Benchmark: the original design, its two workarounds and snaptree, under the same workload.

Wraps :mod:`snaptree.demo.compare`: every design runs the same writer threads and a
dumper for a bounded time, several times; the table gives medians over the
repetitions (dump counts are totals) and ratios against the original design
measured in the same run. It also plots writer latency over time while dumps
run, global lock against snaptree.

Example:

    .venv/bin/python scripts/bench/bench_compare.py --quick --json /tmp/compare.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import ROOT, command_line, facts, write_result

from snaptree.demo import compare, designs

FIGURE = Path("docs/img/compare_latency.png")
PLOTTED = ("global-lock", "snaptree")
BIN_SECONDS = 0.02


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One design over several runs: dump counts summed, rates and latencies as medians."""
    row: dict[str, Any] = {"design": results[-1]["design"], "note": results[-1]["note"]}
    for key in (
        "dumps_attempted",
        "dumps_crashed",
        "dumps_unreadable",
        "dumps_torn",
        "dumps_consistent",
    ):
        row[key] = sum(r[key] for r in results)
    for key in ("writer_ops_per_s", "latency_ms_p50", "latency_ms_p99", "latency_ms_max"):
        row[key] = _median([r[key] for r in results])
    row["dump_ms_p50"] = _median([r["dump_ms_p50"] for r in results if r["dump_ms_p50"]])
    row["runs"] = len(results)
    row["writer_errors"] = [e for r in results for e in r["writer_errors"]]
    crashes: dict[str, int] = {}
    for r in results:
        for message, count in r["crash_messages"].items():
            crashes[message] = crashes.get(message, 0) + count
    row["crash_messages"] = crashes
    return row


def summarize(
    runs: list[compare.Comparison], baselines: list[compare.Comparison]
) -> list[dict[str, Any]]:
    """One row per design, with ratios against the naive design and against no dumps."""

    def merged(comparisons: list[compare.Comparison], name: str) -> dict[str, Any] | None:
        results = [r.summary() for c in comparisons for r in c.results if r.name == name]
        return _merge(results) if results else None

    rows = []
    for name in designs.DESIGNS:
        row = merged(runs, name)
        if row is None:
            continue
        alone = merged(baselines, name)
        if alone is not None:
            row["alone_ops_per_s"] = alone["writer_ops_per_s"]
            row["alone_latency_ms_p99"] = alone["latency_ms_p99"]
            row["alone_latency_ms_max"] = alone["latency_ms_max"]
            row["throughput_vs_alone"] = row["writer_ops_per_s"] / alone["writer_ops_per_s"]
            row["p99_vs_alone"] = row["latency_ms_p99"] / alone["latency_ms_p99"]
            row["writer_errors"] += alone["writer_errors"]
        rows.append(row)
    base = next((r for r in rows if r["design"] == "naive"), None)
    for row in rows:
        if base:
            row["throughput_vs_naive"] = row["writer_ops_per_s"] / base["writer_ops_per_s"]
    return rows


def _ratio(row: dict[str, Any], key: str, digits: int) -> str:
    value = row.get(key)
    return "-" if value is None or value != value else f"{value:.{digits}f}x"


def _ms(value: float) -> str:
    return "-" if value != value else f"{value:.1f}"  # NaN: no dump finished


def markdown(rows: list[dict[str, Any]], workload: compare.Workload, reps: int, cmd: str) -> str:
    lines = [
        "## The original design side by side (plain dicts, global lock, owner thread, snaptree)",
        "",
        f"Command: `{cmd}`",
        "",
        f"Workload: {workload.accounts} accounts, {workload.writers} writer threads, "
        f"{workload.seconds:g} s per design and run, {reps} run(s), a dump every "
        f"{workload.dump_interval:g} s (back to back if 0); writers do transfers (debit, "
        "history entry, credit) and add/remove session keys. A dump is *torn* when it "
        "loads but the balances do not add up. Dump counts are totals over the runs; rates "
        "and latencies are medians over the runs. Baselines, measured in the same run: each "
        "design with its writers alone (no dumps), and the naive design.",
        "",
        "| design | dumps | crashed | unreadable | torn | consistent | dump ms p50 "
        "| writer ops/s | vs no dumps | vs naive | latency ms p50 | p99 | p99 vs no dumps "
        "| max | max with no dumps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['design']} | {r['dumps_attempted']} | {r['dumps_crashed']} "
            f"| {r['dumps_unreadable']} | {r['dumps_torn']} | {r['dumps_consistent']} "
            f"| {_ms(r['dump_ms_p50'])} | {r['writer_ops_per_s']:,.0f} "
            f"| {_ratio(r, 'throughput_vs_alone', 2)} | {_ratio(r, 'throughput_vs_naive', 3)} "
            f"| {r['latency_ms_p50']:.3f} | {r['latency_ms_p99']:.2f} "
            f"| {_ratio(r, 'p99_vs_alone', 1)} | {r['latency_ms_max']:.1f} "
            f"| {_ms(r.get('alone_latency_ms_max', float('nan')))} |"
        )
    lines.append("")
    lines.extend(f"- **{r['design']}**: {r['note']}" for r in rows)
    lines.extend(
        f"- {r['design']} dumps crashed with `{message}`: {count}"
        for r in rows
        for message, count in r["crash_messages"].items()
    )
    lines.extend(
        f"- {r['design']} writer error: {error}" for r in rows for error in r["writer_errors"]
    )
    lines += [
        "",
        "How the designs differ by construction: the global lock and the owner thread make "
        "every writer wait for the whole of every dump (compare their max latency with the "
        "dump time); snaptree's writers take no lock against a dump, which runs in the "
        "Exporter's own process, but they commit durably (a FileStorage fsync per "
        "transaction, which the in-memory designs do not pay).",
    ]
    return "\n".join(lines)


def plot(run: compare.Comparison, path: Path) -> None:
    """Writer latency over time (max and median per bin), with the dumps shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in run.results if r.name in PLOTTED]
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 3.2 * len(results)), sharey=True)
    axes = list(axes) if len(results) > 1 else [axes]
    for ax, result in zip(axes, results, strict=True):
        bins: dict[int, list[float]] = {}
        for start, latency in zip(result.op_times, result.latencies, strict=True):
            bins.setdefault(int(start / BIN_SECONDS), []).append(latency * 1e3)
        keys = sorted(bins)
        times = [k * BIN_SECONDS for k in keys]
        ax.plot(times, [max(bins[k]) for k in keys], lw=0.9, label="max per 20 ms")
        ax.plot(times, [statistics.median(bins[k]) for k in keys], lw=0.9, label="median per 20 ms")
        for number, dump in enumerate(result.dumps):
            ax.axvspan(
                dump.started,
                dump.finished,
                color="tab:red",
                alpha=0.15,
                lw=0,
                label="dump running" if number == 0 else None,
            )
        ax.set_yscale("log")
        ax.set_title(f"{result.name}: {result.note}", fontsize=9)
        ax.set_ylabel("writer latency, ms")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("seconds since the run started")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, one repetition")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    if args.quick:
        workload, reps = compare.Workload(seconds=2.0, accounts=10_000, writers=2), 1
    else:
        workload, reps = compare.Workload(seconds=5.0, accounts=10_000, writers=2), 3

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    runs, baselines = [], []
    for rep in range(reps):
        progress(f"run {rep + 1} of {reps}: writers alone")
        baselines.append(compare.run_comparison(replace(workload, dumps=False), progress=progress))
        progress(f"run {rep + 1} of {reps}: writers and dumps")
        runs.append(compare.run_comparison(workload, progress=progress))
    rows = summarize(runs, baselines)
    cmd = command_line(__file__, argv)
    figure = ROOT / FIGURE
    plot(runs[-1], figure)
    text = markdown(rows, workload, reps, cmd)
    print(text)
    if args.json:
        write_result(
            args.json,
            name="compare",
            title="The original design side by side",
            command=cmd,
            markdown=text,
            figures=[str(FIGURE)],
            facts=facts(),
            rows=rows,
            runs=[run.to_json() for run in runs],
            baselines=[run.to_json() for run in baselines],
        )
    return 1 if any(row["writer_errors"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
