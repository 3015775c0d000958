"""Progress bars for long operations (rich), shown on stderr only when it is a terminal."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

__all__ = ["make_progress"]


def make_progress(quiet: bool = False) -> Progress:
    """A rich Progress on stderr; disabled when ``quiet`` or stderr is not a TTY."""
    console = Console(stderr=True)
    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(),
        MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False,
        disable=quiet or not sys.stderr.isatty())
