"""Training: train config, optimizer, loss, the sharded train step, the loop, train checkpoints, the AOT plan.

- `config`: the TOML train config (`TrainConfig`, `load_train_config`).
- `optimizer`: AdamW with warm-up and linear decay, clipping, weight-decay masking.
- `loss`: chunked float32 next-token cross-entropy that respects document boundaries.
- `step`: the train state and the jitted (pjit) train step with gradient accumulation.
- `mfu`: model FLOPs per token and MFU.
- `metrics`: the step-time split (data wait, compilation, checkpoint, compute), goodput, and the writers of
  metrics.jsonl and TensorBoard event files (through `phi4_jax.paths`, so gs:// too).
- `checkpoints`: Orbax CheckpointManager for train state + data iterator; `init_params_from`.
- `loop`: `train(cfg, workdir)`, what `python train.py` runs; `build_train_step`, the step construction it
  shares with `plan`.
- `plan`: ahead-of-time compilation of the train step for a mesh, and its memory; for a TPU topology, with the
  real TPU compiler (libtpu) on a CPU machine.

May import: `phi4_jax.paths`, `phi4_jax.model`, `phi4_jax.data`, `phi4_jax.checkpoint`, `phi4_jax.inference`
(end-of-run samples); `phi4_jax.posttrain` lazily, inside `loop` and `plan` only, for the SFT/DPO objectives and LoRA.
"""
