"""Torch's intra-op thread count, switched off for work that threads only synchronise.

The count is process-wide, so one counted switch serves every caller: the first in saves it,
the last out restores it, whichever threads they run on (two independent switches could
leave torch on one thread).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_LOCK = threading.Lock()
_USERS, _SAVED = 0, 1


@contextlib.contextmanager
def serial() -> Iterator[None]:
    """Intra-op threads off for the duration (restored after, even on error).

    For batches of small factorisations (effective attention's projections, HTA's spectral
    norms): measured on a busy 2-core machine, 10-100x slower with two threads.
    """
    global _USERS, _SAVED
    with _LOCK:
        if _USERS == 0:
            _SAVED = torch.get_num_threads()
            torch.set_num_threads(1)
        _USERS += 1
    try:
        yield
    finally:
        with _LOCK:
            _USERS -= 1
            if _USERS == 0:
                torch.set_num_threads(_SAVED)


__all__ = ["serial"]
