"""Model FLOPs per token and model FLOPs utilization (MFU) against a device's peak."""

from __future__ import annotations

import jax

from phi4_jax.model.config import Phi4Config


def training_flops_per_token(config: Phi4Config, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward = 3x forward, no remat recompute counted).

    Matmuls: 6 * (parameters used in matmuls: all but the embedding lookup). Causal attention: the
    QK^T and PV products average seq_len/2 keys per query: 2 products * 2 FLOPs * Hq * D * S/2 per layer
    forward, times 3 for training = 6 * L * Hq * D * S.
    """
    matmul_params = config.num_params - config.vocab_size * config.hidden_size
    attention = 6.0 * config.num_layers * config.num_heads * config.head_dim * seq_len
    return 6.0 * matmul_params + attention


# Dense bf16 peak FLOP/s per device (vendor figures), by substring of `device.device_kind`.
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12,
    "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v6": 918e12, "TPU v4": 275e12,
}


def peak_flops_per_device(device=None) -> float | None:
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "") or ""
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, n_devices: int, peak: float | None) -> float | None:
    if not peak:
        return None
    return flops_per_token * tokens_per_s / (peak * n_devices)
