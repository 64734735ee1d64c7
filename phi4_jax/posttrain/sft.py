"""Supervised fine-tuning examples: a chat conversation -> token ids + the mask of the tokens trained on.

phi-4's chat format renders each message as ``<|im_start|>{role}<|im_sep|>{content}<|im_end|>`` (no separators;
`phi4_jax.tokenizer.Tokenizer.apply_chat_template`). SFT trains on the assistant turns only: the assistant's
content and the ``<|im_end|>`` that closes its turn (so the model learns to stop). The system and user turns and
the ``<|im_start|>assistant<|im_sep|>`` header are context, never targets.

Message content is encoded as ordinary text: a ``<|im_end|>`` typed inside a message stays the text
``<|im_end|>`` and cannot forge a turn boundary. (`Tokenizer.encode_chat`, for prompting, encodes the rendered
string with special tokens allowed, as phi-4's Hugging Face tokenizer does.)

The mask uses `sequence_logps`'s convention: ``loss_mask[t] == 1`` makes token t a target, predicted from
position t-1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from phi4_jax.special_tokens import IM_END_ID, IM_SEP_ID, IM_START_ID


class SFTExampleError(ValueError):
    """A conversation that cannot be an SFT example."""


def encode_sft_example(tokenizer, messages: Sequence[Mapping[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, loss_mask), both int32 [n]: `messages` (``[{"role", "content"}, ...]``) in the phi-4 chat
    format, with 1 in the mask on each assistant turn's content and its closing ``<|im_end|>``.

    `tokenizer` is a `phi4_jax.Tokenizer`. Malformed messages raise its `TokenizerError` (from the chat
    template's own checks); a conversation with no assistant turn raises `SFTExampleError`.
    """
    tokenizer.apply_chat_template(messages)  # the template's validation: roles, keys, content types
    if not any(m["role"] == "assistant" for m in messages):
        raise SFTExampleError("the conversation has no assistant turn, so an SFT example would train on nothing")
    ids: list[int] = []
    mask: list[int] = []
    for message in messages:
        header, body = turn_tokens(tokenizer, message)
        trained = int(message["role"] == "assistant")
        ids += header + body
        mask += [0] * len(header) + [trained] * len(body)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def turn_tokens(tokenizer, message: Mapping[str, str], *, close: bool = True) -> tuple[list[int], list[int]]:
    """(header, body) phi-4 ids of one chat turn: ``<|im_start|>{role}<|im_sep|>`` and the content as ordinary
    text, followed by ``<|im_end|>`` when `close` (an open turn is one a completion continues)."""
    header = [IM_START_ID, *tokenizer.encode_ordinary(message["role"]), IM_SEP_ID]
    body = [*tokenizer.encode_ordinary(message["content"]), *([IM_END_ID] if close else [])]
    return header, body
