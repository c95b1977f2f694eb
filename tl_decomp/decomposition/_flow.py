"""Information-flow routes: which input tokens reached a position, through which heads.

Nodes are ``(layer, pos)``: position ``pos`` of the residual stream at ``layer``. Block ``b``
joins layer ``b`` to ``b + 1`` with the exact terms it adds: an attention edge ``j -> i`` per
head (the head's term from key ``j``, carried to the block output: granularity ``source``)
and a residual edge ``i -> i`` holding everything else in state ``i`` (the stream as it
was, the MLP, biases and norm corrections). Each edge is weighted by the paper's share
``<t, e> / ||e||^2`` of the state ``e`` it writes, so the edges into a node sum to 1 exactly.

Ferrando & Voita (2024) weight the same edges by an L1 proximity,
``max(0, ||e||_1 - ||e - t||_1)`` normalised per node, computed from vectors that do not
carry the norms; the share is the projection of the exact term on the state, signed
(a head can write against its state) and pruned here by its magnitude.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from tl_decomp import adapters
from tl_decomp._core import checks
from tl_decomp._core.aliases import Model, TextInput
from tl_decomp._core.results import Result
from tl_decomp.decomposition._algebra import check_patterns
from tl_decomp.decomposition._decompose import cache_for, decompose_layers
from tl_decomp.decomposition._logit import LogitAttribution, pick_bias, token_columns
from tl_decomp.decomposition._recipe import DecompositionRecipe
from tl_decomp.decomposition._tokens import token_labels, token_logits

_SOURCE = re.compile(r"L(\d+)H(\d+)K(\d+)")


@dataclass(frozen=True, repr=False)
class InformationFlow(Result):
    """Routes into one position of one text, and each input token's share there per layer.

    Attributes:
        attention: ``[block head_index query_pos key_pos]``: the share of head ``h``'s term
            from key ``k`` in state ``(block + 1, q)``.
        residual: ``[block pos]``: the share of everything else (``1 - sum`` of the above).
        contributions: ``[layer pos]``: input token ``k``'s share of the state at
            ``position`` and layer ``l`` (``granularity="token"``), or its logit of `target`
            where one was given; `bias` ``[layer]`` what no token owns.
        tokens: the input's tokens as text; `position` the node the routes end at.
        threshold: edges whose weight's magnitude is below it are pruned in `edges`.
    """

    attention: Float[Tensor, "block head_index query_pos key_pos"]
    residual: Float[Tensor, "block pos"]
    contributions: Float[Tensor, "layer pos"]
    bias: Float[Tensor, " layer"]
    tokens: tuple[str, ...]
    position: int
    target: str | None
    threshold: float

    def edges(self, threshold: float | None = None) -> list[dict[str, Any]]:
        """The routes from `position` at the last layer back to layer 0, last block first:
        one record per kept edge (``block``, ``head`` (None: residual), ``source``,
        ``destination``, ``weight``)."""
        cut = self.threshold if threshold is None else threshold
        alive, out = {self.position}, []
        for b in range(self.attention.shape[0] - 1, -1, -1):
            reached: set[int] = set()
            for i in sorted(alive):
                if abs(w := self.residual[b, i].item()) >= cut:
                    out.append(_edge(b, None, i, i, w))
                    reached.add(i)
                for h, j in (self.attention[b, :, i].abs() >= cut).nonzero().tolist():
                    out.append(_edge(b, h, j, i, self.attention[b, h, i, j].item()))
                    reached.add(j)
            alive = reached
        return out

    def rows(self) -> list[dict[str, Any]]:
        """`edges` with the token at each end."""
        return [
            {**e, "from": self.tokens[e["source"]], "to": self.tokens[e["destination"]]}
            for e in self.edges()
        ]

    def top_tokens(self, layer: int, k: int = 5) -> list[tuple[str, int, float]]:
        """``(token, position, contribution)`` of the `k` largest contributors at `layer`."""
        row = self.contributions[layer]
        order = row.abs().argsort(descending=True)[:k].tolist()
        return [(self.tokens[p], p, row[p].item()) for p in order]

    def to_networkx(self, threshold: float | None = None) -> Any:
        """The kept routes as a ``networkx.MultiDiGraph``: nodes ``(layer, pos)`` with their
        ``token``, one edge per head (key ``"L{b}H{h}"``) or residual (``"L{b}resid"``)."""
        import networkx as nx

        g = nx.MultiDiGraph()
        for e in self.edges(threshold):
            b, j, i = e["block"], e["source"], e["destination"]
            g.add_node((b, j), token=self.tokens[j])
            g.add_node((b + 1, i), token=self.tokens[i])
            key = f"L{b}resid" if e["head"] is None else f"L{b}H{e['head']}"
            g.add_edge((b, j), (b + 1, i), key=key, weight=e["weight"])
        return g

    def view(self) -> Any:
        """The routes drawn back to the input tokens (`tl_decomp.views.flow_view`)."""
        from tl_decomp.viz import views

        return views.flow_view(self)


def _edge(block: int, head: int | None, source: int, destination: int, w: float) -> dict:
    return {"block": block, "head": head, "source": source, "destination": destination,
            "weight": w}  # fmt: skip


def information_flow(
    model: Model,
    input: TextInput,
    *,
    position: int = -1,
    target: str | int | None = None,
    threshold: float = 0.05,
) -> InformationFlow:
    """Routes into `position` of one text, exact: every edge is a term of the model's state.

    Guarantees, at every node ``(b + 1, i)``: ``residual[b, i] + attention[b, :, i].sum()
    == 1`` (the shares of the block's terms in its own state), and at every layer
    ``contributions[l].sum() + bias[l]`` equals the state's share 1 (or, with `target`, the
    logit lens's logit of it: the decomposed logit lens by token).

    Args:
        model: any model `decompose` supports at ``granularity="source"`` and ``"token"``.
        input: one text, or token ids ``[1, pos]``.
        position: the node the routes end at (default: the last token).
        target: a token (str or id) whose logit the token contributions explain; None: the
            shares of the state.
        threshold: edges whose share's magnitude is below it are left out of `edges`.

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> flow = information_flow(tiny_model("gpt2", dtype=torch.float64), "the cat sat")
        >>> bool(torch.allclose(flow.residual + flow.attention.sum((1, 3)),
        ...                     torch.ones_like(flow.residual)))
        True
        >>> flow.edges()[0]["destination"] == len(flow.tokens) - 1
        True
    """
    threshold = checks.number(threshold, "threshold", low=0.0, high=1.0)
    if not isinstance(input, str) and not (isinstance(input, Tensor) and input.shape[0] == 1):
        raise ValueError("information_flow reads one text (a str, or token ids [1, pos])")
    spec_layers = list(range(1, model.cfg.n_layers + 1))
    sources = decompose_layers(model, input, layers=spec_layers, granularity="source",
                               reduce="shares")  # fmt: skip
    attention, residual = _routes(sources, model.cfg.n_layers, model.cfg.n_heads)
    n = residual.shape[1]
    position = checks.integer(position, "position", least=-n, most=n - 1) % n
    reduce: Any = "shares" if target is None else ("logit", target)
    layers = [*range(model.cfg.n_layers + 1)]
    per_token = decompose_layers(model, input, layers=layers, granularity="token", reduce=reduce)
    values = torch.stack([r.values[:, 0, position] for r in per_token])  # [layer n+1]
    tokens = _strings(model, input)
    return InformationFlow(attention, residual, values[:, :-1], values[:, -1], tokens, position,
                           None if target is None else str(target), threshold)  # fmt: skip


def token_logit_attribution(
    model: Model,
    input: TextInput,
    tokens: Any,
    incorrect: Any = None,
    *,
    position: int | Literal["last"] = "last",
    attention_mask: Tensor | None = None,
) -> LogitAttribution:
    """Each input token's direct logit for `tokens` (minus `incorrect`'s) at one position of
    each example, exactly: ``values.sum(0) == logits``, the unembedding's own output there.

    The same numbers as ``decompose(..., granularity="token").logit_attrs(tokens)`` at that
    position, from one frozen forward pass and one backward pass instead of ``pos + 1``
    forward passes: with every norm, pattern and activation frozen the network is affine, so
    token ``k``'s logit is ``<d logit / d x_k, x_k>``.

    Args:
        model: a decoder (the unembedding reads the final embedding).
        input: text(s) or token ids, as `decompose`.
        tokens: the token whose logit is explained, as `Decomposition.logit_attrs`: a str or
            id, or one per example.
        incorrect: the same, subtracted (a logit difference).
        position: ``"last"`` (each example's last real token, padding skipped) or an index.
        attention_mask: for token-id input.

    Returns:
        A `LogitAttribution` with ``values [pos + 1, batch, 1]`` (``pos{k}``, then ``bias``,
        which holds ``b_U``) and ``logits [batch, 1]``.

    Example:
        >>> from tl_decomp import decompose, tiny_model
        >>> model = tiny_model("gpt2", dtype=torch.float64)
        >>> la = token_logit_attribution(model, ["the cat sat", "a dog"], "mat")
        >>> d = decompose(model, ["the cat sat", "a dog"], granularity="token")
        >>> bool(torch.allclose(la.values[:, 1, 0], d.logit_attrs("mat").values[:, 1, 2]))
        True
    """
    recipe = DecompositionRecipe.for_model(model, granularity="token")
    spec = recipe.spec
    if not spec.unembed_reads_final:
        raise NotImplementedError(
            f"token logit attribution on {spec.architecture}: a head lies between the final "
            "embedding and the unembedding"
        )
    cache, ids, mask, _ = cache_for(model, recipe, input, attention_mask)
    check_patterns(spec, cache, mask)
    b, n = cache[spec.embeds[0][1]].shape[:2]
    real = torch.ones(b, n, dtype=torch.bool) if mask is None else mask.bool().cpu()
    if position == "last":
        pos = real.long().cumsum(1).argmax(1)  # each row's last real token
    else:
        p = checks.integer(position, "position", least=-n, most=n - 1) % n
        pos = torch.full((b,), p)
    W_U, dt = model.W_U.detach(), cache[spec.final].dtype
    b_U = getattr(model, "b_U", None)
    b_U = torch.zeros(W_U.shape[1], dtype=dt) if b_U is None else b_U.detach()
    rows = torch.arange(b)
    direction = token_columns(model, W_U, tokens, torch.Size((b, n)))[rows, pos]
    bias = pick_bias(b_U, model, tokens, torch.Size((b, n)))[rows, pos]
    if incorrect is not None:
        direction = direction - token_columns(model, W_U, incorrect, torch.Size((b, n)))[rows, pos]
        bias = bias - pick_bias(b_U, model, incorrect, torch.Size((b, n)))[rows, pos]
    values, _ = token_logits(model, spec, cache, direction.to(dt), pos, tokens=ids, mask=mask)
    values[-1] += bias.to(values)
    final = cache[spec.final][rows, pos.to(cache[spec.final].device)]
    own = (final * direction.to(final)).sum(-1) + bias.to(final)
    err = (values.sum(0) - own.to(values)).abs().max().item()
    recipe.check_exact(err, own.abs().max().item(), "the unembedding", "final", values.dtype)
    labels, _ = token_labels(n)
    return LogitAttribution(values[:, :, None], labels, own[:, None].to(values), False, err)


def _routes(sources: list[Any], n_blocks: int, n_heads: int) -> tuple[Tensor, Tensor]:
    """Block ``b``'s source shares in its own output state, and the rest."""
    n = sources[0].values.shape[-1]
    attention = sources[0].values.new_zeros((n_blocks, n_heads, n, n))
    for b, r in enumerate(sources):
        for k, label in enumerate(r.labels):
            m = _SOURCE.fullmatch(label)
            if m and int(m[1]) == b:
                attention[b, int(m[2]), :, int(m[3])] = r.values[k, 0]
    residual = 1 - attention.sum((1, 3))
    return attention, residual


def _strings(model: Model, input: TextInput) -> tuple[str, ...]:
    spec = adapters.model_spec(model)
    ids, _ = adapters.as_tokens(model, spec, input, None)
    return tuple(model.tokenizer.decode([i]) for i in ids[0].tolist())


__all__ = ["InformationFlow", "information_flow", "token_logit_attribution"]
