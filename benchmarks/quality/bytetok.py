"""Byte-level tokens: token id = byte value (0..255), plus one beginning-of-text token (256).

The models see raw UTF-8 bytes, so no tokenizer has to be trained and every domain (English,
Russian, Python, C) is encoded the same way. The merged models still need a `tokenizer.json`
that a consumer (pacer-stream's few-shot router, anyone loading the output) can use, so
`write_tokenizer` writes one for the `tokenizers` library that encodes exactly like `encode`:
a byte-level BPE with the 256 byte symbols in byte order and no merges, no regex split and no
prefix space, and a post-processor that puts BOS in front, as the models saw every line in
training and scoring (the way a Llama tokenizer adds its BOS). `check_tokenizer` proves the
equality on texts of every script we use.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS = 256  # beginning of text; never produced by encode(), prepended by the model code
VOCAB_SIZE = 257
BOS_TEXT = "<bos>"

# Texts the tokenizer check runs on: ASCII, Latin accents, Cyrillic, CJK, an emoji, controls.
CHECK_TEXTS = ("def f(x):  return x**2  # squared", "Größe ändern, déjà vu, niño",
               "изменяет информацию", "日本語のテキスト", "tab\there \x01\x7f end 🙂", "")


def encode(text: str) -> list[int]:
    """The token ids of ``text``: its UTF-8 bytes (no BOS)."""
    return list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def byte_symbols() -> list[str]:
    """The printable character that byte-level BPE uses for each byte value, in byte order.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, DEL,
    NBSP, soft hyphen...) get the code points 256, 257, ... in byte order. This is the mapping
    the `tokenizers` ByteLevel pre-tokenizer applies, so symbol i is the vocabulary entry of id i.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) \
        | set(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def write_tokenizer(folder: Path) -> Path:
    """`tokenizer.json` (+ a tokenizer_config.json for transformers) into ``folder``; checked."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {symbol: i for i, symbol in enumerate(byte_symbols())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([BOS_TEXT])  # id 256, right after the 256 byte symbols
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TEXT} $A", special_tokens=[(BOS_TEXT, BOS)])
    path = Path(folder) / "tokenizer.json"
    tokenizer.save(str(path))
    # transformers' PreTrainedTokenizerFast reads tokenizer.json; this names its BOS token.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS_TEXT,
              "model_max_length": 1 << 20}
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    check_tokenizer(path)
    return path


def check_tokenizer(path: Path) -> None:
    """Assert that the saved tokenizer encodes every check text exactly as ``encode`` does."""
    from tokenizers import Tokenizer, pre_tokenizers

    assert set(byte_symbols()) == set(pre_tokenizers.ByteLevel.alphabet()), \
        "byte_symbols() is not the ByteLevel alphabet"
    tokenizer = Tokenizer.from_file(str(path))
    assert tokenizer.token_to_id(BOS_TEXT) == BOS, "BOS must be id 256"
    for text in CHECK_TEXTS:
        ids = tokenizer.encode(text).ids
        assert ids == [BOS, *encode(text)], \
            f"tokenizer.json encodes {text!r} as {ids}, not BOS and its bytes"
        assert tokenizer.decode(ids) == text, f"tokenizer.json does not decode {text!r} back"
