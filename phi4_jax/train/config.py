"""Training configuration as data: a TOML file (optionally `extends` another) plus `--set a.b=v` overrides.

Sections (all optional; unknown keys are errors):

    extends = "other.toml"          # path relative to this file; this file's keys override it
    [model]      preset = "demo" and any `Phi4Config` field (rope_theta, remat_policy, vocab_size, ...)
    [mesh]       data / fsdp / context / tensor (+ dcn_*) sizes, -1 = fill; distributed = "auto"
    [optimizer]  lr, warmup_steps, decay_steps, end_lr_ratio, weight_decay, b1, b2, eps, clip_norm
    [train]      steps, global_batch, seq_len, micro_batches, loss_chunk, seed, log_every, init_from,
                 objective ("pretrain", "sft", "dpo")
    [data]       tokenizer, shuffle_seed, mixture_weighting ("tokens" | "documents"), mixture_sample_docs,
                 sources = [{name, type, weight, path, generator, text_key}] (type "tokenized": path is a
                 manifest of `python -m phi4_jax.data.tokenize`, the source of the same name in it),
                 sft_files, dpo_files (JSONL globs for the sft / dpo objectives)
    [dpo]        beta, loss_type, label_smoothing, reference_free, rpo_alpha (the dpo objective)
    [lora]       rank (0 = off), alpha, targets, base_dtype: train low-rank adapters, base weights frozen
    [checkpoint] save_every, keep, async_save
    [demo]       sample_prompts, max_new_tokens, plot

`load_train_config` returns a validated `TrainConfig`; every problem is a `TrainConfigError` naming the key.
`config_json` is the resolved config a run saves as WORKDIR/config.json (it loads again as a config file);
`resume_config_changes` lists what a resume changes beyond `RESUME_CHANGEABLE`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import tomllib
from typing import Any

from phi4_jax import paths
from phi4_jax.checks import check_integer
from phi4_jax.data.sources import MIXTURE_WEIGHTINGS
from phi4_jax.model.config import ConfigError, Phi4Config, get_preset
from phi4_jax.model.sharding import MeshConfig, MeshError

SOURCE_TYPES = ("jsonl", "text", "parquet", "npy", "demo", "tokenized")
OBJECTIVES = ("pretrain", "sft", "dpo")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "robust")   # phi4_jax.posttrain.dpo's
TOKENIZERS = ("phi4", "demo_compact")


class TrainConfigError(ValueError):
    """A training configuration that is malformed or inconsistent."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 3e-4               # peak learning rate (phi-4 pretraining)
    warmup_steps: int = 2000
    decay_steps: int | None = None  # linear decay length after warm-up; None = until train.steps
    end_lr_ratio: float = 0.0      # final lr = lr * end_lr_ratio
    weight_decay: float = 0.1      # decoupled (AdamW); not applied to norm weights
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0  # global-norm gradient clipping; None = off


@dataclasses.dataclass(frozen=True)
class TrainLoopConfig:
    steps: int = 1000
    global_batch: int = 8          # sequences per optimizer step (all hosts)
    seq_len: int = 4096
    micro_batches: int = 1         # gradient accumulation: the global batch is split into this many
    loss_chunk: int = 1024         # tokens per chunk of the fp32 lm_head + loss (memory bound at long seq)
    seed: int = 0
    log_every: int = 1
    init_from: str | None = None   # a converted / previous-stage checkpoint dir to start from (params only)
    objective: str = "pretrain"    # "pretrain" (next token), "sft" (assistant tokens), "dpo" (preference pairs)


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    name: str
    type: str
    weight: float
    path: str | None = None        # file or glob (jsonl, text, parquet, npy); tokenized: the manifest.json
    generator: str | None = None   # demo sources: a generator in phi4_jax.data.demo
    text_key: str = "text"         # jsonl / parquet column holding the text


@dataclasses.dataclass(frozen=True)
class DataConfig:
    tokenizer: str = "phi4"        # "phi4" (the 100352-token vocabulary) or "demo_compact"
    shuffle_seed: int = 0
    mixture_weighting: str = "tokens"  # source weights are shares of "tokens" or of "documents"
    mixture_sample_docs: int = 256     # documents per source to estimate mean tokens/document (no manifest)
    sources: tuple[SourceConfig, ...] = ()
    sft_files: str | None = None   # JSONL of {"messages": [...]} (train.objective = "sft")
    dpo_files: str | None = None   # JSONL of {"prompt": [...], "chosen": str, "rejected": str} ("dpo")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 0                  # 0 = no LoRA (train every weight)
    alpha: float = 16.0            # the update is scaled by alpha / rank
    targets: tuple[str, ...] = LORA_TARGETS
    base_dtype: str = "bfloat16"   # the frozen base weights' dtype

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"     # "sigmoid", "ipo", "robust" (TRL's definitions)
    label_smoothing: float = 0.0
    reference_free: bool = False   # True: no reference model (its log-probs taken as 0)
    rpo_alpha: float = 0.0         # > 0: add rpo_alpha x the chosen tokens' NLL (RPO; TRL's rpo_alpha)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    save_every: int = 1000
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    sample_prompts: tuple[str, ...] = ()
    max_new_tokens: int = 32
    plot: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: Phi4Config
    mesh: MeshConfig
    distributed: str
    optimizer: OptimizerConfig
    train: TrainLoopConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    demo: DemoConfig
    dpo: DPOConfig
    lora: LoraConfig
    raw: dict                      # the merged dict this was built from (WORKDIR/config.json holds the
                                   # resolved config instead: `resolved_config`)

    @property
    def micro_batch(self) -> int:
        return self.train.global_batch // self.train.micro_batches


# ----------------------------------------------------------------------------- loading and overrides

def _read_toml(path: str, seen=()) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise TrainConfigError(f"config 'extends' cycle through {path}")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise TrainConfigError(f"config file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise TrainConfigError(f"config file {path!r} is not valid TOML: {e}") from None
    base = data.pop("extends", None)
    if base is None:
        return data
    base_path = os.path.join(os.path.dirname(path), base)
    return deep_merge(_read_toml(base_path, seen + (path,)), data)


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """'optimizer.lr=1e-4' -> (['optimizer', 'lr'], 0.0001); values are TOML literals, else strings."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise TrainConfigError(f"override {item!r} must look like SECTION.KEY=VALUE (e.g. optimizer.lr=1e-4)")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.strip().split("."), parsed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"override {item!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def load_train_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    data = _read_toml(path) if path else {}
    return build_train_config(apply_overrides(data, list(overrides)))


# ----------------------------------------------------------------------------- validation

def _section(cls, data: dict, name: str):
    if not isinstance(data, dict):
        raise TrainConfigError(f"[{name}] must be a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise TrainConfigError(f"unknown key(s) in [{name}]: {sorted(unknown)}; known: {sorted(fields)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise TrainConfigError(f"[{name}]: {e}") from None


def _positive_int(value, where):
    check_integer(value, where, TrainConfigError)


def build_train_config(data: dict) -> TrainConfig:
    data = copy.deepcopy(data)
    known = {"model", "mesh", "optimizer", "train", "data", "checkpoint", "demo", "dpo", "lora"}
    unknown = set(data) - known
    if unknown:
        raise TrainConfigError(f"unknown config section(s) {sorted(unknown)}; known: {sorted(known)}")

    model_d = dict(data.get("model", {}))
    preset = model_d.pop("preset", "demo")
    try:
        model = get_preset(preset, **model_d)
    except (ConfigError, TypeError) as e:
        raise TrainConfigError(f"[model]: {e}") from None

    mesh_d = dict(data.get("mesh", {}))
    distributed = mesh_d.pop("distributed", "auto")
    if distributed not in ("auto", "always", "never"):
        raise TrainConfigError(f"mesh.distributed must be 'auto', 'always' or 'never', got {distributed!r}")
    try:
        mesh = MeshConfig.from_dict(mesh_d)
    except MeshError as e:
        raise TrainConfigError(f"[mesh]: {e}") from None

    opt = _section(OptimizerConfig, data.get("optimizer", {}), "optimizer")
    loop = _section(TrainLoopConfig, data.get("train", {}), "train")
    ckpt = _section(CheckpointConfig, data.get("checkpoint", {}), "checkpoint")
    demo_d = dict(data.get("demo", {}))
    if "sample_prompts" in demo_d:
        demo_d["sample_prompts"] = tuple(demo_d["sample_prompts"])
    demo = _section(DemoConfig, demo_d, "demo")
    dpo = _section(DPOConfig, data.get("dpo", {}), "dpo")
    lora_d = dict(data.get("lora", {}))
    if "targets" in lora_d:
        lora_d["targets"] = tuple(lora_d["targets"]) if isinstance(lora_d["targets"], list) else lora_d["targets"]
    lora = _section(LoraConfig, lora_d, "lora")

    data_d = dict(data.get("data", {}))
    sources = data_d.pop("sources", [])
    if not isinstance(sources, list):
        raise TrainConfigError("data.sources must be a list of tables ([[data.sources]])")
    srcs = tuple(_section(SourceConfig, s, f"data.sources[{i}]") for i, s in enumerate(sources))
    data_cfg = _section(DataConfig, {**data_d, "sources": srcs}, "data")

    # ---- value checks
    if not opt.lr > 0:
        raise TrainConfigError(f"optimizer.lr must be positive, got {opt.lr}")
    if opt.warmup_steps < 0:
        raise TrainConfigError(f"optimizer.warmup_steps must be >= 0, got {opt.warmup_steps}")
    if opt.decay_steps is not None:
        _positive_int(opt.decay_steps, "optimizer.decay_steps")
    if not 0 <= opt.end_lr_ratio <= 1:
        raise TrainConfigError(f"optimizer.end_lr_ratio must be in [0, 1], got {opt.end_lr_ratio}")
    if opt.weight_decay < 0:
        raise TrainConfigError(f"optimizer.weight_decay must be >= 0, got {opt.weight_decay}")
    if opt.clip_norm is not None and not opt.clip_norm > 0:
        raise TrainConfigError(f"optimizer.clip_norm must be positive (or absent), got {opt.clip_norm}")
    for name in ("steps", "global_batch", "seq_len", "micro_batches", "loss_chunk", "log_every"):
        _positive_int(getattr(loop, name), f"train.{name}")
    if loop.global_batch % loop.micro_batches:
        raise TrainConfigError(f"train.global_batch ({loop.global_batch}) must be divisible by "
                               f"train.micro_batches ({loop.micro_batches})")
    if loop.seq_len % min(loop.loss_chunk, loop.seq_len):
        raise TrainConfigError(f"train.seq_len ({loop.seq_len}) must be divisible by train.loss_chunk "
                               f"({loop.loss_chunk})")
    if loop.seq_len > model.max_position_embeddings:
        raise TrainConfigError(f"train.seq_len ({loop.seq_len}) exceeds model.max_position_embeddings "
                               f"({model.max_position_embeddings})")
    _positive_int(ckpt.save_every, "checkpoint.save_every")
    _positive_int(ckpt.keep, "checkpoint.keep")
    _positive_int(demo.max_new_tokens, "demo.max_new_tokens")
    if data_cfg.tokenizer not in TOKENIZERS:
        raise TrainConfigError(f"data.tokenizer must be one of {TOKENIZERS}, got {data_cfg.tokenizer!r}")
    if data_cfg.mixture_weighting not in MIXTURE_WEIGHTINGS:
        raise TrainConfigError(f"data.mixture_weighting must be one of {MIXTURE_WEIGHTINGS}, got "
                               f"{data_cfg.mixture_weighting!r}")
    _positive_int(data_cfg.mixture_sample_docs, "data.mixture_sample_docs")
    if loop.objective not in OBJECTIVES:
        raise TrainConfigError(f"train.objective must be one of {OBJECTIVES}, got {loop.objective!r}")
    if loop.objective == "sft" and not data_cfg.sft_files:
        raise TrainConfigError("train.objective 'sft' needs data.sft_files (JSONL of {\"messages\": [...]})")
    if loop.objective == "dpo" and not data_cfg.dpo_files:
        raise TrainConfigError("train.objective 'dpo' needs data.dpo_files (JSONL of prompt/chosen/rejected)")
    if dpo.loss_type not in DPO_LOSS_TYPES:
        raise TrainConfigError(f"dpo.loss_type: unknown DPO loss type {dpo.loss_type!r}; allowed: "
                               f"{', '.join(DPO_LOSS_TYPES)}")
    if not dpo.beta > 0:
        raise TrainConfigError(f"dpo.beta must be > 0, got {dpo.beta}")
    alpha = dpo.rpo_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise TrainConfigError(f"dpo.rpo_alpha must be a number >= 0, got {alpha!r}")
    if not 0 <= dpo.label_smoothing < 0.5 or (dpo.loss_type == "ipo" and dpo.label_smoothing):
        raise TrainConfigError(f"dpo.label_smoothing must lie in [0, 0.5) (0 for ipo), got {dpo.label_smoothing}")
    if not (isinstance(lora.rank, int) and lora.rank >= 0):
        raise TrainConfigError(f"lora.rank must be an integer >= 0 (0 = off), got {lora.rank!r}")
    if not (isinstance(lora.alpha, (int, float)) and lora.alpha > 0):
        raise TrainConfigError(f"lora.alpha must be positive, got {lora.alpha!r}")
    if not isinstance(lora.targets, tuple) or not lora.targets or set(lora.targets) - set(LORA_TARGETS):
        raise TrainConfigError(f"lora.targets must be a non-empty list from {list(LORA_TARGETS)}, got {lora.targets!r}")
    if lora.rank and loop.objective == "pretrain":
        raise TrainConfigError("lora.rank > 0 trains adapters for post-training: set train.objective to "
                               "'sft' or 'dpo'")
    if lora.rank and demo.sample_prompts:
        raise TrainConfigError("demo.sample_prompts are not sampled from a LoRA run: set demo.sample_prompts = [] "
                               "and sample the merged checkpoint (python -m phi4_jax.posttrain.merge_lora)")
    if lora.base_dtype not in ("float32", "bfloat16", "float16"):
        raise TrainConfigError(f"lora.base_dtype must be float32, bfloat16 or float16, got {lora.base_dtype!r}")
    if not srcs and loop.objective == "pretrain":
        raise TrainConfigError("data.sources is empty: add at least one [[data.sources]] table")
    names = [s.name for s in srcs]
    if len(set(names)) != len(names):
        raise TrainConfigError(f"data.sources names must be unique, got {names}")
    for s in srcs:
        if s.type not in SOURCE_TYPES:
            raise TrainConfigError(f"data source {s.name!r}: type must be one of {SOURCE_TYPES}, got {s.type!r}")
        if not (isinstance(s.weight, (int, float)) and math.isfinite(s.weight) and s.weight > 0):
            raise TrainConfigError(f"data source {s.name!r}: weight must be positive, got {s.weight!r}")
        if s.type == "demo" and not s.generator:
            raise TrainConfigError(f"data source {s.name!r}: type 'demo' needs a 'generator'")
        if s.type != "demo" and not s.path:
            raise TrainConfigError(f"data source {s.name!r}: type {s.type!r} needs a 'path'")

    return TrainConfig(model=model, mesh=mesh, distributed=distributed, optimizer=opt, train=loop,
                       data=data_cfg, checkpoint=ckpt, demo=demo, dpo=dpo, lora=lora, raw=data)


# Keys a resumed run may change without --allow-config-change (a key ending in "." covers its section): how
# long it runs, how often it logs and saves, what it prints at the end, the mesh (a checkpoint restores onto
# any mesh), how the batch is split into micro-batches and the loss into chunks (memory, not math), where a
# fresh run would start from (a resumed one does not), and how the model runs (not what it computes).
RESUME_CHANGEABLE = ("train.steps", "train.log_every", "train.init_from", "train.micro_batches",
                     "train.loss_chunk", "checkpoint.", "demo.", "mesh.", "model.remat_policy",
                     "model.attention_impl", "model.fuse_rope", "model.kernel_interpret")


def resolved_config(cfg: TrainConfig) -> dict:
    """Every setting of `cfg`, defaults included, as a dict that `build_train_config` accepts again."""
    sections = {name: dataclasses.asdict(getattr(cfg, name))
                for name in ("optimizer", "train", "data", "checkpoint", "demo", "dpo", "lora")}
    return {"model": dataclasses.asdict(cfg.model), "mesh": {**dataclasses.asdict(cfg.mesh), "distributed": cfg.distributed},
            **sections}


def config_json(cfg: TrainConfig) -> str:
    """The resolved configuration (as saved in the run directory, WORKDIR/config.json)."""
    return json.dumps(resolved_config(cfg), indent=2, sort_keys=True, default=str)


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: json.loads(json.dumps(tree, default=str))}   # tuples and lists compare alike


def resume_config_changes(saved_path: str, cfg: TrainConfig) -> list[str]:
    """The dotted keys whose values differ between the run's saved config.json and `cfg`, except those in
    `RESUME_CHANGEABLE`, as "key: saved -> new" lines (raises TrainConfigError if the file is unreadable)."""
    try:
        saved = resolved_config(build_train_config(json.loads(paths.read_text(saved_path))))
    except (OSError, ValueError) as e:   # json and TrainConfigError are ValueErrors
        raise TrainConfigError(f"cannot read the saved run config {saved_path!r}: {e}") from None
    old, new = _flatten(saved), _flatten(resolved_config(cfg))
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and not any(
                         k == c or (c.endswith(".") and k.startswith(c)) for c in RESUME_CHANGEABLE))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]
