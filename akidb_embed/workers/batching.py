"""Group the texts of all waiting requests into forward passes of similar length."""
from __future__ import annotations

from typing import NamedTuple


class Slot(NamedTuple):  # a tuple: hashed and built in C (a dict key per text in every pass)
    job: int    # index of the request in the drained list
    row: int    # index of the text within that request


def plan_groups(lengths: list[tuple[Slot, int]], max_batch_size: int, max_batch_tokens: int) -> list[list[Slot]]:
    """Sort texts by token length and cut them into groups.

    A group's cost is ``longest * count`` (everything is padded to the longest text), kept at or
    under ``max_batch_tokens``; a group never holds more than ``max_batch_size`` texts. Sorting
    first keeps padding waste small, and puts short requests' texts in the first passes so they
    are answered first.
    """
    order = sorted(lengths, key=lambda item: item[1])
    groups: list[list[Slot]] = []
    current: list[Slot] = []
    longest = 0
    for slot, length in order:
        longest_if_added = max(longest, length)
        if current and (len(current) >= max_batch_size or longest_if_added * (len(current) + 1) > max_batch_tokens):
            groups.append(current)
            current, longest_if_added = [], length
        current.append(slot)
        longest = longest_if_added
    if current:
        groups.append(current)
    return groups
