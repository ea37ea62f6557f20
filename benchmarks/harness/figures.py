"""The one way benchmark figures are printed, and how runs become figures.

Owns: `FigureTable` (a title line, then aligned columns; a row is printed as
soon as it is measured, so a long bench shows progress), `print_target` (one
verdict line: a figure against its target), `medians` of repeated runs and
`timings` of repeated calls. Starts no process and asserts no speed: a
missed target is printed, never raised.
"""

from __future__ import annotations

import operator
import statistics
import time
from typing import TYPE_CHECKING, TypeVar

import attrs

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

K = TypeVar("K")
Cell = float | str | None  # a number, a text as it is, or None for "-"

_COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}


@attrs.frozen
class Column:
    """A column of figures: its heading, the format spec of its numbers, and
    its width (at least the heading's)."""

    heading: str
    spec: str = ",.0f"
    width: int = 10


class FigureTable:
    """A table of figures: printed at once are a blank line, the title, the
    notes (what the rows are, how they were measured) and the headings; then
    each `row` as it comes. Labels are left-aligned, figures right-aligned."""

    def __init__(
        self,
        title: str,
        label: str,
        label_width: int,
        columns: Sequence[Column],
        notes: Sequence[str] = (),
    ) -> None:
        self._columns = tuple(columns)
        self._label_width = max(len(label), label_width)
        self._widths = tuple(max(len(column.heading), column.width) for column in columns)
        print(f"\n{title}")
        for note in notes:
            print(f"  {note}")
        self._line(label, [column.heading for column in columns])

    def row(self, label: str, *cells: Cell) -> None:
        """One row: a cell per column (ValueError otherwise), each number in
        its column's format."""
        texts = [_text(cell, column) for cell, column in zip(cells, self._columns, strict=True)]
        self._line(label, texts)

    def _line(self, label: str, cells: list[str]) -> None:
        parts = [f"{label:<{self._label_width}}"]
        parts += [f"{cell:>{width}}" for cell, width in zip(cells, self._widths, strict=True)]
        print("  ".join(parts), flush=True)


def _text(cell: Cell, column: Column) -> str:
    if cell is None:
        return "-"
    if isinstance(cell, str):
        return cell
    return format(cell, column.spec)


def print_target(
    subject: str, value: float, comparison: str, bound: float, spec: str, unit: str = ""
) -> None:
    """One verdict line, `target: SUBJECT >= BOUND: VALUE, met` (or `NOT met`);
    `comparison` is one of >=, >, <=, <, and both figures are written with
    `spec` and `unit`."""
    met = _COMPARISONS[comparison](value, bound)
    print(
        f"target: {subject} {comparison} {bound:{spec}}{unit}: {value:{spec}}{unit}, "
        f"{'met' if met else 'NOT met'}",
        flush=True,
    )


def medians(runs: Mapping[K, Sequence[Mapping[str, float]]]) -> dict[K, dict[str, float]]:
    """Each figure's median over its runs, for each key of `runs` that has
    any (a figure missing from a run counts 0 there)."""
    return {
        key: {
            name: statistics.median(run.get(name, 0.0) for run in results)
            for name in dict.fromkeys(name for run in results for name in run)
        }
        for key, results in runs.items()
        if results
    }


def timings(run: Callable[[], object], repeat: int) -> list[float]:
    """The seconds each of `repeat` calls of `run` took (time.perf_counter)."""
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return seconds
