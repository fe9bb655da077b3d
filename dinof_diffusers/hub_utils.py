"""Local folders and Hugging Face Hub repositories: the one rule that tells them apart, and reading either.

The rule (used by `DiNofPipeline.from_pretrained`, train.py's `--pretrained_model_name_or_path`, sample.py's and
evaluate.py's `--pipeline` and evaluate.py's `--reference`): a name is a local path if it exists, is absolute, starts
with "." or "~", has more than one "/", or is "folder/name" where "folder" is an existing local folder (a mistyped
"outputs/pipline" is a missing folder, not a repository of the user "outputs"); any other name is a Hub repository id
("name" or "org/name"). So a missing folder given as a path is reported as a missing folder, never sent to the Hub.

A Hub repository that cannot be read (offline and not in the cache, no such repository or revision, no connection) is
an `OSError` saying "offline / not found", whatever huggingface_hub raised.
"""

import os
from typing import Optional, Union

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
)

# What huggingface_hub raises when a repository cannot be read. LocalEntryNotFoundError ("offline and not in the
# cache") is a subclass of EntryNotFoundError, like RemoteEntryNotFoundError ("the repository has no such file"):
# only the latter says that a file is absent.
_UNREACHABLE = (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled)


def is_local_path(name_or_path: Union[str, os.PathLike]) -> bool:
    """Whether `name_or_path` names a local path rather than a Hub repository id (see the module's rule)."""
    name = os.fspath(name_or_path)
    if os.path.exists(name) or os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1:
        return True
    return "/" in name and os.path.isdir(name.split("/")[0])


def hub_unreachable_error(repo_id: str, error: BaseException) -> OSError:
    """The error for a Hub repository that cannot be read, naming it and what huggingface_hub said."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return OSError(
        f"{repo_id!r} is not a local folder, and the Hub repository {repo_id!r} cannot be read (offline / not found): "
        f"{detail}"
    )


def local_folder(name_or_path: Union[str, os.PathLike], **download_kwargs) -> str:
    """A local folder as it is, or the local snapshot of a Hub repository (`huggingface_hub.snapshot_download` with
    `download_kwargs`; `HF_HUB_OFFLINE=1` is honoured).

    Raises:
        FileNotFoundError: a local path (by the module's rule) that is not a folder; the Hub is not tried.
        OSError: the Hub repository cannot be read ("offline / not found").
    """
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return path
    if is_local_path(path):
        state = " (it is a file)" if os.path.exists(path) else ""
        raise FileNotFoundError(f"No such folder: {path!r}{state}. A Hub repository id is 'org/name'.")
    try:
        return snapshot_download(path, **download_kwargs)
    except _UNREACHABLE as error:
        raise hub_unreachable_error(path, error) from error


def model_file(
    name_or_path: str, filename: str, revision: Optional[str] = None, cache_dir: Optional[str] = None
) -> Optional[str]:
    """The local path of `filename` (e.g. "unet/config.json") in a model folder or Hub repository; `None` if absent.

    A Hub file is downloaded (or found in the cache; `HF_HUB_OFFLINE=1` is honoured).

    Raises:
        OSError: the repository cannot be read: offline and not in the cache, no such repository or revision, no
            connection ("offline / not found"); only a file the repository does not have is `None`.
    """
    if is_local_path(name_or_path):
        path = os.path.join(name_or_path, filename)
        return path if os.path.isfile(path) else None
    try:
        return hf_hub_download(name_or_path, filename, revision=revision, cache_dir=cache_dir)
    except RemoteEntryNotFoundError:
        return None
    except _UNREACHABLE as error:
        raise hub_unreachable_error(name_or_path, error) from error
