"""Atomic file writes: a reader (or a resumed run) never sees half a file, whatever interrupts the writer."""

import json
import os
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator, Union

PathLike = Union[str, os.PathLike]


@contextmanager
def atomic_write_path(path: PathLike) -> Iterator[str]:
    """Yields a temporary path in `path`'s folder; when the block succeeds the file there replaces `path`.

    The temporary file is removed when the block raises. Its name starts with ".tmp-", and it keeps `path`'s
    extension so that writers which infer the format from it (PIL) still work.

    Example:
        >>> with atomic_write_path("samples.png") as temporary_path:
        ...     image.save(temporary_path)
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary_path = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(handle)
    try:
        yield temporary_path
        # mkstemp creates files readable by the owner only; give the result the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary_path, 0o666 & ~umask)
        os.replace(temporary_path, path)
    finally:
        if os.path.exists(temporary_path):
            os.remove(temporary_path)


def write_json_atomically(data: Any, path: PathLike) -> None:
    """Writes `data` as indented JSON (keys sorted) to `path`, atomically."""
    with atomic_write_path(path) as temporary_path:
        with open(temporary_path, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")


def write_text_atomically(text: str, path: PathLike) -> None:
    """Writes `text` to `path`, atomically."""
    with atomic_write_path(path) as temporary_path:
        with open(temporary_path, "w", encoding="utf-8") as handle:
            handle.write(text)
