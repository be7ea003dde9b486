"""The `qtool` command: one Typer app, one file per subcommand."""

from __future__ import annotations

import typer

from qtool import __version__
from qtool.cli import calibrate as calibrate_cmd
from qtool.cli import convert_gguf as convert_gguf_cmd
from qtool.cli import eval as eval_cmd
from qtool.cli import quantize as quantize_cmd
from qtool.cli import sensitivity as sensitivity_cmd

app = typer.Typer(
    name="qtool",
    help="Make large language models small: quantize Hugging Face models into artifacts real runtimes load.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    epilog="Example: qtool quantize smollm2-135m --plan configs/w4a16-g64.yaml --out build/q && "
           "qtool eval build/q --base smollm2-135m --chunks 20",
)
app.command("calibrate", no_args_is_help=True)(calibrate_cmd.calibrate)
app.command("quantize", no_args_is_help=True)(quantize_cmd.quantize)
app.command("eval", no_args_is_help=True)(eval_cmd.evaluate)
app.command("convert-gguf", no_args_is_help=True)(convert_gguf_cmd.convert_gguf)
app.command("sensitivity", no_args_is_help=True)(sensitivity_cmd.sensitivity)


def _version(value: bool) -> None:
    if value:
        print(f"qtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Make large language models small."""


def main() -> None:
    app()
