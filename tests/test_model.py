"""The Flax model against transformers' Phi3ForCausalLM, packed sequences, 16K on CPU, remat, scan, dtypes.

Weights come from tiny random transformers models mapped in memory (`params_from_hf_state_dict`); the
on-disk converter path is tested in test_convert.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import hf_logits, make_tiny_phi3_model

from phi4_jax.checkpoint.hf_mapping import params_from_hf_state_dict
from phi4_jax.model import decoder as M
from phi4_jax.model.config import REMAT_POLICIES, Phi4Config, get_preset

SEQ = 600  # > 512: crosses the attention block size and long enough for RoPE mistakes to show


def rel_err(got, ref):
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref)))


def from_hf(hf_model, **runtime):
    runtime = {"compute_dtype": "float32", "remat_policy": "none", **runtime}
    config = Phi4Config.from_hf_dict(hf_model.config.to_dict(), **runtime)
    state = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    return config, params_from_hf_state_dict(state, config)


@pytest.fixture(scope="module")
def hf_model():
    # Odd sizes, 3:1 GQA, phi-4's RoPE base.
    return make_tiny_phi3_model(seed=0, hidden=72, heads=6, kv_heads=2, layers=2, intermediate=136, vocab=311,
                                rope_theta=250000.0, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def fp32(hf_model):
    """(config, params as jnp float32) of `hf_model`."""
    config, params = from_hf(hf_model)
    return config, jax.tree.map(jnp.asarray, params)


@pytest.fixture(scope="module")
def tokens(hf_model):
    return np.random.default_rng(0).integers(0, hf_model.config.vocab_size, (2, SEQ), dtype=np.int32)


# ----------------------------------------------------------------------------- parity with transformers

@pytest.mark.parametrize("heads, kv_heads", [(6, 2), (4, 1)])
def test_logits_match_transformers_fp32(heads, kv_heads, hf_model, tokens):
    if (heads, kv_heads) == (6, 2):
        ref_model = hf_model
    else:
        ref_model = make_tiny_phi3_model(seed=heads + kv_heads, hidden=64, heads=heads, kv_heads=kv_heads,
                                         layers=2, intermediate=96, vocab=311, rope_theta=250000.0)
    ref = hf_logits(ref_model, tokens)
    assert ref.std() > 0.5, "logits are too flat to make the comparison meaningful"
    config, params = from_hf(ref_model)
    model = M.model_from_params(config, params)
    got = np.asarray(model(tokens))
    assert got.shape == ref.shape and got.dtype == np.float32
    assert rel_err(got, ref) <= 1e-4
    # Predictions agree everywhere, not only on average.
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.99


# ----------------------------------------------------------------------------- packed sequences

def test_packed_documents_equal_each_document_alone(fp32):
    config, params = fp32
    rng = np.random.default_rng(1)
    len_a, len_b, pad = 300, 241, 35  # doc B straddles the 512-token attention block boundary
    a = rng.integers(0, config.vocab_size, len_a, dtype=np.int32)
    b = rng.integers(0, config.vocab_size, len_b, dtype=np.int32)
    fill = np.full(pad, config.pad_token_id, np.int32)
    ids = np.stack([np.concatenate([a, b, fill]), np.concatenate([b, a, fill])])
    seg = np.stack([np.repeat([1, 2, 0], [len_a, len_b, pad]), np.repeat([1, 2, 0], [len_b, len_a, pad])])
    pos = np.stack([np.concatenate([np.arange(len_a), np.arange(len_b), np.arange(pad)]),
                    np.concatenate([np.arange(len_b), np.arange(len_a), np.arange(pad)])]).astype(np.int32)
    model = M.model_from_params(config, params)
    packed = np.asarray(model(ids, positions=pos, segment_ids=seg.astype(np.int32)))
    # Each document alone, at the start of its own row (one batch, one compile; the tokens after doc B
    # cannot change its logits under causal attention).
    alone = np.asarray(model(np.stack([a, np.concatenate([b, a[:len_a - len_b]])])))
    alone_a, alone_b = alone[0], alone[1, :len_b]
    assert rel_err(packed[0, :len_a], alone_a) <= 1e-5
    assert rel_err(packed[0, len_a:len_a + len_b], alone_b) <= 1e-5
    assert rel_err(packed[1, :len_b], alone_b) <= 1e-5
    assert rel_err(packed[1, len_b:len_b + len_a], alone_a) <= 1e-5
    assert np.isfinite(packed[:, -pad:]).all()  # padding (segment 0) stays finite
    # Without segment ids the second document sees the first one: the masking is what makes them equal.
    leaky = np.asarray(model(ids, positions=pos))
    assert rel_err(leaky[0, len_a:len_a + len_b], alone_b) > 1e-2


# ----------------------------------------------------------------------------- 16K tokens on a CPU

def test_16k_forward_runs_blockwise_on_cpu():
    s = 16384
    config = Phi4Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                        num_kv_heads=1, head_dim=16, rope_theta=250000.0, max_position_embeddings=s,
                        compute_dtype="float32", remat_policy="none")
    params = M.Phi4ForCausalLM(config, rngs=nnx.Rngs(0)).params
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 64, (1, s), dtype=np.int32))
    compiled = jax.jit(M.forward, static_argnums=(2,)).lower(params, ids, config).compile()
    one_score_matrix = s * s * 4  # a single fp32 S x S matrix (1 GiB); the naive path needs 2 heads of it
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < one_score_matrix // 16, f"forward needs {temp} bytes of temporaries at 16K"
    logits = np.asarray(compiled(params, ids))
    assert logits.shape == (1, s, 64) and np.isfinite(logits).all()
    assert logits[0, -1].std() > 0  # the last position computed something


# ----------------------------------------------------------------------------- remat, scan, dtypes

def forward_loss(params, ids, config):
    """Mean next-token cross-entropy (float32)."""
    logits = M.forward(params, ids[:, :-1], config)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


loss_and_grads = jax.jit(jax.value_and_grad(forward_loss), static_argnums=(2,))


@pytest.fixture(scope="module")
def loss_and_grads_of(fp32, tokens):
    config, params = fp32
    ids = jnp.asarray(tokens[:, :129])
    results = {}

    def run(**runtime):
        cfg = config.replace(**runtime)
        if cfg not in results:
            loss, grads = loss_and_grads(params, ids, cfg)
            results[cfg] = float(loss), jax.tree.map(np.asarray, grads)
        return results[cfg]
    return run


def test_loss_and_grads_match_torch_autograd(loss_and_grads_of, hf_model, tokens):
    """The training gradient against the peer: torch autograd through transformers' model, same loss.

    The other gradient tests compare our configurations with each other (they share the attention's
    hand-written backward, the RoPE and the norms); this one checks the gradient itself. Gradients map
    HF -> ours exactly like the weights (the mapping only splits, reshapes and transposes).
    """
    import torch

    loss, grads = loss_and_grads_of(remat_policy="none", scan_layers=True)  # the compiled case, reused
    ids = torch.as_tensor(tokens[:, :129], dtype=torch.long)
    hf_model.zero_grad()
    logits = hf_model(ids[:, :-1]).logits
    ref_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 ids[:, 1:].reshape(-1))
    ref_loss.backward()
    config = Phi4Config.from_hf_dict(hf_model.config.to_dict(), compute_dtype="float32", remat_policy="none")
    ref_grads = params_from_hf_state_dict(
        {name: p.grad.detach().float().numpy() for name, p in hf_model.named_parameters()}, config)
    hf_model.zero_grad()
    assert abs(loss - float(ref_loss.detach())) <= 1e-5 * abs(float(ref_loss.detach()))
    # transformers builds its embedding with padding_idx=pad_token_id, whose row torch never gives a gradient;
    # ours has no such rule (padding is masked by segment ids instead), so that one row is left out.
    pad = hf_model.model.embed_tokens.padding_idx
    keep = np.arange(config.vocab_size) != (-1 if pad is None else pad)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
    assert len(flat_ref) == len(jax.tree.leaves(grads)) == 12
    for path, g_ref in flat_ref:
        g = grads
        for key in path:
            g = g[key.key]
        if path[0].key == "embed":
            g, g_ref = g[keep], g_ref[keep]
        assert float(np.max(np.abs(g_ref))) > 0, jax.tree_util.keystr(path)
        assert rel_err(g, g_ref) <= 2e-5, (jax.tree_util.keystr(path), rel_err(g, g_ref))  # observed <= 2.5e-6


@pytest.mark.parametrize("remat_policy, scan_layers", [
    *[(p, True) for p in REMAT_POLICIES if p != "none"],
    ("full", False),  # the unscanned loop with remat (prevent_cse)
])
def test_remat_and_unscanned_layers_give_same_loss_and_grads(loss_and_grads_of, remat_policy, scan_layers):
    ref_loss, ref_grads = loss_and_grads_of(remat_policy="none", scan_layers=True)
    loss, grads = loss_and_grads_of(remat_policy=remat_policy, scan_layers=scan_layers)
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    flat_ref, flat = jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree.leaves(grads)
    for (path, g_ref), g in zip(flat_ref, flat):
        assert rel_err(g, g_ref) <= 1e-5, jax.tree_util.keystr(path)
    assert sum(float(np.abs(g).sum()) for _, g in flat_ref) > 0


def test_unscanned_forward_equals_scanned(fp32, tokens):
    config, params = fp32
    scanned = np.asarray(M.model_from_params(config, params)(tokens))
    unscanned = np.asarray(M.model_from_params(config.replace(scan_layers=False), params)(tokens))
    assert rel_err(unscanned, scanned) <= 1e-6


# bf16 keeps 8 mantissa bits, so logits of this random 2-layer model move by a few percent of their range.
# Stated tolerance: max |bf16 - fp32| <= 5% of max |fp32 logits|, and no worse than 1.5x the error of
# transformers' own bf16 model against its fp32 logits (the peer's yardstick for the same weights).
BF16_TOLERANCE = 5e-2


def test_bf16_params_and_compute_close_to_fp32(hf_model, fp32, tokens):
    import copy

    import torch

    config, params = fp32
    ref = np.asarray(M.model_from_params(config, params)(tokens))
    hf_bf16_err = rel_err(hf_logits(copy.deepcopy(hf_model).to(torch.bfloat16), tokens), ref)
    tolerance = min(BF16_TOLERANCE, 1.5 * hf_bf16_err)

    bf16_config = config.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    model = M.model_from_params(bf16_config, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(model.params))
    got = np.asarray(model(tokens))
    assert got.dtype == np.float32  # logits are float32 whatever the compute dtype
    err = rel_err(got, ref)
    assert 0 < err <= tolerance, (err, hf_bf16_err)  # > 0: the bf16 path really ran in bf16
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9

    # Mixed precision for training: fp32 master weights, bf16 compute.
    mixed = np.asarray(M.model_from_params(config.replace(compute_dtype="bfloat16"), params)(tokens))
    assert 0 < rel_err(mixed, ref) <= tolerance


# ----------------------------------------------------------------------------- parameters and inputs

def _flat_params(module):
    state = nnx.state(module, nnx.Param)
    return jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]


@pytest.mark.parametrize("which", ["loaded", "phi4-14b-abstract"])
def test_every_param_has_logical_axes_of_its_rank(which, fp32):
    if which == "loaded":
        config, params = fp32
        module = M.model_from_params(config, params)
    else:
        config = get_preset("phi4-14b")
        module = M.abstract_model(config)
    flat = _flat_params(module)
    specs = M.flat_param_specs(config)
    assert len(flat) == len(specs) == 12  # embed, final_norm, lm_head and 9 stacked layer tensors
    seen = 0
    for path, var in flat:
        axes = var.get_metadata().get("logical_axes")
        value = var.get_value()
        assert axes is not None, jax.tree_util.keystr(path)
        assert len(axes) == len(value.shape), (jax.tree_util.keystr(path), axes, value.shape)
        assert all(isinstance(a, str) for a in axes)
        seen += int(np.prod(value.shape))
    assert seen == config.num_params
    assert M.logical_axes_tree(config)["layers"]["q_proj"] == ("layers", "embed", "q_heads", "head_dim")


def test_module_call_and_model_from_params(fp32, tokens):
    config, params = fp32
    model = M.model_from_params(config, params)
    assert model.config is config
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    explicit = np.asarray(model(tokens, positions=positions))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), explicit, rtol=1e-6, atol=1e-6)
    bad = dict(params, embed=params["embed"][:-1])
    with pytest.raises(ValueError, match="parameter shapes do not match the config"):
        M.model_from_params(config, bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_ids=np.zeros(8, np.int32)), r"input_ids must be \[batch, seq\], got shape \(8,\)"),
    (dict(input_ids=np.zeros((1, 0), np.int32)), "input_ids must not be empty"),
    (dict(input_ids=np.zeros((1, 8), np.float32)), "input_ids must be integers, got dtype float32"),
    (dict(input_ids=np.array([[1, 2, 9999]])), r"token id 9999 is out of range \[0, 311\)"),
    (dict(input_ids=np.array([[1, -3, 2]])), r"token id -3 is out of range"),
    (dict(input_ids=np.zeros((2, 8), np.int32), positions=np.zeros((2, 7), np.int32)),
     r"positions must have the shape of input_ids \(2, 8\), got \(2, 7\)"),
    (dict(input_ids=np.zeros((2, 8), np.int32), segment_ids=np.zeros((8,), np.int32)),
     "segment_ids must have the shape of input_ids"),
    (dict(input_ids=np.zeros((2, 8), np.int32), segment_ids=np.zeros((2, 8), np.float32)),
     "segment_ids must be integers"),
])
def test_bad_inputs_are_refused(kwargs, match, fp32):
    model = M.model_from_params(*fp32)
    ids = kwargs.pop("input_ids")
    with pytest.raises(M.ModelInputError, match=match):
        model(ids, **kwargs)
