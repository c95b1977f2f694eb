"""The bundled real models: adapter facts, and sums checked against Hugging Face itself."""

from __future__ import annotations

import functools

import pytest
import torch
from support.helpers import NoHooksLeft

from tl_decomp import decompose_layers, load_model, model_spec
from tl_decomp.models import _bundled

pytestmark = pytest.mark.bundled
TEXTS = [
    "The cat sat on the mat.",
    "Emma Woodhouse, handsome, clever, and rich, had lived "
    "nearly twenty-one years in the world with very little to distress or vex her.",
]


@functools.cache
def bundled(name):
    return load_model(name)


def test_minilm_facts():
    spec = model_spec(bundled("minilm"))
    assert (spec.norm_placement, spec.norm_type, spec.causal, spec.token_types) == (
        "post",
        "LN",
        False,
        True,
    )
    assert (spec.n_layers, spec.d_model, spec.n_heads, spec.d_head) == (6, 384, 12, 32)
    assert spec.final == "blocks.5.ln2.hook_out"


def test_smollm2_facts_and_paris():
    model = bundled("smollm2")
    spec = model_spec(model)
    assert (spec.norm_placement, spec.norm_type, spec.causal, spec.positional) == (
        "pre",
        "RMS",
        True,
        "rotary",
    )
    assert (spec.n_layers, spec.n_heads, spec.n_kv_heads) == (30, 9, 3)
    assert spec.biases == frozenset()
    logits = model(model.to_tokens("The capital of France is"))
    assert model.tokenizer.decode(logits[0, -1].argmax()) == " Paris"


def test_minilm_sums_to_hugging_face_hidden_states():
    from transformers import BertModel

    model = bundled("minilm")
    hf = BertModel.from_pretrained(str(_bundled.minilm_dir())).eval()
    with NoHooksLeft(model):
        ds = decompose_layers(model, TEXTS, granularity="head")
    tokens, mask = ds[0].tokens, ds[0].attention_mask
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=mask, output_hidden_states=True).hidden_states
    assert [d.layer for d in ds] == list(range(7))  # HF's hidden_states are numbered alike
    for d in ds:
        keep = d.mask()
        err = (d.factors.sum(0)[keep] - ref[d.layer][keep]).abs().max()
        assert err <= 1e-4 * ref[d.layer][keep].abs().max(), (d.layer, err)
        assert d.relative_error < 1e-5


def test_smollm2_sums_to_hugging_face_hidden_states():
    from transformers import LlamaForCausalLM

    model = bundled("smollm2")
    hf = LlamaForCausalLM.from_pretrained(str(_bundled.smollm2_dir())).eval()
    ds = decompose_layers(model, TEXTS, layers=[0, 15, 29, "final"])
    tokens, mask = ds[0].tokens, ds[0].attention_mask
    with torch.no_grad():
        out = hf(input_ids=tokens, attention_mask=mask, output_hidden_states=True)
    final = out.hidden_states[-1]  # HF stores the ln_final output last
    for d in ds:
        ref = final if d.layer == "final" else out.hidden_states[d.layer]
        keep = d.mask()
        err = (d.factors.sum(0)[keep] - ref[keep]).abs().max()
        assert err <= 1e-4 * ref[keep].abs().max(), (d.layer, err)


def test_smollm2_logit_attribution_sums_to_its_logit_where_tl_logit_attrs_does_not():
    # The README's figures: " Paris" after "The capital of France is" on unprocessed SmolLM2.
    from tl_decomp import decompose

    model = bundled("smollm2")
    d = decompose(model, "The capital of France is", granularity="head")
    la = d.logit_attrs(" Paris")
    tid = model.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    with torch.inference_mode():
        logit = model(d.tokens)[0, -1, tid].item()
    assert abs(la.values.sum(0)[0, -1].item() - logit) <= 1e-4 * abs(logit)
    with torch.no_grad():
        _, cache = model.run_with_cache(d.tokens)
        stack = cache.get_full_resid_decomposition(expand_neurons=False)
        theirs = cache.logit_attrs(stack, tokens=torch.tensor([tid]))[:, 0, -1].sum().item()
    assert abs(theirs - logit) > 1  # the final norm's scale applied to unnormalised terms


def test_a_truncated_smollm2_cache_is_rebuilt(tmp_path, monkeypatch):
    # A crash or a full disk mid-write left a short model.safetensors that passed as fresh
    # and failed deep inside the loader; the marker now records the size it must have.
    writes = []

    def fake_write(gguf, out):
        writes.append(out)
        (out / "model.safetensors").write_bytes(b"x" * 1000)

    monkeypatch.setattr(_bundled, "_write_smollm2", fake_write)
    target = _bundled.smollm2_dir(tmp_path)
    assert len(writes) == 1 and _bundled.smollm2_dir(tmp_path) == target and len(writes) == 1
    (target / "model.safetensors").write_bytes(b"x" * 10)  # truncated
    assert _bundled.smollm2_dir(tmp_path) == target and len(writes) == 2
    assert (target / "model.safetensors").stat().st_size == 1000
