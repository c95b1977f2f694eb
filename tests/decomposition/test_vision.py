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


# -- split_input: the embedding's patches, prefix tokens and positions ---------------------


@pytest.mark.parametrize("family", VISION)
def test_split_input_matches_hugging_face_embedding_pieces(family):
    """``patch`` + ``patch_bias`` is Hugging Face's own patch embedding (conv, bias included),
    the prefix tokens and position embeddings are its parameters, each at its own positions,
    and every layer still sums to Hugging Face's hidden states."""
    model, x = _model(family), zoo.pixels(family)
    states, last = _hf_states(family)
    hf = zoo.hf_reference(family)
    emb = getattr(hf, hf.base_model_prefix, hf).embeddings
    prefix = ["cls_token", "distillation_token"] if family == "deit" else ["cls_token"]
    ds = td.decompose_layers(model, x, granularity="head", split_input=True)
    assert [d.layer for d in ds] == [*range(len(states)), "final"]
    for d in ds:
        want = last if d.layer == "final" else states[d.layer]
        assert _rel(d.factors.sum(0), want) <= TOL, (family, d.layer)
    d0 = ds[0]
    assert list(d0.labels[: 3 + len(prefix)]) == ["patch", "patch_bias", *prefix, "pos_embed"]
    term = dict(zip(d0.labels, d0.factors, strict=True))
    n = len(prefix)
    with torch.inference_mode():
        patches = emb.patch_embeddings(x)  # [batch patch d_model], the conv's bias included
    assert _rel((term["patch"] + term["patch_bias"])[:, n:], patches) <= 1e-12
    bias = emb.patch_embeddings.projection.bias
    assert _rel(term["patch_bias"][:, n:], bias.expand_as(patches)) == 0.0
    for k, name in enumerate(prefix):
        assert torch.equal(term[name][:, k], getattr(emb, name)[0, 0].expand(2, -1).to(x))
        assert not term[name][:, [j for j in range(term[name].shape[1]) if j != k]].any()
    for name in ("patch", "patch_bias"):
        assert not term[name][:, :n].any()  # the prefix tokens have no patch
    assert torch.equal(term["pos_embed"], emb.position_embeddings.expand(2, -1, -1).to(x))
    pieces = torch.stack([term[k] for k in ["patch", "patch_bias", *prefix, "pos_embed"]])
    assert _rel(pieces.sum(0), states[0]) <= 1e-12


def test_split_input_coarse_float32_and_own_cache():
    """Coarse granularity keeps one input row; a float32 model splits within float32; a cache
    run with the split's names filter holds the pixels it re-reads."""
    model, x = _model("vit"), zoo.pixels("vit")
    states, _ = _hf_states("vit")
    d = td.decompose(model, x, layer=0, split_input=True)
    assert d.labels[0] == "i" and _rel(d.factors[0], states[0]) <= 1e-12
    names = td.decomposition_names_filter(model, granularity="layer", split_input=True)
    _, cache = model.run_with_cache(x, names_filter=names)
    own = td.decompose(model, cache, layer=2, granularity="layer", split_input=True)
    assert own.labels[0] == "patch" and _rel(own.factors.sum(0), states[2]) <= TOL
    f32 = zoo.boot("vit", torch.float32)
    d32 = td.decompose(f32, x.float(), layer=3, granularity="layer", split_input=True)
    assert d32.labels[0] == "patch" and _rel(d32.factors.sum(0), states[3]) <= 1e-4


def test_split_input_refuses_a_split_that_misses_the_embedding():
    model, x = _model("vit"), zoo.pixels("vit")
    _, cache = model.run_with_cache(x, names_filter=lambda n: n == "embed.hook_out")
    hooked = cache["embed.hook_out"]
    assert len(td.adapters.embedding_terms(model, x, hooked, torch.float64)) == 4
    with pytest.raises(NotImplementedError, match="sum to its output only to"):
        td.adapters.embedding_terms(model, x, hooked * (1 + 1e-9), torch.float64)


# -- token identifiability on patches ------------------------------------------------------


def _nearest_reference(states, e0):
    """Brute force, one image and position at a time: the first position of the same image
    whose layer-0 vector has the highest cosine with the state (a zero vector scores 0)."""
    out = torch.empty(states.shape[:-1], dtype=torch.long)
    for b in range(states.shape[0]):
        for t in range(states.shape[1]):
            best, arg = -2.0, -1
            for j in range(e0.shape[1]):
                u, v = states[b, t], e0[b, j]
                norm = (u.norm() * v.norm()).item()
                s = (u @ v).item() / norm if norm > 0 else 0.0
                if s > best:
                    best, arg = s, j
            out[b, t] = arg
    return out


@pytest.mark.parametrize("family", VISION)
def test_identifiability_on_patches_matches_brute_force(family):
    """Naive cosine rates per layer on 4 images equal a nearest-neighbour search over Hugging
    Face's own hidden states; layer 0 identifies itself wherever its vectors are distinct."""
    model, x = _model(family), zoo.pixels(family, batch=4, seed=3)
    res = td.token_identifiability(
        model, x, mapping="naive", test_fraction=0.75, batch_size=2, progress=False
    )
    hf = zoo.hf_reference(family)
    with torch.inference_mode():
        states = getattr(hf, hf.base_model_prefix, hf)(x, output_hidden_states=True).hidden_states
    image = td.adapters.image_input(model)
    assert image is not None
    assert res.layers == tuple(range(len(states))) and res.match == "position"
    assert sorted(res.train + res.test) == [0, 1, 2, 3] and len(res.test) == 3
    test = list(res.test)
    for k, hs in enumerate(states):
        nearest = _nearest_reference(hs[test], states[0][test])
        hits = nearest == torch.arange(image.n_pos)
        assert res.rate(k) == pytest.approx(hits.double().mean().item(), abs=0), (family, k)
    e0 = states[0][test]
    distinct = all(torch.unique(e, dim=0).shape[0] == image.n_pos for e in e0)
    if distinct:
        assert res.rate(0) == 1.0
    else:  # DeiT's zoo copy keeps zero CLS and distillation tokens: DIST finds CLS first
        assert res.rate(0) < 1.0
    assert res.positions.tolist() == list(range(image.n_pos)) * 3
    assert torch.equal(res.token_ids, res.positions)  # positions stand in for token ids


def test_identifiability_on_patches_inputs_and_batching():
    """A sequence of images is the same corpus as their stack; batch size changes nothing;
    a fitted map splits by image."""
    model, x = _model("vit"), zoo.pixels("vit", batch=6, seed=1)
    a = td.token_identifiability(model, x, mapping="naive", batch_size=4, progress=False)
    b = td.token_identifiability(model, list(x), mapping="naive", batch_size=1, progress=False)
    assert torch.equal(a.rates, b.rates) and a.test == b.test
    lin = td.token_identifiability(model, x, mapping="linear", distance="l2", progress=False)
    assert set(lin.train).isdisjoint(lin.test) and len(lin.train + lin.test) == 6
    assert lin.rate(0) == 1.0 and lin.rates.shape == (4,)


def test_identifiability_on_patches_checks_input_first():
    model, x = _model("vit"), zoo.pixels("vit", batch=4)
    for bad, err, match in (
        (x, ValueError, "lookup='vocab'.*pixels"),
        (x[0], ValueError, r"\[n_images channels height width\]"),
        (x[:, :2], ValueError, "3 channels of 16x16 pixels, not 2"),
        ([x[0], x[1, :, :8]], ValueError, r"corpus\[1\].*not 3 of 8x16"),
        ([x[0], x[1, 0]], ValueError, r"corpus\[1\]: one image is \[channels height width\]"),
        (["a photo", "a cat"], TypeError, "reads pixel values.*not text"),
        (x[:0], ValueError, "no images"),
    ):
        lookup = "vocab" if match.startswith("lookup") else "sequence"
        with pytest.raises(err, match=match):
            td.token_identifiability(model, bad, lookup=lookup, progress=False)
    with pytest.raises(ValueError, match="match='token'.*patches have none"):
        td.token_identifiability(model, x, match="token", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        td.token_identifiability(model, x, batch_size=0, progress=False)
    with pytest.raises(TypeError):
        td.token_identifiability(zoo.boot("gpt2"), x, progress=False)
