"""Atomic file and folder writes: a reader (or a resumed run) never sees half a file or half a folder, whatever
interrupts the writer.

Everything is written under a temporary name starting with ".tmp-" beside its destination, then renamed into place;
`remove_temporary_files` clears what an interrupted writer left behind. A folder that also holds other things (a
pipeline beside its checkpoints) is updated with `swap_folder_contents`, which `finish_interrupted_swap` completes
after a kill. Disk-full errors and unwritable output folders get messages that name the path and the free space.
"""

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]
TEMPORARY_PREFIX = ".tmp-"
FOLDER_EXISTS_POLICIES = ("replace", "keep", "raise")
# `swap_folder_contents`: the complete new contents while they are moved in, and the old contents they replace. Not
# ".tmp-" names: `remove_temporary_files` must not delete a complete new version before the swap is finished.
SWAP_NEW = ".swap-new"
SWAP_OLD = ".swap-old"
_SWAP_REMOVE_LIST = ".remove"  # inside SWAP_NEW: the names of `remove`, one a line
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


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
        if name.startswith(TEMPORARY_PREFIX):
            _remove(os.path.join(folder, name))


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` is an `OSError` for a full disk or an exhausted quota."""
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def free_space_message(path: PathLike) -> str:
    """ "<free> GiB free on the file system of <path>" (of its nearest existing parent folder)."""
    folder = os.path.abspath(os.fspath(path))
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        free = f"{shutil.disk_usage(folder).free / 2**30:.2f} GiB free"
    except OSError:
        free = "free space unknown"
    return f"{free} on the file system of {folder}"


def check_writable_folder(path: PathLike, name: str) -> str:
    """Creates the folder `path` if needed and checks that a file can be written in it; returns its absolute path.

    Args:
        path: the folder.
        name: what to call it in the error (a flag such as "--output_dir", or an argument name).

    Raises:
        ValueError: `path` is a file, or the folder cannot be created or written to (the message names `name`).
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{name} {path!r} is a file, not a folder.")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=TEMPORARY_PREFIX):
            pass
    except OSError as error:
        reason = free_space_message(path) if is_disk_full(error) else error.strerror or str(error)
        raise ValueError(f"{name} {path!r} cannot be written to: {reason}.") from None
    return path


def swap_folder_contents(staging: PathLike, folder: PathLike, commit_name: str, remove: Iterable[str] = ()) -> None:
    """Replaces entries of `folder` by the complete contents of `staging`, safe against a kill at any moment.

    A folder holding other things as well (a pipeline beside its training checkpoints) cannot be swapped in one
    rename. Instead, the file `commit_name` (e.g. "model_index.json", what makes the folder a pipeline) commits the
    swap:

    1. `staging`, with the list of the entries named in `remove` that it lacks (stale parts of the old contents), is
       renamed to `folder/.swap-new`: from here on the new contents are complete, and the swap is decided;
       `finish_interrupted_swap` completes it after a kill.
    2. every other entry of `.swap-new` replaces its namesake in `folder`, which is first moved into `folder/.swap-old`;
       the stale entries are moved there too.
    3. `commit_name` replaces the folder's in one rename (`os.replace`): the swap is done.
    4. `.swap-old` and the empty `.swap-new` are deleted.

    Until step 3 the old `commit_name` stays in place; a reader that finds a `.swap-new` holding a `commit_name` must
    call `finish_interrupted_swap` first (`DiNofPipeline.from_pretrained` does). A kill before step 1 leaves the old
    contents untouched (and `staging`, for `remove_temporary_files`).

    Args:
        staging: a complete new version, holding `commit_name`, on the file system of `folder` (e.g. a ".tmp-" folder
            inside it).
        folder: the folder to update.
        commit_name: the entry that is moved last.
        remove: entries of the old contents to delete if the new contents do not replace them.
    """
    if not os.path.isfile(os.path.join(staging, commit_name)):
        raise ValueError(f"{os.fspath(staging)!r} holds no {commit_name!r}: it is not a complete new version.")
    stale = [name for name in remove if not os.path.lexists(os.path.join(staging, name)) and name != commit_name]
    with open(os.path.join(staging, _SWAP_REMOVE_LIST), "w") as handle:  # for a finish after a kill
        handle.write("".join(f"{name}\n" for name in stale))
    finish_interrupted_swap(folder, commit_name)  # an earlier swap into this folder that was killed midway
    os.replace(staging, os.path.join(folder, SWAP_NEW))
    _complete_swap(folder, commit_name)


def finish_interrupted_swap(folder: PathLike, commit_name: str) -> Optional[str]:
    """Completes a `swap_folder_contents` into `folder` that was killed midway; does nothing if there is none.

    Returns:
        `None` if there was nothing to finish, else a sentence saying what was done.

    Raises:
        OSError: the swap could not be completed (e.g. the folder is read-only).
    """
    new = os.path.join(folder, SWAP_NEW)
    if not os.path.lexists(new) and not os.path.lexists(os.path.join(folder, SWAP_OLD)):
        return None
    committed = not os.path.lexists(os.path.join(new, commit_name))
    _complete_swap(folder, commit_name)
    if committed:
        return f"removed the leftovers of a completed update of {os.fspath(folder)!r}"
    return f"completed an update of {os.fspath(folder)!r} that was interrupted (the new version is in place)"


def _complete_swap(folder: PathLike, commit_name: str) -> None:
    """Steps 2 to 4 of `swap_folder_contents`; each step is repeatable, so that a second call finishes a killed one."""
    new, old = os.path.join(folder, SWAP_NEW), os.path.join(folder, SWAP_OLD)
    if os.path.lexists(os.path.join(new, commit_name)):  # not committed yet
        os.makedirs(old, exist_ok=True)
        remove = []
        if os.path.isfile(os.path.join(new, _SWAP_REMOVE_LIST)):
            with open(os.path.join(new, _SWAP_REMOVE_LIST)) as handle:
                remove = handle.read().splitlines()
        incoming = sorted(name for name in os.listdir(new) if name not in (commit_name, _SWAP_REMOVE_LIST))
        for name in incoming + remove:
            current, aside = os.path.join(folder, name), os.path.join(old, name)
            if os.path.lexists(current):
                _remove(aside)  # left by an earlier attempt: an older version still
                os.replace(current, aside)
            if name in incoming:
                os.replace(os.path.join(new, name), current)
        os.replace(os.path.join(new, commit_name), os.path.join(folder, commit_name))  # the commit
    _remove(old)
    _remove(new)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
