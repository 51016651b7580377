"""What every ``moerge`` command shares: the root group, the one error presenter, the one progress bar.

Heavy modules (torch, pydantic, the methods) are imported inside the commands so
that ``moerge --help`` answers at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import click

EPILOG = """\b
Examples:
  moerge merge recipe.yaml ./merged          merge the models of a recipe
  moerge merge recipe.yaml ./merged --dry-run   validate and plan only
  moerge inspect ./merged                    tensors, dtypes, shapes, shards
  moerge diff ./base ./expert                how much each tensor changed
  moerge methods                             every method and its parameters
  moerge methods ties                        one method in detail
  moerge demo ./demo                         build small models and merge them
  moerge zoo build text --track encoder      fine-tune real experts (offline)
  moerge compare --track encoder             merge them every way, score held-in/held-out
  moerge report results                      HTML report and figures
  moerge route arrow BASE A/ B/ --out routed/   route among LoRA experts instead of merging

Recipes are YAML in moerge's format (method: ...) or mergekit's (merge_method: ...).
See the README for a recipe gallery."""


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moerge", prog_name="moerge")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """moerge: merge fine-tuned models of the same base into one, fast and in bounded memory."""
    ctx.obj = {"debug": debug}


def _fail(message: str, hint: str | None, code: int) -> None:
    from rich.console import Console
    from rich.markup import escape

    # a path, recipe key or tensor name may hold "[...]": escaped, it is printed as it is, never read as markup
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True)
    if hint:
        err.print(f"[dim]hint:[/] {escape(hint)}", markup=True)
    sys.exit(code)


EXTERNAL_HELP = "Read files that a model folder's index or links place outside it (refused by default)."


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C's KeyboardInterrupt would be, so the same clean-up runs
    (every temporary output removed) before the process exits with the signal's status."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


def _catch_termination() -> dict[int, Any]:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` (main thread only); returns the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    wanted = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    return {s: signal.signal(s, _terminated) for s in wanted}


def run(ctx: click.Context, fn: Callable[[], Any]) -> Any:
    """Run a command body, turning moerge errors into one readable message and an exit code."""
    debug = bool(ctx.find_root().obj and ctx.find_root().obj.get("debug"))
    from moerge.errors import MoergeError

    previous = _catch_termination()
    try:
        return fn()
    except MoergeError as e:
        if debug:
            raise
        _fail(e.message, e.hint, e.exit_code)
    except KeyboardInterrupt as e:
        if debug:
            raise
        if isinstance(e, Terminated):
            name = signal.Signals(e.signum).name
            _fail(f"terminated ({name}); no output was written (partial files were removed)", None, 128 + e.signum)
        _fail("interrupted; no output was written (partial files were removed)", None, 130)
    except MemoryError:
        if debug:
            raise
        _fail("out of memory", "close other programs, or use a machine with more RAM", 3)
    except Exception as e:
        if debug:
            raise
        _fail(f"internal error: {type(e).__name__}: {e}", "run again with --debug for the traceback, "
              "and please report it", 1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_offline(ctx: click.Context, fn: Callable[[], Any]) -> Any:
    """:func:`run` for commands that load models with transformers: offline, and quiet (our own
    progress bars and tables, not the libraries'; read when they are imported)."""
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(key, value)
    return run(ctx, fn)


class ProgressBar:
    """Rich progress bars on stderr, one row per label (a merge, an expert being trained, a model being
    scored); nothing is drawn when ``quiet`` or when stderr is not a terminal. Then ``on_done(label,
    total, info)``, when given, is called once a label completes, so a log still says what happened."""

    def __init__(self, quiet: bool = False, *, transient: bool = False,
                 on_done: Callable[[str, int, str], None] | None = None) -> None:
        self.bar: Any = None
        self.rows: dict[str, Any] = {}
        self.on_done = on_done
        if not quiet and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                transient=transient)

    def __enter__(self) -> ProgressBar:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, label: str, done: int, total: int | None, info: str = "") -> None:
        """Row ``label`` has ``done`` of ``total`` steps (None: not known yet) done."""
        if self.bar is None:
            if total is not None and done == total and self.on_done is not None:
                self.on_done(label, total, info)
            return
        if label not in self.rows:
            self.rows[label] = self.bar.add_task(label, total=total, info="")
        self.bar.update(self.rows[label], completed=done, total=total, info=info)
