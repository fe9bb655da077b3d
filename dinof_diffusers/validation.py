"""Argument checks shared by the package and its scripts: one wording for every "must be" error.

Each check returns the value when it is valid and raises `ValueError` naming the argument and what is allowed
otherwise. A name starting with "-" is a command-line flag and is shown as is (`--resolution`); any other name is a
Python argument and is shown in backticks (`batch_size`).
"""

import math
import numbers
from typing import Any, Collection, Optional, Tuple


def _display(name: str) -> str:
    return name if name.startswith("-") else f"`{name}`"


def check_int(value: Any, name: str, minimum: int = 1, allow_none: bool = False) -> Optional[int]:
    """An integer (not a bool) >= `minimum`, or `None` when `allow_none`; returned as a Python `int`.

    NumPy integers are integers too (as everywhere in diffusers): `np.int64(4)` passes and comes back as `4`.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        expected = f"{'None or ' if allow_none else ''}an integer >= {minimum}"
        raise ValueError(f"{_display(name)} must be {expected}, got {value!r}.")
    return int(value)


def check_positive_int(value: Any, name: str, allow_none: bool = False) -> Optional[int]:
    """An integer >= 1, or `None` when `allow_none`."""
    return check_int(value, name, minimum=1, allow_none=allow_none)


def check_choice(value: Any, name: str, choices: Collection) -> Any:
    """One of `choices`."""
    if value not in choices:
        raise ValueError(f"{_display(name)} must be one of {list(choices)}, got {value!r}.")
    return value


def check_number(
    value: Any,
    name: str,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
    allow_none: bool = False,
) -> Optional[float]:
    """A finite real number (not a bool; NumPy numbers included) within the given bounds, or `None` when `allow_none`.

    Example: `check_number(flow_start, "flow_start", 0.0, 1.0, exclusive_minimum=True)` accepts (0, 1].
    """
    if value is None and allow_none:
        return None
    valid = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(float(value))
    if valid and minimum is not None:
        valid = value > minimum if exclusive_minimum else value >= minimum
    if valid and maximum is not None:
        valid = value < maximum if exclusive_maximum else value <= maximum
    if not valid:
        if minimum is not None and maximum is not None:
            bounds = f" in {'(' if exclusive_minimum else '['}{minimum}, {maximum}{')' if exclusive_maximum else ']'}"
        elif minimum is not None:
            bounds = f" {'>' if exclusive_minimum else '>='} {minimum}"
        elif maximum is not None:
            bounds = f" {'<' if exclusive_maximum else '<='} {maximum}"
        else:
            bounds = ""
        expected = f"{'None or ' if allow_none else ''}a finite number{bounds}"
        raise ValueError(f"{_display(name)} must be {expected}, got {value!r}.")
    return value


def check_size_pair(value: Any, name: str = "sample_size") -> Tuple[int, int]:
    """An image size: a positive integer (square) or a (height, width) pair of them; returns (height, width)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{_display(name)} must be an int or a (height, width) pair, got {value!r}.")
        return check_positive_int(value[0], name), check_positive_int(value[1], name)
    size = check_positive_int(value, name)
    return size, size


def check_range_pair(value: Any, name: str = "data_range") -> Tuple[float, float]:
    """A finite (low, high) pair with high > low; returns it as floats."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{_display(name)} must be a (low, high) pair, got {value!r}.")
    low, high = (float(v) for v in value)
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise ValueError(f"{_display(name)} must be a finite (low, high) pair with high > low, got {value!r}.")
    return low, high


def check_generators(generator: Any, batch_size: int) -> None:
    """A list of generators (`randn_tensor`'s per-sample form) must hold exactly one per sample."""
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(f"`generator` is a list of {len(generator)} generators, but `batch_size` is {batch_size}.")


def check_temperature(value: Any) -> float:
    """A sampling temperature tau: a finite number > 0; returned as a float."""
    return float(check_number(value, "temperature", minimum=0.0, exclusive_minimum=True))


def check_sample_arguments(batch_size: Any, generator: Any, temperature: Any) -> float:
    """The arguments of a prior's `sample(batch_size, generator, temperature)`; returns the temperature as a float."""
    check_positive_int(batch_size, "batch_size")
    check_generators(generator, batch_size)
    return check_temperature(temperature)
