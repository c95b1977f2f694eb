"""A model spread over two devices decomposes exactly (issue #14 item 2).

A tiny model is booted with a Hugging Face ``device_map`` that puts its embeddings and first
block on ``cuda:0`` and the later blocks and the unembedding on ``cuda:1``: the hooks of the
later blocks fire there, and their weights live there. The materialised stack and the
streamed reductions must sum exactly and agree with each other.

Needs two CUDA devices: TransformerLens refuses maps that mix a GPU with the CPU, and on a
CPU-only machine there is no second device to put a block on (a second CPU "device" does not
exist in torch), so it is skipped with that reason rather than faked.
"""

from __future__ import annotations

import pytest
import torch

from tl_decomp import decompose_layers, model_spec

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs two CUDA devices to split a model over (TransformerLens refuses GPU+CPU maps)",
)

MAPS = {
    "gpt2": {
        "transformer.wte": 0,
        "transformer.wpe": 0,
        "transformer.drop": 0,
        "transformer.h.0": 0,
        "transformer.h.1": 1,
        "transformer.h.2": 1,
        "transformer.ln_f": 1,
        "lm_head": 0,  # tied to wte
    },
    "llama": {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1": 1,
        "model.layers.2": 1,
        "model.norm": 1,
        "lm_head": 1,
    },
}
TEXTS = ["the cat sat on the mat .", "a dog ran"]


def _split_model(arch: str):
    from transformer_lens.model_bridge import TransformerBridge

    from tl_decomp.models import tiny_dir

    model = TransformerBridge.boot_transformers(
        tiny_dir(arch), device_map=MAPS[arch], dtype=torch.float64
    )
    return model.eval()


@pytest.mark.parametrize("arch", sorted(MAPS))
@pytest.mark.parametrize("granularity", ["coarse", "head", "source"])
def test_split_model_sums_exactly(arch, granularity):
    model = _split_model(arch)
    spec = model_spec(model)
    assert {p.device for p in model.parameters()} >= {torch.device("cuda", 1)}
    ds = decompose_layers(model, TEXTS, granularity=granularity)
    for d in ds:
        assert d.relative_error <= 1e-9, (d.layer, d.relative_error)
    assert len(ds) == spec.n_layers + 2
    for statistic in ("shares", "cosines"):
        rs = decompose_layers(model, TEXTS, granularity=granularity, reduce=statistic)
        for d, r in zip(ds, rs, strict=True):
            want = getattr(d, statistic)()
            assert r.labels == d.labels and r.relative_error <= 1e-9
            assert (r.values - want.to(r.values.device)).abs().max().item() <= 1e-12
