"""Run state held per model: one hooked run at a time, dropout off for its duration.

A leaf module, so the readers (which run the model once to measure its layout) and the runner
share it without importing each other.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()
_HELD = threading.local()  # ids of the models this thread holds: our own hooks may be on them


def user_hooks(model: Any) -> list[str]:
    """Hook points carrying a hook added through TransformerLens (``add_hook``, an open
    ``model.hooks(...)``); permanent hooks are the model's own (a bridge registers some)."""
    return [
        name
        for name, hp in getattr(model, "hook_dict", {}).items()
        if any(not h.is_permanent for h in (*hp.fwd_hooks, *hp.bwd_hooks))
    ]


def check_no_user_hooks(model: Any) -> None:
    """Refuse a model carrying hooks of the caller's: every identity tl_decomp checks assumes
    the model's own forward pass (a hook scaling ``hook_z`` would be decomposed as if it were
    the model; one on the residual stream breaks the sum). Skipped inside our own runs."""
    if id(model) in getattr(_HELD, "ids", ()):
        return
    names = user_hooks(model)
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ValueError(
            f"the model carries hooks of yours on {shown}: tl_decomp analyses the model's own "
            "forward pass; remove them first (model.reset_hooks(), or leave the "
            "`with model.hooks(...)` block)"
        )


@contextlib.contextmanager
def exclusive(model: Any) -> Iterator[None]:
    """Hold `model` for one hooked run. TransformerLens's hooks belong to the model, not to a
    call: two threads running one model would each cache the other's activations (measured:
    results carrying another thread's text). Re-entrant, so nested runs in one thread pass.
    The outermost hold refuses hooks the caller left on the model (`check_no_user_hooks`)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(model, threading.RLock())
    with lock:
        held = _HELD.__dict__.setdefault("ids", set())
        outer = id(model) not in held
        if outer:
            check_no_user_hooks(model)
            held.add(id(model))
        try:
            yield
        finally:
            if outer:
                held.discard(id(model))


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


@functools.cache
def load_forward_ad() -> None:
    """Import what ``torch.func.jvp`` imports on its first call, with its one warning off:
    torch scripts its forward-AD decompositions with ``torch.jit.script``, which warns that
    it is deprecated 18 times (torch's doing, not the caller's). Once per process."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.script` is deprecated", category=DeprecationWarning
        )
        with contextlib.suppress(ImportError):  # a torch that has no such module warns not
            importlib.import_module("torch._decomp.decompositions_for_jvp")
