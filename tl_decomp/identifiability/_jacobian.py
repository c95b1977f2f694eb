"""The Jacobian-block norms behind `tl_decomp.identifiability`, by forward-mode AD.

A run of the model with the activation at the source site replaced by the JVP's input (the
one write-hook in tl_decomp; it lives only for the call), tangents in chunks (basis vectors
for ``exact``, Gaussian probes for ``estimate``), and the per-example loop that sums
``||J u||^2`` into ``[layer batch query_pos key_pos]`` (Frobenius), or gathers each key
position's ``d_model`` columns and takes the blocks' largest singular values (spectral).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import einops
import torch
from torch import Tensor
from torch.func import jvp, vmap
from tqdm import tqdm

from tl_decomp import adapters
from tl_decomp._core import convention
from tl_decomp._core.convention import Layer
from tl_decomp._core.spec import ModelSpec
from tl_decomp._core.threads import serial

Method = Literal["exact", "estimate"]
Norm = Literal["frobenius", "spectral"]


def layer_sites(spec: ModelSpec, layers: Sequence[Layer]) -> list[str]:
    return [convention.site(spec, L) for L in layers]


def _replace(x: Tensor, tensor: Tensor, *, hook: Any) -> Tensor:
    return x


def capture(store: dict[str, Tensor], site: str, tensor: Tensor, *, hook: Any) -> None:
    store[site] = tensor


def runner(model: Any, spec: ModelSpec, tokens: Tensor, source: str, sites: list[str]):
    """``x -> hidden states [layer 1 pos d_model]`` of `tokens` with the `source` activation
    replaced by ``x``; the run stops after the deepest site."""
    mask = torch.ones_like(tokens)
    order = [spec.layer0] + [b.out for b in spec.blocks] + [spec.final]
    last = max(sites, key=order.index)

    def run(x: Tensor) -> Tensor:
        got: dict[str, Tensor] = {}
        hooks = [(source, functools.partial(_replace, x))]
        hooks += [(s, functools.partial(capture, got, s)) for s in dict.fromkeys(sites)]
        adapters.run_with_hooks(model, tokens, mask, hooks, stop_after=last)
        return torch.stack([got[s] for s in sites])

    return run


def source_activation(model: Any, tokens: Tensor, source: str) -> Tensor:
    got: dict[str, Tensor] = {}
    with torch.no_grad():
        adapters.run_with_hooks(
            model,
            tokens,
            torch.ones_like(tokens),
            [(source, functools.partial(capture, got, source))],
            stop_after=source,
        )
    return got[source].detach().clone()


def _tangents(
    n: int, d: int, method: Method, n_probes: int, chunk: int, like: Tensor, seed: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Chunks of (flat index ``pos * per_pos + k``, tangent [chunk 1 pos d_model]): basis
    vectors (``k`` = the input coordinate) or probes."""
    per_pos = d if method == "exact" else n_probes
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n * per_pos, chunk):
        flat = torch.arange(start, min(start + chunk, n * per_pos))
        pos = flat // per_pos
        u = like.new_zeros((len(flat), 1, n, d))
        if method == "exact":
            u[torch.arange(len(flat)), 0, pos, flat % per_pos] = 1
        else:
            u[torch.arange(len(flat)), 0, pos] = torch.randn(
                (len(flat), d), generator=gen, dtype=torch.float64
            ).to(like)
        yield flat.to(like.device), u


_FORWARD_AD = threading.RLock()


def _columns(run: Callable[[Tensor], Tensor], x0: Tensor) -> Callable[[Tensor], Tensor]:
    """Tangents ``[chunk *x0.shape]`` -> their Jacobian-vector products ``J u``.

    Forward mode, vmapped; where a model's custom ``autograd.Function`` has no forward-mode
    rule (BLOOM's GeLU), the double-backward identity ``J u = d/dv <J^T v, u>`` instead, from
    one forward pass whose graph serves every tangent.
    """
    forward = vmap(lambda u: jvp(run, (x0,), (u,))[1])
    graph: list[Tensor] = []

    def column(u: Tensor) -> Tensor:
        if not graph:
            try:
                return forward(u)
            except RuntimeError as err:
                if "setup_context" not in str(err):
                    raise
            with torch.enable_grad():
                x = x0.detach().requires_grad_()
                y = run(x)
                v = torch.zeros_like(y, requires_grad=True)
                (g,) = torch.autograd.grad(y, x, v, create_graph=True)
            graph.extend((g, v))
        g, v = graph
        return torch.stack([torch.autograd.grad(g, v, ui, retain_graph=True)[0] for ui in u])

    return column


def _sq_norms(
    run: Callable[[Tensor], Tensor],
    x0: Tensor,
    opts: tuple[Method, Norm, int, int, int],
    n_layers: int,
    bar: Any,
) -> tuple[Tensor, Tensor | None]:
    """Per (layer, query, key): ``||J||^2`` in the chosen norm (exact) or the probe mean of
    ``||J u||^2`` and the mean's variance (estimate: Frobenius only)."""
    method, norm, n_probes, chunk, seed = opts
    n, d = x0.shape[1:]
    per_pos = d if method == "exact" else n_probes
    s1 = x0.new_zeros((n_layers, n, n), dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    # spectral: one key position's blocks, [layer query d_out d_in], filled column by column
    block = x0.new_zeros((n_layers, n, d, d), dtype=torch.float64) if norm == "spectral" else None
    column = _columns(run, x0)
    for flat, u in _tangents(n, d, method, n_probes, chunk, x0, seed):
        pos = flat // per_pos
        with torch.no_grad():
            cols = column(u).double()  # [chunk layer 1 query d_model]
        if block is not None:
            _fill_spectral(block, s1, cols, pos, flat % per_pos)
        else:
            q = einops.rearrange(cols.pow(2).sum(-1), "c l 1 i -> l i c")
            s1.index_add_(2, pos, q)
            if method == "estimate":
                s2.index_add_(2, pos, q * q)
        bar.update(len(pos))
    if method == "exact":
        return s1, None
    mean = s1 / n_probes
    var_q = (s2 / n_probes - mean**2).clamp_min(0) * n_probes / (n_probes - 1)
    return mean, var_q / n_probes


def _fill_spectral(block: Tensor, s1: Tensor, cols: Tensor, pos: Tensor, k: Tensor) -> None:
    """Write the columns ``J[:, :, :, k]`` of key position `pos`; once a position's last
    column is in, ``s1[:, :, pos] = sigma_max^2`` of its ``[d_out d_in]`` blocks."""
    d = block.shape[-1]
    for j in pos.unique().tolist():
        sel = pos == j
        block[..., k[sel]] = einops.rearrange(cols[sel], "c l 1 i e -> l i e c")
        if int(k[sel].max()) == d - 1:  # tangents come in order: position j is complete
            # sigma_max^2 = largest eigenvalue of J^T J (eigvalsh: symmetric, faster than SVD)
            gram = block.transpose(-1, -2) @ block
            with serial():  # a batch of small eigensolves: threads only synchronise
                s1[:, :, j] = torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0)


def per_example(model, spec, tokens, mask, source, layers, opts, progress):
    """Squared Jacobian-block norms (and, estimated, their variances) ``[layer b q k]``, one
    example at a time on its real tokens."""
    method, norm, n_probes, chunk_size, seed = opts
    device, sites = tokens.device, layer_sites(spec, layers)
    shape = (len(layers), *mask.shape, mask.shape[1])
    norm2: Tensor | None = None
    var = torch.zeros(shape, dtype=torch.float64, device=device)
    lengths = mask.sum(-1).tolist()
    per_pos = spec.d_model if method == "exact" else n_probes
    with tqdm(total=sum(lengths) * per_pos, disable=not progress, desc="JVPs") as bar:
        for b, n in enumerate(lengths):
            # pixel values [1 channels height width]: a whole image, no padding to cut
            ids = tokens[b : b + 1] if tokens.is_floating_point() else tokens[b : b + 1, :n]
            x0 = source_activation(model, ids, source)
            run = runner(model, spec, ids, source, sites)
            with torch.no_grad():  # a NaN would become NaN contributions and a wrong P̃
                adapters.check_finite({source: x0, **dict(zip(sites, run(x0), strict=True))})
            chunk = chunk_size or max(16, min(1024, 2**22 // (n * spec.d_model)))
            adapters.load_forward_ad()  # torch's deprecation warnings on first use, silenced
            # Forward-mode AD levels are global to the process: one JVP loop at a time.
            with _FORWARD_AD, adapters.exclusive(model), adapters.eager_experts(model):
                sq, v = _sq_norms(
                    run, x0, (method, norm, n_probes, chunk, seed + b), len(layers), bar
                )
            norm2 = torch.zeros(shape, dtype=sq.dtype, device=device) if norm2 is None else norm2
            norm2[:, b, :n, :n] = sq
            if v is not None:
                var[:, b, :n, :n] = v
    assert norm2 is not None
    return norm2, var
