"""What the LM engine and the DiT worker share about stepping a batch of requests.

``isolate``: a batched step that raises is run again on halves of its members, down to single
members, so one member whose own work raises fails alone and its batch-mates go on."""

from __future__ import annotations

from typing import Callable, List, Sequence, TypeVar, Union

Member = TypeVar("Member")
Result = TypeVar("Result")


def isolate(run: Callable[[List[Member]], Sequence[Result]],
            members: Sequence[Member]) -> List[Union[Result, Exception]]:
    """``run(members)`` gives one result per member, computed together. When it raises, each half
    of the members runs again (recursively): a member whose run alone raises gets that exception
    as its entry, every other member its result (from a smaller batch, equal to float rounding)."""
    members = list(members)
    try:
        return list(run(members))
    except Exception as error:  # noqa: BLE001 - attributed to a member below
        if len(members) == 1:
            return [error]
    half = len(members) // 2
    return isolate(run, members[:half]) + isolate(run, members[half:])
