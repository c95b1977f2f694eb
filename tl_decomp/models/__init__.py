"""Models without a download: the bundled real models (`load_model("minilm" | "smollm2")`),
tiny random ones built from a Hugging Face config (`tiny_model`), and a small fine-tune
(`fine_tune`) whose checkpoint `load_model` boots back."""

from tl_decomp.models._bundled import minilm_dir, smollm2_dir
from tl_decomp.models._fine_tune import FINE_TUNE_TASKS, FineTuneTask, FineTuning, fine_tune
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
    "FINE_TUNE_TASKS",
    "FineTuneTask",
    "FineTuning",
    "TINY_ARCHS",
    "fine_tune",
    "load_model",
    "minilm_dir",
    "smollm2_dir",
    "tiny_dir",
    "tiny_model",
    "tiny_tokenizer",
]
