"""Local folders and Hugging Face Hub repositories: the one rule that tells them apart, and reading a file of either.

The rule (used by `DiNofPipeline.from_pretrained`, train.py's `--pretrained_model_name_or_path` and evaluate.py's
`--pipeline` / `--reference`): a name is a local path if it exists, is absolute, starts with "." or "~", or has more
than one "/"; any other name is a Hub repository id ("name" or "org/name"). So a missing folder given as a path is
reported as a missing folder, never sent to the Hub as a repository id.
"""

import os
from typing import Optional, Union

from huggingface_hub import hf_hub_download
from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError


def is_local_path(name_or_path: Union[str, os.PathLike]) -> bool:
    """Whether `name_or_path` names a local path rather than a Hub repository id (see the module's rule)."""
    name = os.fspath(name_or_path)
    return os.path.exists(name) or os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def model_file(
    name_or_path: str, filename: str, revision: Optional[str] = None, cache_dir: Optional[str] = None
) -> Optional[str]:
    """The local path of `filename` (e.g. "unet/config.json") in a model folder or Hub repository; `None` if absent.

    A Hub file is downloaded (or found in the cache; `HF_HUB_OFFLINE=1` is honoured).

    Raises:
        OSError: the repository cannot be reached or does not exist, or (offline) the file is not in the cache.
    """
    if is_local_path(name_or_path):
        path = os.path.join(name_or_path, filename)
        return path if os.path.isfile(path) else None
    try:
        return hf_hub_download(name_or_path, filename, revision=revision, cache_dir=cache_dir)
    except LocalEntryNotFoundError:  # offline and not cached: unknown, not absent
        raise
    except EntryNotFoundError:
        return None
