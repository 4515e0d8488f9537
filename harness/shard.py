"""--shard I/N: which planned cells one shard of a matrix runs, the same on every machine."""

from __future__ import annotations

from collections.abc import Sequence


def parse_shard(text: str) -> list[int]:
    """'I/N' -> [I, N], with 0 <= I < N; ValueError with the reason otherwise."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise ValueError(f"{text!r} is not I/N (e.g. 0/4)") from None
    if not sep or n < 1 or not 0 <= i < n:
        raise ValueError(f"{text!r}: need 0 <= I < N, e.g. 0/4 ... 3/4")
    return [i, n]


def in_shard(cells: Sequence, shard: Sequence[int] | None) -> list:
    """The cells of shard [I, N]: (task, repeat) groups dealt round-robin in plan order.

    A group holds every backend of one repeat of one task, so backends compared within a
    repeat always ran on the same machine, at about the same time; dealing single cells
    would, with N a multiple of the backend count, put each backend on its own machine.
    """
    if not shard:
        return list(cells)
    index, count = shard
    groups: dict[tuple, int] = {}
    chosen = []
    for cell in cells:
        group = groups.setdefault((cell.task, cell.repeat), len(groups))
        if group % count == index:
            chosen.append(cell)
    return chosen
