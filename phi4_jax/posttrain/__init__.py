"""Post-training: the objectives that turn a pretrained phi-4 into a chat model (SFT, DPO).

First slice, what exists now:
- `logps`: `sequence_logps`, the summed log-prob of the masked tokens of each sequence (chunked, float32), and
  its pure-function form `sequence_logps_from_params` for use inside a jitted step.
- `dpo`: `dpo_loss` (TRL's `sigmoid`, `ipo` and `robust` losses, label smoothing, reference-free) and
  `dpo_metrics` (TRL's rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies).
- `sft`: `encode_sft_example`, a chat conversation -> token ids + the loss mask of its assistant turns.
- `pts`: Pivotal Token Search (`PivotalTokenSearch`, `ModelSampler`, the estimate cache, `run_pts`); `oracles`: the
  exact / numeric / python checkers and user callables; `problems`: built-in arithmetic problems for the demo;
  `policy`: `load_policy`, a converted checkpoint or a train.py workdir with its tokenizer.

Not yet: the SFT and DPO trainers, their data pipelines (packing, JSONL readers), LoRA.

May import: `phi4_jax.model`, `phi4_jax.train`, `phi4_jax.data`, `phi4_jax.inference`, `phi4_jax.checkpoint`,
`phi4_jax.tokenizer`, `phi4_jax.special_tokens`, `phi4_jax.checks`; jax, optax, numpy. Never torch.
"""

from phi4_jax.posttrain.dpo import DPO_LOSS_TYPES, dpo_loss, dpo_metrics
from phi4_jax.posttrain.logps import sequence_logps, sequence_logps_from_params
from phi4_jax.posttrain.sft import SFTExampleError, encode_sft_example

__all__ = [
    "DPO_LOSS_TYPES",
    "SFTExampleError",
    "dpo_loss",
    "dpo_metrics",
    "encode_sft_example",
    "sequence_logps",
    "sequence_logps_from_params",
]
