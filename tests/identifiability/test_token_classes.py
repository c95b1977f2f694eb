"""Weights by token class [B Fig. 1b/c, §5]: the classes a tokenizer gives, and the reducer
against a brute-force groupby on hand-built contributions."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from support.models import cached_model

from tl_decomp import hidden_token_attribution, token_class_shares
from tl_decomp._core import token_classes


@pytest.fixture(scope="module")
def tok():
    return cached_model("bert").tokenizer


def encode(tok, texts):
    ids = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    tokens = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    return tokens, mask


def test_classes_come_from_the_tokenizer_with_punctuation_by_kind(tok):
    tokens, mask = encode(tok, ["is . , .", "is"])
    index, names, kinds = token_classes(tok, tokens, mask)
    text = tok.convert_ids_to_tokens(tokens[0].tolist())
    assert text == ["[CLS]", "is", ".", ",", ".", "[SEP]"]
    assert set(names) == {"[CLS]", "[SEP]", ".", ",", "word"}  # [PAD] only pads: no class
    by_token = {t: names[i] for t, i in zip(text, index[0].tolist(), strict=True)}
    assert by_token == {"[CLS]": "[CLS]", "[SEP]": "[SEP]", ".": ".", ",": ",", "is": "word"}
    assert [kinds[names.index(n)] for n in ("[CLS]", ".", "word")] == [
        "special",
        "punctuation",
        "word",
    ]
    assert (index[1, 3:] == -1).all() and (index[1, :3] >= 0).all()  # padding
    unk = torch.tensor([[tok.cls_token_id, tok.unk_token_id, tok.sep_token_id]])
    assert token_classes(tok, unk)[1] == ("[SEP]", "[CLS]", "word")  # [UNK] stands for text
    assert torch.equal(unk, torch.tensor([[tok.cls_token_id, tok.unk_token_id, tok.sep_token_id]]))


def brute(weights, tokens, mask, names, index, causal):
    """Long table of (layer, example, query, key, weight), pandas groupby."""
    rows = []
    lead, b, n, _ = weights.shape
    for x in range(lead):
        for e in range(b):
            for q in range(n):
                for k in range(n):
                    if mask[e, q] and mask[e, k]:
                        qc, kc = names[index[e, q]], names[index[e, k]]
                        seen = (not causal) or k <= q
                        rows.append((x, e, q, qc, kc, weights[x, e, q, k].item(), seen))
    df = pd.DataFrame(rows, columns=["x", "e", "q", "qc", "kc", "w", "seen"])
    per_query = df.pivot_table(index=["x", "e", "q", "qc"], columns="kc", values="w",
                               aggfunc="sum", fill_value=0.0).reset_index()  # fmt: skip
    shares = per_query.groupby(["x", "qc"])[list(names)].mean()
    overall = per_query.groupby("x")[list(names)].mean()
    even = df[df.x == 0].assign(w=lambda d: d.seen / d.groupby(["e", "q"]).seen.transform("sum"))
    uniform = even.pivot_table(index=["e", "q"], columns="kc", values="w", aggfunc="sum",
                               fill_value=0.0)[list(names)].mean()  # fmt: skip
    return shares, overall, uniform


@pytest.mark.parametrize("causal", [False, True])
def test_reducer_against_a_brute_force_groupby(tok, causal):
    tokens, mask = encode(tok, ["is , is . is", "is . .", "is"])
    g = torch.Generator().manual_seed(0)
    w = torch.rand(3, *tokens.shape, tokens.shape[1], generator=g, dtype=torch.float64)
    w = w / w.sum(-1, keepdim=True)
    r = token_class_shares(w, tokens, tok, attention_mask=mask, causal=causal,
                           index=("a", "b", "c"), index_name="layer")  # fmt: skip
    index, names, _ = token_classes(tok, tokens, mask)
    shares, overall, uniform = brute(w, tokens, mask, names, index, causal)
    for x in range(3):
        assert torch.allclose(r.overall[x], torch.tensor(overall.loc[x].to_numpy()), atol=1e-12)
        for qc, row in shares.loc[x].iterrows():
            got = r.shares[x, names.index(str(qc))]
            assert torch.allclose(got, torch.tensor(row.to_numpy()), atol=1e-12), (x, qc)
    assert torch.allclose(r.uniform, torch.tensor(uniform.to_numpy()), atol=1e-12)
    # weights that sum to 1 over real keys give shares that sum to 1
    real = mask.bool()
    if not causal:
        w2 = w * real[None, :, None, :]
        w2 = w2 / w2.sum(-1, keepdim=True)
        assert torch.allclose(token_class_shares(w2, tokens, tok, attention_mask=mask)
                              .overall.sum(-1), torch.ones(3, dtype=torch.float64))  # fmt: skip
    assert r.keys.tolist() == [int(((index == c) & real).sum()) for c in range(len(names))]
    rows = r.rows()
    assert len(rows) == 3 * len(names) and rows[0]["layer"] == "a"
    assert list(r.to_pandas().columns) == ["layer", "class", "kind", "share", "uniform", "keys"]


def test_bad_weights_are_refused_before_any_work(tok):
    tokens, _ = encode(tok, ["is ."])
    with pytest.raises((ValueError, TypeError), match="must end in|typechecking|shape"):
        token_class_shares(torch.rand(2, 1, 3, 4), tokens, tok)
    with pytest.raises(ValueError, match="NaN"):
        token_class_shares(torch.full((1, 1, 4, 4), float("nan")), tokens, tok)
    with pytest.raises(ValueError, match="2 labels for 3"):
        token_class_shares(torch.rand(3, 1, 4, 4), tokens, tok, index=("a", "b"))
    with pytest.raises(ValueError, match="no tokenizer"):
        token_class_shares(torch.rand(1, 1, 4, 4), tokens, None)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_hidden_token_attribution_by_token_class(arch):
    model = cached_model(arch, "bridge", torch.float64)
    hta = hidden_token_attribution(model, ["the cat , sat .", "a dog"])
    r = hta.by_token_class(model)
    assert len(r.index) == len(hta.layers) and r.index_name == "layer"
    direct = token_class_shares(
        hta.contributions, hta.tokens, model.tokenizer,
        attention_mask=hta.attention_mask, causal=arch == "gpt2",
    )  # fmt: skip
    assert torch.equal(r.shares, direct.shares) and torch.equal(r.uniform, direct.uniform)
    ones = torch.ones(len(hta.layers), dtype=torch.float64)
    assert torch.allclose(r.overall.sum(-1), ones)  # HTA rows sum to 1
