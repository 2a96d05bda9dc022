"""CLIP BPE tokenizer: known ids, parity with open_clip's own tokenizer, context handling, round trip."""

from __future__ import annotations

import logging

import pytest
import torch

from sam3_train.data.tokenizer import Sam3Tokenizer


@pytest.fixture(scope="module")
def tok() -> Sam3Tokenizer:
    return Sam3Tokenizer.from_open_clip()


def test_known_clip_token_ids(tok):
    # CLIP's published ids: <|startoftext|> a photo of a cat <|endoftext|>
    ids, mask = tok(["a photo of a cat", "red star"])
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert mask[0].tolist() == [1] * 7 + [0] * 25
    assert ids[1, :4].tolist() == [49406, 736, 1565, 49407]
    assert ids.shape == (2, 32) and ids.dtype == torch.long
    assert tok.vocab_size == 49408


def test_matches_open_clip_simple_tokenizer(tok):
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    phrases = ["small left-handed Zebra!!", "naïve café ☃ 123", "don't   STOP", "a red-and-blue striped umbrella"]
    ids, mask = tok(phrases)
    for row, m, phrase in zip(ids, mask, phrases):
        n = int(m.sum())
        assert row[1 : n - 1].tolist() == reference.encode(phrase), phrase


def test_long_phrase_is_truncated_with_a_warning(tok, caplog):
    with caplog.at_level(logging.WARNING):
        ids, mask = tok(["star " * 50])
    assert "exceed the text encoder's context of 32 tokens" in caplog.text
    assert mask.sum() == 32 and ids[0, -1] == 49407 and ids[0, 0] == 49406


def test_rejects_a_bare_string(tok):
    with pytest.raises(TypeError, match="list of phrases"):
        tok("red star")


def test_save_then_load_from_directory(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = Sam3Tokenizer.from_pretrained(tmp_path)
    phrases = ["small red star", "visual"]
    assert torch.equal(loaded(phrases)[0], tok(phrases)[0])
    assert torch.equal(loaded(phrases)[1], tok(phrases)[1])


def test_directory_without_tokenizer_files_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no tokenizer files"):
        Sam3Tokenizer.from_pretrained(tmp_path)
