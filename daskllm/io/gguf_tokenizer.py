"""A `tokenizers` Tokenizer rebuilt from a GGUF file's tokenizer.ggml.* metadata.

Two kinds of vocabulary (tokenizer.ggml.model):
  gpt2   byte-level BPE (SmolLM, Llama 3, Qwen): tokens are spelled in GPT-2's byte alphabet,
         merges are stored, and tokenizer.ggml.pre names how text is split before merging;
         we use llama.cpp's split for each name (llama-vocab.cpp), so digits are split one by
         one for SmolLM ("smollm"), as SmolLM2's own tokenizer.json does.
  llama  SentencePiece BPE (Llama 2, Mistral v0.1): "▁" for spaces, byte fallback <0xNN>,
         merges derived from the token scores when the file stores none; built as transformers'
         LlamaTokenizer is (Metaspace with a "▁" before the first piece only, Strip on decode).
Tokens typed CONTROL (3) are special added tokens (kept whole, dropped when decoding with
skip_special_tokens); USER_DEFINED (4) ones are plain added tokens, matched whole. With
tokenizer.ggml.add_bos_token (default: true for llama vocabularies) a post-processor puts the bos
token first, always, as transformers' does.
"""
from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

CONTROL, USER_DEFINED = 3, 4

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the regexes llama.cpp applies in turn (each later one splits the pieces again).
PRE_SPLITS = {
    "default": [_GPT2], "gpt2": [_GPT2],
    "smollm": [r"\p{N}", _GPT2], "starcoder": [r"\p{N}", _GPT2], "refact": [r"\p{N}", _GPT2],
    "llama3": [_LLAMA3], "llama-v3": [_LLAMA3], "llama-bpe": [_LLAMA3], "smaug-bpe": [_LLAMA3],
    "qwen2": [_QWEN2], "deepseek-r1-qwen": [_QWEN2],
}


class GGUFTokenizerError(ValueError):
    """The GGUF metadata describes a tokenizer daskllm cannot rebuild."""


def tokenizer_from_gguf(meta: dict) -> Tokenizer | None:
    """The tokenizer the metadata describes, or None when the file carries no vocabulary."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        return None
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    if kind == "gpt2":
        tok = _byte_level(tokens, meta.get("tokenizer.ggml.merges"), meta.get("tokenizer.ggml.pre", "default"))
    elif kind == "llama":
        tok = _sentencepiece(tokens, meta.get("tokenizer.ggml.merges"), meta.get("tokenizer.ggml.scores"),
                             meta.get("tokenizer.ggml.unknown_token_id"), meta.get("tokenizer.ggml.add_space_prefix", True))
    else:
        raise GGUFTokenizerError(f"GGUF tokenizer model {kind!r} is not supported; supported: gpt2 (byte-level "
                                 "BPE), llama (SentencePiece BPE)")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if add_bos(meta) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
                                                           special_tokens=[(tokens[bos], int(bos))])
    return tok


def add_bos(meta: dict) -> bool:
    """Whether encoding starts with the bos token (llama.cpp adds it to SentencePiece vocabularies unless told not to)."""
    return bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama"))


def _byte_level(tokens, merges, pre: str) -> Tokenizer:
    if merges is None:
        raise GGUFTokenizerError("a GGUF byte-level (gpt2) tokenizer needs tokenizer.ggml.merges; the file has none")
    if pre not in PRE_SPLITS:
        raise GGUFTokenizerError(f"GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                                 f"supported: {', '.join(sorted(PRE_SPLITS))}")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], ignore_merges=False))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_SPLITS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                   use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(tokens, merges, scores, unk_id, add_space_prefix) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges is not None:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    elif scores is not None:
        pairs = merges_from_scores(vocab, dict(zip(tokens, [float(s) for s in scores])))
    else:
        raise GGUFTokenizerError("a GGUF SentencePiece (llama) tokenizer needs merges or token scores; the file has neither")
    unk = tokens[unk_id] if unk_id is not None else None
    tok = Tokenizer(models.BPE(vocab, pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="first" if add_space_prefix else "never",
                                                 split=False)
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
    return tok


def merges_from_scores(vocab: dict, scores: dict) -> list:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens,
    best-scored tokens first (transformers' generate_merges)."""
    merges = []
    for token, score in scores.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]
