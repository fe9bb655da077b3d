"""Whole batches shared out across the processes of `accelerate launch` (one plain process works the same way).

The work of an evaluation is a list of independent batches, each with its own seed (`batch_seed`), so that a batch's
result does not depend on which process computes it, nor on how many there are. `run_sharded_batches` deals the
batches out round-robin and, after every round, gathers the round's per-batch records on every process: the main
process writes them down (a manifest, a progress bar counting every process's work); per-batch results
(a likelihood's per-image bits/dim) are gathered exactly the same way. `run_on_main_process` runs a step
that must happen once (preparing a folder, fetching a reference) on the main process and hands its result, or its
error, to every process.

Both work on accelerate's `PartialState` (the process group `accelerate launch` sets up; a single process otherwise).
"""

from typing import Any, Callable, Dict, Optional, Sequence, TypeVar

from .errors import EvaluationError

Result = TypeVar("Result")


def process_state(state=None):
    """`state`, or accelerate's `PartialState` (the launched process group, or one plain process)."""
    if state is not None:
        return state
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # `accelerate launch --cpu` says so through the environment, which only AcceleratorState reads by itself.
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def run_on_main_process(function: Callable[[], Result], state=None) -> Result:
    """Runs `function()` on the main process only and returns its result on every process.

    If it raises on the main process, it raises there and every other process raises an `EvaluationError` with the
    same message, instead of waiting forever for a result that will not come.

    Args:
        function: called without arguments; its result must be picklable.
        state: an accelerate `PartialState`; default the current one.
    """
    state = process_state(state)
    if state.num_processes == 1:
        return function()
    from accelerate.utils import broadcast_object_list

    payload, error = [None, None], None
    if state.is_main_process:
        try:
            payload[0] = function()
        except Exception as caught:
            error, payload[1] = caught, _describe(caught)
    broadcast_object_list(payload)
    if error is not None:
        raise error
    if payload[1] is not None:
        raise EvaluationError(f"The main process stopped: {payload[1]}")
    return payload[0]


def run_sharded_batches(
    batch_indices: Sequence[int],
    run_batch: Callable[[int], Any],
    state=None,
    on_round: Optional[Callable[[Dict[int, Any]], None]] = None,
) -> Dict[int, Any]:
    """Runs `run_batch(index)` for every index, the indices dealt out round-robin over the processes.

    In round r, process p runs `batch_indices[r * P + p]` (P processes; in the last round some may have nothing to
    do). After every round the records the round's batches returned are gathered on every process (one collective
    per round), so `on_round` sees the same records everywhere: the main process can write them down and count
    every process's work. A batch that raises stops every process at the end of that round: the failing process
    raises its own exception, the others an `EvaluationError` naming the process, the batch and the message.

    Args:
        batch_indices: the batches to run (every process must pass the same list).
        run_batch: `index -> record`; the record must be picklable (e.g. JSON data).
        state: an accelerate `PartialState`; default the current one.
        on_round: called on every process after every round with `{index: record}` of that round's batches.

    Returns:
        `{index: record}` of every batch, the same on every process.
    """
    state = process_state(state)
    num_processes, rank = state.num_processes, state.process_index
    indices = list(batch_indices)
    records: Dict[int, Any] = {}
    for start in range(0, len(indices), num_processes):
        position = start + rank
        index = indices[position] if position < len(indices) else None
        if num_processes == 1:
            gathered = [(index, run_batch(index), None)]
        else:
            from accelerate.utils import gather_object

            outcome, failure = (index, None, None), None
            if index is not None:
                try:
                    outcome = (index, run_batch(index), None)
                except Exception as error:
                    outcome, failure = (index, None, _describe(error)), error
            gathered = gather_object([outcome])  # rank order, on every process
            if failure is not None:
                raise failure
            for process, (failed_index, _, message) in enumerate(gathered):
                if message is not None:
                    raise EvaluationError(f"Process {process} stopped at batch {failed_index}: {message}")
        round_records = {index: record for index, record, _ in gathered if index is not None}
        records.update(round_records)
        if on_round is not None:
            on_round(round_records)
    return records
