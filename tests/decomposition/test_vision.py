"""Vision transformers (ViT, DeiT) on a TransformerBridge: pixel values in, patches as positions.

Tiny random models from the zoo's vision section (`tests/support/zoo.py`, 16x16 RGB images in
4x4 patches after CLS, and DeiT's distillation token). Every layer at every granularity must
sum to Hugging Face's own hidden states (and, at ``"final"``, its ``last_hidden_state``, after
the final LayerNorm); effective attention must match one SVD per row over every position
(no causal mask, no padding); Hidden Token Attribution must match a reverse-mode Jacobian.
Inputs are checked before any work: wrong rank, channels or size, and text or token ids
given to a vision model (pixels to a text model likewise) raise by name.
"""

from __future__ import annotations

import functools

import pytest
import torch
from support import zoo
from support.models import KINDS

import tl_decomp as td

pytestmark = pytest.mark.skipif(KINDS[-1] != "bridge", reason="vision models need the bridge")

VISION = sorted(f for f, spec in zoo.FAMILIES.items() if spec.pixels)
GRANULARITIES = ("coarse", "layer", "head", "source", "token")
TOL = 1e-9  # float64, relative to Hugging Face's own state


@functools.cache
def _model(family: str):
    return zoo.boot(family)


@functools.cache
def _hf_states(family: str) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Hugging Face's ``hidden_states`` (the embeddings, then each block's output, all before
    the final LayerNorm) and its ``last_hidden_state`` (after it)."""
    hf = zoo.hf_reference(family)
    base = getattr(hf, hf.base_model_prefix, hf)  # the ViTModel inside a classifier
    with torch.inference_mode():
        out = base(zoo.pixels(family), output_hidden_states=True)
    return out.hidden_states, out.last_hidden_state


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want.to(got)).abs().max() / want.abs().max()).item()


def test_zoo_bridge_matches_hugging_face():
    """The zoo's vision models run on pixels and give Hugging Face's output exactly."""
    for family in VISION:
        hf = zoo.hf_reference(family)
        x = zoo.pixels(family)
        with torch.inference_mode():
            ours = _model(family)(x)
            out = hf(x)
        ref = out.logits if hasattr(out, "logits") else out.last_hidden_state
        assert _rel(ours, ref) <= TOL, family


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("family", VISION)
def test_every_layer_sums_to_hugging_face(family, granularity):
    model, x = _model(family), zoo.pixels(family)
    states, last = _hf_states(family)
    ds = td.decompose_layers(model, x, granularity=granularity)
    assert [d.layer for d in ds] == [*range(len(states)), "final"]
    image = td.adapters.image_input(model)
    assert image is not None
    for d in ds:
        want = last if d.layer == "final" else states[d.layer]
        assert d.factors.shape[1:] == (2, image.n_pos, 32)
        assert _rel(d.factors.sum(0), want) <= TOL, (family, granularity, d.layer)
        assert d.relative_error <= TOL
        assert bool(d.mask().all())  # no padding: every patch is a real position


@pytest.mark.parametrize("family", VISION)
def test_one_layer_and_one_image(family):
    """`decompose` at one layer, and a 3-D tensor read as one image."""
    model, x = _model(family), zoo.pixels(family)
    states, _ = _hf_states(family)
    d = td.decompose(model, x, layer=2, granularity="head")
    assert _rel(d.factors.sum(0), states[2]) <= TOL
    one = td.decompose(model, x[1], layer=2)
    assert one.factors.shape[1] == 1 and _rel(one.factors.sum(0)[0], states[2][1]) <= TOL


@pytest.mark.parametrize("family", VISION)
def test_patch_labels(family):
    model = _model(family)
    d = td.decompose(model, zoo.pixels(family), layer=1)
    labels = d.str_tokens()
    prefix = ["CLS", "DIST"] if family == "deit" else ["CLS"]
    assert labels[: len(prefix)] == prefix
    assert labels[len(prefix)] == "patch0 (r0,c0)" and labels[-1] == "patch15 (r3,c3)"
    assert len(labels) == d.factors.shape[2]


def vision_outcome(family: str) -> tuple[str, str]:
    """(status, detail) for the README's architecture table: ``("exact", "<max relative
    error> (float64)")`` over every layer and granularity against Hugging Face's states,
    effective attention against one SVD per row and exact HTA against autograd."""
    try:
        model, x = _model(family), zoo.pixels(family)
        states, last = _hf_states(family)
        worst = 0.0
        for granularity in GRANULARITIES:
            for d in td.decompose_layers(model, x, granularity=granularity):
                want = last if d.layer == "final" else states[d.layer]
                worst = max(worst, _rel(d.factors.sum(0), want))
        worst = max(worst, _attention_error(family), _attribution_error(family))
    except NotImplementedError as err:
        return "refused", str(err).split(" is not supported")[0]
    return "exact", f"{worst:.1e} (float64)"


@pytest.mark.parametrize("family", VISION)
def test_effective_attention_matches_one_svd_per_row(family):
    """Non-causal, no padding: every row sees every position."""
    assert _attention_error(family) <= 1e-12


def _attention_error(family: str) -> float:
    model, x = _model(family), zoo.pixels(family)
    spec = td.model_spec(model)
    assert not spec.causal
    _, cache = model.run_with_cache(x, names_filter=spec.names_filter(attention=True))
    worst = 0.0
    for L, blk in enumerate(spec.blocks):
        eff = td.effective_attention(cache, L)
        a, v = cache[blk.pattern].double(), blk.values(cache).double()
        for b in range(x.shape[0]):
            for h in range(spec.n_heads):
                t = v[b, :, h] @ blk.W_O[h].double()  # [key d_model]: the same for every row
                u, s, _ = torch.linalg.svd(t, full_matrices=False)
                tol = torch.finfo(torch.float64).eps * max(t.shape) * s[0]
                basis = u[:, s > tol]
                want = a[b, h] @ basis @ basis.T
                worst = max(worst, (eff[b, h].double() - want).abs().max().item())
    return worst


@pytest.mark.parametrize("family", VISION)
def test_hidden_token_attribution_matches_autograd(family):
    """Exact HTA over patches against a reverse-mode Jacobian of every block output with
    respect to block 0's input."""
    # Hugging Face's eager attention takes its softmax in float32 even in a float64 model:
    # forward- and reverse-mode derivatives through it round differently (measured 1.0e-8).
    assert _attribution_error(family) <= 1e-7


def _attribution_error(family: str) -> float:
    model, x = _model(family), zoo.pixels(family, batch=1)
    spec = td.model_spec(model)
    att = td.hidden_token_attribution(model, x, method="exact")
    got: dict[str, torch.Tensor] = {}
    sites = [b.out for b in spec.blocks]

    def run(e0):
        def replace(t, *, hook):
            return e0

        def keep(t, *, hook):
            got[hook.name] = t

        with model.hooks(fwd_hooks=[(spec.layer0, replace), *((s, keep) for s in sites)]):
            model(x)
        return torch.stack([got[s] for s in sites])

    with torch.inference_mode(False):
        _, cache = model.run_with_cache(x, names_filter=lambda h: h == spec.layer0)
        jac = torch.autograd.functional.jacobian(run, cache[spec.layer0].clone())
    assert isinstance(jac, torch.Tensor)  # one input, one output: one Jacobian
    norms = jac[:, 0, :, :, 0].double().pow(2).sum((2, 4)).sqrt()  # [layer query key]
    ref = norms / norms.sum(-1, keepdim=True)
    assert att.contributions.shape == (spec.n_layers, 1, *ref.shape[1:])
    assert torch.equal(att.tokens, x)
    return (att.contributions[:, 0] - ref).abs().max().item()


def test_vision_inputs_are_checked_first():
    model, x = _model("vit"), zoo.pixels("vit")
    for bad, err, match in (
        (x[0, 0], ValueError, r"\[batch channels height width\]"),
        (x[:, :2], ValueError, "3 channels of 16x16 pixels, not 2"),
        (x[..., :8], ValueError, "not 3 of 16x8"),
        (x[:0], ValueError, "no images"),
        ("a photo of a cat", TypeError, "reads pixel values.*not text"),
        (["a", "b"], TypeError, "not text"),
        (torch.tensor([[1, 2, 3]]), TypeError, "reads pixel values.*not torch.int64"),
    ):
        with pytest.raises(err, match=match):
            td.decompose(model, bad, layer=1)
    with pytest.raises(ValueError, match="not padded"):
        td.decompose(model, x, attention_mask=torch.ones(2, 17))
    with pytest.raises(TypeError, match="reads pixel values"):
        td.hidden_token_attribution(model, "a cat")


def test_pixels_given_to_a_text_model_are_refused():
    with pytest.raises(TypeError, match="looks like pixel values"):
        td.decompose(zoo.boot("gpt2"), zoo.pixels("vit"))


@pytest.mark.parametrize("family", VISION)
def test_logit_attribution_is_refused_by_name(family):
    d = td.decompose(_model(family), zoo.pixels(family))
    with pytest.raises(NotImplementedError, match="logit attribution on a vision model"):
        d.logit_attrs(torch.tensor([0, 1]))
