"""``snaptree demo``: the problem snaptree solves, run end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .. import demo as demo_module
from ..store import open as open_store
from .options import db_option, durability_options


@click.command("demo")
@db_option
@click.option("--seconds", default=5.0, show_default=True, type=click.FloatRange(min=0.1))
@click.option(
    "--model",
    "sample",
    default="data/sample_model.json",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Model to import on the first run; if the file is missing, a synthetic one.",
)
@click.option(
    "--accounts",
    default=400,
    show_default=True,
    type=click.IntRange(min=2),
    help="Accounts of the synthetic model.",
)
@click.option("--writers", default=4, show_default=True, type=click.IntRange(min=1, max=64))
@click.option(
    "--exports",
    "export_dir",
    default="data/exports",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory the background exporter writes to.",
)
@click.option(
    "--compare",
    is_flag=True,
    help="Instead, run the original design (plain dicts + pickle.dump), its two usual "
    "workarounds and snaptree side by side, and print a table.",
)
@durability_options
def demo_command(
    db: str | None,
    sample: Path,
    seconds: float,
    accounts: int,
    writers: int,
    export_dir: Path,
    compare: bool,
    durability: dict[str, Any],
) -> None:
    """Import a model, then threads transfer money while an exporter writes consistent dumps.

    The first run imports the sample model into the store; every run then
    has writer threads transfer between its accounts while a background
    Exporter dumps pickles. Ends with a summary: transfers, conflicts
    retried, exports written, and whether every export and the final state
    hold the invariant (the total of all balances never changes). Exits 1
    if any does not.

    Example:

    \b
        snaptree demo --seconds 10 --writers 8
    """
    if compare:
        from ..demo.compare import main as compare_main

        raise SystemExit(compare_main(["--seconds", str(seconds), "--writers", str(writers)]))
    with open_store(db, **durability) as store:
        click.echo(f"store: {store.source}; exports: {export_dir}/", err=True)
        result = demo_module.run_demo(
            store,
            export_dir,
            sample=sample,
            seconds=seconds,
            accounts=accounts,
            writers=writers,
        )
    click.echo(demo_module.summary(result, writers))
    if not result.ok:
        raise SystemExit(1)


commands = [demo_command]
