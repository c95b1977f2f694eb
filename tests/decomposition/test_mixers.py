"""Token mixers that are not attention (state-space models, short convolutions, linear
attention, RWKV's time mixing), pure and in hybrids with attention, checked against Hugging Face.

Each family boots from the zoo (`tests/support/zoo.py`). A mixer block contributes one term,
``{L}_mixer_out`` (coarse kind ``m``): what Hugging Face's own mixer module returns, captured with
a forward hook on a separately loaded Hugging Face model, times the block's residual multiplier.
Attention blocks of a hybrid keep their head and key splits; what needs a pattern (a split of a
mixer by source token, effective attention of a mixer block, the token split) is refused by name,
and so are mixers the bridge does not model.
"""

from __future__ import annotations

import functools

import pytest
import torch
from support import zoo
from support.models import TL3

import tl_decomp as td
from tl_decomp._core.spec import ROUNDED_NORM_TOLERANCE

pytestmark = pytest.mark.skipif(TL3, reason="the bridge zoo is TransformerLens 4.x's")

TOKENS = torch.tensor(
    [[1, 5, 6, 7, 5, 8, 9, 10, 5, 11, 12, 13], [1, 5, 6, 7, 8, 9, 5, 10, 11, 0, 0, 0]]
)
MASK = (torch.arange(12) < torch.tensor([[12], [9]])).long()
PURE = ["mamba", "falcon_mamba", "mamba2", "rwkv"]
HYBRID = ["jamba", "bamba", "falcon_h1", "granite_moe_hybrid", "lfm2", "qwen3_next", "olmo_hybrid"]


@functools.cache
def model(family: str):
    return zoo.boot(family)


def _hf_mixer_outputs(family: str, bridge) -> dict[int, torch.Tensor]:
    """Each mixer block's output as Hugging Face's own module returns it, on a separately
    loaded Hugging Face model (the module found by its name in the bridge's copy)."""
    spec = td.model_spec(bridge)
    names = {id(m): n for n, m in bridge.original_model.named_modules()}
    hf = zoo.hf_reference(family)
    got: dict[int, torch.Tensor] = {}
    handles = []
    for L, blk in enumerate(spec.blocks):
        if blk.mixer is None:
            continue
        component = bridge.blocks[L].get_submodule(blk.mixer.split(".")[2])
        # the bridge wraps each module it hooks: its path in plain Hugging Face drops them
        path = names[id(component.original_component)].replace("._original_component", "")
        module = hf.get_submodule(path.replace("_original_component.", ""))

        def keep(mod, args, out, L=L):
            got[L] = (out[0] if isinstance(out, tuple) else out).detach()

        handles.append(module.register_forward_hook(keep))
    try:
        with torch.no_grad():
            hf(TOKENS, attention_mask=MASK)
    finally:
        for h in handles:
            h.remove()
    return got


@pytest.mark.parametrize("family", PURE + HYBRID)
def test_mixer_term_is_hugging_faces_mixer_output(family):
    bridge = model(family)
    spec = td.model_spec(bridge)
    ref = _hf_mixer_outputs(family, bridge)
    assert ref, "no mixer block found"
    ds = td.decompose_layers(bridge, TOKENS, attention_mask=MASK, granularity="layer")
    real = MASK.bool()
    for L, want in ref.items():
        d = ds[L + 1]
        got = d.factors[d.labels.index(f"{L}_mixer_out")]
        want = spec.blocks[L].residual_scale * want.to(got)
        err = (got - want)[real].abs().max() / want[real].abs().max()
        assert err <= 1e-9, f"{family} block {L}: {err:.2e}"
    # Every factor is exact against the model's own state (checked inside), with m in coarse.
    coarse = ds[-1].coarse()
    assert coarse.kinds == ("i", "h", "m", "f", "c")
    assert torch.allclose(coarse.factors.sum(0), ds[-1].factors.sum(0), rtol=0, atol=1e-10)


@pytest.mark.parametrize("family", HYBRID)
def test_hybrid_attention_blocks_keep_head_and_key_splits(family):
    bridge = model(family)
    spec = td.model_spec(bridge)
    attending = [L for L, b in enumerate(spec.blocks) if b.pattern]
    assert attending, "a hybrid has attention blocks"
    _, cache = bridge.run_with_cache(TOKENS, attention_mask=MASK)
    eff = td.effective_attention_layers(cache, model=bridge, attention_mask=MASK)
    assert eff.shape[0] == len(attending)
    head = td.decompose(bridge, TOKENS, attention_mask=MASK, layer="final", granularity="head")
    try:
        src = td.decompose(bridge, TOKENS, attention_mask=MASK, layer="final", granularity="source")
    except NotImplementedError as err:  # Qwen3-Next gates its heads' output
        assert "is not blocks." in str(err) and "times" in str(err), err
        return
    for L in attending:
        for h in range(spec.n_heads):
            keys = [k for k, label in enumerate(src.labels) if label.startswith(f"L{L}H{h}K")]
            summed = src.factors[keys].sum(0)
            want = head.factors[head.labels.index(f"L{L}H{h}")]
            assert torch.allclose(summed, want, rtol=0, atol=1e-10)
    # a mixer's term stays whole at source granularity
    mixers = [L for L, b in enumerate(spec.blocks) if b.mixer]
    assert all(f"{L}_mixer_out" in src.labels for L in mixers)


@pytest.mark.parametrize("family", ["mamba", "jamba"])
def test_what_needs_a_pattern_is_refused_on_a_mixer(family):
    bridge = model(family)
    spec = td.model_spec(bridge)
    L = next(L for L, b in enumerate(spec.blocks) if b.mixer)
    _, cache = bridge.run_with_cache(TOKENS, names_filter=td.source_names_filter(bridge))
    with pytest.raises(NotImplementedError, match="token mixer that is not attention"):
        td.decompose(bridge, TOKENS, granularity="token")
    with pytest.raises(NotImplementedError, match="token mixer that is not attention"):
        td.effective_attention(cache, L, model=bridge)
    with pytest.raises(NotImplementedError, match="token mixer that is not attention"):
        td.source_shares(cache, L, model=bridge)
    with pytest.raises(NotImplementedError, match="term.s. m"):
        td.word_factors(bridge, ([["the", "cat"]], [["D", "N"]]), progress=False)
    rep = td.report(bridge, "the cat sat on the mat", progress=False)
    assert any("token mixer is not attention" in s for s in rep.left_out)
    assert rep.flow is None and "i + h + m + f + c" in rep.html()


def test_a_model_without_attention_is_causal_by_its_own_outputs():
    spec = td.model_spec(model("mamba"))
    assert spec.causal and all(b.mixer and not b.pattern for b in spec.blocks)
    with pytest.raises(NotImplementedError, match="none of whose blocks is attention"):
        td.attention_correlation(model("mamba"), ["the cat sat"])


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_a_residual_rounded_to_float32_widens_the_tolerance(family):
    """Mamba's ``residual_in_fp32`` rounds the residual stream even in a float64 model: the
    model's own states carry float32 rounding, which the tolerance takes in as it does for a
    float32 norm; the terms still sum to Hugging Face's states to that rounding."""
    bridge = model(family)
    assert all(b.rounds for b in td.model_spec(bridge).blocks)
    d = td.decompose(bridge, TOKENS, attention_mask=MASK, layer=3)
    assert 1e-12 < d.relative_error <= ROUNDED_NORM_TOLERANCE


def test_streamed_shares_equal_the_materialised_ones_on_a_hybrid():
    bridge = model("jamba")
    full = td.decompose_layers(bridge, TOKENS, attention_mask=MASK, granularity="layer")
    streamed = td.decompose_layers(
        bridge, TOKENS, attention_mask=MASK, granularity="layer", reduce="shares"
    )
    for d, r in zip(full, streamed, strict=True):
        assert r.labels == d.labels
        real = MASK.bool()
        assert torch.allclose(r.values[:, real], d.shares()[:, real], rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "family, reason",
    [
        ("nemotron_h", "opaque token mixer"),  # one "mixer" passes attention and experts through
        ("zamba2", "opaque block"),  # its shared attention block is not hooked
        ("recurrent_gemma", "opaque block"),  # Griffin's blocks are wrapped whole
    ],
)
def test_mixers_the_bridge_does_not_model_are_refused(family, reason):
    with pytest.raises(NotImplementedError, match=reason):
        td.decompose(zoo.boot(family), TOKENS, layer=1)
