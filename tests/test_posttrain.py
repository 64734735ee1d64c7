"""Post-training objectives against PyTorch: `sequence_logps` on a converted tiny transformers Phi3ForCausalLM,
`dpo_loss` / `dpo_metrics` against TRL's formulas written here in torch, SFT loss masks against hand-built ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hf_models import make_tiny_phi3_model

from phi4_jax.checkpoint.hf_mapping import params_from_hf_state_dict
from phi4_jax.model.config import Phi4Config
from phi4_jax.model.decoder import ModelInputError, model_from_params
from phi4_jax.posttrain import dpo_loss, dpo_metrics, encode_sft_example, sequence_logps, sequence_logps_from_params
from phi4_jax.posttrain.dpo import rpo_nll_loss

SEQ = 300  # >= 256 tokens per row


@pytest.fixture(scope="module")
def models():
    hf = make_tiny_phi3_model(seed=3, hidden=48, heads=4, kv_heads=2, layers=2, intermediate=80, vocab=257,
                              rope_theta=250000.0)
    config = Phi4Config.from_hf_dict(hf.config.to_dict(), compute_dtype="float32", remat_policy="none")
    state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    params = jax.tree.map(jnp.asarray, params_from_hf_state_dict(state, config))
    return hf, model_from_params(config, params)


def torch_sequence_logps(hf, ids, mask):
    """Reference: HF logits -> log_softmax -> gather token t from position t-1 -> sum where mask[t] == 1."""
    with torch.no_grad():
        logits = hf(torch.as_tensor(ids, dtype=torch.long)).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tok = torch.gather(logp, 2, torch.as_tensor(ids[:, 1:], dtype=torch.long)[..., None])[..., 0]
    return (tok * torch.as_tensor(mask[:, 1:], dtype=torch.float64)).sum(1).numpy()


@pytest.fixture(scope="module")
def chat_batch(models):
    """Three right-padded rows (prompt, response, padding); the mask covers the responses only. Row 0 also sets
    mask[0, 0], which must be ignored (no position predicts the first token)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 257, (3, SEQ), dtype=np.int32)
    mask = np.zeros((3, SEQ), np.int32)
    seg = np.zeros((3, SEQ), np.int32)
    for row, (prompt, length) in enumerate([(40, SEQ), (120, 260), (7, 201)]):
        mask[row, prompt:length] = 1
        seg[row, :length] = 1
        ids[row, length:] = 0  # pad id
    mask[0, 0] = 1
    return ids, mask, seg


def test_sequence_logps_match_torch(models, chat_batch):
    hf, model = models
    ids, mask, seg = chat_batch
    ref = torch_sequence_logps(hf, ids, mask)
    got = sequence_logps(model, ids, mask)
    assert got.dtype == jnp.float32 and got.shape == (3,)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-3)
    # Padding marked as segment 0 changes nothing for the masked tokens; a chunk that does not divide the
    # sequence (300 = 4 * 64 + 44) pads the tail internally.
    np.testing.assert_allclose(np.asarray(sequence_logps(model, ids, mask, segment_ids=seg, chunk=64)), ref,
                               rtol=1e-4, atol=1e-3)
    # Boolean masks are accepted.
    np.testing.assert_allclose(np.asarray(sequence_logps(model, ids, mask.astype(bool))), ref, rtol=1e-4, atol=1e-3)


def test_sequence_logps_packed_rows_match_separate_sequences(models):
    """Two documents packed in one row (segment ids, positions restarting at 0) score as the sum of each
    document run alone through transformers; the first token of document 2 is not a target."""
    hf, model = models
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 257, (1, 170), dtype=np.int32), rng.integers(0, 257, (1, 130), dtype=np.int32)
    ma, mb = (rng.random((1, 170)) < 0.5).astype(np.int32), (rng.random((1, 130)) < 0.5).astype(np.int32)
    mb[0, 0] = 1  # document 2's first token: predicted by nothing within its document
    ids, mask = np.concatenate([a, b], 1), np.concatenate([ma, mb], 1)
    seg = np.concatenate([np.ones((1, 170)), 2 * np.ones((1, 130))], 1).astype(np.int32)
    pos = np.concatenate([np.arange(170), np.arange(130)])[None].astype(np.int32)
    ref = torch_sequence_logps(hf, a, ma) + torch_sequence_logps(hf, b, mb)
    got = sequence_logps(model, ids, mask, segment_ids=seg, positions=pos, chunk=100)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-3)


def test_sequence_logps_gradient_matches_torch(models, chat_batch):
    """d(sum of sequence log-probs)/d(lm_head) and /d(final norm) through the chunked, rematerialized scan."""
    hf, model = models
    ids, mask, _ = chat_batch
    ids, mask = ids[:, :256], mask[:, :256]
    hf.zero_grad()
    logits = hf(torch.as_tensor(ids, dtype=torch.long)).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tok = torch.gather(logp, 2, torch.as_tensor(ids[:, 1:], dtype=torch.long)[..., None])[..., 0]
    (tok * torch.as_tensor(mask[:, 1:], dtype=torch.float32)).sum().backward()

    def total(params):
        return jnp.sum(sequence_logps_from_params(params, model.config, jnp.asarray(ids), jnp.asarray(mask),
                                                  chunk=64))

    grads = jax.grad(total)(model.params)
    np.testing.assert_allclose(np.asarray(grads["lm_head"]).T, hf.lm_head.weight.grad.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grads["final_norm"]), hf.model.norm.weight.grad.numpy(),
                               rtol=1e-3, atol=1e-4)


def test_sequence_logps_bad_input(models):
    _, model = models
    ids = np.zeros((2, 8), np.int32)
    with pytest.raises(ModelInputError, match="loss_mask must have the shape"):
        sequence_logps(model, ids, np.ones((2, 7), np.int32))
    with pytest.raises(ModelInputError, match="only 0 and 1"):
        sequence_logps(model, ids, np.full((2, 8), 2, np.int32))
    with pytest.raises(ModelInputError, match="0/1 integers or booleans"):
        sequence_logps(model, ids, np.ones((2, 8), np.float32))


# ----------------------------------------------------------------------------- DPO against TRL's formulas

def torch_dpo_losses(pc, pr, rc, rr, beta, loss_type, ls, lc=None, lr=None):
    """Per-pair losses as trl/trainer/dpo_trainer.py (TRL 1.16, `_compute_loss`) defines them, reverse-KL DPO:
    chosen/rejected log-ratios (lines 1350-1351), sigmoid (1387-1388) with the cDPO label smoothing TRL writes for
    `aot` (1453-1456), ipo with token-count normalization (1393-1404), robust (1428-1431)."""
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls
    if loss_type == "ipo":
        if lc is not None:
            delta = chosen_logratios / lc.clamp(min=1.0) - rejected_logratios / lr.clamp(min=1.0)
        return (delta - 1 / (2 * beta)) ** 2
    clean = -(1 - ls) * F.logsigmoid(beta * delta)
    flipped = -ls * F.logsigmoid(-beta * delta)
    return (clean - flipped) / (1 - 2 * ls)


@pytest.fixture(scope="module")
def logps():
    g = torch.Generator().manual_seed(0)
    # Summed log-probs of ~100-token completions; policy near the reference, as in training.
    ref = -100 + 20 * torch.randn(4, 16, generator=g, dtype=torch.float64)
    pol = ref + 3 * torch.randn(4, 16, generator=g, dtype=torch.float64)
    pol[0, 1], ref[0, 1] = ref[1, 1], pol[1, 1]  # some pairs with the policy preferring rejected
    return pol[0], pol[1], ref[0], ref[1]


CASES = [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0), ("ipo", 0.02, 0.0),
         ("robust", 0.1, 0.0), ("robust", 0.3, 0.1), ("robust", 0.1, 0.4)]


@pytest.mark.parametrize("loss_type, beta, ls", CASES)
def test_dpo_loss_and_gradient_match_trl(logps, loss_type, beta, ls):
    pc, pr, rc, rr = (t.clone().requires_grad_(True) for t in logps)
    ref = torch_dpo_losses(pc, pr, rc, rr, beta, loss_type, ls).mean()
    ref.backward()

    def loss(c, r, refc, refr):
        return dpo_loss(c, r, refc, refr, beta=beta, loss_type=loss_type, label_smoothing=ls)

    args = [jnp.asarray(t.detach().numpy(), jnp.float32) for t in logps]
    got, grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(*args)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), ref.item(), rtol=1e-5)
    for g, t in zip(grads, (pc, pr, rc, rr)):
        np.testing.assert_allclose(np.asarray(g), t.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_ipo_length_normalization_matches_trl(logps):
    g = torch.Generator().manual_seed(1)
    lc = torch.randint(0, 200, (16,), generator=g).double()
    lr = torch.randint(1, 200, (16,), generator=g).double()
    lc[0] = 0  # an empty completion: TRL clamps the count to 1
    pc, pr, rc, rr = (t.clone().requires_grad_(True) for t in logps)
    ref = torch_dpo_losses(pc, pr, rc, rr, 0.1, "ipo", 0.0, lc, lr).mean()
    ref.backward()
    args = [jnp.asarray(t.detach().numpy(), jnp.float32) for t in logps]
    got, grads = jax.value_and_grad(
        lambda c, r: dpo_loss(c, r, *args[2:], loss_type="ipo", chosen_lengths=lc.numpy(),
                              rejected_lengths=lr.numpy()), argnums=(0, 1))(*args[:2])
    np.testing.assert_allclose(float(got), ref.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[0]), pc.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grads[1]), pr.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_rpo_nll_and_its_gradient_match_trl(logps):
    """TRL's RPO term (1.16: loss_type "sft", weight rpo_alpha): the chosen tokens' mean NLL over the batch."""
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(1, 30, (16,), generator=g)
    tokens = [-torch.rand(int(n), generator=g, dtype=torch.float64) * 3 for n in lengths]   # per-token log-probs
    per_token = torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True).requires_grad_(True)
    mask = torch.arange(per_token.shape[1])[None] < lengths[:, None]
    pc, pr, rc, rr = logps
    ref = (torch_dpo_losses(pc, pr, rc, rr, 0.1, "sigmoid", 0.0).mean() - 0.5 * per_token[mask].mean())
    ref.backward()

    def loss(per_token_logps):
        chosen = jnp.sum(per_token_logps * jnp.asarray(mask.numpy()), axis=1)
        return dpo_loss(pc.numpy(), pr.numpy(), rc.numpy(), rr.numpy()) + 0.5 * rpo_nll_loss(chosen, lengths.numpy())

    got, grad = jax.value_and_grad(loss)(jnp.asarray(per_token.detach().numpy(), jnp.float32))
    np.testing.assert_allclose(float(got), ref.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), per_token.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_reference_free_dpo_is_a_zero_reference(logps):
    pc, pr, _, _ = logps
    zeros = torch.zeros_like(pc)
    for loss_type, ls in (("sigmoid", 0.1), ("ipo", 0.0), ("robust", 0.1)):
        ref = torch_dpo_losses(pc, pr, zeros, zeros, 0.1, loss_type, ls).mean().item()
        got = dpo_loss(pc.numpy(), pr.numpy(), None, None, loss_type=loss_type, label_smoothing=ls)
        np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_dpo_metrics_match_trl(logps):
    pc, pr, rc, rr = logps
    beta = 0.2
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)  # dpo_trainer.py lines 1582-1597
    got = dpo_metrics(*(t.numpy() for t in logps), beta=beta)
    np.testing.assert_allclose(float(got["rewards/chosen"]), chosen_rewards.mean().item(), rtol=1e-5)
    np.testing.assert_allclose(float(got["rewards/rejected"]), rejected_rewards.mean().item(), rtol=1e-5)
    np.testing.assert_allclose(float(got["rewards/margins"]), (chosen_rewards - rejected_rewards).mean().item(),
                               rtol=1e-5)
    acc = (chosen_rewards > rejected_rewards).double().mean().item()
    assert 0 < acc < 1  # the fixture has pairs on both sides, so a constant could not pass
    assert float(got["rewards/accuracies"]) == pytest.approx(acc)


def test_dpo_bad_input(logps):
    a = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="unknown DPO loss_type 'hinge'; allowed: sigmoid, ipo, robust"):
        dpo_loss(a, a, a, a, loss_type="hinge")
    with pytest.raises(ValueError, match="label_smoothing does not apply to the ipo loss"):
        dpo_loss(a, a, a, a, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"robust loss must lie in \[0, 0.5\)"):
        dpo_loss(a, a, a, a, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(a, a, a, a, beta=0.0)
    with pytest.raises(ValueError, match="both ref_chosen_logps and ref_rejected_logps, or neither"):
        dpo_loss(a, a, a, None)
    with pytest.raises(ValueError, match="rejected_logps has shape"):
        dpo_loss(a, np.zeros(3, np.float32), a, a)
    with pytest.raises(ValueError, match="1-D array"):
        dpo_loss(a[None], a[None], a[None], a[None])
    with pytest.raises(ValueError, match="ipo loss only"):
        dpo_loss(a, a, a, a, chosen_lengths=a, rejected_lengths=a)


# ----------------------------------------------------------------------------- SFT loss masking

@pytest.fixture(scope="module")
def tokenizer():
    from phi4_jax.tokenizer import Tokenizer
    return Tokenizer()


# Hand-built from phi-4's ids (PHI4.md): <|im_start|> 100264, <|im_end|> 100265, <|im_sep|> 100266;
# cl100k: "system" 9125, "user" 882, "assistant" 78191, "Hello" 9906, " World" 4435, "Hi" 13347.
S, E, P = 100264, 100265, 100266


def test_sft_mask_trains_assistant_content_and_its_im_end_only(tokenizer):
    messages = [{"role": "system", "content": "Hi"}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hello World"}, {"role": "user", "content": " World"},
                {"role": "assistant", "content": "Hi"}]
    ids, mask = encode_sft_example(tokenizer, messages)
    expected = [  # (token, trained)
        (S, 0), (9125, 0), (P, 0), (13347, 0), (E, 0),
        (S, 0), (882, 0), (P, 0), (9906, 0), (E, 0),
        (S, 0), (78191, 0), (P, 0), (9906, 1), (4435, 1), (E, 1),
        (S, 0), (882, 0), (P, 0), (4435, 0), (E, 0),
        (S, 0), (78191, 0), (P, 0), (13347, 1), (E, 1),
    ]
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids.tolist() == [t for t, _ in expected]
    assert mask.tolist() == [m for _, m in expected]
    # Without special text in the content, the ids are the chat template's own encoding.
    assert ids.tolist() == tokenizer.encode_chat(messages, add_generation_prompt=False)


def test_sft_special_token_text_in_content_stays_text(tokenizer):
    messages = [{"role": "user", "content": "say <|im_end|>"},
                {"role": "assistant", "content": "<|im_start|>assistant<|im_sep|>"}]
    ids, mask = encode_sft_example(tokenizer, messages)
    assert ids.tolist().count(S) == 2 and ids.tolist().count(E) == 2 and ids.tolist().count(P) == 2
    assert tokenizer.decode(ids.tolist()) == tokenizer.apply_chat_template(messages)
    trained = ids[mask == 1].tolist()
    assert trained == tokenizer.encode_ordinary("<|im_start|>assistant<|im_sep|>") + [E]


def test_sft_bad_conversations(tokenizer):
    from phi4_jax.posttrain import SFTExampleError
    from phi4_jax.tokenizer import TokenizerError

    with pytest.raises(SFTExampleError, match="no assistant turn"):
        encode_sft_example(tokenizer, [{"role": "user", "content": "Hello"}])
    with pytest.raises(TokenizerError, match="role 'tool'"):
        encode_sft_example(tokenizer, [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}])
    with pytest.raises(TokenizerError, match="no 'content' key"):
        encode_sft_example(tokenizer, [{"role": "assistant"}])
