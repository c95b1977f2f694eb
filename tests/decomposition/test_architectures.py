"""Every text family TransformerBridge boots: exact against Hugging Face, or a named refusal.

One tiny random model per family (`tests/support/zoo.py`), a padded batch with repeated tokens:
every block output and the final embedding, coarse and per head, must sum to Hugging Face's
own hidden states, and effective attention must match one SVD per row over exactly the keys
that row sees. A family the library refuses must raise `NotImplementedError` naming the
feature. The README's architecture table is written from these results
(`TL_DECOMP_WRITE_README=1 pytest tests/decomposition/test_architectures.py`), and checked
against them.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import pytest
import torch
from support import zoo
from support.helpers import projected_row
from support.models import KINDS, TL3

import tl_decomp as td

TOKENS = torch.tensor(
    [[1, 5, 6, 7, 5, 8, 9, 10, 5, 11, 12, 13], [1, 5, 6, 7, 8, 9, 5, 10, 11, 0, 0, 0]]
)
MASK = (torch.arange(12) < torch.tensor([[12], [9]])).long()
README = Path(__file__).parents[2] / "README.md"


@functools.cache
def outcome(family: str) -> tuple[str, str]:
    """(status, detail): "exact" with the measured error, "refused" with the reason, or
    "skipped" when this TransformerLens line cannot boot or run the family at all."""
    # Tiny models: threads only synchronise, and on a loaded 2-core machine they thrash.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _outcome(family)
    finally:
        torch.set_num_threads(threads)


def _outcome(family: str) -> tuple[str, str]:
    if TL3 and (zoo.FAMILIES[family].seq2seq or zoo.FAMILIES[family].pixels):
        return "skipped", "the zoo's encoder–decoders and vision models are TransformerLens 4.x's"
    if zoo.FAMILIES[family].seq2seq:  # two stacks: checked in test_seq2seq.py
        from test_seq2seq import seq2seq_outcome

        return seq2seq_outcome(family)
    if zoo.FAMILIES[family].pixels:  # images: checked in test_vision.py
        from test_vision import vision_outcome

        return vision_outcome(family)
    dtype = zoo.dtype_for(family)
    try:
        model = zoo.boot(family, dtype)
        with torch.inference_mode():
            model(TOKENS[:1, :4])
    except Exception as err:  # the bridge itself cannot run it: nothing of ours to test
        return "skipped", f"{type(err).__name__}: {err}"[:160]
    try:
        with torch.inference_mode():
            model.run_with_cache(TOKENS, attention_mask=MASK)
    except Exception as err:  # caching every hook breaks the bridge's own forward
        return "bridge", f"the bridge's run_with_cache fails ({type(err).__name__})"
    gap = _bridge_gap(model, family)
    if gap > (1e-4 if dtype == torch.float32 else 1e-6):
        return "bridge", f"the bridge's padded forward differs from Hugging Face's ({gap:.1e})"
    try:
        worst = max(
            _decomposition_error(model, family), _attention_error(model), _attribution_error(model)
        )
        _identifiability_runs(model)
        worst = max(worst, _logit_error(model, family))
    except NotImplementedError as err:
        return "refused", str(err).split(" is not supported")[0]
    return "exact", f"{worst:.1e} ({str(dtype).removeprefix('torch.')})"


def _bridge_gap(model, family: str) -> float:
    """Relative gap between the bridge's and Hugging Face's logits on the padded batch."""
    hf = zoo.hf_reference(family, zoo.dtype_for(family))
    with torch.inference_mode():
        ours, ref = model(TOKENS, attention_mask=MASK), hf(TOKENS, attention_mask=MASK).logits
    real = MASK.bool()
    return ((ours[real] - ref[real]).abs().max() / ref[real].abs().max()).item()


MOE: set[str] = set()  # families with mixture-of-experts blocks
MIXERS: set[str] = set()  # families with token mixers that are not attention
EXPERT_REFUSALS: dict[str, str] = {}  # ... whose blocks cannot be split by expert
SOURCE_REFUSALS: dict[str, str] = {}  # families whose heads cannot be split by key position
TOKEN_REFUSALS: dict[str, str] = {}  # families the token split refuses by name


def _decomposition_error(model, family: str) -> float:
    """Max relative error of the factors against Hugging Face's hidden states."""
    hf = zoo.hf_reference(family, zoo.dtype_for(family))
    with torch.inference_mode():
        states = hf(TOKENS, attention_mask=MASK, output_hidden_states=True).hidden_states
    real = MASK.bool()[..., None]
    worst = 0.0
    spec = td.model_spec(model)
    if any(b.mixer for b in spec.blocks):
        MIXERS.add(family)
    moe = td.DecompositionRecipe.for_model(model).moe_layers
    if moe:
        MOE.add(family)
    grains = ("coarse", "layer", "head", "source", "token") + (("expert",) if moe else ())
    for granularity in grains:
        try:
            ds = td.decompose_layers(model, TOKENS, attention_mask=MASK, granularity=granularity)
        except NotImplementedError as err:
            if granularity == "token" and (
                "granularity='token'" in str(err) or "by key" in str(err)
            ):
                TOKEN_REFUSALS[family] = str(err)  # MoE, a fused gate/up, z not pattern @ v
                continue
            if granularity == "source" and "by key position" in str(err):
                SOURCE_REFUSALS[family] = str(err)  # hook_z is not pattern @ hook_v
                continue
            if granularity != "expert" or "by expert" not in str(err):
                raise
            EXPERT_REFUSALS[family] = str(err)
            continue
        # HF numbers hidden_states as we do, except that on decoders the last one is the
        # final norm's output (our "final"): the last block's own output has none. Mamba and
        # RWKV list each block's output, not its input: their first state is block 0's output.
        shift = int(not _same(ds[0], states[0], real) and _same(ds[1], states[0], real))
        for d in ds:
            i = spec.n_layers if d.layer == "final" else d.layer - shift
            if d.layer == spec.n_layers and spec.final != d.site or i < 0:
                continue
            total = d.factors.sum(0).masked_fill(~real, 0)
            ref = states[i].to(total).masked_fill(~real, 0)
            worst = max(worst, ((total - ref).abs().max() / ref.abs().max()).item())
    return worst


def _same(d, state, real) -> bool:
    total = d.factors.sum(0).masked_fill(~real, 0)
    ref = state.to(total).masked_fill(~real, 0)
    return bool((total - ref).abs().max() <= 1e-6 * ref.abs().max())


def _attention_error(model) -> float:
    """Max |A_eff - A P_row| over every layer, head and row, P_row from one SVD of V over
    exactly the keys that row sees (causal prefix, window, padding)."""
    spec = td.model_spec(model)
    _, cache = model.run_with_cache(
        TOKENS, attention_mask=MASK, names_filter=spec.names_filter(attention=True)
    )
    worst = 0.0
    for L, blk in enumerate(spec.blocks):
        if not blk.pattern:  # a token mixer that is not attention
            with pytest.raises(NotImplementedError, match="token mixer"):
                td.effective_attention(cache, L, attention_mask=MASK)
            continue
        eff = td.effective_attention(cache, L, attention_mask=MASK)
        a = cache[blk.pattern].double()
        v = blk.values(cache).double()  # [batch pos head d] (MLA's hook holds [b h p d])
        v = v[:, :, list(spec.kv_head)] if v.shape[2] != spec.n_heads else v
        for b in range(TOKENS.shape[0]):
            n = int(MASK[b].sum())
            for q in range(n):
                keys = [k for k in range(n) if (not spec.causal or k <= q)]
                if blk.window is not None:
                    keys = [k for k in keys if q - blk.window < k]
                if blk.chunk is not None:  # Llama 4: the query's own chunk (right padding)
                    keys = [k for k in keys if k // blk.chunk == q // blk.chunk]
                for h in range(spec.n_heads):
                    want = projected_row(a[b, h, q], v[b, keys, h] @ blk.W_O[h].double(), keys)
                    worst = max(worst, (eff[b, h, q].double() - want).abs().max().item())
    return worst


def _attribution_error(model) -> float:
    """Max |c - reference| of exact Hidden Token Attribution, the reference from a reverse-mode
    Jacobian of every block output with respect to block 0's input (plain autograd)."""
    spec = td.model_spec(model)
    tokens = TOKENS[:1, :5]
    att = td.hidden_token_attribution(model, tokens, method="exact")
    got: dict[str, torch.Tensor] = {}
    sites = [b.out for b in spec.blocks]

    def run(x):
        def replace(t, *, hook):
            return x

        def keep(t, *, hook):
            got[hook.name] = t

        with model.hooks(fwd_hooks=[(spec.layer0, replace), *((s, keep) for s in sites)]):
            model(tokens)
        return torch.stack([got[s] for s in sites])

    with torch.inference_mode(False):
        _, cache = model.run_with_cache(tokens, names_filter=lambda h: h == spec.layer0)
        x0 = cache[spec.layer0].clone()
        jac = torch.autograd.functional.jacobian(run, x0)  # [L 1 n d 1 n d]
    norms = jac[:, 0, :, :, 0].double().pow(2).sum((2, 4)).sqrt()  # [L query key]
    ref = norms / norms.sum(-1, keepdim=True)
    worst = 0.0
    for i, layer in enumerate(att.layers):
        if layer > 0:
            worst = max(
                worst, (att.contributions[i, 0].double() - ref[layer - 1]).abs().max().item()
            )
    return worst


LOGIT_REFUSALS: dict[str, set[str]] = {}  # family -> "final" / "lens" where attribution refused


def _logit_error(model, family: str) -> float:
    """Max relative error of logit attribution: the final embedding's against the model's own
    unembedding output, each block output's against the logit lens ``unembed(ln_final(x))``."""
    spec = td.model_spec(model)
    ds = td.decompose_layers(model, TOKENS, attention_mask=MASK, granularity="head")
    with torch.inference_mode():
        _, cache = model.run_with_cache(
            TOKENS, attention_mask=MASK, names_filter=lambda h: h == "unembed.hook_out"
        )
    real = MASK.bool()
    worst = 0.0
    for d in ds:
        try:
            la = d.logit_attrs(torch.tensor([5, 9]), incorrect=7)
        except NotImplementedError:
            LOGIT_REFUSALS.setdefault(family, set()).add(
                "final" if d.site == spec.final else "lens"
            )
            continue
        if d.site == spec.final:
            out = cache["unembed.hook_out"]
        else:
            with torch.inference_mode():
                out = model.unembed(model.ln_final(d.target))
        want = (out[..., [5, 9]].diagonal(dim1=0, dim2=-1).T - out[..., 7]).to(la.values)
        got = la.values.sum(0)
        worst = max(worst, ((got - want)[real].abs().max() / want[real].abs().max()).item())
    return worst


def _identifiability_runs(model) -> None:
    """Token identifiability (its numbers are checked in test_identifiability.py) runs and
    gives a rate per layer, the layer-0 input identifying itself."""
    texts = ["the cat sat on the mat .", "a dog ran , the cat sat", "the big dog is on a mat"]
    r = td.token_identifiability(model, texts * 4, progress=False)
    rates = torch.as_tensor(r.rates)
    assert rates.shape == (td.model_spec(model).n_layers + 1,) and rates[0] == 1
    assert ((rates >= 0) & (rates <= 1)).all()


FAMILIES = sorted(zoo.FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_exact_or_refused(family):
    status, detail = outcome(family)
    if status == "skipped":
        pytest.skip(f"this TransformerLens line cannot run {family}: {detail}")
    if status == "bridge":
        pytest.skip(f"{family}: {detail}; nothing of tl_decomp's to check against it")
    if status == "refused":
        assert "tl_decomp" in detail or detail, detail
        return
    err = float(detail.split()[0])
    assert err <= (1e-4 if "float32" in detail else 1e-6), f"{family}: {detail}"


def _table() -> str:
    rows = [
        "| family | Hugging Face class | decomposition | logit attribution | by input token |",
        "|---|---|---|---|---|",
    ]
    for family in FAMILIES:
        status, detail = outcome(family)
        if status == "skipped":
            continue
        if status == "exact":
            note = " (float32: Hugging Face refuses float64)" if "float32" in detail else ""
            if family in MOE:
                note += "; per expert: " + ("refused" if family in EXPERT_REFUSALS else "exact")
            if family in MIXERS:
                note += "; token mixers: one term each"
            what = "exact" + note
        elif status == "bridge":
            what = "not checked: " + detail.split(" (")[0] + " (a TransformerLens bug)"
        else:
            what = "refused: " + re.sub(r" \(.*", "", detail.replace("|", "/"))[:120]
        refused = LOGIT_REFUSALS.get(family, set())
        logit = "" if status != "exact" else "exact (final embedding and lens)"
        if refused:
            logit = "refused: a head before W_U" if "final" in refused else "final exact; no lens"
        token = "" if status != "exact" else _token_note(family)
        if status == "exact" and zoo.FAMILIES[family].pixels:
            what = "exact (pixels: CLS and patches)"
            logit = "refused: a classifier reading one position"
            token = "exact"
        if status == "exact" and zoo.FAMILIES[family].seq2seq:
            what = "exact (encoder and decoder, cross-attention `x`)"
            logit = "decoder: " + _seq2seq_logit_note(family)
            token = "refused: an encoder–decoder"
        if status == "exact":  # the largest error of every check, against Hugging Face
            what = what.replace("exact", f"exact (error {detail.split()[0]})", 1)
        cls = zoo.FAMILIES[family].model_class
        rows.append(f"| {family} | {cls} | {what} | {logit} | {token} |")
    return "\n".join(rows)


def _seq2seq_logit_note(family: str) -> str:
    from test_seq2seq import _model

    post = td.model_spec(_model(family), stack="decoder").norm_placement == "post"
    return "final exact; no lens (post-LN)" if post else "exact (final embedding and lens)"


def _token_note(family: str) -> str:
    """``granularity="token"``: exact, or the short reason it is refused."""
    err = TOKEN_REFUSALS.get(family)
    if err is None:
        return "exact"
    for needle, why in (
        ("token mixer", "a token mixer (no pattern)"),
        ("latent attention", "latent attention (values not per head)"),
        ("per-layer-input", "a per-layer-input branch"),
        ("is not act(gate)", "an expert gate not act(gate) * up"),
        ("is not called with", "experts not called with (input, index, weights)"),
        ("mixture-of-experts", "mixture-of-experts MLPs"),
        ("fused", "gate fused with the up-projection"),
        ("no down-projection", "MLP activation not hooked"),
        ("by key position", "z is not pattern @ v"),
        ("times in one", "a module run twice per pass"),
    ):
        if needle in err:
            return "refused: " + why
    return "refused"


@pytest.mark.skipif(KINDS[-1] != "bridge", reason="the README's table is TransformerLens 4.x's")
def test_readme_table_matches_the_code():
    begin, end = "<!-- architectures:begin -->", "<!-- architectures:end -->"
    text = README.read_text()
    table = _table()
    if os.environ.get("TL_DECOMP_WRITE_README") == "1":
        head, rest = text.split(begin)
        _, tail = rest.split(end)
        README.write_text(f"{head}{begin}\n{table}\n{end}{tail}")
        text = README.read_text()
    written = text.split(begin)[1].split(end)[0].strip()
    # The measured errors may differ in their last digit on another CPU: each must be within
    # a factor of 3 of the written one; everything else must be equal.
    number = re.compile(r"\d\.\de-\d\d")
    assert number.sub("#", written) == number.sub("#", table), "README table out of date"
    for got, want in zip(number.findall(table), number.findall(written), strict=True):
        assert 1 / 3 <= float(got) / float(want) <= 3, f"measured {got}, README says {want}"
