"""Atomic file writes (a kill never leaves a half-written result, checkpoint or cache entry)
and source digests (editing a generator or extractor invalidates what it made)."""

from __future__ import annotations

import hashlib
import inspect
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from comodal.errors import ConfigError


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same directory, then rename over ``path``."""
    path = Path(path)
    try:  # a read-only directory, or a file where a directory should be
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {err.strerror or err}") from err
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def file_stamp(path: Path) -> str:
    """A file's resolved path, size and modification time: what a fingerprint of data read
    from it records, so that replacing the file changes the fingerprint."""
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def source_digest(obj: object) -> str:
    """Digest of an extractor's source code, so that editing it invalidates cached features."""
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]
