"""Logit attribution: the factors' logits sum to the model's own logits (final embedding) and
to the logit lens's (block outputs), on every tiny architecture and model class."""

from __future__ import annotations

import pytest
import torch
from support.models import KINDS, cached_model, model_params, skip_broken

from tl_decomp import LogitAttribution, decompose, decompose_layers

TOKENS = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 10, 11, 12, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def _logits(model):
    kind = type(model).__name__
    key = "one_zero_attention_mask" if kind == "HookedEncoder" else "attention_mask"
    with torch.inference_mode():
        out = model(TOKENS, **{key: MASK})
    return getattr(out, "logits", out).double()


@pytest.mark.parametrize("case", [p.values[0] for p in model_params()], ids=str)
def test_final_embedding_sums_to_the_models_logits(case):
    arch, kind, processed = case
    skip_broken(arch, kind, processed, torch.float64)
    model = cached_model(arch, kind, torch.float64, processed)
    if arch == "bert":
        with pytest.raises(NotImplementedError, match="head"):
            decompose(model, TOKENS, attention_mask=MASK).logit_attrs(5)
        return
    d = decompose(model, TOKENS, attention_mask=MASK, granularity="head")
    la = d.logit_attrs(torch.tensor([5, 9]), incorrect=7)
    logits = _logits(model)
    want = torch.stack([logits[0, :, 5] - logits[0, :, 7], logits[1, :, 9] - logits[1, :, 7]])
    real = MASK.bool()
    err = (la.values.sum(0) - want)[real].abs().max() / want[real].abs().max()
    assert err < 1e-6 and la.max_abs_error <= 1e-6 * la.logits.abs().max()
    assert la.values.shape[1:] == TOKENS.shape and len(la.labels) == la.values.shape[0]
    assert not la.lens


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_lens_terms_sum_to_the_logit_lens_at_every_layer(arch):
    model = cached_model(arch, "bridge", torch.float64)
    for d in decompose_layers(model, TOKENS, attention_mask=MASK, granularity="layer"):
        la = d.logit_attrs(5)
        with torch.inference_mode():
            x = d.target if d.layer == "final" else model.ln_final(d.target)
            want = model.unembed(x)[..., 5].double()
        real = MASK.bool()
        assert (la.values.sum(0) - want)[real].abs().max() <= 1e-6 * want.abs().max()
        assert la.lens == (d.layer != "final")


def test_ranked_table_and_token_forms():
    model = cached_model("gpt2", "bridge", torch.float64)
    d = decompose(model, "the cat sat on the mat", granularity="layer")
    by_id = d.logit_attrs(6)
    assert isinstance(by_id, LogitAttribution) and "final embedding" in repr(by_id)
    assert torch.equal(
        d.logit_attrs("mat").values,
        d.logit_attrs(model.tokenizer("mat", add_special_tokens=False)["input_ids"][0]).values,
    )
    ranked = by_id.ranked()
    assert [v for _, v in ranked] == sorted((v for _, v in ranked), reverse=True)
    assert list(by_id.to_pandas().columns) == ["label", "logit"]
    with pytest.raises(ValueError, match="not one"):
        d.logit_attrs("the cat")
    with pytest.raises(ValueError, match="integers"):
        d.logit_attrs(torch.tensor([1.5]))


def test_padded_rows_read_their_last_real_token():
    """A padded batch: the tables default to each row's last real token, never padding."""
    model = cached_model("gpt2")
    d = decompose(model, ["the cat sat on the mat", "a dog"], granularity="layer")
    la = d.logit_attrs("mat")
    last = int(d.mask()[1].nonzero().max())
    assert la.position(1, "last") == last < d.tokens.shape[1] - 1
    ranked = dict(la.ranked(batch=1))
    assert abs(sum(ranked.values()) - la.logits[1, last].item()) < 1e-9
    with pytest.raises(ValueError, match="padding"):
        la.ranked(batch=1, pos=-1)
    by_abs = [abs(v) for _, v in la.ranked(batch=1, by="abs")]
    assert by_abs == sorted(by_abs, reverse=True)


def test_targets_as_a_list_one_per_example_and_ids_checked():
    model = cached_model("gpt2")
    d = decompose(model, ["the cat sat", "a dog ran"], granularity="layer")
    both = d.logit_attrs(["mat", "dog"])
    assert torch.allclose(both.values[:, 0], d.logit_attrs("mat").values[:, 0])
    assert torch.allclose(both.values[:, 1], d.logit_attrs("dog").values[:, 1])
    with pytest.raises(ValueError, match="one per example"):
        d.logit_attrs(["mat", "dog", "cat"])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        d.logit_attrs(10**7)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rank_and_top_k_of_the_lens_per_layer(arch, kind):
    """Against a brute-force lens: ``unembed`` of ``accumulated_resid(apply_ln=True)`` at
    every block output, and the model's own logits at the final embedding; the position
    "last" is each row's last real token under padding."""
    model = cached_model(arch, kind)
    ds = decompose_layers(model, TOKENS, attention_mask=MASK)
    _, cache = model.run_with_cache(TOKENS, attention_mask=MASK)
    lens = cache.accumulated_resid(apply_ln=True)  # [layer batch pos d_model]: 0 .. n_layers
    target = 13
    for d in ds:
        la = d.logit_attrs(target)
        with torch.no_grad():
            ref = model(TOKENS, attention_mask=MASK) if d.layer == "final" else None
            ref = model.unembed(lens[d.layer]) if ref is None else getattr(ref, "logits", ref)
        for b, last in ((0, 5), (1, 3)):
            want = ref[b, last].double()
            brute_rank = 1 + sum(1 for v in want.tolist() if v > want[target].item())
            assert la.rank(b) == la.rank(b, last) == brute_rank, (d.layer, b)
            order = sorted(range(len(want)), key=lambda i: -want[i].item())[:4]
            got = la.top_k(4, b)
            assert [i for _, i, _ in got] == order
            assert all(abs(v - want[i].item()) < 1e-9 for _, i, v in got)
            assert got[0][0] == model.tokenizer.decode([order[0]])
    diff = d.logit_attrs(target, incorrect=7)  # a logit difference: the first token's rank
    assert diff.rank(0) == la.rank(0) and diff.top_k(3, 1) == la.top_k(3, 1)
    with pytest.raises(ValueError, match="padding"):
        la.rank(1, 5)
    with pytest.raises(ValueError, match="k must be in 1.."):
        la.top_k(10**9)
