"""Atomic file and folder writes: a reader (or a resumed run) never sees half a file or half a folder, whatever
interrupts the writer.

Everything is written under a temporary name starting with ".tmp-" beside its destination, then renamed into place;
`remove_temporary_files` clears what an interrupted writer left behind.
"""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator, Union

PathLike = Union[str, os.PathLike]
TEMPORARY_PREFIX = ".tmp-"
FOLDER_EXISTS_POLICIES = ("replace", "keep", "raise")


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
    handle, temporary_path = tempfile.mkstemp(dir=folder, prefix=TEMPORARY_PREFIX, suffix=os.path.splitext(path)[1])
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


def replace_path(source: PathLike, destination: PathLike) -> None:
    """Renames the file or folder `source` to `destination`, replacing what is there.

    A file is replaced in one rename. A folder cannot be renamed over a non-empty one, so an existing `destination`
    folder is first renamed aside (to a ".tmp-" name in its parent folder), `source` takes its place and the old
    folder is deleted: `destination` is the old or the new folder, never a mix (and absent for the instant between
    the two renames).
    """
    source, destination = os.fspath(source), os.fspath(destination)
    if not (os.path.isdir(destination) and not os.path.islink(destination)):
        os.replace(source, destination)
        return
    parent = os.path.dirname(os.path.abspath(destination))
    aside = tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}old-{os.path.basename(destination)}-", dir=parent)
    os.replace(destination, os.path.join(aside, "old"))
    try:
        os.replace(source, destination)
    except BaseException:
        os.replace(os.path.join(aside, "old"), destination)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def atomic_folder_path(path: PathLike, if_exists: str = "replace") -> Iterator[str]:
    """Yields a new temporary folder beside `path`; when the block succeeds the folder becomes `path`.

    The temporary folder is deleted when the block raises.

    Args:
        path: the destination folder.
        if_exists: what to do when `path` exists once the block is done (e.g. written meanwhile by another
            process): "replace" it (see `replace_path`), "keep" it (the new folder is discarded) or "raise"
            `FileExistsError` (an empty folder is replaced in every case).

    Example:
        >>> with atomic_folder_path("converted") as temporary_path:
        ...     model.save_pretrained(temporary_path)
    """
    if if_exists not in FOLDER_EXISTS_POLICIES:
        raise ValueError(f"`if_exists` must be one of {list(FOLDER_EXISTS_POLICIES)}, got {if_exists!r}.")
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    temporary_path = tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{os.path.basename(path)}-", dir=parent)
    try:
        yield temporary_path
        os.chmod(temporary_path, 0o755)  # mkdtemp creates folders readable by the owner only
        if if_exists == "replace":
            replace_path(temporary_path, path)
        else:
            try:  # a rename onto a missing or empty folder; it fails on an occupied one
                os.rename(temporary_path, path)
            except OSError:
                if not (os.path.isdir(path) and os.listdir(path)):
                    raise
                if if_exists == "raise":
                    raise FileExistsError(f"{path!r} exists and is not empty.") from None
    finally:
        if os.path.exists(temporary_path):
            shutil.rmtree(temporary_path)


def remove_temporary_files(folder: PathLike) -> None:
    """Deletes the ".tmp-" files and folders that interrupted writers left directly inside `folder`."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if not name.startswith(TEMPORARY_PREFIX):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
