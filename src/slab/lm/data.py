"""Text data for the language-model commands: local English text via HF datasets, a BPE tokenizer
trained with HF tokenizers, and packed or padded token batches.

The default corpus is Debian's ``fortunes`` package (``make lm-data``): about 2.5 MB of English
quotations, jokes, poems and definitions in ``/usr/share/games/fortunes``, one entry per ``%`` line.
Any directory or list of UTF-8 text files works (``--text``); files without ``%`` separators are split
into paragraphs at blank lines.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

__all__ = ["FORTUNES_DIR", "text_files", "load_text", "split_entries", "train_tokenizer", "pack_tokens",
           "pad_rows", "default_text_source"]

FORTUNES_DIR = Path("/usr/share/games/fortunes")
#: Fortune files that are not prose.
_SKIP = {"ascii-art", "translate-me"}
_ENTRY_SPLIT = re.compile(r"^%\s*$", re.MULTILINE)
_PARA_SPLIT = re.compile(r"\n\s*\n")


def default_text_source() -> Path:
    if not FORTUNES_DIR.is_dir():
        raise FileNotFoundError(f"{FORTUNES_DIR} is missing: run `make lm-data` (installs the Debian package "
                                f"'fortunes'), or pass --text DIR_OR_FILES with your own UTF-8 text")
    return FORTUNES_DIR


def text_files(source: str | os.PathLike | list | None = None) -> list[str]:
    """The text files of ``source`` (a directory, a file, or a list of them); default: the fortunes."""
    if source is None:
        source = default_text_source()
    sources = source if isinstance(source, (list, tuple)) else [source]
    files: list[str] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            files += [str(f) for f in sorted(p.iterdir())
                      if f.is_file() and not f.is_symlink() and f.suffix not in (".dat", ".u8") and f.name not in _SKIP]
        elif p.is_file():
            files.append(str(p))
        else:
            raise FileNotFoundError(f"text source {p} does not exist")
    if not files:
        raise FileNotFoundError(f"no text files in {source}")
    return files


def split_entries(document: str) -> list[str]:
    """Entries of one file: ``%``-separated (fortune format) or blank-line paragraphs."""
    parts = _ENTRY_SPLIT.split(document) if _ENTRY_SPLIT.search(document) else _PARA_SPLIT.split(document)
    return [p.strip() for p in parts if p.strip()]


def load_text(source=None, held_out: float = 0.05, seed: int = 0, cache_dir: str | None = None):
    """``DatasetDict`` with ``train`` and ``test`` splits of entries (column ``text``), from local files.

    Uses the HF ``datasets`` "text" builder (one sample per file) and splits each file into entries; the
    held-out split is a seeded random ``held_out`` fraction of entries.
    """
    from datasets import load_dataset
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    files = text_files(source)
    docs = load_dataset("text", data_files={"train": files}, sample_by="document", cache_dir=cache_dir,
                        split="train")
    entries = docs.map(lambda batch: {"text": [e for d in batch["text"] for e in split_entries(d)]},
                       batched=True, remove_columns=docs.column_names)
    n = len(entries)
    if n < 2 or round(n * held_out) < 1 or n - round(n * held_out) < 1:
        raise ValueError(f"text {source or FORTUNES_DIR} has {n} entr{'y' if n == 1 else 'ies'} (blank-line paragraphs "
                         f"or %-separated entries): too few to hold out {held_out:.0%} for evaluation and train on the "
                         f"rest; give more text")
    return entries.train_test_split(test_size=held_out, seed=seed, shuffle=True)


def train_tokenizer(texts, vocab_size: int = 4096, min_frequency: int = 2):
    """A byte-level BPE tokenizer trained on ``texts`` (HF tokenizers), as a ``PreTrainedTokenizerFast``.

    Special tokens: ``<|endoftext|>`` (bos/eos, id 0) and ``<pad>`` (id 1).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>")


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def pack_tokens(tokenizer, texts, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """All entries tokenized, each followed by EOS, concatenated and cut into ``[N, seq_len]`` blocks.

    Every token is real (no padding); the remainder that does not fill a block is dropped.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    flat: list[int] = []
    for ids in _encode(tokenizer, texts):
        flat += ids + [eos]
        if max_blocks is not None and len(flat) >= max_blocks * seq_len:
            break
    n = len(flat) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"not enough text for one block of {seq_len} tokens ({len(flat)} tokens)")
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


def pad_rows(tokenizer, texts, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One entry per row (truncated to ``seq_len``, EOS appended), right-padded: ``(input_ids, attention_mask)``.

    Exercises the padding-aware BN statistics: padding never enters them and never enters the loss.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [(ids + [tokenizer.eos_token_id])[:seq_len] for ids in _encode(tokenizer, texts)]
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise ValueError("no entry with at least 2 tokens")
    ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask
