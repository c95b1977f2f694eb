"""Causal projections: row t onto the column space of its own prefix ``U[:t+1]``.

The causal half of `tl_decomp.attention` (which holds the conventions: ``U`` is
``[batch head pos k]`` with zero rows at masked keys and ``U U'^T = T T'^T``). Gram-Schmidt
over the first keys, blocked Woodbury updates of a QR factor after them; a row the norm bounds
cannot certify gets its own SVD (`_fallback`), so rank decisions are the reference's.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Bool, Float
from torch import Tensor

CHUNK = 1024  # rows (or heads) decomposed per batched SVD on the fallback path


def causal(
    u: Float[Tensor, "batch head_index pos k"],
    a: Float[Tensor, "batch head_index pos pos"],
    mask: Bool[Tensor, "batch pos"],
    rtol: Float[Tensor, "batch head_index pos"],
) -> Float[Tensor, "batch head_index pos pos"]:
    """Causal: row t is projected onto the column space of its own prefix ``U[:t+1]``.

    First keys (until each head has k independent ones): Gram-Schmidt in key order writes
    ``U[:w] = D Z``, Z the independent keys, so row t projects onto col(D[:t+1]); keys that
    repeat earlier ones (one token twice in layer 0 of a rotary model) cost nothing extra.
    Later keys go in blocks, R the QR factor of all keys before the block: row t needs
    ``x_t = (R^T R + Z_t^T Z_t)^{-1} b_t``, every row of a block from one Cholesky (Woodbury).
    A row whose rank or conditioning the norm bounds cannot certify gets its own SVD, the
    reference method.
    """
    n, k = u.shape[-2:]
    valid, seen = mask[:, None], mask.cumsum(-1)[:, None]
    b = a @ u  # each row's output, in U's coordinates
    fro = u.square().sum(-1).cumsum(-1).sqrt()  # >= sigma_max of each prefix
    coords, fresh, resid = _gram_schmidt(u, rtol * fro / (4 * math.sqrt(k)))
    w = coords.shape[-2]
    lower = _slot_matrix(coords, fresh)
    d = torch.linalg.solve_triangular(lower, coords, upper=False, left=False)
    d = torch.where(fresh[..., None], _slots(fresh, k, d.dtype), d)  # independent: unit rows
    # On the keys seen so far, D[:t+1]^T D[:t+1] = I + C_t^T C_t, C the dependent rows of D.
    g = a[..., :w, :w] @ d
    y, solved = _woodbury(d * (~fresh)[..., None], g) if not fresh.all() else (g, True)
    rank = fresh.cumsum(-1)
    inv_norm = _inverse_norm(lower, rank)  # >= 1 / sigma_min of the independent keys
    eps = resid.square().cumsum(-1).sqrt()  # how far U[:t+1] is from rank `rank`
    fw = fro[..., :w]
    tol = rtol[..., :w] * fw
    exact = (rank == seen[..., :w]) & (2 * tol * inv_norm < 1)
    ok = (2 * math.sqrt(k) * eps <= tol) & ((eps + 2 * tol) * inv_norm < 1)
    ok &= (fw * inv_norm <= _kappa(u.dtype)) & solved
    need = ~exact & ~ok & valid[..., :w]
    x = _fallback(None, u[..., :w, :], b[..., :w, :], need, rtol[..., :w])
    eff = torch.empty_like(a)
    eff[..., :w, :w] = torch.where(need[..., None], x @ u[..., :w, :].mT, y @ d.mT).tril()
    eff[..., :w, :w] = torch.where(exact[..., None], a[..., :w, :w], eff[..., :w, :w])
    eff[..., :w, w:] = 0
    if w < n:
        eff[..., w:, :] = (_blocks(u, b, fro, valid, rtol, w) @ u.mT).tril(w)
    return eff


def _gram_schmidt(u: Tensor, theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Keys in order until every head holds k independent ones (or has no keys left).

    Key p is dependent when its distance from the span of the earlier independent keys is
    at most ``theta[p]``. Returns each key's coordinates in the orthonormal basis so built
    (one slot per independent key, in key order), the independent flags, and the dependent
    keys' distances from the span.
    """
    *bh, n, k = u.shape
    basis = u.new_zeros(*bh, k, k)
    rank = torch.zeros(bh, dtype=torch.long, device=u.device)
    steps = torch.arange(1, n + 1, device=u.device)
    last = torch.where((u != 0).any(-1), steps, 0).amax(-1)  # keys after this are zero rows
    coords, fresh, resid = [], [], []
    for p in range(n):
        if not ((rank < k) & (p < last)).any():
            break
        z = u[..., p, :]
        h = (z[..., None, :] @ basis)[..., 0, :]
        r = z - (basis @ h[..., None])[..., 0]
        h2 = (r[..., None, :] @ basis)[..., 0, :]  # twice is enough (Giraud et al. 2005)
        r, h = r - (basis @ h2[..., None])[..., 0], h + h2
        norm = r.norm(dim=-1)
        new = (norm > theta[..., p]) & (rank < k)
        slot = torch.nn.functional.one_hot(rank.clamp_max(k - 1), k).to(u.dtype) * new[..., None]
        unit = r / norm.clamp_min(torch.finfo(u.dtype).tiny)[..., None]
        basis = basis + unit[..., :, None] * slot[..., None, :]
        coords.append(h + norm[..., None] * slot)
        fresh.append(new)
        resid.append(torch.where(new, 0.0, norm))
        rank = rank + new
    if not coords:  # no key at all
        return u.new_zeros(*bh, 0, k), rank.new_zeros(*bh, 0).bool(), u.new_zeros(*bh, 0)
    return torch.stack(coords, -2), torch.stack(fresh, -1), torch.stack(resid, -1)


def _slots(fresh: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """One-hot slot of each independent key (zero rows for dependent keys)."""
    index = (fresh.cumsum(-1) - 1).clamp_min(0)
    return torch.nn.functional.one_hot(index, k).to(dtype) * fresh[..., None]


def _slot_matrix(coords: Tensor, fresh: Tensor) -> Tensor:
    """Row s: the coordinates of the s-th independent key. Lower triangular; identity rows
    in unused slots keep it invertible."""
    onehot = _slots(fresh, coords.shape[-1], coords.dtype)
    return onehot.mT @ coords + torch.diag_embed(1 - onehot.sum(-2))


def _inverse_norm(lower: Tensor, rank: Tensor) -> Tensor:
    """``||L_s^{-1}||_F`` of the leading ``s x s`` block of lower-triangular L, s = `rank`.

    A leading block of ``L^{-1}`` is the inverse of L's leading block: one triangular
    inverse serves every prefix.
    """
    eye = torch.eye(lower.shape[-1], dtype=lower.dtype, device=lower.device)
    inv = torch.linalg.solve_triangular(lower, eye, upper=False)
    cum = inv.square().sum(-1).cumsum(-1).sqrt()
    at = cum.take_along_dim((rank - 1).clamp_min(0), dim=-1)
    return torch.where(rank > 0, at, 0.0)


def _woodbury(c: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Row t: ``(I + C[:t+1]^T C[:t+1])^{-1} g_t``, block by block, and where the
    factorisations held (they can fail only in low precision with a huge C)."""
    n, k = c.shape[-2:]
    if n == 0:
        return g, g.new_ones(g.shape[:-1], dtype=torch.bool)
    gram = torch.eye(k, dtype=c.dtype, device=c.device).expand(*c.shape[:-2], k, k)
    out, held = [], []
    for rows in _block_rows(0, n, k):
        chol, ok = _cholesky(gram)
        x, ok_block = _block_solve(_upper_inverse(chol.mT), c[..., rows, :], g[..., rows, :])
        out.append(x)
        held.append((ok & ok_block)[..., None].expand(x.shape[:-1]))
        gram = gram + c[..., rows, :].mT @ c[..., rows, :]
    return torch.cat(out, dim=-2), torch.cat(held, dim=-1)


def _blocks(u: Tensor, b: Tensor, fro: Tensor, valid: Tensor, rtol: Tensor, start: int) -> Tensor:
    """``x_t = (U[:t+1]^T U[:t+1])^+ b_t`` for rows from `start` on. Where the QR factor R
    of the keys before a block does not certify the block's rows (rank deficient or
    ill-conditioned), each such row gets its own SVD."""
    n, k = u.shape[-2:]
    r = r_factor(u[..., :start, :])
    eye = torch.eye(k, dtype=u.dtype, device=u.device)
    out = []
    for rows in _block_rows(start, n, k):
        z, bb = u[..., rows, :], b[..., rows, :]
        r_inv = _upper_inverse(r)
        cond = fro[..., rows] * r_inv.flatten(-2).norm(dim=-1)[..., None]  # >= each prefix's
        limit = torch.clamp(0.5 / rtol[..., rows], max=_kappa(u.dtype))
        ok = torch.isfinite(cond) & (cond <= limit)
        x, held = _block_solve(torch.where(ok.any(-1)[..., None, None], r_inv, eye), z, bb)
        ok &= held[..., None]
        out.append(_fallback(r, z, bb, ~ok & valid[..., rows], rtol[..., rows], x))
        r = r_factor(torch.cat([r, z], dim=-2))
    return torch.cat(out, dim=-2)


def _block_rows(start: int, stop: int, k: int) -> list[slice]:
    """Blocks of k rows (at least 32): a block of s rows costs ``s^3 + s^2 k``, so n / s
    blocks cost ``n (s^2 + s k)``: small blocks are cheap, few blocks mean few calls."""
    step = max(k, 32)
    return [slice(j, min(j + step, stop)) for j in range(start, stop, step)]


def _kappa(dtype: torch.dtype) -> float:
    """The largest condition-number bound the block solves are trusted with."""
    return torch.finfo(dtype).eps ** -0.5 / 4


def _block_solve(
    r_inv: Float[Tensor, "*bh k k"], z: Float[Tensor, "*bh s k"], b: Float[Tensor, "*bh s k"]
) -> tuple[Float[Tensor, "*bh s k"], Bool[Tensor, "*bh"]]:
    """Row t of a block: ``(R^T R + Z[:t+1]^T Z[:t+1])^{-1} b_t``, all rows at once.

    Woodbury with ``W = Z R^{-1}`` and ``K = I + W W^T``: the Cholesky factor of a leading
    block of K is the leading block of K's Cholesky factor (and so for its inverse), so
    masking each right-hand side to its row's prefix serves every prefix from one
    factorisation.
    """
    y = b @ r_inv  # row t: (R^{-T} b_t)^T
    w = z @ r_inv
    eye = torch.eye(z.shape[-2], dtype=z.dtype, device=z.device)
    chol, held = _cholesky(eye + w @ w.mT)
    l_inv = _upper_inverse(chol.mT).mT
    h = (l_inv @ (w @ y.mT).triu()).triu()
    g = l_inv.mT @ h  # column t: K_t^{-1} W_t y_t, zero past row t
    return (y - g.mT @ w) @ r_inv.mT, held


def _cholesky(m: Tensor) -> tuple[Tensor, Tensor]:
    """Lower Cholesky factor, identity where the factorisation failed, and where it held."""
    chol, info = torch.linalg.cholesky_ex(m)
    held = info == 0
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    return torch.where(held[..., None, None], chol, eye), held


def _upper_inverse(r: Tensor) -> Tensor:
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    return torch.linalg.solve_triangular(r, eye, upper=True)


def _fallback(
    r: Tensor | None, z: Tensor, b: Tensor, need: Tensor, rtol: Tensor, out: Tensor | None = None
) -> Tensor:
    """Rows flagged in `need`: ``x_t = b_t (M^T M)^+`` from the SVD of ``M = [R; Z[:t+1]]``,
    which has the singular values and right singular vectors of that row's ``U[:t+1]``."""
    out = torch.zeros_like(b) if out is None else out.clone()
    s_len = z.shape[-2]
    for chunk in need.nonzero().split(CHUNK):
        bi, hi, t = chunk.unbind(-1)
        zt = z[bi, hi] * (torch.arange(s_len, device=z.device) <= t[:, None])[..., None]
        m = zt if r is None else torch.cat([r[bi, hi], zt], dim=-2)
        _, s, vh = torch.linalg.svd(m, full_matrices=False)
        keep = s > rtol[bi, hi, t][:, None] * s[:, :1]
        f = pinv_factor(s, vh, keep)
        out[bi, hi, t] = (b[bi, hi, t][:, None] @ f @ f.mT)[:, 0]
    return out


def pinv_factor(s: Tensor, vh: Tensor, keep: Tensor) -> Tensor:
    """F with ``F F^T = (M^T M)^+`` from M's SVD, keeping the singular values in `keep`."""
    return vh.mT * torch.where(keep, 1.0 / torch.where(keep, s, 1.0), 0.0)[..., None, :]


def r_factor(u: Tensor) -> Tensor:
    """The ``k x k`` R factor of a QR of u (zero rows added when u has fewer than k)."""
    k = u.shape[-1]
    if u.shape[-2] < k:
        u = torch.cat([u, u.new_zeros(*u.shape[:-2], k - u.shape[-2], k)], dim=-2)
    return torch.linalg.qr(u, mode="r").R
