"""Models without a download: the bundled real models (`load_model("minilm" | "smollm2")`)
and tiny random ones built from a Hugging Face config (`tiny_model`)."""

from tl_decomp.models._bundled import minilm_dir, smollm2_dir
from tl_decomp.models._load import (
    BUNDLED,
    TINY_ARCHS,
    load_model,
    tiny_dir,
    tiny_model,
    tiny_tokenizer,
)

__all__ = [
    "BUNDLED",
    "TINY_ARCHS",
    "load_model",
    "minilm_dir",
    "smollm2_dir",
    "tiny_dir",
    "tiny_model",
    "tiny_tokenizer",
]
