"""SAM 3's text tokenizer: CLIP's byte-level BPE (vocabulary 49408), context 32, offline.

Two sources, never a hub:
- a checkpoint directory in the released ``facebook/sam3`` layout (``tokenizer.json`` or
  ``vocab.json`` + ``merges.txt``), read with transformers' ``CLIPTokenizer``;
- CLIP's merges file ``bpe_simple_vocab_16e6.txt.gz`` as the registry package ``open_clip_torch``
  ships it, from which the vocabulary is rebuilt the way CLIP builds it (bytes, bytes + ``</w>``,
  one token per merge, then the two special tokens).

    tok = Sam3Tokenizer.from_open_clip()
    input_ids, attention_mask = tok(["red star", "small blue circle"])   # 2 x [2, 32] long
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
from pathlib import Path

import torch
from transformers import CLIPTokenizer

log = logging.getLogger(__name__)

CONTEXT_LENGTH = 32
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def _byte_alphabet() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode stand-ins in CLIP's vocabulary order.

    Printable bytes stand for themselves and come first; the other bytes follow, mapped to
    code points from 256 upwards. The order matters: it fixes the ids of the 512 single-byte tokens.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def open_clip_vocab_file() -> Path:
    """The BPE merges file that ``open_clip_torch`` ships (no download)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "No tokenizer files given and open_clip_torch is not installed: pass a checkpoint "
            "directory holding tokenizer.json (or vocab.json + merges.txt), or `pip install open_clip_torch`."
        )
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip_torch is installed but {path} is missing.")
    return path


def _clip_vocab_from_merges(merges_gz: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(merges_gz).read().decode("utf-8").split("\n")
    # CLIP keeps the first 49152 - 256 - 2 merges after the header line.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    alphabet = _byte_alphabet()
    tokens = alphabet + [t + "</w>" for t in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    if len(tokens) != VOCAB_SIZE:
        raise ValueError(f"{merges_gz} gives a vocabulary of {len(tokens)} tokens, expected {VOCAB_SIZE}.")
    return {tok: i for i, tok in enumerate(tokens)}, merges


class Sam3Tokenizer:
    """Callable: phrases -> (input_ids [N, 32] long, attention_mask [N, 32] long).

    Sequences are ``<|startoftext|> tokens <|endoftext|>`` padded with ``<|endoftext|>`` (the
    attention mask marks real tokens). Phrases longer than the context are cut to fit, keeping the
    end token, with one warning naming them.
    """

    def __init__(self, backend: CLIPTokenizer, *, context_length: int = CONTEXT_LENGTH):
        self.backend = backend
        self.context_length = context_length

    @classmethod
    def from_open_clip(cls, *, context_length: int = CONTEXT_LENGTH) -> Sam3Tokenizer:
        vocab, merges = _clip_vocab_from_merges(open_clip_vocab_file())
        backend = CLIPTokenizer(vocab=vocab, merges=merges)
        return cls(backend, context_length=context_length)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, context_length: int = CONTEXT_LENGTH) -> Sam3Tokenizer:
        directory = Path(directory)
        if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{directory} holds no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)})."
            )
        backend = CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)
        return cls(backend, context_length=context_length)

    @classmethod
    def from_path_or_open_clip(cls, path: str | Path | None) -> Sam3Tokenizer:
        """SAM 3's tokenizer files from ``path`` (a missing file is an error), CLIP's shipped BPE when None."""
        return cls.from_open_clip() if path is None else cls.from_pretrained(path)

    @classmethod
    def from_dir_or_open_clip(cls, directory: str | Path | None) -> Sam3Tokenizer:
        """The checkpoint's own tokenizer when the directory has one, CLIP's shipped vocabulary otherwise."""
        if directory is not None and any((Path(directory) / n).is_file() for n in _TOKENIZER_FILES):
            return cls.from_pretrained(directory)
        return cls.from_open_clip()

    @property
    def vocab_size(self) -> int:
        return len(self.backend)

    def save_pretrained(self, directory: str | Path) -> None:
        self.backend.save_pretrained(str(directory))

    def __call__(self, phrases: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(phrases, str):
            raise TypeError("Sam3Tokenizer takes a list of phrases, not one string.")
        if not phrases:
            empty = torch.zeros(0, self.context_length, dtype=torch.long)
            return empty, empty.clone()
        full = self.backend(list(phrases), add_special_tokens=True)["input_ids"]
        too_long = [p for p, ids in zip(phrases, full) if len(ids) > self.context_length]
        if too_long:
            log.warning(
                "%d phrase(s) exceed the text encoder's context of %d tokens and are truncated: %s",
                len(too_long), self.context_length, "; ".join(repr(p[:60]) for p in too_long[:3]),
            )
        enc = self.backend(
            list(phrases),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        return enc["input_ids"].long(), enc["attention_mask"].long()
