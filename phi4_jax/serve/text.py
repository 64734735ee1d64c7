"""Token ids -> response text for the server: incremental UTF-8 decoding, stop strings, and logprob entries.

`CompletionText` turns one choice's generated tokens into text as they arrive. Stop token ids end the text
without adding their own text. Stop strings are matched on the decoded text: the text is cut just before the
first match, and text that could still be the beginning of a stop string is held back (not streamed) until the
next tokens decide it. `token_entries` builds OpenAI's completions `logprobs` object (tokens, token_logprobs,
top_logprobs, text_offset), `chat_logprobs_content` the chat completions one (per token: token, logprob, bytes,
top_logprobs).
"""

from __future__ import annotations

import codecs
from typing import Sequence


class CompletionText:
    """The text of one generated choice, built token by token.

    `add(token_id) -> str` returns the text that may be sent now; `finish() -> str` the held-back rest.
    `stopped` is True once a stop string matched (the caller then cancels the request); `text` is all the
    text so far, cut at the stop string.
    """

    def __init__(self, tokenizer, *, stop_strings: Sequence[str] = (), stop_token_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.sent = 0          # characters of `text` already returned
        self.stopped = False

    def add(self, token_id: int) -> str:
        if self.stopped or token_id in self.stop_token_ids:
            return ""
        self.text += self.decoder.decode(self.tokenizer.decode_bytes([int(token_id)]))
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop_strings and not self.stopped:
            # A match can only involve text not yet sent plus up to len(stop) - 1 characters before it.
            start = max(0, self.sent - max(len(s) for s in self.stop_strings) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop_strings) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
        end = len(self.text)
        if not (final or self.stopped):
            end -= self._held_back()
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece

    def _held_back(self) -> int:
        """Characters at the end of the text that are a proper prefix of some stop string."""
        held = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:n]):
                    held = n
                    break
        return held


def token_texts(tokenizer, ids: Sequence[int]) -> tuple[list[str], list[int]]:
    """Each token's own text and its character offset in the decoded text of all `ids`."""
    texts, offsets = [], []
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    length = 0
    for token_id in ids:
        raw = tokenizer.decode_bytes([int(token_id)])
        texts.append(raw.decode("utf-8", errors="replace"))
        offsets.append(length)
        length += len(decoder.decode(raw))
    return texts, offsets


def token_entries(tokenizer, events, start_offset: int = 0) -> dict:
    """OpenAI completions `logprobs` for a list of (token_id, logprob | None, top [(id, logprob)] | None).

    `top_logprobs` maps each candidate's text (the top ones and the chosen one) to its log-prob (None where the
    logprob is None, as for the first prompt token); `text_offset` counts characters from `start_offset`.
    """
    ids = [token_id for token_id, _, _ in events]
    texts, offsets = token_texts(tokenizer, ids)
    tops = []
    for (token_id, logprob, top), text in zip(events, texts):
        if logprob is None:
            tops.append(None)
        else:  # the chosen token is always among them (so logprobs=0 still names it)
            entry = {tokenizer.decode_bytes([int(t)]).decode("utf-8", errors="replace"): float(lp)
                     for t, lp in (top or [])}
            entry.setdefault(text, float(logprob))
            tops.append(entry)
    return {"tokens": texts,
            "token_logprobs": [None if lp is None else float(lp) for _, lp, _ in events],
            "top_logprobs": tops,
            "text_offset": [start_offset + o for o in offsets]}


def _chat_token(tokenizer, token_id: int, logprob: float) -> dict:
    raw = tokenizer.decode_bytes([int(token_id)])
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": float(logprob), "bytes": list(raw)}


def chat_logprobs_content(tokenizer, events, skip_ids=frozenset()) -> list[dict]:
    """OpenAI chat `logprobs.content` for a list of (token_id, logprob, top [(id, logprob)] | None): per token
    {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}, ...]} (most likely first). Tokens in
    `skip_ids` (the stop tokens, which add no text to the message) are left out."""
    return [{**_chat_token(tokenizer, token_id, logprob),
             "top_logprobs": [_chat_token(tokenizer, t, lp) for t, lp in (top or [])]}
            for token_id, logprob, top in events if token_id not in skip_ids]
