"""What every command shares: rich consoles, progress bars, one-line errors with exit codes, JSON output."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Iterator

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from qtool.errors import QtoolError

err = Console(stderr=True)
out = Console()


@contextlib.contextmanager
def user_errors(verbose: bool) -> Iterator[None]:
    """Turn qtool errors into one clear line on stderr and the documented exit status."""
    try:
        yield
    except QtoolError as e:
        if verbose:
            err.print_exception()
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]: nothing was written")
        raise typer.Exit(130) from None


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator:
    """A rich progress bar on stderr; yields a `(stage, done, total)` callback."""
    bar = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=err, disable=not enabled, transient=False)
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    def update_lazily(stage: str, done: int, total: int) -> None:
        if not tasks:
            bar.start()  # the bar appears with the first step, so early errors print alone
        update(stage, done, total)

    try:
        yield update_lazily
    finally:
        bar.stop()


def max_kld_option(what: str):
    """`--max-kld` of quantize and eval: the quality gate on KL divergence (exit 4)."""
    return typer.Option("--max-kld", min=0.0, help=f"Exit 4 when {what} KL divergence is above this.",
                        rich_help_panel="Quality gate")


def min_same_top_option(what: str):
    """`--min-same-top` of quantize and eval: the quality gate on same-top % (exit 4)."""
    return typer.Option("--min-same-top", min=0.0, max=100.0, help=f"Exit 4 when {what} same-top % is below this.",
                        rich_help_panel="Quality gate")


def check_precision(precision: str | None) -> None:
    """`--precision` (quantize, calibrate): one of the calibration precisions, or not given."""
    from qtool.calib.precision import PRECISIONS
    from qtool.errors import UsageError

    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}: unknown; allowed: {', '.join(PRECISIONS)}")


def warn(msg: str) -> None:
    err.print(f"[bold yellow]WARNING[/]: {escape(msg)}", highlight=False, soft_wrap=True)


def check_json_dest(dest: str | None) -> None:
    """Fail before any work when `--json FILE` cannot be written."""
    from qtool.errors import UsageError

    if dest not in (None, "-") and not Path(dest).parent.is_dir():
        raise UsageError(f"--json {dest}: directory {Path(dest).parent} does not exist")


def write_json(dest: str | None, payload: dict) -> None:
    """`--json -` prints to stdout; `--json FILE` writes the file."""
    if dest is None:
        return
    text = json.dumps(payload, indent=2, sort_keys=True)
    if dest == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(dest).write_text(text + "\n")


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return str(n)
