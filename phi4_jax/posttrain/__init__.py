"""Post-training: the objectives that turn a pretrained phi-4 into a chat model (SFT, DPO), LoRA, and Pivotal
Token Search (DPO pairs from the policy's own pivotal tokens).

They run on the pretraining trainer (`python train.py` with `train.objective = "sft"` / `"dpo"`): same sharded
step, checkpoints and resume; only the data and the loss differ.
- `logps`: `sequence_logps`, the summed log-prob of the masked tokens of each sequence (chunked, float32), and
  its pure-function form `sequence_logps_from_params` for use inside a jitted step.
- `dpo`: `dpo_loss` (TRL's `sigmoid`, `ipo` and `robust` losses, label smoothing, reference-free), `rpo_nll_loss`
  (RPO's chosen-token NLL, TRL's `rpo_alpha` term) and `dpo_metrics` (TRL's rewards/chosen, rewards/rejected,
  rewards/margins, rewards/accuracies, logps/chosen, logps/rejected).
- `sft`: `encode_sft_example`, a chat conversation -> token ids + the loss mask of its assistant turns.
- `data`: SFT and DPO JSONL readers (errors name file:line; skips counted), first-fit packing of SFT examples
  and of DPO pairs (several pairs a row, chosen and rejected side by side), their batches.
- `objectives`: the SFT and DPO `Objective`s the train step runs.
- `reference`: DPO's reference log-probs, precomputed once and stored beside the data
  (`python -m phi4_jax.posttrain.precompute_ref`); `posttrain_batches`, the loop's data for these objectives.
- `lora`: `LoraWeight` (a weight object for `phi4_jax.model.linear`), adapter init/merge, the LoRA train state
  (checkpointed without its frozen base: `FrozenBase` reloads and fingerprint-checks it), and the merged export
  (`python -m phi4_jax.posttrain.merge_lora`).
- `demo_chat`: the CPU demo's chat data and its held-out evaluation.
- `pts`: Pivotal Token Search (`PivotalTokenSearch`, `ModelSampler`, `ModelTopTokens`, the estimate cache,
  `run_pts`); `oracles`: the exact / numeric / python checkers and user callables; `problems`: built-in arithmetic problems for the demo;
  `policy`: `load_policy`, a converted checkpoint or a train.py workdir with its tokenizer.

May import: `phi4_jax.model`, `phi4_jax.train`, `phi4_jax.data`, `phi4_jax.inference`, `phi4_jax.checkpoint`,
`phi4_jax.tokenizer`, `phi4_jax.special_tokens`, `phi4_jax.checks`; jax, optax, orbax, grain, numpy. Never torch.
(`phi4_jax.train.loop` imports `objectives`/`reference`/`lora` lazily, only for post-training configs.)
"""

from phi4_jax.posttrain.dpo import DPO_LOSS_TYPES, dpo_loss, dpo_metrics, rpo_nll_loss
from phi4_jax.posttrain.logps import sequence_logps, sequence_logps_from_params
from phi4_jax.posttrain.sft import SFTExampleError, encode_sft_example

__all__ = [
    "DPO_LOSS_TYPES",
    "SFTExampleError",
    "dpo_loss",
    "dpo_metrics",
    "encode_sft_example",
    "rpo_nll_loss",
    "sequence_logps",
    "sequence_logps_from_params",
]
