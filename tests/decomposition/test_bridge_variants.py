"""Latent attention (MLA), Gemma-4's per-layer inputs and Llama 4's attention chunks, checked
against Hugging Face.

Each family boots from the zoo (`tests/support/zoo.py`), plus variants the zoo's sizes do not
reach: MLA with values wider than the query/key head size (the bridge then splits ``hook_z``
wrongly; DeepSeek's real sizes are v_head_dim 128, head_dim 64) and Gemma-4 with learned
layer scalars away from 1. On the padded batch of `test_architectures.py`:

- every layer's factors, coarse / layer / head / source, sum to Hugging Face's own hidden
  states (float64; 1e-9, or 1e-6 where Hugging Face computes a norm on the way in float32);
- each head's term is that head's slice of ``o_proj`` applied to Hugging Face's own attention
  output (a forward pre-hook on ``o_proj``), times whatever follows it in the block;
- effective attention is one SVD per row over exactly the keys that row sees (causal prefix,
  padding, Llama 4's chunk counted from the first real token).
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from support import zoo
from support.helpers import projected_row
from support.models import TL3

import tl_decomp as td
from tl_decomp._core.spec import TOLERANCE

pytestmark = pytest.mark.skipif(TL3, reason="the bridge zoo is TransformerLens 4.x's")

TOKENS = torch.tensor(
    [[1, 5, 6, 7, 5, 8, 9, 10, 5, 11, 12, 13], [1, 5, 6, 7, 8, 9, 5, 10, 11, 0, 0, 0]]
)
MASK = (torch.arange(12) < torch.tensor([[12], [9]])).long()
# Left padding: Llama 4 counts its chunks from each example's first real token.
LEFT = torch.tensor(
    [[1, 5, 6, 7, 5, 8, 9, 10, 5, 11, 12, 13], [0, 0, 0, 1, 5, 6, 7, 8, 9, 5, 10, 11]]
)
LEFT_MASK = (LEFT != 0).long()

MLA = ["deepseek_v2", "deepseek_v3", "glm4_moe_lite", "youtu"]
# name -> (zoo family, config overrides, layer scalars written into the weights or None)
VARIANTS: dict[str, tuple[str, dict[str, Any], list[float] | None]] = {
    "deepseek_v3_wide_v": ("deepseek_v3", {"v_head_dim": 12}, None),
    "youtu_wide_v": ("youtu", {"v_head_dim": 12}, None),
    "gemma4_text_scalars": ("gemma4_text", {}, [0.5, 1.75, 0.625]),  # exact in float32
}
FAMILIES = [*MLA, "gemma4_text", "llama4", *VARIANTS]
GRAINS = ("coarse", "layer", "head", "source")


@functools.cache
def model_dir(name: str) -> str:
    """A zoo family's folder, or a variant's: the family's config with overrides, seeded and
    perturbed as the zoo does, its layer scalars set where given."""
    if name not in VARIANTS:
        return zoo.model_dir(name)
    from tl_decomp.models import tiny_tokenizer

    family, overrides, scalars = VARIANTS[name]
    spec = zoo.FAMILIES[family]
    config = spec.config()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    import transformers as tf

    model = getattr(tf, spec.model_class)(config)
    zoo._perturb(model)
    if scalars is not None:
        with torch.no_grad():
            for layer, s in zip(model.model.layers, scalars, strict=True):
                layer.layer_scalar.fill_(s)
    path = tempfile.mkdtemp(prefix=f"tl_decomp_variant_{name}_")
    model.save_pretrained(path)
    tiny_tokenizer(False, path).save_pretrained(path)
    assert json.loads(Path(path, "config.json").read_text())["architectures"]
    return path


def _moe(name: str) -> bool:
    return zoo.FAMILIES[VARIANTS[name][0] if name in VARIANTS else name].moe


@functools.cache
def bridge(name: str):
    from transformer_lens.model_bridge import TransformerBridge

    overrides = {"_experts_implementation_internal": "eager"} if _moe(name) else None
    model = TransformerBridge.boot_transformers(
        model_dir(name), device="cpu", dtype=torch.float64, hf_config_overrides=overrides
    )
    return model.eval()


@functools.cache
def hf(name: str):
    import transformers as tf

    family = VARIANTS[name][0] if name in VARIANTS else name
    kwargs: dict[str, Any] = {"dtype": torch.float64, "attn_implementation": "eager"}
    if _moe(name):
        kwargs["experts_implementation"] = "eager"
    cls = getattr(tf, zoo.FAMILIES[family].model_class)
    return cls.from_pretrained(model_dir(name), **kwargs).eval()


@functools.cache
def hf_run(name: str, left: bool = False):
    """Hugging Face's hidden states and each layer's ``o_proj`` input and output."""
    tokens, mask = (LEFT, LEFT_MASK) if left else (TOKENS, MASK)
    model, seen = hf(name), {}
    hooks = []
    for L, layer in enumerate(model.model.layers):
        keep = lambda mod, args, out, L=L: seen.__setitem__(L, (args[0], out))  # noqa: E731
        hooks.append(layer.self_attn.o_proj.register_forward_hook(keep))
    try:
        with torch.inference_mode():
            out = model(tokens, attention_mask=mask, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return out.hidden_states, seen


def _relative(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> float:
    real = mask.bool()[..., None]
    got, want = got.masked_fill(~real, 0), want.to(got).masked_fill(~real, 0)
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("granularity", GRAINS)
@pytest.mark.parametrize("name", FAMILIES)
def test_every_layer_sums_to_hugging_face(name, granularity):
    model = bridge(name)
    states, _ = hf_run(name)
    ds = td.decompose_layers(model, TOKENS, attention_mask=MASK, granularity=granularity)
    recipe = td.DecompositionRecipe.for_model(model, granularity=granularity)
    spec = recipe.spec
    for d in ds:
        if d.layer == spec.n_layers:  # Hugging Face's last state is the final norm's output
            continue
        i = spec.n_layers if d.layer == "final" else d.layer
        err = _relative(d.factors.sum(0), states[i], MASK)
        assert err <= spec.tolerance(torch.float64, recipe.rounded(d.layer)), (name, d.layer, err)
        if not recipe.rounded(d.layer):
            assert err <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("name", FAMILIES)
def test_head_terms_are_o_proj_slices(name):
    """Head h of block L, at layer L + 1: ``z_h W_O[h]`` from Hugging Face's own ``o_proj``
    input, through the block's post-attention norm (sigma from ``o_proj``'s own output) and
    layer scalar, as Hugging Face applies them."""
    model = bridge(name)
    _, seen = hf_run(name)
    ds = td.decompose_layers(model, TOKENS, attention_mask=MASK, granularity="head")
    by_layer = {d.layer: d for d in ds}
    for L, layer in enumerate(hf(name).model.layers):
        z, o = seen[L]
        attn = layer.self_attn
        n = attn.config.num_attention_heads
        weight = attn.o_proj.weight.detach()  # [d_model, n * d_v]
        d_v = weight.shape[1] // n
        heads = torch.stack(
            [
                z[..., h * d_v : (h + 1) * d_v] @ weight[:, h * d_v : (h + 1) * d_v].T
                for h in range(n)
            ]
        )
        if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma: post_attention_layernorm
            post = layer.post_attention_layernorm  # normalises the attention's output
            rms = (o.square().mean(-1, keepdim=True) + post.eps).sqrt()
            heads = heads / rms * post.weight.detach()
        heads = heads * getattr(layer, "layer_scalar", torch.ones(()))
        d = by_layer[L + 1]
        for h in range(n):
            err = _relative(d.factors[d.labels.index(f"L{L}H{h}")], heads[h], MASK)
            assert err <= TOLERANCE[torch.float64], (name, L, h, err)


# Left padding only on Llama 4 (its chunks start at the first real token): Hugging Face's
# own DeepSeek-V3 and Gemma-4 (sliding window) forwards turn left-padded rows into NaN.
SVD_CASES = [("llama4", 0), ("llama4", 1), ("deepseek_v3", 0), ("deepseek_v3_wide_v", 0)]
SVD_CASES += [("youtu_wide_v", 0), ("gemma4_text", 0)]


@pytest.mark.parametrize(("name", "left"), SVD_CASES)
def test_effective_attention_is_a_per_row_svd(name, left):
    """Against one SVD per row, over exactly the keys that row sees."""
    model = bridge(name)
    tokens, mask = (LEFT, LEFT_MASK) if left else (TOKENS, MASK)
    spec = td.model_spec(model)
    _, cache = model.run_with_cache(
        tokens, attention_mask=mask, names_filter=spec.names_filter(attention=True)
    )
    for L, blk in enumerate(spec.blocks):
        eff = td.effective_attention(cache, L, attention_mask=mask).double()
        a = cache[blk.pattern].double()
        v = blk.values(cache).double()  # [batch pos head d], whatever the hook's layout
        v = v[:, :, list(spec.kv_head)] if v.shape[2] != spec.n_heads else v
        for b in range(tokens.shape[0]):
            valid = mask[b].nonzero()[:, 0].tolist()
            first = valid[0]
            for q in valid:
                keys = [k for k in valid if k <= q]
                if blk.window is not None:
                    keys = [k for k in keys if q - blk.window < k]
                if blk.chunk is not None:
                    keys = [k for k in keys if (k - first) // blk.chunk == (q - first) // blk.chunk]
                for h in range(spec.n_heads):
                    want = projected_row(a[b, h, q], v[b, keys, h] @ blk.W_O[h].double(), keys)
                    err = (eff[b, h, q] - want).abs().max().item()
                    assert err <= 1e-9, (name, L, b, q, h, err)


def test_llama4_chunks_are_derived_and_matter():
    """The chunk size is read from the model, and a row past the first chunk sees fewer
    keys than its causal prefix (so the check above tests the chunk, not plain causality)."""
    model = bridge("llama4")
    spec = td.model_spec(model)
    assert {b.chunk for b in spec.blocks} == {zoo.WINDOW}
    _, cache = model.run_with_cache(TOKENS, names_filter=spec.names_filter(attention=True))
    a = cache[spec.blocks[0].pattern]
    assert (a[..., zoo.WINDOW, : zoo.WINDOW] == 0).all()  # first key of the second chunk


def test_mla_values_and_z_are_read_in_the_library_layout():
    """Values wider than the query/key head: W_O per head from o_proj, z re-split by it."""
    model = bridge("deepseek_v3_wide_v")
    spec = td.model_spec(model)
    blk = spec.blocks[0]
    assert tuple(blk.W_O.shape) == (spec.n_heads, 12, spec.d_model) and spec.d_head == 8
    _, cache = model.run_with_cache(TOKENS[:1])
    assert cache[blk.z].shape[-1] == 8  # the bridge's split
    z, v = blk.heads(cache[blk.z]), blk.values(cache)
    a = cache[blk.pattern]
    assert torch.allclose(torch.einsum("bhqk,bkhd->bqhd", a, v), z, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["gemma4_text", "gemma4_text_scalars"])
def test_gemma4_terms(name):
    """Norms read as plain-gain RMSNorms without hook_scale, a per-layer-input term per block
    (kind f), the layer scalar read from the weights, and granularity token refused by name."""
    model = bridge(name)
    spec = td.model_spec(model)
    scalars = VARIANTS[name][2] if name in VARIANTS else [1.0] * spec.n_layers
    assert [b.out_scale for b in spec.blocks] == scalars
    for blk in spec.blocks:
        assert blk.attn_post is not None and blk.attn_post.rms and blk.attn_post.scale == ""
        assert blk.v.endswith("v_norm.hook_out")
    d = td.decompose(model, TOKENS, attention_mask=MASK, granularity="layer", layer=2)
    assert {"0_per_layer_input", "1_per_layer_input"} <= set(d.labels)
    assert d.kinds[d.labels.index("0_per_layer_input")] == "f"
    with pytest.raises(NotImplementedError, match="per-layer-input"):
        td.decompose(model, TOKENS, attention_mask=MASK, granularity="token", layer=1)


def test_mla_token_granularity_is_refused_by_name():
    with pytest.raises(NotImplementedError, match="latent attention"):
        td.decompose(bridge("deepseek_v2"), TOKENS, attention_mask=MASK, granularity="token")


def test_dsa_indexer_attention_is_refused_by_name():
    """GLM-MoE-DSA's indexer picks each query's keys: no key set the spec can derive."""
    with pytest.raises(NotImplementedError, match="indexed_attention"):
        td.model_spec(bridge("glm_moe_dsa"))
