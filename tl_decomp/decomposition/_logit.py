"""Direct logit attribution of a decomposition, and the decomposed logit lens.

For the final embedding (what the unembedding reads) each factor's logit is ``f_k · W_U[:, t]``
and the factors' logits plus ``b_U[t]`` sum to the unembedding's own output for token ``t``.
For any earlier layer of a pre-LN model, the factors are first carried through the final norm
with *that layer's own* mean and scale (the logit lens: ``unembed(ln_final(resid_l))``,
TransformerLens's ``accumulated_resid(apply_ln=True)``), so they sum exactly to the lens's
logits: the linearisation of the lens at that layer, not the model's output.

The target is the unembedding's output, before anything a model applies to logits after it
(Gemma-2's soft-capping, Granite's logit scaling); each result carries its measured error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_decomp import adapters
from tl_decomp._core import checks
from tl_decomp._core.results import Result


@dataclass(frozen=True, repr=False)
class LogitAttribution(Result):
    """``values.sum(0) == logits`` up to `max_abs_error`; ``labels[k]`` names ``values[k]``.

    Attributes:
        values: each factor's logit (or logit difference) ``[factor batch pos]``; the last row
            is the unembedding bias ``b_U`` where the model has one.
        labels: the decomposition's labels (plus ``b_U``).
        logits: the unembedding's own logit (difference) at that layer ``[batch pos]``: the
            model's (final embedding) or the logit lens's (earlier layers).
        lens: True when this is the logit lens at a block output, not the final embedding.
        attention_mask: 1 = real token, 0 = padding (None: no padding); the tables read each
            row's last real token unless told a position.

    `rank` and `top_k` read the unembedding's logits over the whole vocabulary at one
    position (the logit lens's, at a block output): where the target stands among them.
    """

    values: Float[Tensor, "factor batch pos"]
    labels: tuple[str, ...]
    logits: Float[Tensor, "batch pos"]
    lens: bool
    max_abs_error: float
    attention_mask: Int[Tensor, "batch pos"] | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.values.shape))
        kind = "logit lens" if self.lens else "final embedding"
        return (
            f"LogitAttribution({kind}, values [{shape}], {len(self.labels)} labels, "
            f"max_abs_error={self.max_abs_error:.2g})"
        )

    def position(self, batch: int, pos: int | Literal["last"]) -> int:
        """`pos` of row `batch` as an index: ``"last"`` is its last real token; a padding
        position is refused (it holds no token of the text)."""
        n = self.values.shape[2]
        real = (
            torch.ones(n, dtype=torch.bool)
            if self.attention_mask is None
            else self.attention_mask[batch].bool().cpu()
        )
        if pos == "last":
            return int(real.nonzero().max())
        p = checks.integer(pos, "pos", least=-n, most=n - 1) % n
        if not real[p]:
            raise ValueError(f"position {pos} of example {batch} is padding; pos='last' is its "
                             f"last real token ({int(real.nonzero().max())})")  # fmt: skip
        return p

    def ranked(
        self,
        batch: int = 0,
        pos: int | Literal["last"] = "last",
        by: Literal["value", "abs"] = "value",
    ) -> list[tuple[str, float]]:
        """``(label, logit)`` at one position (default: the example's last real token),
        largest first; ``by="abs"`` by magnitude, so the strongest opposing terms rank too."""
        checks.choice(by, "by", ("value", "abs"))
        col = self.values[:, batch, self.position(batch, pos)].tolist()
        key = (lambda kv: -abs(kv[1])) if by == "abs" else (lambda kv: -kv[1])
        return sorted(zip(self.labels, col, strict=True), key=key)

    def vocab_logits(
        self, batch: int = 0, pos: int | Literal["last"] = "last"
    ) -> Float[Tensor, " d_vocab"]:
        """The unembedding's logit of every token at one position: the model's (final
        embedding) or the logit lens's ``unembed(ln_final(resid))`` (a block output)."""
        at = self.meta.get("vocab")
        if at is None:
            raise ValueError("this LogitAttribution holds no vocabulary logits: make it with "
                             "Decomposition.logit_attrs")  # fmt: skip
        checks.integer(batch, "batch", least=0, most=self.values.shape[1] - 1)
        return at(batch, self.position(batch, pos))

    def rank(self, batch: int = 0, pos: int | Literal["last"] = "last") -> int:
        """The target token's rank among the vocabulary's logits at one position: 1 is the
        top token; tokens with an equal logit share the best rank. With a logit difference,
        the rank of the first token (`tokens`, not `incorrect`)."""
        p = self.position(batch, pos)
        logits = self.vocab_logits(batch, p)
        target = logits[int(self.meta["ids"][batch, p])]
        return int((logits > target).sum()) + 1

    def top_k(
        self, k: int = 5, batch: int = 0, pos: int | Literal["last"] = "last"
    ) -> list[tuple[str, int, float]]:
        """The `k` tokens with the largest logits at one position, largest first, as
        ``(text, id, logit)`` (text: the id decoded alone)."""
        logits = self.vocab_logits(batch, pos)
        k = checks.integer(k, "k", least=1, most=logits.shape[-1])
        top = logits.topk(k)
        decode = self.meta["decode"]
        return [(decode(i), i, v) for i, v in zip(top.indices.tolist(), top.values.tolist(),
                                                   strict=True)]  # fmt: skip

    def rows(self) -> list[dict[str, Any]]:
        """One row per factor and position: ``label, batch, pos, logit``."""
        vals = self.values.cpu()
        return [
            {"label": label, "batch": b, "pos": p, "logit": vals[k, b, p].item()}
            for k, label in enumerate(self.labels)
            for b in range(vals.shape[1])
            for p in range(vals.shape[2])
        ]

    def to_pandas(  # type: ignore[override]  # one position, as `ranked`
        self,
        batch: int = 0,
        pos: int | Literal["last"] = "last",
        by: Literal["value", "abs"] = "value",
    ) -> Any:
        """`ranked` as a DataFrame with columns ``label``, ``logit``."""
        import pandas as pd

        return pd.DataFrame(self.ranked(batch, pos, by), columns=["label", "logit"])


def logit_attribution(d: Any, tokens: Any, incorrect: Any = None) -> LogitAttribution:
    """Each factor's share of the logit of `tokens` (minus `incorrect`'s, when given).

    Guarantees ``result.values.sum(0) == result.logits``, the unembedding's own output at the
    decomposed layer (measured: `max_abs_error`; raises past the tolerance).

    Args:
        d: a `Decomposition` from `decompose` / `decompose_layers` (not hand-built).
        tokens: a token (str or id) for every position, or ids ``[batch]`` / ``[batch pos]``.
        incorrect: the same, subtracted: a logit difference.

    Example:
        >>> from tl_decomp import decompose
        >>> from tl_decomp.models import tiny_model
        >>> model = tiny_model("gpt2", dtype=torch.float64)
        >>> d = decompose(model, "the cat sat on the", granularity="layer")
        >>> la = d.logit_attrs("mat")  # token id 13
        >>> bool(torch.allclose(la.values.sum(0), model(d.tokens)[..., 13]))
        True
        >>> la.ranked()[0][0] in la.labels
        True
    """
    recipe = d.meta.get("recipe")
    if recipe is None:
        raise ValueError("this Decomposition does not record its recipe: use td.decompose")
    model, spec = recipe.model, recipe.spec
    if adapters.image_input(model) is not None:
        raise NotImplementedError(
            f"logit attribution on a vision model ({spec.architecture}: its output reads the "
            "first position alone, one row of logits per image, not a vocabulary per position) "
            "is not supported by tl_decomp"
        )
    if recipe.stack == "encoder":
        raise NotImplementedError(
            f"logit attribution on {spec.architecture}'s encoder: its states reach the "
            "logits only through the decoder's cross-attention; decompose the decoder "
            "(decoder_input=) for logits"
        )
    if not spec.unembed_reads_final:
        raise NotImplementedError(
            f"logit attribution on {spec.architecture}: a head (BERT's MLM transform: dense, "
            "activation, LayerNorm) lies between the final embedding and the unembedding"
        )
    factors, labels = d.factors, list(d.labels)
    lens = d.site != spec.final
    if lens:
        factors, labels = _through_final_norm(recipe, d)
    dt = factors.dtype
    W_U, b_U = unembedding(recipe, dt)
    shape = d.target.shape[:2]
    direction = token_columns(model, W_U, tokens, shape)
    bias = pick_bias(b_U.detach().to(dt), model, tokens, shape)
    if incorrect is not None:
        direction = direction - token_columns(model, W_U, incorrect, shape)
        bias = bias - pick_bias(b_U.detach().to(dt), model, incorrect, shape)
    # The unembedding's device may not be the factors' (a model split over devices).
    direction, bias = direction.to(factors.device), bias.to(factors.device)
    values = torch.einsum("kbpd,bpd->kbp", factors, direction)
    if recipe.granularity == "token":  # what no token owns stays in one row: the bias
        values, labels = _fold_into_bias(values, labels, bias)
    elif bias.abs().max() > 0:
        values = torch.cat([values, bias[None]])
        labels.append("b_U")
    logits = own_logits(model, recipe, d, tokens, incorrect)
    err = (values.sum(0) - logits).abs().max().item()
    # The lens runs the model's own final norm, float32-rounding ones included.
    recipe.check_exact(err, logits.abs().max().item(), "the unembedding", "final", dt)
    meta = {
        "vocab": partial(_vocab_at, model, d.target, lens, recipe=recipe),
        "ids": _ids(model, tokens, shape),
        "decode": partial(_decode, model),
    }
    return LogitAttribution(values, tuple(labels), logits, lens, err, d.attention_mask, meta)


def unembedding(recipe: Any, dt: torch.dtype) -> tuple[Tensor, Tensor]:
    """``W_U`` and ``b_U`` as the logits read the final embedding: an encoder–decoder's
    decoder folds a multiplier before ``lm_head`` (T5's ``d_model ** -0.5`` with tied
    embeddings) into ``W_U`` and a bias after it (BART's ``final_logits_bias``) into ``b_U``,
    both measured on the model (`tl_decomp.adapters.unembedding`)."""
    model = recipe.model
    W_U = model.W_U.detach().to(dt)
    b_U = getattr(model, "b_U", None)
    b_U = torch.zeros(W_U.shape[1], dtype=dt, device=W_U.device) if b_U is None else b_U
    b_U = b_U.detach().to(dt)
    if recipe.stack is not None:
        scale, bias = adapters.unembedding(model)
        W_U = W_U * scale
        b_U = b_U if bias is None else b_U + bias.to(b_U)
    return W_U, b_U


def _unembed(model: Any, recipe: Any, x: Tensor, lens: bool) -> Tensor:
    """The unembedding of states `x` (``[... d_model]``), through the final norm for the lens,
    as the model computes it (an encoder–decoder's decoder: its own final norm, multiplier
    and bias, `unembedding`'s)."""
    if recipe is None or recipe.stack is None:
        return model.unembed(model.ln_final(x) if lens else x)
    x = model.get_submodule(recipe.spec.ln_final.name)(x) if lens else x
    scale, bias = adapters.unembedding(model)
    out = model.unembed(x * scale)
    return out if bias is None else out + bias.to(out)


def _vocab_at(model: Any, state: Tensor, lens: bool, batch: int, pos: int, recipe=None) -> Tensor:
    """The unembedding (after ``ln_final`` for the lens) of one position's state."""
    with torch.no_grad():
        x = state[batch, pos][None, None].to(model.W_U.device)
        return _unembed(model, recipe, x, lens)[0, 0]


def _decode(model: Any, token_id: int) -> str:
    tok = getattr(model, "tokenizer", None)
    return str(token_id) if tok is None else tok.decode([token_id])


def _fold_into_bias(values: Tensor, labels: list[str], b_U: Tensor) -> tuple[Tensor, list[str]]:
    """Token factors keep one non-token row: the lens's ``ln_final_bias`` and ``b_U`` join
    the ``bias`` factor."""
    k = labels.index("bias")
    out = values[: k + 1].clone()
    out[k] += values[k + 1 :].sum(0) + b_U
    return out, labels[: k + 1]


def _one_id(model: Any, token: Any) -> int:
    if isinstance(token, str):
        ids = model.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{token!r} is {len(ids)} tokens, not one")
        return int(ids[0])
    if isinstance(token, bool) or not isinstance(token, int):
        raise TypeError(f"a token is a str or an int id, not {type(token).__name__}")
    return token


def _ids(model: Any, tokens: Any, shape: torch.Size) -> Tensor:
    """Token ids ``[batch pos]`` from a str or an id (every position), a list of them or ids
    ``[batch]`` (one per example), or ids ``[batch pos]``; each id within the vocabulary."""
    if isinstance(tokens, (list, tuple)):
        if len(tokens) != shape[0]:
            raise ValueError(f"{len(tokens)} tokens for {shape[0]} examples: give one per "
                             "example, or one for all")  # fmt: skip
        t = torch.tensor([_one_id(model, tok) for tok in tokens])
    elif isinstance(tokens, (str, int)):
        t = torch.tensor(_one_id(model, tokens))
    else:
        t = torch.as_tensor(tokens)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError("token ids must be integers")
    if t.ndim == 1:
        t = t[:, None]
    d_vocab = model.W_U.shape[-1]
    if t.numel() and (t.min() < 0 or t.max() >= d_vocab):
        raise ValueError(f"token id {int(t.max() if t.max() >= d_vocab else t.min())} is not in "
                         f"the vocabulary (0 .. {d_vocab - 1})")  # fmt: skip
    return t.expand(shape).long()


def token_columns(model: Any, W_U: Tensor, tokens: Any, shape: torch.Size) -> Tensor:
    ids = _ids(model, tokens, shape).to(W_U.device)
    return W_U.T[ids]  # [batch pos d_model]


def pick_bias(b_U: Tensor, model: Any, tokens: Any, shape: torch.Size) -> Tensor:
    return b_U[_ids(model, tokens, shape).to(b_U.device)]


def own_logits(model: Any, recipe: Any, d: Any, tokens: Any, incorrect: Any) -> Tensor:
    """The unembedding run on the model's own state (the final embedding, or the final norm
    of a block output), for the tokens asked."""
    with torch.no_grad():
        x = d.target.to(model.W_U.device)  # the unembedding's device
        out = _unembed(model, recipe, x, d.site != recipe.spec.final)
        out = out.to(device=d.factors.device, dtype=d.factors.dtype)
    shape = d.target.shape[:2]
    pick = out.gather(-1, _ids(model, tokens, shape).to(out.device)[..., None])[..., 0]
    if incorrect is not None:
        pick = (
            pick - out.gather(-1, _ids(model, incorrect, shape).to(out.device)[..., None])[..., 0]
        )
    return pick


def _through_final_norm(recipe: Any, d: Any) -> tuple[Tensor, list[str]]:
    """The factors of a block output carried through ``ln_final`` with that output's own
    mean and scale: exact for the lens's ``ln_final(resid_l)``."""
    norm = recipe.spec.ln_final
    if norm is None or recipe.spec.norm_placement != "pre":
        raise NotImplementedError(
            "the logit lens at a block output needs a pre-LN model with a final norm "
            f"({recipe.spec.architecture}: {recipe.spec.norm_placement}-LN)"
        )
    x = d.target.to(d.factors.dtype)
    eps = norm.eps if norm.eps is not None else float(recipe.model.cfg.eps)
    centred = x if norm.rms else x - x.mean(-1, keepdim=True)
    scale = (centred.square().mean(-1, keepdim=True) + eps).sqrt()
    gain = 1 / scale if norm.w is None else norm.w.to(x) / scale
    per_token = recipe.granularity == "token"  # each token's share centred by its own mean
    factors = (
        d.factors - d.factors.mean(-1, keepdim=True) if per_token and not norm.rms else d.factors
    )
    factors, labels = factors * gain, list(d.labels)
    extra = []
    if not norm.rms and not per_token:
        extra.append(("ln_final_center", -x.mean(-1, keepdim=True) * gain))
    if norm.b is not None:
        extra.append(("ln_final_bias", norm.b.to(x).expand_as(x)))
    for label, term in extra:
        factors = torch.cat([factors, term.expand_as(x)[None]])
        labels.append(label)
    return factors, labels


__all__ = ["LogitAttribution", "logit_attribution"]
