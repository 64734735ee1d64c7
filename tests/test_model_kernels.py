"""The whole model on the Pallas attention kernels keeps parity with transformers.

The model dispatches attention through `kernels` (config.attention_impl); here it runs on the Mosaic TPU kernel
(with RoPE fused into the kernel's q/k tile loads) and on the Mosaic GPU kernel, both in interpret mode on CPU,
and its logits are compared with transformers' Phi3ForCausalLM on 256 tokens.

Tolerances (max |ours - ref| / max |ref|): the TPU kernel computes in float32 like the reference: 1e-4.
The GPU kernel feeds its matmuls bf16 (wgmma has no fp32 operands; float32 inputs are cast on purpose), so it
is held to the bf16 level: 3e-2.
"""

import numpy as np
import pytest

from hf_models import hf_logits, make_tiny_phi3_model
from kernel_mode import interpret_for
from kernels import mosaic_gpu_interpret
from phi4_jax.config import Phi4Config
from phi4_jax.hf_mapping import params_from_hf_state_dict
from phi4_jax.model import model_from_params

SEQ = 256  # a multiple of both kernels' block sizes, long enough for RoPE at theta 250k to matter


@pytest.fixture(scope="module")
def reference():
    # head_dim 128 (hidden / heads), as phi-4: the fused-RoPE TPU kernel requires it.
    hf = make_tiny_phi3_model(seed=3, hidden=256, heads=2, kv_heads=1, layers=2, intermediate=96, vocab=97,
                              rope_theta=250000.0)
    config = Phi4Config.from_hf_dict(hf.config.to_dict(), param_dtype="float32", compute_dtype="float32",
                                     remat_policy="none")
    params = params_from_hf_state_dict({k: v.numpy() for k, v in hf.state_dict().items()}, config)
    ids = np.random.RandomState(0).randint(0, config.vocab_size, size=(1, SEQ))
    return config, params, ids, hf_logits(hf, ids)


def _relative_error(config, params, ids, ref, **runtime):
    model = model_from_params(config.replace(**runtime), params)
    ours = np.asarray(model(ids))
    return np.abs(ours - ref).max() / np.abs(ref).max()


def test_model_on_pallas_tpu_kernel_with_fused_rope(reference):
    config, params, ids, ref = reference
    err = _relative_error(config, params, ids, ref, attention_impl="pallas_tpu", fuse_rope=True,
                          kernel_interpret=interpret_for("tpu"))
    assert err <= 1e-4, err


@pytest.mark.skipif(interpret_for("gpu") and not mosaic_gpu_interpret.is_available(),
                    reason="this JAX has no Mosaic GPU interpret mode")
def test_model_on_pallas_gpu_kernel(reference):
    config, params, ids, ref = reference
    err = _relative_error(config, params, ids, ref, attention_impl="pallas_gpu", fuse_rope=False,
                          kernel_interpret=interpret_for("gpu"))
    assert err <= 3e-2, err


def test_model_on_xla_reference_matches_too(reference):
    # The same check on the default CPU path, so a failure above points at the kernel, not the harness.
    config, params, ids, ref = reference
    assert _relative_error(config, params, ids, ref, attention_impl="xla") <= 1e-4
