"""A small, deterministic fine-tune, so a checkpoint comparison (Mickus et al. 2022, §7) has a
fine-tuned checkpoint to compare without a download or a training framework.

`fine_tune` loads a Hugging Face directory (a bundled model's, or any local one), trains it
with torch's AdamW on one of two objectives that run on a CPU in minutes, and saves the
checkpoint where `load_model` boots it back as a TransformerLens model:

* ``token_classification``: a fresh linear head on the last hidden state predicts each word's
  label from its first word piece (the shipped POS data); the encoder is saved without it.
* ``masked_lm``: BERT's masked-language-model objective (15% of the ordinary tokens: 80%
  ``[MASK]``, 10% a random token, 10% kept) with the model's own head, which is fresh where
  the checkpoint ships none (MiniLM); the encoder and the head are saved.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from tl_decomp._core.results import Result

FineTuneTask = Literal["token_classification", "masked_lm"]
FINE_TUNE_TASKS: tuple[str, ...] = get_args(FineTuneTask)


@dataclass(frozen=True, repr=False)
class FineTuning(Result):
    """A finished fine-tune: where its checkpoint is and the training loss at each step.

    Attributes:
        path: the saved Hugging Face directory (`load` boots it).
        task: the objective (`FineTuneTask`).
        losses: the training loss of each step's batch, before that step's update.
        seed: the seed of the head's initialisation, the batch order, masking and dropout.
        n_examples: training sentences.
        classes: token classification's labels, in the head's order (empty for masked_lm).
    """

    path: str
    task: str
    losses: tuple[float, ...]
    seed: int
    n_examples: int
    classes: tuple[str, ...]

    def rows(self) -> list[dict[str, Any]]:
        """One record per step: ``step``, ``loss``."""
        return [{"step": k, "loss": v} for k, v in enumerate(self.losses)]

    def load(self, *, dtype: torch.dtype = torch.float32) -> Any:
        """The checkpoint booted as a `TransformerBridge` (`load_model` on `path`)."""
        from tl_decomp.models._load import load_model

        return load_model(self.path, dtype=dtype)


def fine_tune(
    source: str | os.PathLike[str],
    task: FineTuneTask,
    data: Any,
    *,
    out_dir: str | os.PathLike[str],
    steps: int = 100,
    batch_size: int = 16,
    lr: float = 1e-4,
    max_length: int = 48,
    seed: int = 0,
) -> FineTuning:
    """Fine-tune a model with AdamW for `steps` batches and save it to `out_dir`.

    Deterministic: the same arguments on the same machine and thread count give the same
    losses and weights (every random draw comes from `seed`; torch's global generator is
    restored afterwards). Gradients are clipped to norm 1.

    Args:
        source: a bundled model (``"minilm"``, ``"smollm2"``) or a local Hugging Face
            directory (with a fast tokenizer).
        task: ``"token_classification"`` (data: ``(words, labels)``, a list of sentences each
            a list of words and the parallel labels, e.g. `tl_decomp.datasets.load_pos`) or
            ``"masked_lm"`` (data: a list of texts; encoders with a mask token only).
        data: the training data, as `task` says.
        out_dir: a new or empty directory for the checkpoint.
        steps: optimiser steps; batches cycle through the data, reshuffled each pass.
        batch_size: sentences per step.
        lr: AdamW's learning rate (constant, no weight decay).
        max_length: tokens per sentence, specials included (longer ones are truncated).
        seed: see above.

    Raises:
        ValueError: an unknown task or model, data that does not fit the task, a
            non-positive size or rate, or an `out_dir` that is a file or not empty — all
            before the model is loaded.

    Example:
        >>> import tempfile
        >>> from tl_decomp.models import tiny_dir
        >>> texts = ["the cat sat on the mat .", "a dog ran and the cat sat ."]
        >>> run = fine_tune(tiny_dir("bert"), "masked_lm", texts, steps=3, batch_size=2,
        ...                 out_dir=tempfile.mkdtemp())
        >>> len(run.losses), run.load().cfg.n_layers
        (3, 3)
    """
    from transformers import AutoTokenizer

    if task not in FINE_TUNE_TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {FINE_TUNE_TASKS}")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 3:
        raise ValueError(f"max_length must be an int of at least 3, got {max_length!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    path = _source_dir(source)
    out = _check_out(out_dir)
    texts, labels = _check_data(task, data)
    tok = AutoTokenizer.from_pretrained(str(path))
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{path} has no fast tokenizer (word alignment needs one)")
    classes = tuple(sorted({str(x) for s in labels for x in s})) if labels else ()
    if task == "token_classification" and len(classes) < 2:
        raise ValueError(f"a single class {classes!r}: token classification needs two or more")
    if task == "masked_lm" and tok.mask_token_id is None:
        raise ValueError(f"{path}'s tokenizer has no mask token: masked_lm needs an encoder")

    # fork_rng: the caller's random state is left as it was.
    with _quiet(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        plan = _Plan(steps, batch_size, float(lr), max_length, gen)
        if task == "token_classification":
            model, losses = _train_tokens(path, tok, texts, labels, classes, plan)
        else:
            model, losses = _train_mlm(path, tok, texts, plan)
        out.mkdir(exist_ok=True)
        model.eval().save_pretrained(str(out))
        tok.save_pretrained(str(out))
    return FineTuning(str(out), task, tuple(losses), seed, len(texts), classes)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' load report (a fresh head's "newly initialized" weights are the point
    here) and progress bars, silenced for the call only."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _source_dir(source: str | os.PathLike[str]) -> Path:
    from tl_decomp.models._load import _ALIASES, bundled_dir

    key = str(source).strip().lower()
    if key in _ALIASES:
        return bundled_dir(key)
    path = Path(source)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{source!r} is neither a bundled model (minilm, smollm2) nor a Hugging Face "
            "directory (no config.json)"
        )
    return path


def _check_out(out_dir: str | os.PathLike[str]) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out_dir {out} must be a new or empty directory")
    if not out.parent.is_dir():
        raise ValueError(f"out_dir {out}: no directory {out.parent}")
    return out


def _check_data(task: str, data: Any) -> tuple[list[Any], list[tuple[Hashable, ...]]]:
    if task == "masked_lm":
        if isinstance(data, str) or not isinstance(data, Sequence) or not data:
            raise ValueError("masked_lm needs a non-empty list of texts")
        if any(not isinstance(t, str) or not t.strip() for t in data):
            raise ValueError("masked_lm needs texts: every item a non-empty str")
        return list(data), []
    try:
        words, labels = data
    except (TypeError, ValueError):
        raise ValueError("token_classification needs a (words, labels) pair") from None
    if not len(words) or len(words) != len(labels):
        raise ValueError(f"{len(words)} sentences of words but {len(labels)} of labels")
    for k, (ws, ls) in enumerate(zip(words, labels, strict=True)):
        if isinstance(ws, str) or len(ws) != len(ls) or not len(ws):
            raise ValueError(f"sentence {k}: give a non-empty list of words and one label each")
        if any(not isinstance(w, str) or not w.strip() for w in ws):
            raise ValueError(f"sentence {k} has an empty or non-string word")
    return [list(ws) for ws in words], [tuple(ls) for ls in labels]


@dataclass(frozen=True)
class _Plan:
    steps: int
    batch_size: int
    lr: float
    max_length: int
    gen: torch.Generator

    def batches(self, n: int) -> Iterator[list[int]]:
        """`steps` index batches, cycling through a fresh permutation of ``range(n)``."""
        order: list[int] = []
        for _ in range(self.steps):
            while len(order) < self.batch_size:
                order += torch.randperm(n, generator=self.gen).tolist()
            yield order[: self.batch_size]
            order = order[self.batch_size :]


def _optimise(model, head, plan: _Plan, n: int, loss_of) -> list[float]:
    params = [p for m in (model, head) if m is not None for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.0)
    model.train()
    losses = []
    for index in plan.batches(n):
        loss = loss_of(index)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _train_tokens(path, tok, words, labels, classes, plan: _Plan):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path)).float()
    head = torch.nn.Linear(model.config.hidden_size, len(classes))
    ids = {c: k for k, c in enumerate(classes)}

    def loss_of(index: list[int]) -> Tensor:
        enc = tok([words[i] for i in index], is_split_into_words=True, truncation=True,
                  max_length=plan.max_length, padding=True, return_tensors="pt")  # fmt: skip
        target = torch.full(enc["input_ids"].shape, -100)
        for b, i in enumerate(index):  # each word's first piece carries its label
            seen = set()
            for p, w in enumerate(enc.word_ids(b)):
                if w is not None and w not in seen:
                    seen.add(w)
                    target[b, p] = ids[str(labels[i][w])]
        hidden = model(**enc).last_hidden_state
        return torch.nn.functional.cross_entropy(head(hidden).flatten(0, 1), target.flatten())

    return model, _optimise(model, head, plan, len(words), loss_of)


def _train_mlm(path, tok, texts, plan: _Plan):
    from transformers import AutoModelForMaskedLM

    try:
        model = AutoModelForMaskedLM.from_pretrained(str(path)).float()
    except ValueError as err:  # a decoder's config has no masked-LM class
        raise ValueError(f"masked_lm needs an encoder with a masked-LM class: {err}") from err
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    head = getattr(model, "cls", None)  # BERT's head module, on the last hidden state

    def loss_of(index: list[int]) -> Tensor:
        enc = tok([texts[i] for i in index], truncation=True, max_length=plan.max_length,
                  padding=True, return_tensors="pt")  # fmt: skip
        inputs, target = _mask_tokens(enc["input_ids"], special, tok, plan.gen)
        if head is None:
            logits = model(**{**enc, "input_ids": inputs}).logits
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
        # The head on the targets only: the vocabulary-wide logits of every position would
        # cost more than the encoder.
        hidden = model.base_model(**{**enc, "input_ids": inputs}).last_hidden_state
        keep = target != -100
        return torch.nn.functional.cross_entropy(head(hidden[keep]), target[keep])

    return model, _optimise(model, None, plan, len(texts), loss_of)


def _mask_tokens(ids: Tensor, special: Tensor, tok: Any, gen: torch.Generator):
    """BERT's corruption: 15% of the ordinary tokens (at least one per text) are targets;
    of those 80% become the mask token, 10% a random token, 10% stay."""
    ordinary = ~torch.isin(ids, special)
    draw = torch.rand(ids.shape, generator=gen)
    chosen = ordinary & (draw < 0.15)
    # A text with no draw under 0.15 gets its lowest-draw ordinary token, so no row is empty.
    lowest = torch.where(ordinary, draw, 2.0).argmin(1)
    rows = ordinary.any(1)
    chosen[rows.nonzero().flatten(), lowest[rows]] = True
    target = torch.where(chosen, ids, -100)
    kind = torch.rand(ids.shape, generator=gen)
    random_ids = torch.randint(len(tok), ids.shape, generator=gen)
    inputs = torch.where(chosen & (kind < 0.8), tok.mask_token_id, ids)
    inputs = torch.where(chosen & (kind >= 0.8) & (kind < 0.9), random_ids, inputs)
    return inputs, target


__all__ = ["FINE_TUNE_TASKS", "FineTuneTask", "FineTuning", "fine_tune"]
