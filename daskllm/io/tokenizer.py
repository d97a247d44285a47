"""Tokenizer: tokenizer.json (or a GGUF file's vocabulary) through `tokenizers`, with bos/eos and the chat template."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def special_token_ids(path: Path, tokenizer: HFTokenizer | None = None) -> tuple:
    """(bos id or None, tuple of eos ids), from generation_config.json, then config.json,
    then the token strings of tokenizer_config.json."""
    bos, eos = None, ()
    for name in ("config.json", "generation_config.json"):   # later files win
        data = _read_json(path / name)
        if data.get("bos_token_id") is not None:
            bos = data["bos_token_id"]
        if data.get("eos_token_id") is not None:
            value = data["eos_token_id"]
            eos = tuple(value) if isinstance(value, list) else (value,)
    if tokenizer is not None and (bos is None or not eos):
        tc = _read_json(path / "tokenizer_config.json")

        def token_id(entry):
            text = entry.get("content") if isinstance(entry, dict) else entry
            return tokenizer.token_to_id(text) if text else None
        if bos is None and tc.get("bos_token"):
            bos = token_id(tc["bos_token"])
        if not eos and tc.get("eos_token"):
            found = token_id(tc["eos_token"])
            eos = (found,) if found is not None else ()
    return bos, eos


SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
GGUF_SPECIAL_IDS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                    "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id"}


def _chat_template(path: Path, config: dict) -> str | None:
    """tokenizer_config.json's chat_template (a string, or named templates: "default"), else chat_template.jinja."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    if template is None and (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    return template


class Tokenizer:
    """Text <-> token ids for one checkpoint.

    Example
    -------
    >>> tok = Tokenizer.from_dir("tests/fixtures/golden/llama")   # doctest: +SKIP
    >>> tok.decode(tok.encode("Hello world"))                      # doctest: +SKIP
    'Hello world'
    """

    def __init__(self, tokenizer: HFTokenizer, bos_id=None, eos_ids=(), add_bos=False, chat_template=None,
                 special_tokens=None):
        self._tok = tokenizer
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.add_bos = add_bos      # prepend bos when tokenizer.json's post-processor does not
        self.chat_template = chat_template    # jinja source (io.chat renders it), or None
        self.special_tokens = dict(special_tokens or {})   # bos_token, eos_token, ... -> text, for templates

    def token_text(self, token_id) -> str | None:
        """The text of a token id (e.g. the bos/eos strings a chat template uses)."""
        return None if token_id is None else self._tok.id_to_token(int(token_id))

    @classmethod
    def from_dir(cls, path) -> "Tokenizer | None":
        """The tokenizer of a checkpoint directory, or None if it has no tokenizer.json."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            return None
        tok = HFTokenizer.from_file(str(file))
        bos, eos = special_token_ids(path, tok)
        config = _read_json(path / "tokenizer_config.json")
        special = {name: (v.get("content") if isinstance(v, dict) else v) for name in SPECIAL_NAMES
                   if (v := config.get(name)) is not None}
        return cls(tok, bos, eos, bool(config.get("add_bos_token", False)), _chat_template(path, config), special)

    @classmethod
    def from_gguf(cls, meta: dict) -> "Tokenizer | None":
        """The tokenizer a GGUF file's metadata describes, or None if it has no vocabulary."""
        from .gguf_tokenizer import tokenizer_from_gguf     # its post-processor adds bos when the file says so
        tok = tokenizer_from_gguf(meta)
        if tok is None:
            return None
        eos = meta.get("tokenizer.ggml.eos_token_id")
        tokens = meta["tokenizer.ggml.tokens"]
        special = {name: tokens[int(meta[key])] for name, key in GGUF_SPECIAL_IDS.items()
                   if meta.get(key) is not None and 0 <= int(meta[key]) < len(tokens)}
        return cls(tok, meta.get("tokenizer.ggml.bos_token_id"), () if eos is None else (int(eos),), False,
                   meta.get("tokenizer.chat_template"), special)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        """Token ids of `text`; add_special_tokens=False for text that writes its own (a rendered chat)."""
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self._tok)


class StreamDecoder:
    """Turns tokens into text one at a time, holding back bytes of an unfinished character."""

    def __init__(self, tokenizer: HFTokenizer):
        self._tok = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tok, int(token_id)) or ""
