"""Document tokenizers for training data: the phi-4 tokenizer, and the demo's compact renumbering of it.

Both turn a document into int32 ids ending in `<|endoftext|>` (`encode_document`); special-token text inside
the data stays plain text (`encode_ordinary`). `fingerprint` identifies the ids a tokenizer produces
(pre-tokenized shards record it).
"""

from __future__ import annotations

import functools
import hashlib
import json

import numpy as np

from phi4_jax.data import demo as demo_data
from phi4_jax.data.sources import DataError
from phi4_jax.special_tokens import ENDOFTEXT_ID, IM_END_ID, IM_SEP_ID, IM_START_ID, PAD_ID

CHAT_ROLES = ("system", "user", "assistant")


class Phi4TextTokenizer:
    """Documents -> int32 ids with the phi-4 tokenizer, ending in <|endoftext|>."""

    def __init__(self):
        from phi4_jax.tokenizer import Tokenizer

        self.tokenizer = Tokenizer()
        self.vocab_size = self.tokenizer.n_vocab
        self.endoftext_id = ENDOFTEXT_ID

    @property
    def fingerprint(self) -> str:
        """Identifies the token ids this tokenizer produces (`phi4_jax.Tokenizer.fingerprint`)."""
        return self.tokenizer.fingerprint

    def encode_document(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode_ordinary(text) + [ENDOFTEXT_ID], np.int32)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def from_phi4_ids(self, ids) -> np.ndarray:
        """phi-4 token ids -> this tokenizer's ids (the same here)."""
        return np.asarray(ids, np.int32)


class CompactTokenizer:
    """The phi-4 tokenizer restricted to the ids a closed corpus uses, renumbered 0..n-1.

    For the CPU demo: the built-in documents use a few hundred phi-4 tokens, and a 100,352-row embedding
    and lm_head would dominate a 1M-parameter model's compute. Id 0 is padding, 1 is <|endoftext|>, 2 stands
    for any phi-4 token outside the corpus; text is tokenized by phi-4's BPE first, then renumbered.
    `extra_ids` follow the corpus's ids (so adding them renumbers nothing): the demo adds the chat format's
    tokens (`<|im_start|>`, `<|im_sep|>`, `<|im_end|>` and the role names) for post-training.
    """

    def __init__(self, phi4_ids, extra_ids=()):
        from phi4_jax.tokenizer import Tokenizer

        self.tokenizer = Tokenizer()
        self.unk_id = 2
        self.endoftext_id = 1
        reserved = {PAD_ID, ENDOFTEXT_ID}
        corpus = sorted(set(int(i) for i in phi4_ids) - reserved)
        extra = [i for i in dict.fromkeys(int(i) for i in extra_ids) if i not in set(corpus) | reserved]
        self.phi4_ids = [PAD_ID, ENDOFTEXT_ID, PAD_ID] + corpus + extra
        self._to_compact = {p: i for i, p in enumerate(self.phi4_ids) if i != 2}
        self.vocab_size = len(self.phi4_ids)

    @classmethod
    @functools.lru_cache(maxsize=4)   # built once per process (it encodes 15,000 documents)
    def for_demo_generators(cls, generators, docs_per_generator: int = 3000, seed: int = 0):
        from phi4_jax.tokenizer import Tokenizer

        tok = Tokenizer()
        ids = set()
        for name in generators:
            src = demo_data.SyntheticSource(name, seed=seed)
            for i in range(docs_per_generator):
                ids.update(tok.encode_ordinary(src[i]["text"]))
        chat = [IM_START_ID, IM_SEP_ID, IM_END_ID] + [t for role in CHAT_ROLES for t in tok.encode_ordinary(role)]
        return cls(ids, extra_ids=chat)

    @property
    def fingerprint(self) -> str:
        """The phi-4 tokenizer's fingerprint combined with this renumbering."""
        spec = json.dumps([self.tokenizer.fingerprint, self.phi4_ids])
        return hashlib.sha256(spec.encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.from_phi4_ids(self.tokenizer.encode_ordinary(text)).tolist()

    def from_phi4_ids(self, ids) -> np.ndarray:
        """phi-4 token ids -> compact ids (the unknown-token id for ids outside the vocabulary)."""
        return np.asarray([self._to_compact.get(int(t), self.unk_id) for t in ids], np.int32)

    def encode_document(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text) + [self.endoftext_id], np.int32)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([self.phi4_ids[int(i)] for i in ids if 2 < int(i) < self.vocab_size])


def make_tokenizer(data_cfg):
    if data_cfg.tokenizer == "demo_compact":
        # post-training runs without [[data.sources]] renumber like the full demo mixture (configs/demo.toml)
        gens = [s.generator for s in data_cfg.sources if s.type == "demo"] or list(demo_data.GENERATORS)
        if len(data_cfg.sources) not in (0, len(gens)):
            raise DataError("data.tokenizer 'demo_compact' only works with demo sources")
        return CompactTokenizer.for_demo_generators(tuple(gens), seed=data_cfg.shuffle_seed)
    return Phi4TextTokenizer()
