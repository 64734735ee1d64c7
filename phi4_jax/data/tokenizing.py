"""Document tokenizers for training data: the phi-4 tokenizer, and the demo's compact renumbering of it.

Both turn a document into int32 ids ending in `<|endoftext|>` (`encode_document`); special-token text inside
the data stays plain text (`encode_ordinary`). `fingerprint` identifies the ids a tokenizer produces
(pre-tokenized shards record it).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from phi4_jax.data import demo as demo_data
from phi4_jax.data.sources import DataError
from phi4_jax.special_tokens import ENDOFTEXT_ID, PAD_ID


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


class CompactTokenizer:
    """The phi-4 tokenizer restricted to the ids a closed corpus uses, renumbered 0..n-1.

    For the CPU demo: the built-in documents use a few hundred phi-4 tokens, and a 100,352-row embedding
    and lm_head would dominate a 1M-parameter model's compute. Id 0 is padding, 1 is <|endoftext|>, 2 stands
    for any phi-4 token outside the corpus; text is tokenized by phi-4's BPE first, then renumbered.
    """

    def __init__(self, phi4_ids):
        from phi4_jax.tokenizer import Tokenizer

        self.tokenizer = Tokenizer()
        self.unk_id = 2
        self.endoftext_id = 1
        self.phi4_ids = [PAD_ID, ENDOFTEXT_ID, PAD_ID] + sorted(set(int(i) for i in phi4_ids)
                                                                 - {PAD_ID, ENDOFTEXT_ID})
        self._to_compact = {p: i for i, p in enumerate(self.phi4_ids) if i != 2}
        self.vocab_size = len(self.phi4_ids)

    @classmethod
    def for_demo_generators(cls, generators, docs_per_generator: int = 3000, seed: int = 0):
        from phi4_jax.tokenizer import Tokenizer

        tok = Tokenizer()
        ids = set()
        for name in generators:
            src = demo_data.SyntheticSource(name, seed=seed)
            for i in range(docs_per_generator):
                ids.update(tok.encode_ordinary(src[i]["text"]))
        return cls(ids)

    @property
    def fingerprint(self) -> str:
        """The phi-4 tokenizer's fingerprint combined with this renumbering."""
        spec = json.dumps([self.tokenizer.fingerprint, self.phi4_ids])
        return hashlib.sha256(spec.encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return [self._to_compact.get(t, self.unk_id) for t in self.tokenizer.encode_ordinary(text)]

    def encode_document(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text) + [self.endoftext_id], np.int32)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([self.phi4_ids[int(i)] for i in ids if 2 < int(i) < self.vocab_size])


def make_tokenizer(data_cfg):
    if data_cfg.tokenizer == "demo_compact":
        gens = [s.generator for s in data_cfg.sources if s.type == "demo"]
        if len(gens) != len(data_cfg.sources):
            raise DataError("data.tokenizer 'demo_compact' only works with demo sources")
        return CompactTokenizer.for_demo_generators(gens, seed=data_cfg.shuffle_seed)
    return Phi4TextTokenizer()
