"""A zoo of tiny random Hugging Face models, one per text family TransformerLens 4 can bridge.

Each `FAMILIES` entry builds a small config (d_model 32, 3 layers, 4 query heads of 8, 2 KV
heads where the family has grouped-query attention, vocab 64, no dropout) and names the
Hugging Face class to instantiate. `boot(family)` writes the seeded random model, with every
1-D parameter (norm gains and biases, biases) moved off its trivial init, and a word-level
tokenizer to a temporary folder once per process, and boots that folder as a `TransformerBridge`.
`hf_reference(family)` loads the same folder into Hugging Face alone (eager attention), the
baseline the bridge's logits are checked against in `tests/decomposition/test_architectures.py`.

Sliding windows, GPT-Neo's local window and Llama 4's attention chunks are `WINDOW` = 6 tokens,
shorter than the 12-token `IDS`, so windowed attention differs from full attention. Mixture of
experts families run Hugging Face's "eager" expert loop: its default grouped_mm kernel refuses
float64 ("Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double").

`BROKEN` lists the families that do not boot, do not match or cannot `run_with_cache`, with the
reason; `BROKEN_BUILDS` keeps the builders of those that have one. `CAVEATS` notes the hook gaps and
surprises of families that do work. Adding a family is one `FAMILIES` entry.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import transformers as tf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

IDS = torch.arange(3, 15)[None]  # 12 tokens, twice the sliding windows below
WINDOW = 6
INIT_STD = 0.2  # Hugging Face's usual 0.02 leaves attention near uniform at d_model 32
SLIDING_3 = ["sliding_attention", "sliding_attention", "full_attention"]


class Family(NamedTuple):
    """How to build one tiny model."""

    config: Callable[[], Any]  # returns a transformers `PretrainedConfig`
    model_class: str  # the class in `transformers` to instantiate
    float32_only: bool = False  # the Hugging Face forward itself fails in float64
    encoder: bool = False  # masked LM: BERT tokenizer
    moe: bool = False  # mixture of experts: boot with experts_implementation="eager"
    architecture: str | None = None  # `architectures` to write when TransformerLens spells it
    seq2seq: bool = False  # encoder–decoder: also written as pytorch_model.bin (Switch reads it)
    pixels: bool = False  # vision: reads pixel_values (`pixels(family)`), no tokenizer


# Sizes applied to every field a family's config class has (or aliases in `attribute_map`);
# a family's own keyword arguments override them.
_SMALL: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
    "initializer_range": INIT_STD,
    "init_std": INIT_STD,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "use_cache": False,
    # mixture of experts: 4 experts, top 2, one shared expert, first layer dense
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 24,
    "shared_expert_intermediate_size": 40,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "num_dense_layers": 1,
    # multi-head latent attention (DeepSeek, GLM-4 MoE Lite, Youtu)
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 12,  # wider than head_dim (as DeepSeek's): the bridge's z split is wrong
}


@functools.cache
def _fields(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


def _tiny(cls: type, **overrides: Any) -> Any:
    """`cls` at the `_SMALL` sizes, `overrides` on top, with every dropout at zero."""
    fields, aliases = _fields(cls), getattr(cls, "attribute_map", {})
    kwargs: dict[str, Any] = {}
    for key, value in _SMALL.items():
        key = key if key in fields else aliases.get(key, key)
        if key in fields:
            kwargs.setdefault(key, value)
    kwargs.update(overrides)
    cfg = cls(**kwargs)
    for key, value in cfg.to_dict().items():
        low = key.lower()
        dropout = "dropout" in low or "pdrop" in low or low == "layerdrop"
        if dropout and isinstance(value, (int, float)) and value:
            setattr(cfg, key, type(value)(0))
    attn = getattr(cfg, "attn_config", None)  # MPT keeps its attention dropout in a sub-config
    if getattr(attn, "attn_pdrop", 0):
        attn.attn_pdrop = type(attn.attn_pdrop)(0)
    return cfg


def _cfg(cls: type, **overrides: Any) -> Callable[[], Any]:
    return functools.partial(_tiny, cls, **overrides)


def _granite(cls: type) -> Callable[[], Any]:
    scales = {"embedding_multiplier": 4.0, "residual_multiplier": 0.5}
    return _cfg(cls, **scales, attention_multiplier=0.2, logits_scaling=3.0)


_PARTIAL_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "original_max_position_embeddings": 32,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
}
_GEMMA = {"sliding_window": WINDOW, "query_pre_attn_scalar": 16}  # scale != 1/sqrt(head_dim)
_SOFTCAP = {"attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0}
_SSM = {"state_size": 4, "expand": 2, "conv_kernel": 3, "chunk_size": 4}
_MAMBA1 = {"state_size": 4, "expand": 2, "conv_kernel": 3, "time_step_rank": 4}
_MAMBA_HYBRID = {"mamba_d_state": 4, "mamba_d_conv": 3, "mamba_expand": 2}
_MAMBA2_HYBRID = {"mamba_n_heads": 8, "mamba_d_head": 8, "mamba_n_groups": 1, "mamba_chunk_size": 4}
_NEO_LAYERS = [[["global", "local"], 1], [["global"], 1]]  # global, local, global
# encoder–decoders: 3 + 3 layers, decoder_start_token_id 1 (the BOS)
_BART = {
    "encoder_layers": 3,
    "decoder_layers": 3,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 48,
    "decoder_ffn_dim": 48,
    "decoder_start_token_id": 1,
    "forced_eos_token_id": None,
}
_T5 = {
    "d_kv": 8,
    "d_ff": 48,
    "num_decoder_layers": 3,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
    "decoder_start_token_id": 1,
}


def _t5gemma() -> Any:
    """T5Gemma nests one Gemma-2-like config per stack (sliding windows, GQA, soft-capping)."""
    stack = {k: v for k, v in _SMALL.items() if k in _fields(tf.T5GemmaModuleConfig)}
    stack.update(_GEMMA, attention_dropout=0.0, dropout_rate=0.0)
    top = {k: _SMALL[k] for k in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")}
    return tf.T5GemmaConfig(
        encoder=stack, decoder=stack, **top, dropout_rate=0.0, attention_dropout=0.0,
        tie_word_embeddings=False,
    )  # fmt: skip


# Vision transformers: 16x16 RGB images in 4x4 patches, 16 patches after the prefix tokens
# (CLS; DeiT adds a distillation token), 5 classes where there is a classifier head.
_VISION = {"image_size": 16, "patch_size": 4, "num_channels": 3, "encoder_stride": 4}


def pixels(family: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Seeded random pixel values ``[batch channels height width]`` for a vision family, in
    the family's float64 (or float32) dtype."""
    cfg = _spec(family).config()
    size = (batch, cfg.num_channels, cfg.image_size, cfg.image_size)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(size, generator=gen, dtype=torch.float64).to(dtype_for(family))


FAMILIES: dict[str, Family] = {
    # vision (pre-LN encoders over patches; no tokenizer)
    "vit": Family(
        _cfg(tf.ViTConfig, **_VISION, num_labels=5), "ViTForImageClassification", pixels=True
    ),
    "vit_model": Family(_cfg(tf.ViTConfig, **_VISION), "ViTModel", pixels=True),  # + pooler
    "deit": Family(
        _cfg(tf.DeiTConfig, **_VISION, num_labels=5), "DeiTForImageClassification", pixels=True
    ),
    # encoders (post-LN, embedding LayerNorm)
    "bert": Family(_cfg(tf.BertConfig, type_vocab_size=2), "BertForMaskedLM", encoder=True),
    "roberta": Family(_cfg(tf.RobertaConfig), "RobertaForMaskedLM", encoder=True),
    # encoder–decoders (decoder blocks: self-attention, cross-attention, MLP)
    "t5": Family(_cfg(tf.T5Config, **_T5), "T5ForConditionalGeneration", seq2seq=True),
    "longt5": Family(  # local attention in the encoder, delegated to Hugging Face
        _cfg(tf.LongT5Config, **_T5, local_radius=3), "LongT5ForConditionalGeneration", seq2seq=True
    ),
    "switch_transformers": Family(  # top-1 experts in blocks 1 (sparse every other block)
        _cfg(
            tf.SwitchTransformersConfig,
            **_T5,
            num_sparse_encoder_layers=1,
            num_sparse_decoder_layers=1,
            expert_capacity=64,
        ),
        "SwitchTransformersForConditionalGeneration",
        seq2seq=True,
    ),
    "t5gemma": Family(_t5gemma, "T5GemmaForConditionalGeneration", seq2seq=True),
    "bart": Family(_cfg(tf.BartConfig, **_BART), "BartForConditionalGeneration", seq2seq=True),
    "marian": Family(
        _cfg(tf.MarianConfig, **_BART, decoder_vocab_size=64), "MarianMTModel", seq2seq=True
    ),
    "mbart": Family(_cfg(tf.MBartConfig, **_BART), "MBartForConditionalGeneration", seq2seq=True),
    "pegasus": Family(
        _cfg(tf.PegasusConfig, **_BART), "PegasusForConditionalGeneration", seq2seq=True
    ),
    "m2m100": Family(
        _cfg(tf.M2M100Config, **_BART), "M2M100ForConditionalGeneration", seq2seq=True
    ),
    "blenderbot": Family(
        _cfg(tf.BlenderbotConfig, **_BART), "BlenderbotForConditionalGeneration", seq2seq=True
    ),
    "led": Family(  # Longformer's banded attention (window 4) in the encoder
        _cfg(
            tf.LEDConfig,
            **_BART,
            max_encoder_position_embeddings=64,
            max_decoder_position_embeddings=64,
            attention_window=4,
        ),
        "LEDForConditionalGeneration",
        seq2seq=True,
    ),
    # LayerNorm, learned / ALiBi / no rotary positions
    "gpt2": Family(_cfg(tf.GPT2Config, n_inner=48), "GPT2LMHeadModel"),
    "openai_gpt": Family(_cfg(tf.OpenAIGPTConfig), "OpenAIGPTLMHeadModel"),
    "gpt_neo": Family(
        _cfg(tf.GPTNeoConfig, attention_types=_NEO_LAYERS, window_size=WINDOW),
        "GPTNeoForCausalLM",
    ),
    "gpt_bigcode": Family(
        _cfg(tf.GPTBigCodeConfig, n_inner=48, multi_query=True), "GPTBigCodeForCausalLM"
    ),
    "opt": Family(_cfg(tf.OPTConfig, ffn_dim=48, word_embed_proj_dim=32), "OPTForCausalLM"),
    "xglm": Family(_cfg(tf.XGLMConfig, ffn_dim=48), "XGLMForCausalLM", float32_only=True),
    "bloom": Family(_cfg(tf.BloomConfig), "BloomForCausalLM"),
    "mpt": Family(_cfg(tf.MptConfig, expansion_ratio=2), "MptForCausalLM"),
    "falcon": Family(  # Falcon-7B: multi-query, parallel attention + MLP off one LayerNorm
        _cfg(tf.FalconConfig, multi_query=True, parallel_attn=True, ffn_hidden_size=48),
        "FalconForCausalLM",
    ),
    "falcon_rw": Family(  # Falcon-RW: ALiBi, sequential blocks, biases
        _cfg(
            tf.FalconConfig,
            alibi=True,
            parallel_attn=False,
            multi_query=False,
            bias=True,
            ffn_hidden_size=48,
        ),
        "FalconForCausalLM",
    ),
    # LayerNorm, rotary
    "gptj": Family(_cfg(tf.GPTJConfig, n_inner=48, rotary_dim=4), "GPTJForCausalLM"),
    "gpt_neox": Family(
        _cfg(tf.GPTNeoXConfig, rotary_pct=0.5, use_parallel_residual=True), "GPTNeoXForCausalLM"
    ),
    "phi": Family(
        _cfg(tf.PhiConfig, rope_parameters=_PARTIAL_ROPE, num_key_value_heads=4), "PhiForCausalLM"
    ),
    "stablelm": Family(
        _cfg(tf.StableLmConfig, rope_parameters=_PARTIAL_ROPE, use_qkv_bias=True),
        "StableLmForCausalLM",
    ),
    "stablelm_parallel": Family(  # StableLM-2-12B: parallel blocks, per-head q/k LayerNorm
        _cfg(
            tf.StableLmConfig,
            rope_parameters=_PARTIAL_ROPE,
            use_parallel_residual=True,
            qk_layernorm=True,
        ),
        "StableLmForCausalLM",
    ),
    "cohere": Family(_cfg(tf.CohereConfig, logit_scale=0.5), "CohereForCausalLM"),
    "cohere2": Family(
        _cfg(tf.Cohere2Config, logit_scale=0.5, sliding_window=WINDOW, layer_types=SLIDING_3),
        "Cohere2ForCausalLM",
    ),
    "olmo": Family(_cfg(tf.OlmoConfig), "OlmoForCausalLM"),
    "starcoder2": Family(_cfg(tf.Starcoder2Config, sliding_window=WINDOW), "Starcoder2ForCausalLM"),
    "jais2": Family(_cfg(tf.Jais2Config), "Jais2ForCausalLM"),
    "nemotron": Family(_cfg(tf.NemotronConfig), "NemotronForCausalLM"),
    "modernbert_decoder": Family(
        _cfg(tf.ModernBertDecoderConfig, sliding_window=WINDOW), "ModernBertDecoderForCausalLM"
    ),
    # RMSNorm, rotary
    "llama": Family(_cfg(tf.LlamaConfig), "LlamaForCausalLM"),
    "mistral": Family(_cfg(tf.MistralConfig, sliding_window=WINDOW), "MistralForCausalLM"),
    "ministral3": Family(_cfg(tf.Ministral3Config, sliding_window=WINDOW), "Ministral3ForCausalLM"),
    "qwen2": Family(_cfg(tf.Qwen2Config), "Qwen2ForCausalLM"),
    "qwen2_window": Family(  # layers >= max_window_layers slide
        _cfg(tf.Qwen2Config, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
        "Qwen2ForCausalLM",
    ),
    "qwen3": Family(_cfg(tf.Qwen3Config), "Qwen3ForCausalLM"),
    "gemma": Family(_cfg(tf.GemmaConfig), "GemmaForCausalLM"),
    "gemma2": Family(_cfg(tf.Gemma2Config, **_GEMMA, **_SOFTCAP), "Gemma2ForCausalLM"),
    "gemma3": Family(
        _cfg(tf.Gemma3TextConfig, **_GEMMA, layer_types=SLIDING_3), "Gemma3ForCausalLM"
    ),
    "gemma4_text": Family(
        _cfg(
            tf.Gemma4TextConfig,
            sliding_window=WINDOW,
            layer_types=SLIDING_3,
            vocab_size_per_layer_input=64,
            hidden_size_per_layer_input=8,
            global_head_dim=16,
            num_experts=None,  # dense: enable_moe_block stays False
        ),
        "Gemma4ForCausalLM",
    ),
    "vaultgemma": Family(_cfg(tf.VaultGemmaConfig, **_GEMMA, **_SOFTCAP), "VaultGemmaForCausalLM"),
    "phi3": Family(_cfg(tf.Phi3Config, sliding_window=None), "Phi3ForCausalLM"),
    "phi3_window": Family(_cfg(tf.Phi3Config, sliding_window=WINDOW), "Phi3ForCausalLM"),
    "olmo2": Family(_cfg(tf.Olmo2Config), "Olmo2ForCausalLM"),
    "olmo3": Family(
        _cfg(tf.Olmo3Config, sliding_window=WINDOW, layer_types=SLIDING_3), "Olmo3ForCausalLM"
    ),
    "granite": Family(_granite(tf.GraniteConfig), "GraniteForCausalLM"),
    "smollm3": Family(_cfg(tf.SmolLM3Config, no_rope_layers=[1, 1, 0]), "SmolLM3ForCausalLM"),
    "apertus": Family(_cfg(tf.ApertusConfig, rope_parameters=_LLAMA3_ROPE), "ApertusForCausalLM"),
    "arcee": Family(_cfg(tf.ArceeConfig), "ArceeForCausalLM"),
    "bitnet": Family(_cfg(tf.BitNetConfig), "BitNetForCausalLM"),
    "ernie4_5": Family(_cfg(tf.Ernie4_5Config, use_bias=True), "Ernie4_5ForCausalLM"),
    "exaone4": Family(
        _cfg(tf.Exaone4Config, sliding_window=WINDOW, layer_types=SLIDING_3), "Exaone4ForCausalLM"
    ),
    "glm": Family(_cfg(tf.GlmConfig), "GlmForCausalLM"),
    "glm4": Family(_cfg(tf.Glm4Config), "Glm4ForCausalLM"),
    "hunyuan_v1_dense": Family(_cfg(tf.HunYuanDenseV1Config), "HunYuanDenseV1ForCausalLM"),
    "nanochat": Family(_cfg(tf.NanoChatConfig), "NanoChatForCausalLM"),
    "seed_oss": Family(_cfg(tf.SeedOssConfig), "SeedOssForCausalLM"),
    "hrm_text": Family(_cfg(tf.HrmTextConfig, num_layers_per_stack=2), "HrmTextForCausalLM"),
    # multi-head latent attention (MLA needs as many KV heads as query heads)
    "youtu": Family(_cfg(tf.YoutuConfig, num_key_value_heads=4), "YoutuForCausalLM"),
    # mixture of experts
    "mixtral": Family(_cfg(tf.MixtralConfig), "MixtralForCausalLM", moe=True),
    "qwen2_moe": Family(_cfg(tf.Qwen2MoeConfig), "Qwen2MoeForCausalLM", moe=True),
    "qwen3_moe": Family(_cfg(tf.Qwen3MoeConfig), "Qwen3MoeForCausalLM", moe=True),
    "olmoe": Family(_cfg(tf.OlmoeConfig), "OlmoeForCausalLM", moe=True),
    "flex_olmo": Family(_cfg(tf.FlexOlmoConfig), "FlexOlmoForCausalLM", moe=True),
    "granitemoe": Family(_granite(tf.GraniteMoeConfig), "GraniteMoeForCausalLM", moe=True),
    "phimoe": Family(
        _cfg(tf.PhimoeConfig), "PhimoeForCausalLM", moe=True, architecture="PhiMoEForCausalLM"
    ),
    "jetmoe": Family(_cfg(tf.JetMoeConfig, kv_channels=8), "JetMoeForCausalLM", moe=True),
    "minimax_m2": Family(_cfg(tf.MiniMaxM2Config), "MiniMaxM2ForCausalLM", moe=True),
    "gpt_oss": Family(_cfg(tf.GptOssConfig, sliding_window=WINDOW), "GptOssForCausalLM", moe=True),
    "llama4": Family(
        _cfg(
            tf.Llama4TextConfig,
            intermediate_size_mlp=48,
            attention_chunk_size=WINDOW,
            num_experts_per_tok=1,
        ),
        "Llama4ForCausalLM",
        moe=True,
    ),
    "afmoe": Family(
        _cfg(tf.AfmoeConfig, sliding_window=WINDOW, layer_types=SLIDING_3),
        "AfmoeForCausalLM",
        moe=True,
    ),
    "laguna": Family(
        _cfg(tf.LagunaConfig, sliding_window=WINDOW, layer_types=SLIDING_3),
        "LagunaForCausalLM",
        moe=True,
    ),
    "ernie4_5_moe": Family(
        _cfg(
            tf.Ernie4_5_MoeConfig,
            moe_num_experts=4,
            moe_k=2,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
            moe_layer_end_index=2,
        ),
        "Ernie4_5_MoeForCausalLM",
        moe=True,
    ),
    "glm4_moe": Family(_cfg(tf.Glm4MoeConfig), "Glm4MoeForCausalLM", moe=True),
    "glm4_moe_lite": Family(
        _cfg(tf.Glm4MoeLiteConfig, num_key_value_heads=4), "Glm4MoeLiteForCausalLM", moe=True
    ),
    "glm_moe_dsa": Family(
        _cfg(tf.GlmMoeDsaConfig, num_key_value_heads=4, index_head_dim=8),
        "GlmMoeDsaForCausalLM",
        moe=True,
    ),
    "deepseek_v2": Family(
        _cfg(tf.DeepseekV2Config, num_key_value_heads=4), "DeepseekV2ForCausalLM", moe=True
    ),
    "deepseek_v3": Family(
        _cfg(tf.DeepseekV3Config, num_key_value_heads=4), "DeepseekV3ForCausalLM", moe=True
    ),
    "deepseek_v4": Family(
        _cfg(tf.DeepseekV4Config, sliding_window=WINDOW, o_lora_rank=16, index_head_dim=8),
        "DeepseekV4ForCausalLM",
        moe=True,
    ),
    # token mixers that are not attention: state-space models, convolutions, linear attention
    "mamba": Family(_cfg(tf.MambaConfig, **_MAMBA1), "MambaForCausalLM"),
    "falcon_mamba": Family(_cfg(tf.FalconMambaConfig, **_MAMBA1), "FalconMambaForCausalLM"),
    "mamba2": Family(
        _cfg(tf.Mamba2Config, **_SSM, num_heads=8, head_dim=8, n_groups=1), "Mamba2ForCausalLM"
    ),
    "rwkv": Family(
        _cfg(tf.RwkvConfig, attention_hidden_size=32, context_length=64), "RwkvForCausalLM"
    ),
    "jamba": Family(  # Mamba, attention at layer 1, experts at layer 1
        _cfg(
            tf.JambaConfig,
            **_MAMBA_HYBRID,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            use_mamba_kernels=False,
        ),
        "JambaForCausalLM",
        moe=True,
    ),
    "bamba": Family(
        _cfg(tf.BambaConfig, **_MAMBA_HYBRID, **_MAMBA2_HYBRID, attn_layer_indices=[1]),
        "BambaForCausalLM",
    ),
    "falcon_h1": Family(  # attention and Mamba-2 side by side in every block
        _cfg(tf.FalconH1Config, **_MAMBA_HYBRID, **_MAMBA2_HYBRID, mamba_d_ssm=64),
        "FalconH1ForCausalLM",
    ),
    "granite_moe_hybrid": Family(
        _cfg(
            tf.GraniteMoeHybridConfig,
            **_MAMBA_HYBRID,
            **_MAMBA2_HYBRID,
            layer_types=["mamba", "attention", "mamba"],
            position_embedding_type="rope",
        ),
        "GraniteMoeHybridForCausalLM",
        moe=True,
    ),
    "lfm2": Family(  # short gated convolutions, attention at layer 1
        _cfg(
            tf.Lfm2Config,
            layer_types=["conv", "full_attention", "conv"],
            conv_L_cache=3,
            block_ff_dim=48,
        ),
        "Lfm2ForCausalLM",
    ),
    "qwen3_next": Family(  # gated delta-net linear attention, attention at layer 1
        _cfg(
            tf.Qwen3NextConfig,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_conv_kernel_dim=3,
        ),
        "Qwen3NextForCausalLM",
        moe=True,
    ),
    "olmo_hybrid": Family(_cfg(tf.OlmoHybridConfig), "OlmoHybridForCausalLM"),
    "nemotron_h": Family(
        _cfg(
            tf.NemotronHConfig,
            layers_block_type=["mamba", "attention", "moe"],
            mamba_num_heads=8,
            mamba_head_dim=8,
            n_groups=1,
            ssm_state_size=4,
            conv_kernel=3,
            chunk_size=4,
        ),
        "NemotronHForCausalLM",
        moe=True,
    ),
    "zamba2": Family(
        _cfg(
            tf.Zamba2Config,
            layers_block_type=["mamba", "hybrid", "mamba"],
            mamba_d_state=4,
            mamba_d_conv=3,
            mamba_expand=2,
            mamba_headdim=8,
            n_mamba_heads=8,
            mamba_ngroups=1,
            chunk_size=4,
            num_mem_blocks=1,
            attention_head_dim=8,
        ),
        "Zamba2ForCausalLM",
    ),
    "recurrent_gemma": Family(_cfg(tf.RecurrentGemmaConfig), "RecurrentGemmaForCausalLM"),
}

_REMOTE = "remote code only (no class in transformers 5.24); needs the hub's modeling files"

BROKEN: dict[str, str] = {
    "opt_postln": "run_with_cache raises ValueError: not enough values to unpack (expected 3, got "
    "2): an OPTAttention receives a 2-D hidden state (OPT flattens the stream around its MLP); "
    "the plain forward boots and matches Hugging Face exactly",
    "codegen": "AttributeError: 'CodeGenAttention' object has no attribute 'embed_positions' "
    "(the bridge's CodeGen attention reads attn.embed_positions; transformers 5 moved the "
    "sinusoidal table to a CodeGenRotaryEmbedding module)",
    "falcon_new": "logits mismatch, max relative error 0.9 (boots): the adapter splits the fused "
    "query_key_value as [all Q | all K | all V], Hugging Face's new_decoder_architecture lays it "
    "out per KV group as [q_1 .. q_(H/KV), k, v] x KV",
    "falcon_new_mq": "RuntimeError: split_with_sizes expects split_sizes to sum exactly to 64 "
    "(input tensor's size at dimension 0), but got split_sizes=[32, 8, 8] (the adapter forces one "
    "KV head whenever multi_query=True; Hugging Face ignores multi_query under "
    "new_decoder_architecture and uses num_kv_heads)",
    "qwen": f"QwenForCausalLM (Qwen 1): {_REMOTE}",
    "baichuan": f"BaichuanForCausalLM: {_REMOTE}",
    "internlm2": f"InternLM2ForCausalLM: {_REMOTE}",
    "exaone": f"ExaoneForCausalLM (EXAONE 3): {_REMOTE}",
    "openelm": f"OpenELMForCausalLM: {_REMOTE}",
    "ouro": f"OuroForCausalLM: {_REMOTE}",
    "raven": f"RavenForCausalLM: {_REMOTE}",
    "gpt2_custom": f"GPT2LMHeadCustomModel: {_REMOTE}",
}

BROKEN_BUILDS: dict[str, Family] = {
    "opt_postln": Family(  # OPT-350m: post-LN, embeddings projected in and out
        _cfg(tf.OPTConfig, ffn_dim=48, word_embed_proj_dim=16, do_layer_norm_before=False),
        "OPTForCausalLM",
    ),
    "falcon_new": Family(  # Falcon-40B/180B: grouped KV, two LayerNorms in parallel
        _cfg(
            tf.FalconConfig,
            new_decoder_architecture=True,
            multi_query=False,
            num_kv_heads=2,
            num_ln_in_parallel_attn=2,
            ffn_hidden_size=48,
        ),
        "FalconForCausalLM",
    ),
    "codegen": Family(_cfg(tf.CodeGenConfig, n_inner=48, rotary_dim=4), "CodeGenForCausalLM"),
    "falcon_new_mq": Family(
        _cfg(
            tf.FalconConfig,
            new_decoder_architecture=True,
            multi_query=True,
            num_kv_heads=2,
            num_ln_in_parallel_attn=2,
            ffn_hidden_size=48,
        ),
        "FalconForCausalLM",
    ),
}


# Families in FAMILIES (they boot, match and cache) with a known gap in their hooks.
CAVEATS: dict[str, str] = {
    "openai_gpt": "blocks.{i}.hook_out and hook_resid_post never fire (Hugging Face's "
    "OpenAIGPT Block.forward returns a list, not a tuple; ln2.hook_out holds the block output), "
    "and with an attention_mask (right padding) the bridge's logits differ from Hugging Face's "
    "at real positions by 1e-2 relative",
    "xglm": "float32 only: Hugging Face's XGLM attention overflows in float64 (torch.full((), "
    "finfo(float64).min) in the default float32); its sinusoidal positions have no hook, so "
    "blocks.0.hook_in != hook_embed (which is scaled by sqrt(d_model))",
    "gemma4_text": "norms are plain GeneralizedComponents (no hook_scale / hook_normalized); "
    "after the MLP each block adds a per-layer-input (PLE) branch and then multiplies the whole "
    "stream by a learned layer_scalar, so hook_out != hook_in + hook_attn_out + hook_mlp_out",
    "deepseek_v4": "attention is opaque (no q/k/v/pattern hooks); the residual stream is 4 "
    "hyper-connection copies: blocks.{i}.hook_in / hook_out are [batch, pos, 4, d_model]",
    "nanochat": "one RMSNorm module (model.norm) runs twice, on the embeddings before block 0 "
    "and as the final norm: ln_final hooks fire twice per forward (the cache keeps the final "
    "call) and blocks.0.hook_in = rmsnorm(hook_embed); its RMSNorms have no weight",
    "hrm_text": "no `blocks`: two stacks L_blocks and H_blocks, run in cycles (several passes "
    "per forward), with L_ln_final / H_ln_final",
}


def _spec(family: str) -> Family:
    return FAMILIES[family] if family in FAMILIES else BROKEN_BUILDS[family]


@torch.no_grad()
def _perturb(model: torch.nn.Module) -> None:
    """Move every 1-D parameter (norm gains and biases, biases) off its trivial init."""
    for p in model.parameters():
        if p.ndim == 1:
            p.add_(0.2 * torch.randn_like(p))


@torch.no_grad()
def _perturb_logits_bias(model: torch.nn.Module) -> None:
    """Move an encoder–decoder's ``final_logits_bias`` buffer (added after ``lm_head``) off 0."""
    for name, buf in model.named_buffers():
        if name.endswith("final_logits_bias"):
            buf.add_(0.2 * torch.randn_like(buf))


@functools.cache
def model_dir(family: str) -> str:
    """Write the family's random model and tokenizer once per process; return the folder."""
    from tl_decomp.models import tiny_tokenizer

    spec = _spec(family)
    torch.manual_seed(0)
    model = getattr(tf, spec.model_class)(spec.config())
    _perturb(model)
    if spec.seq2seq:  # BART's kin add a bias after lm_head (zero at init; Marian's is not)
        _perturb_logits_bias(model)
    path = tempfile.mkdtemp(prefix=f"tl_decomp_zoo_{family}_")
    model.save_pretrained(path)
    if spec.architecture is not None:
        config = Path(path, "config.json")
        data = json.loads(config.read_text())
        data["architectures"] = [spec.architecture]
        config.write_text(json.dumps(data, indent=2))
    if spec.seq2seq:  # Switch's adapter loads with use_safetensors=False
        torch.save(model.state_dict(), Path(path, "pytorch_model.bin"))
    if not spec.pixels:
        tiny_tokenizer(spec.encoder, path).save_pretrained(path)
    return path


def dtype_for(family: str, dtype: torch.dtype = torch.float64) -> torch.dtype:
    """`dtype`, or float32 for a family whose Hugging Face forward cannot run float64."""
    return torch.float32 if _spec(family).float32_only else dtype


def boot(family: str, dtype: torch.dtype = torch.float64, *, as_users_do: bool = False) -> Any:
    """The family's tiny model as a `TransformerBridge` in eval mode (see `dtype_for`).

    Mixture-of-experts families boot with the eager expert loop (the reference's), or, with
    `as_users_do`, Hugging Face's default kernel (``grouped_mm``), as a user's model runs."""
    from transformer_lens.model_bridge import TransformerBridge

    eager = _spec(family).moe and not as_users_do
    overrides = {"_experts_implementation_internal": "eager"} if eager else None
    bridge = TransformerBridge.boot_transformers(
        model_dir(family), device="cpu", dtype=dtype, hf_config_overrides=overrides
    )
    return bridge.eval()


def hf_reference(family: str, dtype: torch.dtype = torch.float64) -> Any:
    """The same weights in Hugging Face alone: eager attention (and experts), eval mode.

    Like `boot_transformers`, every parameter is cast to `dtype`, also those Hugging Face keeps
    in float32 (`_keep_in_fp32_modules`: DeepSeek-V4's hyper-connections, norms, sinks); float32
    buffers such as rotary `inv_freq` stay float32 in both.
    """
    spec = _spec(family)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "eager"}
    if spec.moe:
        kwargs["experts_implementation"] = "eager"
    model = getattr(tf, spec.model_class).from_pretrained(model_dir(family), **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(dtype)
    return model.eval()
