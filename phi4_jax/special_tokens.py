"""phi-4's vocabulary layout and special-token ids, without the tokenizer (no tiktoken import).

The model config, the data pipeline and generation need these ids; only `phi4_jax.tokenizer` needs the BPE.
"""

from __future__ import annotations

NUM_MERGEABLE_RANKS = 100256
N_VOCAB = 100352


def _phi4_special_tokens() -> dict[str, int]:
    """phi-4's 96 special tokens: the named ones at fixed ids, `<|dummy_N|>` filling the other ids in order."""
    named = {
        "<|endoftext|>": 100257,
        "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260,
        "<|im_start|>": 100264,
        "<|im_end|>": 100265,
        "<|im_sep|>": 100266,
        "<|endofprompt|>": 100276,
    }
    taken = set(named.values())
    free = [i for i in range(NUM_MERGEABLE_RANKS, N_VOCAB) if i not in taken]
    tokens = dict(named)
    tokens.update({f"<|dummy_{n}|>": token_id for n, token_id in enumerate(free)})
    return dict(sorted(tokens.items(), key=lambda item: item[1]))


SPECIAL_TOKENS: dict[str, int] = _phi4_special_tokens()
ENDOFTEXT_ID = SPECIAL_TOKENS["<|endoftext|>"]    # 100257, phi-4's bos_token_id
IM_START_ID = SPECIAL_TOKENS["<|im_start|>"]      # 100264
IM_END_ID = SPECIAL_TOKENS["<|im_end|>"]          # 100265, phi-4's eos_token_id: generation stops here
IM_SEP_ID = SPECIAL_TOKENS["<|im_sep|>"]          # 100266
PAD_ID = SPECIAL_TOKENS["<|dummy_85|>"]           # 100349, phi-4's pad_token_id
