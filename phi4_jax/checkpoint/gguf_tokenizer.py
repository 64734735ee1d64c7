"""phi-4's tokenizer in llama.cpp GGUF metadata: written by ``--to-gguf``, checked when a GGUF is read.

llama.cpp runs phi-4's tokenizer as a byte-level BPE (``tokenizer.ggml.model = "gpt2"``) with the ``"dbrx"``
pre-tokenizer (llama.cpp's name for the cl100k_base split regex; its converter detects phi-4's tokenizer as that
one). Its metadata is what llama.cpp's ``convert_hf_to_gguf.py`` writes for phi-4:

- ``tokenizer.ggml.tokens``: the 100,352 token strings, id order. The 100,256 cl100k_base tokens are their bytes
  in GPT-2's byte-to-unicode alphabet (`byte_to_unicode`); the 96 special tokens are their text.
- ``tokenizer.ggml.token_type``: NORMAL for the BPE tokens, CONTROL for the special tokens.
- ``tokenizer.ggml.merges``: ``"left right"`` pairs, in rank order. tiktoken stores ranks, not merges, so each
  multi-byte token's merge is rebuilt by running BPE on its own bytes with the ranks below its own: what remains
  is exactly two parts, the pair that merges into it (`bpe_merges`).
- no BOS or EOS added to prompts (phi-4 adds none), and ``tokenizer.chat_template``: phi-4's chat template.
  (The bos / eos / padding ids, the checkpoint config's, are written with the other metadata.)

A model with another vocabulary size (the tiny test models, the demo's compact tokenizer) has no phi-4 tokenizer
to write: `--to-gguf` refuses it unless asked for a weights-only file (``tokenizer.ggml.model = "none"``, which
llama.cpp runs from token ids), because the compact tokenizer's id mapping is not stored with a checkpoint.

`check_gguf_tokenizer` compares a GGUF's embedded tokenizer with phi-4's: model and pre-tokenizer, every token,
the merges (phi-4's must all be there, in the same order; a file may list extra redundant ones, as Hugging Face's
tiktoken conversion does), and the bos / eos / padding ids (eos may be <|im_end|> or, as some phi-4 GGUFs ship,
<|endoftext|>: `gguf_convert.config_from_gguf` then takes <|im_end|> as the eos). A file without a tokenizer (or
with ``"none"``) is not checked.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from phi4_jax.checkpoint.hf_files import ConversionError
from phi4_jax.special_tokens import ENDOFTEXT_ID, IM_END_ID, N_VOCAB, NUM_MERGEABLE_RANKS, PAD_ID, SPECIAL_TOKENS

TOKENIZER_MODEL = "gpt2"
TOKENIZER_PRE = "dbrx"
# (GGUF key, the ids phi-4's tokenizer may state there): some phi-4 GGUFs give <|endoftext|> (100257) as eos, as
# microsoft/phi-4's first tokenizer_config.json did; the chat format still ends answers with <|im_end|>.
SPECIAL_ID_KEYS = (("tokenizer.ggml.bos_token_id", (ENDOFTEXT_ID,)),
                   ("tokenizer.ggml.eos_token_id", (IM_END_ID, ENDOFTEXT_ID)),
                   ("tokenizer.ggml.padding_token_id", (PAD_ID,)))
NO_CHECK_HINT = "pass --no-tokenizer-check (load_model: check_tokenizer=False) to use it anyway"


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> tuple[str, ...]:
    """GPT-2's byte-level alphabet: byte b -> one printable character (printable Latin-1 bytes stand for
    themselves; the others, in order, for U+0100 onwards)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


def token_string(token: bytes) -> str:
    alphabet = byte_to_unicode()
    return "".join(alphabet[b] for b in token)


def bpe_merges(ranks: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The merge that makes each multi-byte token, in rank order, from a tiktoken rank list (rank -> bytes).

    tiktoken merges the adjacent pair whose concatenation has the lowest rank. Run on a token's bytes with only
    the ranks below its own, that stops one merge short: two parts, which are the token's merge.
    """
    rank_of = {token: rank for rank, token in enumerate(ranks)}
    merges = []
    for rank, token in enumerate(ranks):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, at = rank, -1
            for i in range(len(parts) - 1):
                r = rank_of.get(parts[i] + parts[i + 1], rank)
                if r < best:
                    best, at = r, i
            if at < 0:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) != 2:
            raise ConversionError(f"BPE rank {rank} ({token!r}) is not the merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


@dataclass(frozen=True)
class GGUFVocab:
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]


@functools.lru_cache(maxsize=1)
def phi4_gguf_vocab() -> GGUFVocab:
    """phi-4's tokenizer as GGUF metadata lists (built once per process from the cl100k_base ranks)."""
    import gguf

    from phi4_jax.tokenizer import Tokenizer, TokenizerError

    try:
        encoding = Tokenizer().encoding
    except TokenizerError as e:
        raise ConversionError(f"phi-4 tokenizer for the GGUF metadata: {e}") from None
    ranks = [encoding.decode_single_token_bytes(i) for i in range(NUM_MERGEABLE_RANKS)]
    specials = {token_id: text for text, token_id in SPECIAL_TOKENS.items()}
    tokens = tuple(token_string(t) for t in ranks) + tuple(specials[i] for i in range(NUM_MERGEABLE_RANKS, N_VOCAB))
    types = (int(gguf.TokenType.NORMAL),) * NUM_MERGEABLE_RANKS + \
        (int(gguf.TokenType.CONTROL),) * (N_VOCAB - NUM_MERGEABLE_RANKS)
    merges = tuple(f"{token_string(a)} {token_string(b)}" for a, b in bpe_merges(ranks))
    return GGUFVocab(tokens, types, merges)


def add_phi4_tokenizer(writer, config) -> None:
    """Adds phi-4's tokenizer and chat template to a `gguf.GGUFWriter` (before its header is written).
    A config whose vocabulary is not phi-4's is a ConversionError (see the module docstring)."""
    from phi4_jax.tokenizer import CHAT_TEMPLATE

    if config.vocab_size != N_VOCAB:
        raise ConversionError(f"the model's vocabulary has {config.vocab_size} tokens, not phi-4's {N_VOCAB}, so "
                              "phi-4's tokenizer cannot be written into the GGUF; pass --no-tokenizer for a "
                              "weights-only file (llama.cpp runs it from token ids)")
    vocab = phi4_gguf_vocab()
    writer.add_tokenizer_model(TOKENIZER_MODEL)
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def add_no_tokenizer(writer, config) -> None:
    """Marks a weights-only GGUF: llama.cpp's ``"none"`` tokenizer (it reads the vocabulary size from
    ``phi3.vocab_size``)."""
    del config
    writer.add_tokenizer_model("none")


def _show(s: str) -> str:
    return repr(s if len(s) <= 40 else s[:40] + "...")


def check_gguf_tokenizer(reader, path: Path) -> None:
    """Raises a one-line ConversionError when a GGUF's embedded tokenizer is not phi-4's (see the module
    docstring); a file without one passes."""
    def field(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    def mismatch(what):
        return ConversionError(f"{path.name}: embedded tokenizer is not phi-4's: {what}; {NO_CHECK_HINT}")

    model = field("tokenizer.ggml.model")
    if model is None or model in ("none", "no_vocab"):
        return
    if model != TOKENIZER_MODEL:
        raise mismatch(f"tokenizer.ggml.model is {model!r}, phi-4's is {TOKENIZER_MODEL!r} (byte-level BPE)")
    pre = field("tokenizer.ggml.pre")
    if pre is not None and pre != TOKENIZER_PRE:
        raise mismatch(f"tokenizer.ggml.pre is {pre!r}, phi-4's is {TOKENIZER_PRE!r} (cl100k_base's split regex)")
    vocab = phi4_gguf_vocab()
    tokens = field("tokenizer.ggml.tokens")
    if tokens is None:
        raise mismatch("it has no tokenizer.ggml.tokens")
    if len(tokens) != N_VOCAB:
        raise mismatch(f"{len(tokens)} tokens, phi-4 has {N_VOCAB}")
    for i, (theirs, ours) in enumerate(zip(tokens, vocab.tokens)):
        if theirs != ours:
            raise mismatch(f"token {i} is {_show(theirs)}, phi-4's is {_show(ours)}")
    merges = field("tokenizer.ggml.merges")
    if merges is None:
        raise mismatch("it has no tokenizer.ggml.merges")
    position = {m: i for i, m in reversed(list(enumerate(merges)))}  # first occurrence
    last = -1
    for ours in vocab.merges:
        at = position.get(ours)
        if at is None:
            raise mismatch(f"merge {_show(ours)} is missing")
        if at < last:
            raise mismatch(f"merge {_show(ours)} comes before an earlier phi-4 merge (merge order differs)")
        last = at
    for key, allowed in SPECIAL_ID_KEYS:
        value = field(key)
        if value is not None and int(value) not in allowed:
            raise mismatch(f"{key} is {int(value)}, phi-4's is {' or '.join(f'{i} ({tokens[i]})' for i in allowed)}")
