"""The convgap cache directory and atomic JSON files in it.

Location: ``$CONVGAP_CACHE`` if set, else ``$XDG_CACHE_HOME/convgap``, else
``~/.cache/convgap``. Files are written atomically (temporary file + rename), so a crash
never leaves half a file; a file that cannot be parsed is reported by :class:`CacheWarning`
and treated as empty, so the caller re-measures and overwrites it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["CacheWarning", "cache_dir", "read_json", "write_atomic", "write_json",
           "update_json"]


class CacheWarning(UserWarning):
    """A cache file was unreadable and is being rebuilt."""


def cache_dir() -> Path:
    """The convgap cache directory (created on first write, not here)."""
    if os.environ.get("CONVGAP_CACHE"):
        return Path(os.environ["CONVGAP_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "convgap"
    return Path.home() / ".cache" / "convgap"


def read_json(name: str) -> dict[str, Any]:
    """Contents of cache file ``name`` as a dict; ``{}`` if it is missing. A corrupt file
    (not JSON, or not a JSON object) gives a :class:`CacheWarning` naming it and ``{}``."""
    path = cache_dir() / name
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        warnings.warn(f"cannot read cache file {path} ({exc}); rebuilding it", CacheWarning, 2)
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        warnings.warn(f"cache file {path} is corrupt ({exc}); rebuilding it", CacheWarning, 2)
        return {}
    if not isinstance(data, dict):
        warnings.warn(f"cache file {path} is corrupt (not a JSON object); rebuilding it",
                      CacheWarning, 2)
        return {}
    return data


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Create ``path`` (and its folders) atomically: ``write(file)`` fills a temporary file
    (binary) in the same folder, which then replaces ``path`` in one rename, so readers and
    crashes see the old file or the whole new one, never part of it. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(name: str, data: dict[str, Any]) -> Path:
    """Write ``data`` to cache file ``name`` atomically; return its path."""
    text = json.dumps(data, indent=1, sort_keys=True).encode()
    return write_atomic(cache_dir() / name, lambda fh: fh.write(text))


@contextlib.contextmanager
def _locked(name: str):
    """An exclusive lock on cache file ``name`` across processes (where fcntl exists)."""
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: last writer wins
        yield
        return
    with open(directory / f"{name}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def update_json(name: str, change) -> Path:
    """Read cache file ``name``, apply ``change(dict) -> dict`` and write the result, under
    a lock, so concurrent processes merge their entries instead of dropping each other's."""
    with _locked(name):
        return write_json(name, change(read_json(name)))
