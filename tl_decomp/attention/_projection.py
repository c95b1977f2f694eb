"""Projections onto the column space of T, one key set per query row (docs/method.md §6).

The numerical core of `tl_decomp.attention`. Every function takes ``U`` (``[batch head pos k]``,
zero rows at masked keys) with ``U U'^T = T T'^T``, so col(U) = col(T) and the singular values
agree, in ``k = min(d_head, d_model)`` columns instead of d_model.

The reference is one SVD per row. Here rows whose rank and conditioning cheap norm bounds
certify take shared factorisations (Gram-Schmidt over the first keys, blocked Woodbury
updates of a QR factor after them, Cholesky for bidirectional heads); a row the bounds
cannot certify gets its own SVD, so rank decisions are the reference's.
The causal prefixes are solved in `tl_decomp.attention`.
"""

from __future__ import annotations

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_decomp.attention._causal import CHUNK, causal, pinv_factor, r_factor

_CHUNK_ELEMENTS = 2**24  # sliding windows: U entries (or factor entries) gathered at once


def full_projection(
    u: Float[Tensor, "batch head_index pos k"],
    mask: Bool[Tensor, "batch pos"],
    rtol: Float[Tensor, " batch"],
) -> tuple[
    Float[Tensor, "batch head_index k k"],
    Bool[Tensor, "batch head_index"],
    Int[Tensor, "batch head_index"],
]:
    """All of an example's keys: F with ``F F^T = (U^T U)^+`` (so ``P = (U F) (U F)^T``),
    whether ``P = I`` on the valid keys, and ``rank(U)``.

    Where Cholesky and a norm bound certify U well conditioned (full column rank, or full
    row rank when there are at most k keys), a Gram matrix serves; elsewhere an SVD.
    """
    k = u.shape[-1]
    n_keys = mask.sum(-1)[:, None].expand(u.shape[:2])
    gram = u.mT @ u  # all at once: indexing u would copy it (sliding windows: many keys)
    fro = gram.diagonal(dim1=-2, dim2=-1).sum(-1).sqrt()
    rtol = rtol[:, None]
    wide = n_keys <= k
    f = u.new_zeros(*u.shape[:2], k, k)
    certified = torch.zeros_like(wide)
    tall = ~wide[:, 0]
    if tall.any():
        f[tall], certified[tall] = _certified_factor(gram[tall], fro[tall], rtol[tall])
    if wide.any():  # an identity row per padded key keeps the row Gram invertible
        ut, pad = u[~tall], ~mask[~tall, None]
        gram = ut @ ut.mT + torch.diag_embed(pad.to(u.dtype))
        certified[~tall] = _certified_factor(gram, fro[~tall], rtol[~tall], pad)[1]
    exact = wide & certified
    rank = torch.where(wide, n_keys, k)
    for chunk in (~certified).nonzero().split(CHUNK):
        bi, hi = chunk.unbind(-1)
        _, s, vh = torch.linalg.svd(r_factor(u[bi, hi]))
        keep = s > rtol[bi] * s[:, :1]
        f[bi, hi] = pinv_factor(s, vh, keep)
        rank[bi, hi] = keep.sum(-1)
        exact[bi, hi] = wide[bi, hi] & (rank[bi, hi] == n_keys[bi, hi])
    return f, exact, rank


def _certified_factor(
    gram: Tensor, fro: Tensor, rtol: Tensor, pad: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``L^{-T}`` for ``gram = L L^T``, and where it is trusted: Cholesky succeeded and
    ``||U||_F ||L^{-1}||_F`` (>= cond U) is small enough for the Gram route (error
    ``eps cond^2``) and far below ``1 / rtol`` (so the rank is certainly full)."""
    chol, info = torch.linalg.cholesky_ex(gram)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    if pad is not None:  # padded keys' identity rows are not part of U
        inv = inv * ~pad[..., :, None] * ~pad[..., None, :]
    cond = fro * inv.flatten(-2).norm(dim=-1)
    limit = torch.clamp(0.5 / rtol, max=torch.finfo(gram.dtype).eps ** -0.25)
    ok = (info == 0) & torch.isfinite(cond) & (cond <= limit)
    return inv.mT, ok


def windowed(
    u: Float[Tensor, "batch head_index pos k"],
    a: Float[Tensor, "batch head_index pos pos"],
    mask: Bool[Tensor, "batch pos"],
    rtol: Float[Tensor, "batch head_index pos"],
    window: int,
) -> Float[Tensor, "batch head_index pos pos"]:
    """Sliding window: row t is projected onto the column space of its own window
    ``U[t-window+1 : t+1]`` (valid keys only; `a` must be zero outside the window).

    Rows before `window` see a prefix: `causal` on the first `window` rows and keys. No two
    later rows see the same keys, so their windows are gathered into a batch of small
    bidirectional problems, each solved by `full_projection` (a Gram-matrix Cholesky where the
    norm bounds certify it, the reference SVD elsewhere).
    """
    n = u.shape[-2]
    w = min(window, n)
    eff = torch.zeros_like(a)
    eff[..., :w, :w] = causal(u[..., :w, :], a[..., :w, :w], mask[:, :w], rtol[..., :w])
    queries = mask[:, w:].nonzero()  # padded queries see nothing: no window to solve
    queries[:, 1] += w
    span = torch.arange(window, device=u.device) - window + 1  # key offsets from the query
    _solve_spans(eff, u, a, mask, rtol, queries, span)
    return eff


def _solve_spans(eff: Tensor, u: Tensor, a: Tensor, mask: Tensor, rtol: Tensor, queries, span):
    """Rows ``queries`` (``[n 2]``: example, position t) of `eff`, each projected onto its
    keys ``t + span``: gathered, a chunk of queries at a time, into small bidirectional
    problems (a span's keys x k and its k x k factors per query and head)."""
    heads = torch.arange(u.shape[1], device=u.device)[:, None]
    k = u.shape[-1]
    per_query = max(1, _CHUNK_ELEMENTS // (u.shape[1] * max(len(span), k) * k))
    for chunk in queries.split(per_query):
        bi, t = chunk.unbind(-1)
        keys = (t[:, None] + span)[:, None]  # [chunk 1 span]
        where = bi[:, None, None], heads, t[:, None, None], keys
        eff[where] = _window_rows(
            u[bi[:, None, None], heads, keys], a[where], mask[bi[:, None], keys[:, 0]],
            rtol[bi, :, t],
        )  # fmt: skip


def banded(
    u: Float[Tensor, "batch head_index pos k"],
    a: Float[Tensor, "batch head_index pos pos"],
    mask: Bool[Tensor, "batch pos"],
    rtol: Float[Tensor, "batch head_index pos"],
    window: int,
) -> Float[Tensor, "batch head_index pos pos"]:
    """Bidirectional sliding window (T5Gemma's encoder): row t is projected onto the column
    space of its valid keys j with ``|t - j| <= window`` (`a` must be zero outside them). As
    `windowed`'s later rows: each query's keys gathered into a small bidirectional problem;
    ``window`` zero keys padded on both sides keep every gathered key distinct."""
    n = u.shape[-2]
    up = torch.nn.functional.pad(u, (0, 0, window, window))  # zero rows: outside every span
    ap = torch.nn.functional.pad(a, (window, window))
    mp = torch.nn.functional.pad(mask, (window, window))
    eff = torch.zeros_like(ap)
    span = torch.arange(2 * window + 1, device=u.device)  # padded key index: t + offset
    _solve_spans(eff, up, ap, mp, rtol, mask.nonzero(), span)  # padded queries see nothing
    return eff[..., window : window + n]


def chunk_ids(mask: Bool[Tensor, "batch pos"], chunk: int) -> Int[Tensor, "batch pos"]:
    """Each position's attention chunk, counted from the example's first valid token: Hugging
    Face's ``chunked_overlay`` aligns chunks after the left padding."""
    lead = (mask.int().cumsum(-1) == 0).sum(-1, keepdim=True)  # left padding per example
    pos = torch.arange(mask.shape[-1], device=mask.device) - lead
    return pos.div(chunk, rounding_mode="floor")


def chunked(
    u: Float[Tensor, "batch head_index pos k"],
    a: Float[Tensor, "batch head_index pos pos"],
    mask: Bool[Tensor, "batch pos"],
    rtol: Float[Tensor, "batch head_index pos"],
    chunk: int,
) -> Float[Tensor, "batch head_index pos pos"]:
    """Attention chunks: row t is projected onto its own chunk's keys up to itself, so each
    chunk is its own causal problem (`a` must be zero outside the chunk). Examples with the
    same left padding share chunk boundaries and are solved together."""
    n = u.shape[-2]
    eff = torch.zeros_like(a)
    lead = (mask.int().cumsum(-1) == 0).sum(-1)
    for pad in lead.unique().tolist():
        bi = (lead == pad).nonzero()[:, 0]
        cuts = sorted({0, n, *range(pad % chunk, n, chunk)})
        for s, e in zip(cuts[:-1], cuts[1:], strict=False):
            if not mask[bi, s:e].any():  # padding only: no row to solve
                continue
            eff[bi, :, s:e, s:e] = causal(
                u[bi, :, s:e], a[bi, :, s:e, s:e], mask[bi, s:e], rtol[bi, :, s:e]
            )
    return eff


def _window_rows(
    u: Float[Tensor, "query head_index window k"],
    a: Float[Tensor, "query head_index window"],
    mask: Bool[Tensor, "query window"],
    rtol: Float[Tensor, "query head_index"],
) -> Float[Tensor, "query head_index window"]:
    """Each query's row projected onto the column space of its own keys' ``U``."""
    heads = u.shape[1]
    f, exact, _ = full_projection(
        einops.rearrange(u, "q h w k -> (q h) 1 w k"),
        einops.repeat(mask, "q w -> (q h) w", h=heads),
        einops.rearrange(rtol, "q h -> (q h)"),
    )
    f = einops.rearrange(f, "(q h) 1 k j -> q h k j", h=heads)
    coords = ((a[..., None, :] @ u) @ f) @ f.mT  # the row's output, through (U^T U)^+
    eff = (coords @ u.mT)[..., 0, :]
    return torch.where(einops.rearrange(exact, "(q h) 1 -> q h 1", h=heads), a, eff)


__all__ = ["banded", "causal", "chunk_ids", "chunked", "full_projection", "windowed"]
