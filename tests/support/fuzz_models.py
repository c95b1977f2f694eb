"""Random tiny configurations for the property tests (`tests/decomposition/test_properties.py`).

A `Config` is a hashable description of a tiny float64 model: a Hugging Face family from
`tests/support/zoo.py` with config knobs on top (heads and KV heads, biases, parallel blocks, norm
placement, sliding windows, layers), processed weights or not, or (TransformerLens 3.x) one of
`tl_decomp.models.TINY_ARCHS` as a HookedTransformer / HookedEncoder. `configs()` draws one;
`boot(config)` builds it once per process. The families are the ones whose algebra differs:

    gpt2      LayerNorm before each sublayer, biases, learned positions
    bert      LayerNorm after each sublayer (post-LN), bidirectional, embedding LayerNorm
    opt       pre- or post-LN (do_layer_norm_before), biases on/off
    llama     RMSNorm, rotary, grouped-/multi-query attention, biases on/off
    mistral   as llama, with or without a sliding window (1..8 keys)
    qwen2     QKV biases, sliding windows from layer max_window_layers on
    gemma2    RMSNorm before and after each sublayer, alternating sliding/full layers
    olmo2     RMSNorm after each sublayer only
    gpt_neox  parallel or sequential blocks, partial rotary, biases on/off
    gptj      parallel blocks off one LayerNorm
    falcon    multi-query, parallel or sequential, biases on/off, ALiBi or rotary
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import transformers as tf
from hypothesis import strategies as st

from support import zoo
from support.models import KINDS, cached_model
from tl_decomp import model_spec
from tl_decomp.models import TINY_ARCHS, tiny_tokenizer

D_MODEL = 32  # zoo's width; heads * head_dim stays at it
VOCAB = 64  # zoo's and tiny_model's vocabulary
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", ".", ",", "is", "big", "w9"]


class Config(NamedTuple):
    """A tiny model: `family` (zoo) with Hugging Face config `knobs`, or a TINY_ARCHS arch
    when `kind` is ``hooked``."""

    family: str
    knobs: tuple[tuple[str, Any], ...] = ()
    processed: bool = False
    kind: str = "bridge"

    def __str__(self) -> str:
        knobs = ",".join(f"{k}={v}" for k, v in self.knobs)
        return f"{self.kind}:{self.family}({knobs}){'+processed' if self.processed else ''}"


# -- the knobs each family draws ---------------------------------------------------------------
def _heads(draw: Callable[..., Any], kv: bool) -> dict[str, Any]:
    n = draw(st.sampled_from([2, 4, 8]))
    knobs: dict[str, Any] = {"num_attention_heads": n, "head_dim": D_MODEL // n}
    if kv:  # 1: multi-query; n: multi-head; between: grouped-query
        knobs["num_key_value_heads"] = draw(
            st.sampled_from([d for d in (1, 2, 4, 8) if n % d == 0])
        )
    return knobs


_BOOL = st.booleans()
_WINDOW = st.integers(1, 8)  # 1: each query sees itself only

KNOBS: dict[str, Callable[[Callable[..., Any]], dict[str, Any]]] = {
    "gpt2": lambda draw: _heads(draw, kv=False),
    "bert": lambda draw: _heads(draw, kv=False),
    "opt": lambda draw: (
        _heads(draw, kv=False) | {"do_layer_norm_before": draw(_BOOL), "enable_bias": draw(_BOOL)}
    ),
    "llama": lambda draw: (
        _heads(draw, kv=True) | {"attention_bias": draw(_BOOL), "mlp_bias": draw(_BOOL)}
    ),
    "mistral": lambda draw: _heads(draw, kv=True) | {"sliding_window": draw(st.none() | _WINDOW)},
    "qwen2": lambda draw: (
        _heads(draw, kv=True)
        | {
            "use_sliding_window": True,
            "sliding_window": draw(_WINDOW),
            "max_window_layers": draw(st.integers(0, 3)),
        }
    ),
    "gemma2": lambda draw: _heads(draw, kv=True) | {"sliding_window": draw(_WINDOW)},
    "olmo2": lambda draw: _heads(draw, kv=True) | {"attention_bias": draw(_BOOL)},
    "gpt_neox": lambda draw: (
        _heads(draw, kv=False)
        | {
            "use_parallel_residual": draw(_BOOL),
            "attention_bias": draw(_BOOL),
            "rotary_pct": draw(st.sampled_from([0.25, 0.5, 1.0])),
        }
    ),
    "gptj": lambda draw: _heads(draw, kv=False) | {"rotary_dim": draw(st.sampled_from([2, 4]))},
    "falcon": lambda draw: (
        _heads(draw, kv=False)
        | {
            "multi_query": draw(_BOOL),
            "parallel_attn": draw(_BOOL),
            "bias": draw(_BOOL),
            "alibi": draw(_BOOL),
        }
    ),
}
FAMILIES = tuple(KNOBS)
# Hugging Face's RMSNorm (Llama, Mistral, Qwen2, Gemma-2, OLMo-2) normalises in float32 even
# in a float64 model and casts back, so the model's own activations carry float32 rounding
# (relative ~1e-7) that the float64 factors do not: those families are held to 1e-6. Listed
# here, not read from the spec's `Norm.rounds`, so the library cannot loosen its own test.
ROUNDING_NORMS = frozenset({"llama", "mistral", "qwen2", "gemma2", "olmo2"})


@functools.cache
def unsupported(family: str, processed: bool) -> str | None:
    """Why this TransformerLens line or tl_decomp cannot take `family` at its zoo defaults
    (None: it can). Derived by booting it, so a list of exclusions cannot go stale; a knob
    combination that fails later is a finding, not an exclusion."""
    try:
        model_spec(boot(Config(family, (), processed)))
    except Unbootable as err:
        return f"TransformerLens cannot run it: {err}"
    except NotImplementedError as err:  # tl_decomp's model_spec refuses it, naming why
        return f"tl_decomp refuses it: {err}"[:300]
    return None


@st.composite
def configs(draw: Callable[..., Any]) -> Config:
    """A random tiny configuration; on TransformerLens 3.x also HookedTransformer ones."""
    if "hooked" in KINDS and draw(st.integers(0, 4)) == 0:
        arch = draw(st.sampled_from(TINY_ARCHS))
        processed = arch != "bert" and draw(_BOOL)  # HookedEncoder has no weight processing
        return Config(arch, (), processed, "hooked")
    family = draw(st.sampled_from(FAMILIES).filter(lambda f: unsupported(f, False) is None))
    knobs = KNOBS[family](draw) | {"num_hidden_layers": draw(st.integers(1, 3))}
    processed = draw(_BOOL) and unsupported(family, True) is None
    return Config(family, tuple(sorted(knobs.items())), processed)


def tolerance(config: Config) -> float:
    """Relative tolerance of a float64 decomposition against the model's own activation."""
    if config.kind == "hooked":  # TransformerLens's own RMSNorm computes in the model's dtype
        return 1e-9
    return 1e-6 if config.family in ROUNDING_NORMS else 1e-9


# -- building ----------------------------------------------------------------------------------
def hf_config(config: Config) -> Any:
    """The zoo family's config with `config.knobs` on top (aliases resolved; a knob the config
    class lacks, such as head_dim for GPT-2, is dropped: it is implied by the head count)."""
    partial = zoo.FAMILIES[config.family].config
    cls = partial.args[0]
    fields = {f.name for f in dataclasses.fields(cls)}
    aliases = getattr(cls, "attribute_map", {})
    overrides = dict(partial.keywords)
    for key, value in config.knobs:
        key = key if key in fields else aliases.get(key, key)
        if key in fields:
            overrides[key] = value
    return zoo._tiny(cls, **overrides)


class Unbootable(Exception):
    """TransformerLens itself cannot boot or run this configuration (its bug, not ours)."""


_BOOTED: dict[Config, Any] = {}


def boot(config: Config) -> Any:
    """The model of `config`, float64, eval mode; built once per process (read-only).

    Raises `Unbootable` where TransformerLens fails on its own (booting, compatibility mode,
    or its plain forward pass), remembered like a model so it is tried once."""
    if config not in _BOOTED:
        try:
            _BOOTED[config] = _boot(config)
        except Exception as err:
            _BOOTED[config] = Unbootable(f"{type(err).__name__}: {err}"[:200])
    got = _BOOTED[config]
    if isinstance(got, Unbootable):
        raise got
    return got


def _boot(config: Config) -> Any:
    if config.kind == "hooked":
        return cached_model(config.family, "hooked", torch.float64, config.processed)
    from transformer_lens.model_bridge import TransformerBridge

    spec = zoo.FAMILIES[config.family]
    torch.manual_seed(0)
    hf = getattr(tf, spec.model_class)(hf_config(config))
    zoo._perturb(hf)
    path = tempfile.mkdtemp(prefix=f"tl_decomp_fuzz_{config.family}_")
    try:
        hf.save_pretrained(path)
        tiny_tokenizer(spec.encoder, path).save_pretrained(path)
        model = TransformerBridge.boot_transformers(path, device="cpu", dtype=torch.float64)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    if config.processed:
        model.enable_compatibility_mode(disable_warnings=True)
    with torch.inference_mode():
        model(torch.tensor([[1, 5, 6, 5]]))
    return model.eval()
