"""Probing subsets of factors [M §4-6]: features, splits, probes, tables, the shipped data."""

from __future__ import annotations

import einops
import pytest
import torch
from support.helpers import NoHooksLeft, assert_close
from support.models import KINDS, cached_model

from tl_decomp import adapters, decompose
from tl_decomp.datasets import UNIVERSAL, LabelledWords, as_labelled, load_pos
from tl_decomp.datasets import _corpus as corpus
from tl_decomp.probing import (
    SUBSETS,
    WordFactors,
    masked_prediction,
    probe_factors,
    probe_subsets,
    split,
    word_factors,
)
from tl_decomp.probing._classifiers import agreement, fit_predict, selector

TERMS = ("i", "h", "f", "c")
WORDS = [["the", "cat", "sat", "on", "the", "mat"], ["a", "dog", "ran", "."]] * 3
LABELS = [["D", "N", "V", "P", "D", "N"], ["D", "N", "V", "."]] * 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small batched matmuls: one thread avoids OpenMP contention on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def constructed(carrier: str, n: int = 600, d: int = 16, seed: int = 0) -> WordFactors:
    """Noise in every factor; only `carrier` adds a class-dependent mean (3 balanced classes)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(4, n, d, generator=g)
    x[TERMS.index(carrier), :, :3] += 3 * torch.nn.functional.one_hot(y, 3)
    return WordFactors(x, y, ("a", "b", "c"), "final", 0.0)


# -- probes on constructed data -----------------------------------------------------------


@pytest.mark.parametrize(
    "carrier, probe",
    [("i", "linear"), ("h", "linear"), ("f", "linear"), ("c", "linear")]
    + [("h", "mlp"), ("f", "knn")],
)
def test_only_subsets_with_the_carrying_factor_beat_chance(carrier, probe):
    # 480 training words: the paper's 20 MLP epochs are 60 Adam steps here, too few.
    epochs = {"max_iter": 200} if probe == "mlp" else {}
    table = probe_factors(constructed(carrier), probe=probe, seeds=3, progress=False, **epochs)
    assert table.subsets == SUBSETS and table.chance == pytest.approx(1 / 3)
    for name, acc, f1 in zip(table.subsets, table.mean(), table.mean("macro_f1"), strict=True):
        if carrier in name.split("+"):
            assert acc > 0.6 and f1 > 0.6, name
        else:
            assert acc < 0.45 and f1 < 0.45, name


@pytest.mark.parametrize("probe", ["linear", "mlp", "knn"])
def test_same_seed_same_table_and_seeds_are_independent(probe):
    wf = constructed("h", n=200)
    kw = dict(probe=probe, subsets=["h", "i+f", "i+h+f+c"], progress=False, max_iter=50)
    a = probe_factors(wf, seeds=[3, 4], **kw)
    b = probe_factors(wf, seeds=[3, 4], **kw)
    c = probe_factors(wf, seeds=[3], **kw)
    assert str(a) == str(b)
    for field in ("accuracy", "macro_f1", "pairwise_agreement"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert torch.equal(a.accuracy[:, :1], c.accuracy)
    assert a.seeds == (3, 4) and a.accuracy.shape == (3, 2)


def test_agreement_matrix():
    t = probe_factors(constructed("f", n=200), probe="knn", seeds=2, progress=False)
    m = t.agreement()
    assert m.shape == (15, 15)
    assert torch.equal(m.diagonal(), torch.ones(15))
    assert torch.equal(m, m.T) and bool(((m >= 0) & (m <= 1)).all())
    # probes that both reach 100% agree everywhere; a chance-level probe cannot.
    assert m[SUBSETS.index("f"), SUBSETS.index("i")] < 0.6


def test_agreement_macro_f1_is_sklearns_between_each_pair_of_subsets():
    # The authors' agreement matrix: f1_score(a's predictions, b's, average="macro").
    from sklearn.metrics import f1_score

    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 5, (6, 40), generator=g)
    pred[1] = pred[0]
    pred[2, :20] = 4  # a class only some subsets predict
    same, f1 = agreement(pred, n_classes=7)
    for a in range(6):
        for b in range(6):
            ref = f1_score(pred[b].numpy(), pred[a].numpy(), average="macro")
            assert abs(f1[a, b].item() - ref) < 1e-12, (a, b)
            assert same[a, b].item() == (pred[a] == pred[b]).double().mean().item()
    assert torch.equal(f1, f1.T) and f1[0, 1] == 1


def test_probe_table_agreement_is_the_mean_over_seeds_of_sklearns_macro_f1():
    from sklearn.metrics import f1_score

    wf = constructed("h", n=200)
    subsets = ["i", "h", "i+h"]
    t = probe_factors(wf, probe="knn", seeds=[0, 1], subsets=subsets, progress=False)
    ref = torch.zeros(3, 3, dtype=torch.float64)
    for seed in (0, 1):  # the same split and probe, predicted again, scored by sklearn
        parts = [einops.einsum(selector(subsets), wf.factors[:, i], "s f, f n d -> s n d")
                 for i in split(200, seed)]  # fmt: skip
        y = [wf.labels[i] for i in split(200, seed)]
        opts = {"n_jobs": 1}
        pred = fit_predict("knn", parts[0], y[0], parts[1], y[1], parts[2], 3, seed, opts)
        for a in range(3):
            for b in range(3):
                ref[a, b] += f1_score(pred[b], pred[a], average="macro") / 2
    assert torch.allclose(t.agreement("macro_f1").double(), ref, atol=1e-6)
    assert torch.equal(t.agreement(), t.pairwise_agreement)
    with pytest.raises((ValueError, TypeError), match="metric must be one of|typechecking"):
        t.agreement("kappa")  # type: ignore[arg-type]


def test_splits_are_80_10_10_by_occurrence_and_follow_the_seed():
    for n in (10, 11, 257):
        tr, va, te = split(n, seed=1)
        assert (len(tr), len(va)) == (round(0.8 * n), round(0.1 * n)) and len(te) >= 1
        assert sorted(torch.cat([tr, va, te]).tolist()) == list(range(n))
    assert torch.equal(torch.cat(split(50, 7)), torch.cat(split(50, 7)))
    assert not torch.equal(torch.cat(split(50, 7)), torch.cat(split(50, 8)))


def test_table_renders_mean_and_std_and_plots():
    t = probe_factors(constructed("h", n=100), probe="knn", seeds=3, progress=False)
    text = str(t)
    assert "knn probe, 3 seed(s), 100 words" in text and "chance" in text
    row = next(line for line in text.splitlines() if line.startswith("h "))
    mean, std = t.mean()[SUBSETS.index("h")] * 100, t.std()[SUBSETS.index("h")] * 100
    assert f"{mean:.1f} ± {std:.1f}" in row
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    assert len(t.plot().patches) == 15
    assert t.plot_agreement().get_images()
    assert t.plot_agreement(metric="macro_f1").get_images()


# -- features from a model ----------------------------------------------------------------


@pytest.mark.parametrize("arch, kind", [("bert", k) for k in KINDS] + [("gpt2", "bridge")])
def test_a_word_is_the_sum_of_its_pieces(arch, kind):
    model = cached_model(arch, kind)
    words, labels = [["the", "cat.", "sat"], ["a", "dog"]], [["D", "N", "V"], ["D", "N"]]
    with NoHooksLeft(model):
        wf = word_factors(model, (words, labels), progress=False)
    assert wf.factors.shape == (4, 5, 32) and wf.labels.tolist() == [0, 1, 2, 0, 1]
    assert wf.max_relative_error < 1e-9
    d = decompose(model, ["the cat. sat", "a dog"])  # the same texts: words joined by spaces
    first = 1 if arch == "bert" or model.cfg.default_prepend_bos else 0  # [CLS] / BOS
    f = d.factors
    expected = [f[:, 0, first], f[:, 0, first + 1] + f[:, 0, first + 2], f[:, 0, first + 3]]
    expected += [f[:, 1, first], f[:, 1, first + 1]]
    assert_close(wf.factors, torch.stack(expected, 1), torch.float64, "word sums")


def test_layer_and_labelled_words_input():
    model = cached_model("bert")
    wf = word_factors(model, LabelledWords(((("the", "cat"),)), (("D", "N"),)), layer=0,
                      progress=False)  # fmt: skip
    d = decompose(model, "the cat", layer=0)
    assert wf.layer == 0
    assert_close(wf.factors, d.factors[:, 0, 1:3], torch.float64, "layer 0")


def test_probe_subsets_end_to_end_on_a_tiny_model():
    model = cached_model("bert")
    with NoHooksLeft(model):
        t = probe_subsets(model, (WORDS, LABELS), seeds=2, progress=False)
    assert t.n_occurrences == 30 and t.classes == (".", "D", "N", "P", "V")
    assert t.accuracy.shape == (15, 2) and t.layer == 3  # BERT: the last block's output
    assert bool(((t.accuracy >= 0) & (t.accuracy <= 1)).all())
    assert torch.equal(t.agreement().diagonal(), torch.ones(15))


def test_a_word_the_tokenizer_drops_is_named():
    with pytest.raises(ValueError, match="produced no token") as err:
        word_factors(cached_model("bert"), ([["the", "\u200b"]], [["D", "X"]]), progress=False)
    assert r"'\u200b'" in str(err.value)  # the word, named


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, match",
    [
        (([["the", "cat"]], [["D"]]), "sentence 0 has 2 words but 1 labels"),
        (([["a"], ["b"]], [["X"]]), "2 sentences of words but 1 of labels"),
        (([["the", "cat"]], [["N", "N"]]), "single class"),
        (([], []), "empty dataset"),
        (([[]], [[]]), "sentence 0 is empty"),
        ((["the cat"], [["D", "N"]]), "not a str"),
        (([["the", " "]], [["D", "N"]]), "empty or non-string word"),
        ("the cat", "pair"),
    ],
)
def test_bad_datasets_are_refused_before_running_the_model(data, match):
    model = cached_model("bert")
    with pytest.raises(ValueError, match=match), NoHooksLeft(model):
        probe_subsets(model, data, progress=False)


def test_bad_options():
    wf = constructed("h", n=50)
    with pytest.raises((ValueError, TypeError), match="probe"):  # TypeError: runtime checks
        probe_factors(wf, probe="svm", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bad subset"):
        probe_factors(wf, subsets=["h+x"], progress=False)
    with pytest.raises(ValueError, match="seeds must be at least 1"):
        probe_factors(wf, seeds=0, progress=False)
    small = WordFactors(wf.factors[:, :9], wf.labels[:9], wf.classes, "final", 0.0)
    with pytest.raises(ValueError, match="at least 10"):
        probe_factors(small, progress=False)
    t = probe_factors(wf, probe="knn", subsets=["h+i", "i+h", "c"], seeds=1, progress=False)
    assert t.subsets == ("i+h", "c")


# -- masked-token prediction --------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_masked_prediction_from_all_factors_is_the_models_own(kind):
    model = cached_model("bert", kind)
    texts = ["the cat sat on the mat", "a dog ran .", "the big cat is on a mat"] * 3
    with NoHooksLeft(model):
        m = masked_prediction(model, texts, seed=1, batch_size=4, progress=False)
    assert m.n_masked == 9 and m.subsets == SUBSETS
    assert m.agreement[-1] == 1.0 and m.accuracy[-1] == m.model_accuracy
    assert bool(((m.accuracy >= 0) & (m.accuracy <= 1)).all())
    assert "agrees with model" in str(m)


def test_mlm_head_matches_the_models_logits():
    from tl_decomp import adapters

    model = cached_model("bert")
    tokens, mask = adapters.tokenize(model, ["the cat sat", "a dog"], encoder=True)
    spec = adapters.model_spec(model)
    cache = adapters.run_with_cache(model, tokens, mask, spec.names_filter())
    with torch.no_grad():
        logits = model(tokens, attention_mask=mask)
    assert_close(adapters.mlm_logits(model, cache[spec.final]), logits, torch.float64, "head")


def test_masked_prediction_needs_an_mlm_head():
    with pytest.raises(NotImplementedError, match="masked-LM"):
        masked_prediction(cached_model("gpt2"), ["the cat sat"], progress=False)
    with pytest.raises(ValueError, match="texts is an empty list"):
        masked_prediction(cached_model("bert"), [], progress=False)


# -- the shipped data ---------------------------------------------------------------------


def test_shipped_pos_data_is_the_shipped_corpus_tagged():
    data = load_pos()
    assert (len(data), data.n_words) == (2500, 61971)
    lines = corpus.load_corpus()
    for words, line in zip(data.words, lines, strict=True):  # words re-join to the line
        assert "".join(words) == line.replace(" ", "")
    assert set(data.classes) == set(UNIVERSAL.values())
    ptb = load_pos(5, tagset="ptb")
    assert len(ptb) == 5 and {"NNP", "VBD", "DT"} <= set(ptb.classes)
    words, labels = load_pos(2)
    assert words[1][:4] == ("It", "was", "Miss", "Taylor")
    assert as_labelled((words, labels)) == load_pos(2)
    with pytest.raises((ValueError, TypeError), match="tagset"):
        load_pos(tagset="upos")  # type: ignore[arg-type]


@pytest.mark.bundled
def test_word_pieces_on_minilm_match_the_tokenizers_own_word_ids():
    from tl_decomp import load_model

    model = load_model("minilm")
    data = load_pos(2)
    wf = word_factors(model, data, progress=False)
    start = 0
    for words in data.words:
        d = decompose(model, " ".join(words))
        enc = model.tokenizer(list(words), is_split_into_words=True)
        assert enc["input_ids"] == d.tokens[0].tolist()  # the same pieces, [CLS] ... [SEP]
        ids = torch.tensor([-1 if w is None else w for w in enc.word_ids()])
        assert (torch.bincount(ids[ids >= 0]) > 1).any()  # some words have several pieces
        expected = torch.stack([d.factors[:, 0, ids == k].sum(1) for k in range(len(words))], 1)
        assert_close(wf.factors[:, start : start + len(words)], expected, torch.float32, "minilm")
        start += len(words)
    assert wf.max_relative_error < 1e-4


def test_bert15_corruption_is_the_papers():
    # 15% of real positions (special ones included), 80% [MASK] / 10% random / 10% kept.
    from tl_decomp.probing import corrupt

    model = cached_model("bert")
    tok = model.tokenizer
    texts = [" ".join(["the", "cat", "sat", "on", "a", "mat"] * 3)] * 400  # 20 tokens each
    tokens, mask = adapters.tokenize(model, texts, encoder=True)
    gen = torch.Generator().manual_seed(0)
    corrupted, rows, pos = corrupt(tokens, mask, tok, 64, "bert15", gen)
    assert len(rows) == 400 * 3  # round(0.15 * 20) per text
    assert len(set(zip(rows.tolist(), pos.tolist(), strict=True))) == len(rows)  # no repeats
    hit = corrupted[rows, pos]
    frac_mask = (hit == tok.mask_token_id).float().mean().item()
    frac_kept = (hit == tokens[rows, pos]).float().mean().item()
    assert 0.77 < frac_mask < 0.83 and 0.08 < frac_kept < 0.13  # kept includes random = same
    specials = torch.isin(tokens[rows, pos], torch.tensor(tok.all_special_ids))
    assert specials.any()  # [CLS] and [SEP] are candidates too
    untouched = torch.ones_like(corrupted, dtype=torch.bool)
    untouched[rows, pos] = False
    assert torch.equal(corrupted[untouched], tokens[untouched])
    m = masked_prediction(model, texts[:12], corruption="bert15", batch_size=5, progress=False)
    assert m.corruption == "bert15" and m.n_masked == 12 * 3
    assert m.agreement[-1] == 1.0 and m.accuracy[-1] == m.model_accuracy


def test_linear_probe_is_regularised_logistic_regression_never_below_the_majority():
    # A rare binary label (majority 90%) weakly carried by i; noise elsewhere. The hand-written
    # probe scored below the majority baseline; scikit-learn's must not, on any subset, and
    # matches a StandardScaler + LogisticRegression fit on the same split within a point.
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    g = torch.Generator().manual_seed(3)
    n, d = 1500, 24
    y = (torch.rand(n, generator=g) < 0.1).long()
    x = torch.randn(4, n, d, generator=g)
    x[0, :, 0] += 1.5 * y
    wf = WordFactors(x, y, ("no", "yes"), "final", 0.0)
    t = probe_factors(wf, probe="linear", seeds=2, split="fixed", progress=False)
    assert t.split == "fixed" and "one fixed split" in str(t)
    noise = 2 * (t.chance * (1 - t.chance) / (0.1 * n)) ** 0.5  # two test-split stderrs
    assert bool((t.mean() >= t.chance - noise).all()), t.mean()
    tr, _, te = split(n, 0)
    for k in (0, 14):  # i, and i+h+f+c
        feats = t.subsets[k].split("+")
        xs = sum(x["ihfc".index(f)] for f in feats).double().numpy()
        ref = make_pipeline(StandardScaler(), LogisticRegression()).fit(xs[tr], y[tr].numpy())
        ref_acc = ref.score(xs[te], y[te].numpy())
        assert t.accuracy[k, 0].item() >= ref_acc - 0.01, (t.subsets[k], ref_acc)
    assert torch.equal(t.accuracy[:, 0], t.accuracy[:, 1])  # fixed split, convex probe


@pytest.mark.bundled
def test_linear_probe_on_the_shipped_pos_data_is_never_below_the_majority():
    from tl_decomp import load_model, load_pos

    wf = word_factors(load_model("minilm"), load_pos(60), progress=False)
    t = probe_factors(wf, probe="linear", seeds=1, progress=False)
    n_test = wf.labels.shape[0] - round(0.8 * wf.labels.shape[0]) - round(0.1 * wf.labels.shape[0])
    noise = 2 * (t.chance * (1 - t.chance) / n_test) ** 0.5
    assert bool((t.mean() >= t.chance - noise).all()), (t.chance, t.mean())
    assert t.mean()[t.subsets.index("i")] > 0.8  # the word itself carries its part of speech
