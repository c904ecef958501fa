"""A small WordPiece tokenizer trained offline on a dataset's questions, saved as `tokenizer.json`.

Why our own: the embedded task has a closed vocabulary of a few dozen words, so a tokenizer trained on its
questions gives a student a tiny embedding table; a user's folder without a tokenizer gets one the same way
from its train texts. The result is a plain Hugging Face `tokenizers` file, which the bundle and the server
read without torch or transformers.

Special tokens have fixed ids so models and the bundle's TextEncoder agree without looking them up:
[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4. Every encoding is `[CLS] tokens [SEP]`.
"""

from __future__ import annotations

import os
import string
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
DEFAULT_VOCAB_SIZE = 512
# Always in the vocabulary, so any lower-case English word or number encodes without [UNK].
BASE_ALPHABET = string.ascii_lowercase + string.digits + string.punctuation


def build_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Build a lower-casing WordPiece tokenizer from `texts`: whole words first, characters as the fallback.

    The vocabulary is the special tokens, every character seen plus a-z, 0-9 and ASCII punctuation (as a word
    start and as a `##` continuation, so an unseen word still encodes without [UNK]), then the most frequent whole words
    (ties broken alphabetically) until `vocab_size`. Why not `tokenizers.trainers.WordPieceTrainer`: it breaks
    merge ties in hash-map order, which changes from process to process, so the same questions gave a
    different tokenizer.json on every run; the generated dataset must be byte-identical for a seed.

    >>> tok = build_tokenizer(["What colour is the circle?", "Is there a red square?"])
    >>> tok.encode("what colour is the circle?").tokens[:3]
    ['[CLS]', 'what', 'colour']
    """
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be > {len(SPECIAL_TOKENS)}, got {vocab_size}")
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        if isinstance(text, str) and text.strip():
            counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    if not counts:
        raise ValueError("cannot build a tokenizer from no texts; give at least one non-empty question")
    vocab = _vocabulary(counts, vocab_size)
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))  # already in the vocab: marks them special, ids unchanged
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)],
    )
    return tokenizer


def _vocabulary(counts: Counter[str], vocab_size: int) -> dict[str, int]:
    """Specials, then characters (start and ## forms), then words by falling frequency; ids in that order."""
    chars = sorted({ch for word in counts for ch in word} | set(BASE_ALPHABET))
    tokens = list(SPECIAL_TOKENS) + chars + [f"##{ch}" for ch in chars]
    if len(tokens) > vocab_size:
        raise ValueError(
            f"vocab_size {vocab_size} is too small for the {len(chars)} distinct characters in the texts; "
            f"use at least {len(tokens)}"
        )
    seen = set(tokens)
    for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(tokens) >= vocab_size:
            break
        if word not in seen:
            tokens.append(word)
            seen.add(word)
    return {token: i for i, token in enumerate(tokens)}


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike[str]) -> Path:
    """Write `tokenizer.json` atomically (temp file beside it, then rename) and return its path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = tokenizer.to_str(pretty=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Read a `tokenizer.json`; a missing or corrupt file raises with the path in the message."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception
        raise ValueError(f"cannot read tokenizer {path}: {exc}") from exc
