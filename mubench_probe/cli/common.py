"""What every command shares: the typer `app`, the two consoles, error handling, progress, and the
only ways the CLI prints (`_say`, `SafeTable` via `_print_wide`, `_data`, `_emit`).

User data (a label, a column, a model or file name, an error message) never reaches rich's markup
parser or the terminal unescaped: tests/test_security.py checks that every print in this package
goes through these helpers.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from .. import api
from ..errors import ProbeError, UsageError

app = typer.Typer(
    help="mubench_probe: extract embeddings of microscopy images once, evaluate everything.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(emoji=False)
err = Console(stderr=True, emoji=False)
F = TypeVar("F", bound=Callable[..., Any])
FORMATS = ("table", "csv", "json")


def _safe(text: Any) -> str:
    """User data (a label, a column, model or file name, an error message) for a rich markup
    string: control characters made visible (ESC -> `\\x1b`, newline -> `\\n`), brackets escaped."""
    return escape(api.printable(text))


def _say(console: Console, message: Any, prefix: str = "") -> None:
    """The one way this package prints a line: `prefix` is our own markup (a style, a label such as
    "error:"); `message` is data, printed as it is (never parsed as markup or emoji codes), with
    every control character made visible, so no value can restyle, erase or forge the output."""
    body = escape(api.printable(message) + " ")[:-1]  # last in the line: a trailing backslash needs no escape
    console.print(prefix + body, highlight=False, soft_wrap=True, emoji=False)


def notify(line: str) -> None:
    """A note from the API (a rebuilt index, a resumed run) on stderr, escaped."""
    _say(err, line, prefix="note: ")


class SafeTable(Table):
    """A rich Table whose title, headers and cells are data: shown as they are, never parsed as
    markup, with control characters made visible (the terminal counterpart of `_say`)."""

    def __init__(self, *headers: Any, title: Any = None, **kwargs: Any) -> None:
        title = None if title is None else Text(api.printable(title), style="table.title")
        super().__init__(*(_cell_text(h) for h in headers), title=title, **kwargs)

    def add_column(self, header: Any = "", *args: Any, **kwargs: Any) -> None:
        super().add_column(_cell_text(header), *args, **kwargs)

    def add_row(self, *cells: Any, **kwargs: Any) -> None:
        super().add_row(*(_cell_text(c) for c in cells), **kwargs)


def _cell_text(value: Any) -> Any:
    return Text(api.printable(value)) if isinstance(value, str) else value


def friendly(fn: F) -> F:
    """Turn package errors and Ctrl-C into one-line messages with meaningful exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ProbeError as exc:  # escaped: messages name extras like mubench-probe[formats]
            _say(err, exc, prefix="[bold red]error:[/] ")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _say(err, "interrupted: finished chunks are saved; rerun the same command to resume")
            raise typer.Exit(130) from None
        except OSError as exc:  # unwritable store, full disk, missing file: the user's environment
            _say(err, exc, prefix="[bold red]error:[/] ")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


class RateColumn(ProgressColumn):
    """Items per second (images, units) of a progress bar."""

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {task.fields.get('unit', 'img')}/s" if speed else "–/s", style="cyan")


class LineProgress:
    """Progress for logs (stderr not a terminal): one plain line per task every `every` seconds.

    A live bar prints nothing until the run ends when redirected; these lines say how far a
    long run is (rows, rate, ETA) in a job's log file. Same calls as rich's Progress.
    """

    def __init__(self, every: float = 30.0, unit: str = "img") -> None:
        self.every, self.unit = every, unit
        self.tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for tid in self.tasks:
            self._line(tid, final=True)

    def add_task(self, description: str, total: float | None = None, **_: Any) -> TaskID:
        tid = TaskID(len(self.tasks))
        now = time.monotonic()
        self.tasks[tid] = {"description": description, "total": total, "done": 0.0, "t0": now, "last": now}
        return tid

    def advance(self, tid: int, n: float) -> None:
        self.update(tid, completed=self.tasks[tid]["done"] + n)

    def update(self, tid: int, completed: float | None = None, total: float | None = None, description=None) -> None:
        task = self.tasks[tid]
        if completed is not None:
            task["done"] = completed
        if total is not None:
            task["total"] = total
        if description is not None:
            task["description"] = description
        if time.monotonic() - task["last"] >= self.every:
            self._line(tid)

    def _line(self, tid: int, final: bool = False) -> None:
        task = self.tasks[tid]
        task["last"] = now = time.monotonic()
        elapsed = max(now - task["t0"], 1e-9)
        rate = task["done"] / elapsed
        total = task["total"]
        parts = [f"{task['description']}: {task['done']:,.0f}" + (f"/{total:,.0f}" if total else "")]
        if total:
            parts.append(f"({100 * task['done'] / total:.0f}%)")
        parts.append(f"{rate:,.1f} {self.unit}/s, {elapsed:,.0f} s elapsed")
        if total and rate > 0 and not final:
            parts.append(f"ETA {(total - task['done']) / rate:,.0f} s")
        _say(err, " ".join(parts) + (" (done)" if final else ""))


class DescriptionColumn(ProgressColumn):
    """A task's description (a model spec, a task name) as data: never markup, controls visible."""

    def render(self, task: Any) -> Text:
        return Text(api.printable(task.description))


def _progress(unit: str = "img") -> Progress | LineProgress:
    """A live bar on a terminal; periodic plain lines when stderr goes to a file or pipe."""
    if not err.is_terminal:
        return LineProgress(unit=unit)
    return Progress(
        DescriptionColumn(),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


def _bars_for(bars: Progress | LineProgress, label: str = "{}") -> Callable[[str, int], Callable[[int], None]]:
    """The API's `progress(spec, total)` callback: one bar per model, advanced by rows done."""

    def bar_for(spec: str, total: int) -> Callable[[int], None]:
        t = bars.add_task(label.format(spec), total=total)
        return lambda n: bars.advance(t, n)

    return bar_for


def _check_format(fmt: str, as_json: bool = False) -> str:
    fmt = "json" if as_json else fmt
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return fmt


def _print_wide(renderable: Any) -> None:
    """Print at the width the renderable needs: cells are never wrapped, in a terminal or in a log."""
    natural = Console(width=100_000).measure(renderable).maximum  # measured without a width limit
    Console(width=max(natural, 40), file=out.file, highlight=False, emoji=False).print(renderable)


def _data(text: str, nl: bool = True) -> None:
    """CSV or JSON on stdout, for programs: every value exactly as it is (JSON escapes control
    characters itself; click would strip ANSI sequences from a pipe, altering values). Only when
    stdout is a terminal, where a person reads it, are control characters made visible."""
    if out.is_terminal:
        text = api.printable(text, keep_newlines=True)
    typer.echo(text, nl=nl, color=True)


def _json(payload: Any) -> None:
    """A JSON document on stdout (values that JSON cannot hold become strings)."""
    _data(json.dumps(payload, default=str, indent=2))


def _emit(records: Sequence[Mapping[Any, Any]], fmt: str, title: str = "") -> None:
    """Records as a table (one line per record), CSV or JSON on stdout."""
    if fmt == "json":
        _json(records)
        return
    if fmt == "csv":
        import pandas as pd

        _data(pd.DataFrame(records).to_csv(index=False), nl=False)
        return
    columns = list(dict.fromkeys(k for r in records for k in r))
    table = SafeTable(title=title or None, title_justify="left")
    for c in columns:
        table.add_column(str(c), no_wrap=True)
    for r in records:
        table.add_row(*[_cell(r.get(c)) for c in columns])
    _print_wide(table)


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _fmt(cell: Any) -> str:
    """(value, low, high) as `0.812 [.79, .83]`; a value without a CI as `0.812`."""
    if cell is None or (isinstance(cell, float) and cell != cell):
        return "–"
    value, lo, hi = cell
    if lo is None or hi is None or lo != lo or hi != hi:  # no CI (NaN; None after --bootstrap 0)
        return f"{value:.3f}"

    def short(v: float) -> str:  # 0.29 -> .29, -0.05 -> -.05: keeps the CI short on one line
        return f"{v:.2f}".replace("0.", ".", 1)

    return f"{value:.3f} [{short(lo)}, {short(hi)}]"


def _numbers(text: str, option: str = "the option") -> tuple[float, ...]:
    """Comma-separated numbers; anything else is a usage error (exit 2)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise UsageError(f"{option} takes comma-separated numbers, not {text!r}")
    return values


def _ints(text: str, option: str = "the option") -> tuple[int, ...]:
    """Comma-separated positive integers; anything else is a usage error (exit 2)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise UsageError(f"{option} takes comma-separated positive integers, not {text!r}")
    return values
