"""Information-flow routes: exact edge weights, pruning, graph and table, CLI and view."""

from __future__ import annotations

import json

import networkx as nx
import pytest
import torch
from support.helpers import NoHooksLeft
from support.models import cached_model

import tl_decomp as td
from tl_decomp import cli, models, views

TEXT = "the cat sat on the mat"


@pytest.fixture(scope="module")
def flow():
    return td.information_flow(cached_model("gpt2"), TEXT, target="mat", threshold=0.01)


def test_edges_into_each_node_sum_to_one(flow):
    total = flow.residual + flow.attention.sum((1, 3))
    assert torch.allclose(total, torch.ones_like(total), atol=1e-12)


def test_attention_edges_are_the_source_terms_shares():
    model = cached_model("gpt2")
    f = td.information_flow(model, TEXT)
    # block 1's source terms at layer 2, read independently
    r = td.decompose_layers(model, TEXT, layers=[2], granularity="source", reduce="shares")[0]
    for k, label in enumerate(r.labels):
        if label.startswith("L1H"):
            h, key = (int(x) for x in label[3:].split("K"))
            assert torch.allclose(f.attention[1, h, :, key], r.values[k, 0], atol=1e-12)


def test_token_contributions_sum_to_the_lens_logit(flow):
    model = cached_model("gpt2")
    ds = td.decompose_layers(model, TEXT, granularity="token")
    for layer in range(flow.contributions.shape[0]):
        lens = ds[layer].logit_attrs("mat").logits[0, flow.position]
        assert abs(flow.contributions[layer].sum() + flow.bias[layer] - lens) < 1e-10


def test_pruned_routes_reach_back_from_the_target(flow):
    edges = flow.edges()
    last = flow.attention.shape[0] - 1
    assert {e["destination"] for e in edges if e["block"] == last} == {flow.position}
    for e in edges:  # every kept edge feeds a node that is itself on a route
        if e["block"] < last:
            assert any(
                f["block"] == e["block"] + 1 and f["source"] == e["destination"] for f in edges
            )
        assert abs(e["weight"]) >= flow.threshold
    # a larger threshold keeps a subset
    assert len(flow.edges(0.5)) <= len(edges)


def test_graph_and_table(flow):
    g = flow.to_networkx()
    assert isinstance(g, nx.MultiDiGraph) and g.number_of_edges() == len(flow.edges())
    assert all(g.nodes[n]["token"] == flow.tokens[n[1]] for n in g.nodes)
    df = flow.to_pandas()
    assert list(df.columns[:5]) == ["block", "head", "source", "destination", "weight"]
    assert flow.top_tokens(0, 1)[0][1] == flow.position  # layer 0: only its own token


def test_one_text_only_and_options_checked_before_work():
    model = cached_model("gpt2")
    with NoHooksLeft(model):
        with pytest.raises(ValueError, match="one text"):
            td.information_flow(model, ["a", "b"])
        with pytest.raises((ValueError, TypeError), match="threshold"):
            td.information_flow(model, TEXT, threshold=2.0)


def test_view_escapes_tokens(tmp_path):
    model = cached_model("gpt2")
    f = td.information_flow(model, TEXT)
    hostile = td.InformationFlow(**{**f.__dict__, "tokens": ("<script>x</script>", *f.tokens[1:])})
    page = views.flow_view(hostile).save(tmp_path / "flow.html").read_text("utf-8")
    assert "<script>x</script>" not in page


def test_cli_flow(monkeypatch, capsys):
    monkeypatch.setattr(models, "load_model", lambda name: cached_model("gpt2"))
    assert cli.main(["flow", TEXT, "--model", "x", "--target", "mat", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "logit of 'mat'" in out and "#2" in out
    assert cli.main(["flow", TEXT, "--model", "x", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["rank"] for r in rows} == {1, 2, 3, 4, 5}
