"""The WordPiece tokenizer built for a dataset's questions: fixed special ids, deterministic, round-trips."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from distill.data import shapes
from distill.data.tokenizer import CLS_ID, PAD_ID, SEP_ID, UNK_ID, build_tokenizer, load_tokenizer, save_tokenizer
from export.bundle import PreprocessSpec, TextEncoder

TEXTS = [shapes.generate_scene(0, "train", i).text for i in range(400)]


def test_special_tokens_have_fixed_ids() -> None:
    tok = build_tokenizer(TEXTS)
    ids = {t: tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    assert ids == {"[PAD]": PAD_ID, "[UNK]": UNK_ID, "[CLS]": CLS_ID, "[SEP]": SEP_ID, "[MASK]": 4}
    assert (PAD_ID, UNK_ID, CLS_ID, SEP_ID) == (0, 1, 2, 3)


def test_lowercases_and_wraps_in_cls_sep() -> None:
    tok = build_tokenizer(TEXTS)
    encoding = tok.encode("What COLOUR is the Triangle?")
    assert encoding.tokens == ["[CLS]", "what", "colour", "is", "the", "triangle", "?", "[SEP]"]
    assert tok.decode(encoding.ids) == "what colour is the triangle?"


def test_unseen_words_fall_back_to_characters_not_unk() -> None:
    tok = build_tokenizer(TEXTS)
    encoding = tok.encode("is the hexagon red?")
    assert UNK_ID not in encoding.ids and "##x" in encoding.tokens
    assert tok.encode("is the ☃ red?").tokens[3] == "[UNK]"  # a character never seen


def test_save_load_round_trip(tmp_path: Path) -> None:
    tok = build_tokenizer(TEXTS, vocab_size=170)
    path = save_tokenizer(tok, tmp_path / "sub" / "tokenizer.json")
    loaded = load_tokenizer(path)
    assert loaded.to_str() == tok.to_str() and loaded.get_vocab_size() == 170
    for text in TEXTS[:50]:
        assert loaded.encode(text).ids == tok.encode(text).ids
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"], "no temp file left behind"
    Tokenizer.from_file(str(path))  # a plain Hugging Face tokenizers file


def test_same_texts_same_file_in_any_order_and_any_process(tmp_path: Path) -> None:
    shuffled = TEXTS * 2
    random.Random(1).shuffle(shuffled)
    assert build_tokenizer(shuffled).to_str() == build_tokenizer(TEXTS).to_str()
    code = (
        "import sys; from distill.data import shapes; from distill.data.tokenizer import build_tokenizer; "
        "texts = [shapes.generate_scene(0, 'train', i).text for i in range(400)]; "
        "sys.stdout.write(build_tokenizer(texts).to_str())"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out == build_tokenizer(TEXTS).to_str()


def test_works_with_the_bundle_text_encoder() -> None:
    tok = build_tokenizer(TEXTS)
    encoder = TextEncoder(tok, PreprocessSpec(max_text_length=6))
    ids, mask = encoder.encode(["Is there a red square?", "How many?"])
    assert ids.shape == (2, 6) and ids.dtype == np.int64
    assert ids[0, 0] == CLS_ID and ids[1, mask[1].sum() - 1] == SEP_ID
    assert (ids[mask == 0] == PAD_ID).all()


def test_bad_inputs_are_refused_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no texts"):
        build_tokenizer(["", "   "])
    with pytest.raises(ValueError, match="too small"):
        build_tokenizer(TEXTS, vocab_size=10)
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path / "missing.json")
