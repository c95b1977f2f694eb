"""`fine_tune`: deterministic, the loss drops, the weights move, the caller's random state is
kept, and the checkpoint boots back and still decomposes exactly (against Hugging Face's own
hidden states of the saved directory)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from support.helpers import assert_close

from tl_decomp import decompose
from tl_decomp.models import FINE_TUNE_TASKS, fine_tune, tiny_dir
from tl_decomp.models._fine_tune import _mask_tokens

TEXTS = ["the cat sat on the mat .", "a dog ran and the cat sat .", "the big dog is on a mat ,"]
TAG = {"the": "DET", "a": "DET", "cat": "NOUN", "dog": "NOUN", "mat": "NOUN", "sat": "VERB",
       "ran": "VERB", "is": "VERB", "on": "ADP", "and": "CONJ", ".": ".", ",": ".",
       "big": "ADJ"}  # fmt: skip
WORDS = [t.split() for t in TEXTS]
POS = (WORDS, [[TAG[w] for w in ws] for ws in WORDS])


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(f"{path}/model.safetensors")


def run(tmp_path, task, data, name="run", **kw):
    kw = {"steps": 4, "batch_size": 2, **kw}
    return fine_tune(tiny_dir("bert"), task, data, out_dir=tmp_path / name, **kw)


@pytest.mark.parametrize("task", FINE_TUNE_TASKS)
def test_same_seed_same_run_and_the_callers_random_state_is_kept(tmp_path, task):
    data = POS if task == "token_classification" else TEXTS
    tiny_dir("bert")  # built (and seeded) once per process, before the state is read
    state = torch.get_rng_state()
    a, b = run(tmp_path, task, data, "a"), run(tmp_path, task, data, "b")
    assert torch.equal(torch.get_rng_state(), state)
    assert a.losses == b.losses and len(a.losses) == 4
    assert a.to_pandas()["loss"].tolist() == list(a.losses) and "task=" in repr(a)
    wa, wb = weights(a.path), weights(b.path)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    c = run(tmp_path, task, data, "c", seed=1)
    assert c.losses != a.losses


def test_token_classification_learns_and_moves_every_encoder_weight(tmp_path):
    r = run(tmp_path, "token_classification", POS, steps=40, batch_size=3, lr=1e-2)
    assert r.classes == (".", "ADJ", "ADP", "CONJ", "DET", "NOUN", "VERB")
    first, last = r.losses[0], sum(r.losses[-5:]) / 5
    assert last < 0.2 * first, (first, last)
    base, tuned = weights(tiny_dir("bert")), weights(r.path)
    # Every encoder tensor moved; the source has no pooler, the saved one is fresh and unused.
    shared = [k for k in tuned if "bert." + k in base]
    assert sorted(set(tuned) - set(shared)) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert all(not torch.equal(tuned[k], base["bert." + k]) for k in shared)
    assert not any(k.startswith("cls.") for k in tuned)  # the POS head is not saved


def test_masked_lm_learns_with_its_own_head_saved(tmp_path):
    r = run(tmp_path, "masked_lm", TEXTS * 4, steps=40, batch_size=4, lr=1e-2)
    first, last = r.losses[0], sum(r.losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    base, tuned = weights(tiny_dir("bert")), weights(r.path)
    assert base.keys() == tuned.keys()
    head = [k for k in tuned if k.startswith("cls.")]
    assert head and all(not torch.equal(tuned[k], base[k]) for k in head)


def test_the_head_on_targets_only_is_the_full_forward(tmp_path):
    """`fine_tune` applies BERT's head to the masked positions only: the same logits."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(tiny_dir("bert")).eval()
    enc = AutoTokenizer.from_pretrained(tiny_dir("bert"))(TEXTS, padding=True, return_tensors="pt")
    keep = enc["attention_mask"].bool()
    with torch.no_grad():
        full = model(**enc).logits[keep]
        part = model.cls(model.base_model(**enc).last_hidden_state[keep])
    assert_close(part, full, torch.float32, "head on targets")


def test_masking_follows_bert():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir("bert"))
    ids = tok(TEXTS * 200, padding=True, return_tensors="pt")["input_ids"]
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    inputs, target = _mask_tokens(ids, special, tok, torch.Generator().manual_seed(0))
    chosen = target != -100
    ordinary = ~torch.isin(ids, special)
    assert not (chosen & ~ordinary).any() and chosen.any(1).all()
    assert torch.equal(target[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    n = ordinary.sum(1).double()  # 15% of each text, plus one where no draw fell under 0.15
    expected = (0.15 * n + 0.85**n).sum() / n.sum()
    share = chosen.sum() / ordinary.sum()
    masked = (inputs[chosen] == tok.mask_token_id).float().mean()
    kept = (inputs[chosen] == ids[chosen]).float().mean()  # 10% kept, plus random hits
    assert abs(share - expected) < 0.015, (share, expected)
    assert 0.75 < masked < 0.85 and 0.08 < kept < 0.14, (masked, kept)


@pytest.mark.parametrize("task", FINE_TUNE_TASKS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_checkpoint_boots_back_and_decomposes_exactly(tmp_path, task, dtype):
    from transformers import AutoModel, AutoTokenizer

    r = run(tmp_path, task, POS if task == "token_classification" else TEXTS, lr=1e-2)
    d = decompose(r.load(dtype=dtype), TEXTS, layer=-1)
    hf = AutoModel.from_pretrained(r.path, dtype=dtype).eval()
    enc = AutoTokenizer.from_pretrained(r.path)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        own = hf(**enc).last_hidden_state
    keep = enc["attention_mask"].bool()
    assert_close(d.factors.sum(0)[keep], own[keep], dtype, f"{task} sum vs Hugging Face")


@pytest.mark.parametrize(
    ("task", "data", "kw", "match"),
    [
        ("regression", TEXTS, {}, "unknown task|typechecking"),
        ("masked_lm", TEXTS, {"steps": 0}, "steps"),
        ("masked_lm", TEXTS, {"lr": float("nan")}, "lr"),
        ("masked_lm", TEXTS, {"max_length": 2}, "max_length"),
        ("masked_lm", "the cat", {}, "list of texts"),
        ("masked_lm", ["the cat", ""], {}, "non-empty str"),
        ("token_classification", TEXTS, {}, "pair"),
        ("token_classification", (WORDS, POS[1][:2]), {}, "3 sentences of words but 2"),
        ("token_classification", ([["the", "cat"]], [["DET"]]), {}, "sentence 0"),
        ("token_classification", ([["the", "cat"]], [["X", "X"]]), {}, "single class"),
    ],
)
def test_bad_input_raises_before_any_work(tmp_path, task, data, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):  # TypeError: the annotation
        fine_tune(tiny_dir("bert"), task, data, out_dir=tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_bad_source_or_out_dir_raises(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match="new or empty"):
        fine_tune(tiny_dir("bert"), "masked_lm", TEXTS, out_dir=tmp_path / "full")
    with pytest.raises(ValueError, match="neither a bundled model"):
        fine_tune(str(tmp_path), "masked_lm", TEXTS, out_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="no mask token"):  # a decoder
        fine_tune(tiny_dir("gpt2"), "masked_lm", TEXTS, out_dir=tmp_path / "out")
