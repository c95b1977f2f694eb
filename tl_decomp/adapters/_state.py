"""Run state held per model: one hooked run at a time, dropout off for its duration.

A leaf module, so the readers (which run the model once to measure its layout) and the runner
share it without importing each other.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any

_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def exclusive(model: Any) -> Iterator[None]:
    """Hold `model` for one hooked run. TransformerLens's hooks belong to the model, not to a
    call: two threads running one model would each cache the other's activations (measured:
    results carrying another thread's text). Re-entrant, so nested runs in one thread pass."""
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(model, threading.RLock())
    with lock:
        yield


@contextlib.contextmanager
def evaluating(model: Any) -> Iterator[None]:
    """Dropout off for the duration: every analysis reads one deterministic forward pass (in
    train mode dropout breaks every sum and identity). Each module's own `training` flag is
    restored afterwards, even when the call raises."""
    with exclusive(model):
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training
