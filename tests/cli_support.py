"""What the command-line tests share: running ``convgap.cli.main`` in-process, and a user's
model module written to a temporary directory and importable by name."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from convgap.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    """``main(argv)`` (each argument as a string): (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@contextmanager
def user_module(tmp_path, monkeypatch, name: str, source: str) -> Iterator[str]:
    """``source`` saved as ``tmp_path/<name>.py``, importable as ``name`` (and the working
    directory) while inside; forgotten by ``sys.modules`` afterwards."""
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield name
    finally:
        sys.modules.pop(name, None)
