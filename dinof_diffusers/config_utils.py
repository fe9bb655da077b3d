"""diffusers configurations as plain data."""

from typing import Any, Dict, Mapping


def public_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """A diffusers config (`model.config`, `scheduler.config`, a loaded config.json) as a plain dict, without its
    private `_*` entries (`_class_name`, `_diffusers_version`, ...)."""
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}
