"""OpenAI request bodies -> validated settings, and OpenAI-style errors.

`APIError(status, message, param=..., code=...)` is what a handler raises for a bad request; the app turns it
into ``{"error": {"message", "type", "param", "code"}}`` with that HTTP status. `parse_sampling` checks the fields
both completion endpoints share (max_tokens, temperature, top_p, n, seed, stop, stop_token_ids, stream, logprobs)
and returns a `Sampling`; `parse_chat_logprobs` reads chat's `logprobs` / `top_logprobs`.
"""

from __future__ import annotations

from dataclasses import dataclass

from phi4_jax.checks import is_integer, is_number

ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}
MAX_N = 16          # choices per request
MAX_STOP = 16       # stop strings / stop token ids per request
MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """A request the server refuses: HTTP `status`, a one-line `message`, the offending `param`, a `code`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Sampling:
    max_tokens: int | None        # None: up to the end of the context
    temperature: float
    top_p: float
    n: int
    seed: int | None
    stop_strings: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    stream: bool
    include_usage: bool           # stream_options.include_usage: a last chunk with the usage
    logprobs: int | None          # top-k alternatives per token (0 = the chosen token's only); None: no logprobs


def _optional(body: dict, name: str, default):
    value = body.get(name)
    return default if value is None else value


def _integer(body, name, default, minimum, maximum=None):
    value = _optional(body, name, default)
    if value is None:
        return None
    if not is_integer(value) or value < minimum or (maximum is not None and value > maximum):
        bound = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
        raise invalid(f"'{name}' must be {bound}, got {value!r}", name)
    return int(value)


def _boolean(body, name, default=False):
    value = _optional(body, name, default)
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be true or false, got {value!r}", name)
    return value


def parse_sampling(body: dict, *, max_tokens_field: str = "max_tokens", allow_zero_tokens: bool = False,
                   logprobs: int | None = None) -> Sampling:
    """The shared sampling fields of a completions / chat completions body (raises APIError 400)."""
    max_tokens = _integer(body, max_tokens_field, None, 0 if allow_zero_tokens else 1)
    if max_tokens is None and max_tokens_field != "max_tokens":
        max_tokens = _integer(body, "max_tokens", None, 1)
    temperature = _optional(body, "temperature", 1.0)
    if not is_number(temperature) or not 0 <= temperature <= 2:
        raise invalid(f"'temperature' must be a number in [0, 2], got {temperature!r}", "temperature")
    top_p = _optional(body, "top_p", 1.0)
    if not is_number(top_p) or not 0 < top_p <= 1:
        raise invalid(f"'top_p' must be a number in (0, 1], got {top_p!r}", "top_p")
    n = _integer(body, "n", 1, 1, MAX_N)
    seed = _integer(body, "seed", None, -(2 ** 63))
    stop = _optional(body, "stop", [])
    stop = [stop] if isinstance(stop, (str, int)) and not isinstance(stop, bool) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(
            isinstance(s, str) or is_integer(s) for s in stop):
        raise invalid(f"'stop' must be a string, a token id, or a list of at most {MAX_STOP} of them", "stop")
    stop_ids = _optional(body, "stop_token_ids", [])
    if not isinstance(stop_ids, list) or len(stop_ids) > MAX_STOP or not all(is_integer(t) for t in stop_ids):
        raise invalid(f"'stop_token_ids' must be a list of at most {MAX_STOP} token ids", "stop_token_ids")
    stop_ids = [int(t) for t in stop_ids] + [int(s) for s in stop if not isinstance(s, str)]
    stream = _boolean(body, "stream")
    options = _optional(body, "stream_options", {})
    if not isinstance(options, dict):
        raise invalid("'stream_options' must be an object", "stream_options")
    include_usage = _boolean(options, "include_usage")
    return Sampling(max_tokens, float(temperature), float(top_p), n, seed,
                    tuple(s for s in stop if isinstance(s, str)), tuple(stop_ids), stream, include_usage, logprobs)


def parse_chat_logprobs(body: dict) -> int | None:
    """/v1/chat/completions `logprobs` (true/false) and `top_logprobs` (0..MAX_TOP_LOGPROBS alternatives per
    token): the number of alternatives, or None when no logprobs are asked for."""
    wanted = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if wanted else None


def check_token_ids(ids, vocab_size: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise invalid(f"'{param}' has token id {bad} outside the vocabulary [0, {vocab_size})", param)


def parse_prompts(body: dict) -> list:
    """/v1/completions `prompt`: a string, a list of strings, a list of token ids, or a list of such lists.
    Returns a list of (str | list[int])."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(is_integer(t) for t in prompt):
            return [[int(t) for t in prompt]]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and p and all(is_integer(t) for t in p) for p in prompt):
            return [[int(t) for t in p] for p in prompt]
    raise invalid("'prompt' must be a string, a list of strings, a list of token ids, or a list of token-id "
                  "lists (none empty)", "prompt")


def parse_messages(body: dict) -> list[dict]:
    """/v1/chat/completions `messages`: [{"role": "system" | "user" | "assistant", "content": str | parts}].
    Content given as a list of {"type": "text", "text": ...} parts is joined."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list of {'role', 'content'} objects", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role, content = message.get("role"), message.get("content")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise invalid(f"messages[{i}].role must be 'system', 'user' or 'assistant', got {role!r}",
                          f"messages[{i}].role")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise invalid(f"messages[{i}].content parts must all be {{'type': 'text', 'text': str}}",
                              f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise invalid(f"messages[{i}].content must be a string, got {type(content).__name__}",
                          f"messages[{i}].content")
        out.append({"role": role, "content": content})
    return out
