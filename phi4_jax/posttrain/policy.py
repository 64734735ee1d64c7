"""A model to post-train or sample from, with its tokenizer: `load_policy(path)`.

`path` is either a model checkpoint (`convert_weights.py` output, phi-4 tokenizer and chat format) or a
`python train.py` workdir (the newest training checkpoint's parameters, and the run's own tokenizer: the demo's
compact one for `python train.py`, which has no chat format).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable


class PolicyError(ValueError):
    """A checkpoint that cannot be loaded as a policy."""


@dataclasses.dataclass
class Policy:
    model: object
    encode_text: Callable[[str], list[int]]
    encode_chat: Callable[[list], list[int]] | None   # None: the tokenizer has no chat format
    decode: Callable[[list[int]], str]
    stop_tokens: list[int]
    name: str
    to_phi4_ids: Callable[[list[int]], list[int]]      # the model's ids as phi-4 ids (the demo renumbers them)
    token_limit: int | None = None   # ids from here on are rows the tokenizer never uses (None: every row is a token)


def _mapped_ids(table: list[int], ids) -> list[int]:
    """`ids` looked up in `table`; an id past its end (a model row no token uses) is an UnmappedTokenError."""
    from phi4_jax.posttrain.pts import UnmappedTokenError

    try:
        return [table[int(i)] for i in ids]
    except IndexError:
        raise UnmappedTokenError(f"model ids {[int(i) for i in ids if int(i) >= len(table)]} have no token in this "
                                 f"tokenizer (it uses ids below {len(table)})") from None


def _from_train_workdir(path: str, dtype) -> Policy:
    import jax

    from phi4_jax.data.sources import DataError
    from phi4_jax.data.tokenizing import make_tokenizer
    from phi4_jax.model.decoder import is_param_spec, model_from_params, param_specs
    from phi4_jax.train.checkpoints import TrainCheckpointError, _restore_train_params
    from phi4_jax.train.config import build_train_config

    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = build_train_config(json.load(f))
    except (OSError, ValueError) as e:
        raise PolicyError(f"{path!r} is a train.py workdir but its config.json cannot be read: {e}") from None
    config = cfg.model if dtype is None else cfg.model.replace(param_dtype=dtype, compute_dtype=dtype)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda s: device, param_specs(config), is_leaf=is_param_spec)
    try:
        params = _restore_train_params(path, config, shardings)
        tokenizer = make_tokenizer(cfg.data)
    except (TrainCheckpointError, DataError) as e:
        raise PolicyError(f"cannot load {path!r}: {e}") from None
    phi4_ids = getattr(tokenizer, "phi4_ids", None)
    to_phi4 = list if phi4_ids is None else functools.partial(_mapped_ids, phi4_ids)
    limit = tokenizer.vocab_size if tokenizer.vocab_size < config.vocab_size else None
    return Policy(model_from_params(config, params), tokenizer.encode, None, tokenizer.decode,
                  [tokenizer.endoftext_id], f"workdir:{os.path.abspath(path)}", to_phi4, limit)


def load_policy(path: str, dtype: str | None = None) -> Policy:
    """The model and tokenizer at `path` (see the module docstring); PolicyError names what is wrong."""
    if not os.path.isdir(path):
        raise PolicyError(f"checkpoint directory {path!r} does not exist")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return _from_train_workdir(path, dtype)
    from phi4_jax.checkpoint.load import load_model
    from phi4_jax.checkpoint.store import CheckpointError
    from phi4_jax.inference.engine import default_stop_tokens
    from phi4_jax.model.config import ConfigError
    from phi4_jax.tokenizer import Tokenizer

    try:
        model = load_model(path, dtype=dtype)
    except (CheckpointError, ConfigError) as e:
        raise PolicyError(f"cannot load checkpoint {path!r}: {e}") from None
    tokenizer = Tokenizer()
    if model.config.vocab_size < tokenizer.n_vocab:
        raise PolicyError(f"checkpoint {path!r} has vocab_size {model.config.vocab_size}, smaller than the phi-4 "
                          f"tokenizer's {tokenizer.n_vocab}")
    return Policy(model, tokenizer.encode, lambda messages: tokenizer.encode_chat(messages, add_generation_prompt=True),
                  tokenizer.decode, default_stop_tokens(model.config), f"checkpoint:{os.path.abspath(path)}", list)
