"""The terminal side of the command line: where words and progress go, the options every command shares,
and the mapping of every outcome to one exit code and at most one error line.

Imports no torch, so ``ossconv --help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click
from tqdm import tqdm

from ossconv import render
from ossconv.errors import EXIT_BAD_INPUT, EXIT_BUG, EXIT_OK, OssconvError
from ossconv.units import DEFAULT_MAX_SHARD_SIZE_TEXT, parse_size

DEBUG_ENV = "OSSCONV_DEBUG"


class Output:
    """Where a command's words go: JSON (one document on stdout), text, or nothing (``--quiet``)."""

    def __init__(self, as_json: bool, quiet: bool):
        self.as_json = as_json
        self.quiet = quiet

    def text(self, message: str = "") -> None:
        if not self.as_json and not self.quiet:
            click.echo(message)

    def result(self, data: dict[str, Any], render: Callable[[], None]) -> None:
        if self.as_json:
            click.echo(json.dumps(data, indent=2, default=str))
        elif not self.quiet:
            render()

    def progress(self, description: str, unit: str = "B") -> BarProgress:
        """A progress bar on stderr, shown only on a terminal and never with --json or --quiet."""
        disable = self.as_json or self.quiet or not sys.stderr.isatty()
        bar = tqdm(
            total=0, desc=description, unit=unit, unit_scale=unit == "B", disable=disable, file=sys.stderr, leave=False
        )
        return BarProgress(bar)


class BarProgress:
    """A tqdm bar as the library's :class:`ossconv.progress.Progress`."""

    def __init__(self, bar: tqdm):
        self.bar = bar

    def __call__(self, count: int) -> None:
        self.bar.update(count)

    def add_total(self, count: int) -> None:
        self.bar.total = (self.bar.total or 0) + count
        self.bar.refresh()

    def __enter__(self) -> BarProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def output_options(function: Callable) -> Callable:
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of text.")
    @click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
    @functools.wraps(function)
    def wrapper(*args: Any, as_json: bool, quiet: bool, **kwargs: Any) -> Any:
        return function(*args, out=Output(as_json, quiet), **kwargs)

    return wrapper


def write_options(function: Callable) -> Callable:
    @click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new output is complete).")
    @click.option(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE_TEXT,
        show_default=True,
        help="Largest shard file, e.g. 500MB, 5GB, 2GiB.",
    )
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    return wrapper


def write_command(ui: Output, label: str, run: Callable[..., Any], **kwargs: Any) -> int:
    """Run a library function that writes a checkpoint (by keyword), with a byte progress bar; print its result."""
    kwargs["max_shard_size"] = parse_size(kwargs["max_shard_size"])
    with ui.progress(label) as progress:
        result = run(**kwargs, progress=progress)
    ui.result(result.to_dict(), lambda: render.conversion_text(result))
    return EXIT_OK


class Interrupted(BaseException):
    """SIGINT or SIGTERM: unwinds like an exception, so every ``with`` block on the way removes its temporary
    output; not a KeyboardInterrupt, which click would answer with a line of its own."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _error_line(error: BaseException) -> str:
    if isinstance(error, OssconvError):
        line = str(error)
    elif isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        line = f"{where}{error.strerror or error}"
    else:
        line = str(error)
    return _one_line(line)


def _one_line(text: str) -> str:
    """Names from inputs may hold line breaks; the error stays one line whatever they hold."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


M_TRIM_THRESHOLD = -1  # glibc mallopt parameters
M_MMAP_THRESHOLD = -3
LARGE_ALLOCATION = 4 << 20
KEPT_HEAP = 2 * LARGE_ALLOCATION


def _bound_the_heap() -> None:
    """Expert slices are tens of MB, allocated and freed thousands of times (on two threads). glibc raises its
    mmap threshold after such frees and then serves them from the heap, which it keeps: peak RSS grew with the
    number of layers converted (0.47 GB for 1 layer, 0.89 GB for 4). A fixed threshold gives large blocks back
    to the system when freed, so RSS stays flat. A fixed threshold also pins glibc's trim threshold at 128 KB,
    which hands the heap back after every few-MB temporary only to fault it in again (1.8 million page faults
    in a 2-layer verify, 5.4 s; with 8 MB kept, 0.5 million and 4.0 s, RSS the same)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION)
        libc.mallopt(M_TRIM_THRESHOLD, KEPT_HEAP)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def run_group(cli: click.Group, argv: list[str] | None = None) -> None:
    """Run the command and turn every outcome into one exit code and at most one error line."""
    import signal

    _bound_the_heap()

    from safetensors import SafetensorError

    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = cli.main(args=argv, prog_name="ossconv", standalone_mode=False)
    except click.exceptions.Exit as done:
        code = done.exit_code
    except click.ClickException as error:
        error.show()
        code = EXIT_BAD_INPUT if error.exit_code != 0 else 0
    except Interrupted as stop:
        name = signal.Signals(stop.signum).name
        click.echo(f"Error: interrupted ({name}); no output was left behind", err=True)
        code = 128 + stop.signum  # as shells report a process a signal ended: 130, 143
    except click.Abort:
        click.echo("Aborted.", err=True)
        code = EXIT_BAD_INPUT
    except (OssconvError, OSError, SafetensorError, json.JSONDecodeError) as error:
        if os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        click.echo(f"Error: {_error_line(error)}", err=True)
        code = getattr(error, "exit_code", EXIT_BAD_INPUT)
    except Exception as error:  # a bug: one line, never mistaken for "checkpoints differ"
        if os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        message = _one_line(f"{type(error).__name__}: {error}")
        click.echo(
            f"Error: internal error in ossconv ({message}); rerun with {DEBUG_ENV}=1 for the traceback", err=True
        )
        code = EXIT_BUG
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


def rule_option(function: Callable) -> Callable:
    return click.option(
        "--rule",
        type=click.Choice(["up", "floor"]),
        default="up",
        show_default=True,
        help="MXFP4 scale rule when float experts are encoded: 'up' = triton_kernels ROUND_UP (what OpenAI and "
        "transformers use); 'floor' = OCP MX v1.0 / torchao FLOOR.",
    )(function)


def text_options(function: Callable) -> Callable:
    """verify's text inputs: prompts, chats and case files through the checkpoint's own tokenizer."""
    function = click.option(
        "--generate",
        type=click.IntRange(0),
        default=0,
        help="Also continue each case greedily for N tokens on A and on B; different continuations differ.",
    )(function)
    function = click.option(
        "--reasoning-effort",
        type=click.Choice(["low", "medium", "high"]),
        default=None,
        help="Passed to the chat template, as gpt-oss's expects.",
    )(function)
    function = click.option(
        "--tokenizer",
        type=click.Path(),
        default=None,
        help="tokenizer.json (or its folder) when none is beside A (or above an original/ folder).",
    )(function)
    function = click.option(
        "--prompts",
        "cases_file",
        type=click.Path(),
        default=None,
        help='A JSON-lines file of cases: {"text": ...} or {"messages": [...]}, optionally an "id".',
    )(function)
    function = click.option(
        "--chat",
        "chats",
        multiple=True,
        type=click.Path(),
        help="A JSON file of {role, content} messages, rendered with A's chat template (repeatable).",
    )(function)
    function = click.option(
        "--prompt", "prompts", multiple=True, help="A text prompt, through A's own tokenizer (repeatable)."
    )(function)
    return function
