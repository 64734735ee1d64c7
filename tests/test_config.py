"""Phi4Config: the phi-4 preset against PHI4.md, Hugging Face config.json in both styles, refusals."""

import copy
import dataclasses
import json

import pytest

from phi4_jax.checkpoint.hf_mapping import hf_tensor_shapes
from phi4_jax.model.config import PRESETS, ConfigError, Phi4Config, get_preset

# microsoft/phi-4 config.json as published (transcribed from PHI4.md's table).
PHI4_CONFIG_JSON = {
    "architectures": ["Phi3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 100257,
    "embd_pdrop": 0.0,
    "eos_token_id": 100265,
    "hidden_act": "silu",
    "hidden_size": 5120,
    "initializer_range": 0.02,
    "intermediate_size": 17920,
    "max_position_embeddings": 16384,
    "model_type": "phi3",
    "num_attention_heads": 40,
    "num_hidden_layers": 40,
    "num_key_value_heads": 10,
    "original_max_position_embeddings": 16384,
    "pad_token_id": 100349,
    "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 250000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.47.0",
    "use_cache": True,
    "vocab_size": 100352,
}

ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim", "rope_theta", "rms_norm_eps", "max_position_embeddings", "bos_token_id",
               "eos_token_id", "pad_token_id")


def arch(config):
    return {name: getattr(config, name) for name in ARCH_FIELDS}


def runtime(config):
    return {name: getattr(config, name)
            for name in ("param_dtype", "compute_dtype", "remat_policy", "attention_impl", "scan_layers",
                         "fuse_rope", "kernel_interpret")}


# ----------------------------------------------------------------------------- the phi-4 preset

def test_phi4_preset_matches_phi4_md():
    c = get_preset("phi4-14b")
    assert arch(c) == dict(
        vocab_size=100352, hidden_size=5120, intermediate_size=17920, num_layers=40, num_heads=40,
        num_kv_heads=10, head_dim=128, rope_theta=250000.0, rms_norm_eps=1e-5, max_position_embeddings=16384,
        bos_token_id=100257, eos_token_id=100265, pad_token_id=100349)
    assert c.num_heads // c.num_kv_heads == 4
    assert c.num_params == 14_659_507_200
    assert c.replace(num_layers=41).num_params - c.num_params == 340_797_440  # per layer
    assert 2 * c.num_params == 29_319_014_400  # bf16 checkpoint bytes


def test_num_params_equals_hf_tensor_count():
    for name in ("phi4-14b", "phi4-1.5b", "demo", "tiny"):
        c = get_preset(name)
        total = 0
        for shape in hf_tensor_shapes(c).values():
            n = 1
            for dim in shape:
                n *= dim
            total += n
        assert total == c.num_params, name


def test_phi4_hf_tensor_shapes_match_phi4_md():
    shapes = hf_tensor_shapes(get_preset("phi4-14b"))
    assert shapes["model.embed_tokens.weight"] == (100352, 5120)
    assert shapes["model.layers.39.self_attn.qkv_proj.weight"] == (7680, 5120)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (5120, 5120)
    assert shapes["model.layers.0.mlp.gate_up_proj.weight"] == (35840, 5120)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (5120, 17920)
    assert shapes["model.norm.weight"] == (5120,)
    assert shapes["lm_head.weight"] == (100352, 5120)
    assert len(shapes) == 3 + 40 * 6


# ----------------------------------------------------------------------------- Hugging Face config.json

def test_from_published_phi4_config_json():
    assert Phi4Config.from_hf_dict(PHI4_CONFIG_JSON) == get_preset("phi4-14b")


def test_from_transformers5_rope_parameters_style():
    transformers = pytest.importorskip("transformers")
    # transformers 5 reading phi-4's published config.json writes it back with rope_parameters.
    loaded = transformers.Phi3Config.from_dict(copy.deepcopy(PHI4_CONFIG_JSON)).to_dict()
    assert "rope_theta" not in loaded and loaded["rope_parameters"]["rope_theta"] == 250000
    assert Phi4Config.from_hf_dict(loaded) == get_preset("phi4-14b")
    # And one built from keyword arguments, with an odd tiny shape and GQA 3:1.
    hf = transformers.Phi3Config(
        vocab_size=311, hidden_size=72, intermediate_size=136, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, bos_token_id=1, eos_token_id=[2, 3],
        pad_token_id=0).to_dict()
    c = Phi4Config.from_hf_dict(hf, compute_dtype="float32")
    assert arch(c) == dict(vocab_size=311, hidden_size=72, intermediate_size=136, num_layers=3, num_heads=6,
                           num_kv_heads=2, head_dim=12, rope_theta=500000.0, rms_norm_eps=1e-6,
                           max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    assert c.compute_dtype == "float32"


def test_rope_theta_null_at_top_level_uses_rope_parameters():
    hf = dict(PHI4_CONFIG_JSON, rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 250000.0})
    assert Phi4Config.from_hf_dict(hf).rope_theta == 250000.0
    hf = dict(PHI4_CONFIG_JSON)
    del hf["rope_theta"]
    assert Phi4Config.from_hf_dict(hf).rope_theta == 10000.0  # transformers' default when absent


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_hf_dict_round_trip(name):
    c = get_preset(name)
    hf = c.to_hf_dict()
    assert json.loads(json.dumps(hf)) == hf
    assert Phi4Config.from_hf_dict(hf, **runtime(c)) == c


def test_to_hf_dict_loads_in_transformers():
    transformers = pytest.importorskip("transformers")
    c = get_preset("phi4-14b")
    hf = c.to_hf_dict()
    assert {k: v for k, v in hf.items() if k in PHI4_CONFIG_JSON and k != "transformers_version"} == {
        k: v for k, v in PHI4_CONFIG_JSON.items() if k != "transformers_version"}
    loaded = transformers.Phi3Config.from_dict(hf)
    assert (loaded.hidden_size, loaded.num_key_value_heads, loaded.rope_parameters["rope_theta"]) == (5120, 10, 250000)
    assert Phi4Config.from_hf_dict(loaded.to_dict()) == c


def test_from_hf_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(PHI4_CONFIG_JSON))
    assert Phi4Config.from_hf_file(path) == get_preset("phi4-14b")
    with pytest.raises(ConfigError, match="no config.json at"):
        Phi4Config.from_hf_file(tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        Phi4Config.from_hf_file(path)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="does not hold a JSON object"):
        Phi4Config.from_hf_file(path)


def _phi4(**changes):
    hf = copy.deepcopy(PHI4_CONFIG_JSON)
    for key, value in changes.items():
        if value is _DELETE:
            del hf[key]
        else:
            hf[key] = value
    return hf


_DELETE = object()
LONGROPE = {"type": "longrope", "short_factor": [1.0] * 64, "long_factor": [4.0] * 64}


@pytest.mark.parametrize("hf, match", [
    (_phi4(partial_rotary_factor=0.5), "partial_rotary_factor 0.5 is not supported"),
    (_phi4(rope_theta=_DELETE, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                "partial_rotary_factor": 0.75}),
     "partial_rotary_factor 0.75 is not supported"),
    (_phi4(partial_rotary_factor=None, rope_parameters={"partial_rotary_factor": 0.5}),
     "partial_rotary_factor 0.5 is not supported"),
    (_phi4(rope_scaling=LONGROPE), "rope_scaling of type 'longrope'"),
    (_phi4(rope_scaling={"type": "su", "short_factor": [1.0], "long_factor": [1.0]}), "rope_scaling of type 'su'"),
    (_phi4(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling of type 'linear'"),
    (_phi4(rope_parameters=dict(LONGROPE, rope_type="longrope", rope_theta=1e4), rope_theta=_DELETE),
     "rope_type 'longrope' is not supported"),
    (_phi4(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), "conflicting rope_theta"),
    (_phi4(sliding_window=2047), "sliding_window=2047 is not supported"),
    (_phi4(attention_bias=True), "attention_bias=true is not supported"),
    (_phi4(mlp_bias=True), "mlp_bias=true is not supported"),
    (_phi4(tie_word_embeddings=True), "tie_word_embeddings=true is not supported"),
    (_phi4(model_type="llama", architectures=["LlamaForCausalLM"]), "unsupported architecture: model_type='llama'"),
    (_phi4(model_type="phi", architectures=["PhiForCausalLM"]), "unsupported architecture: model_type='phi'"),
    (_phi4(architectures=["Phi3ForSequenceClassification"]), "unsupported architectures"),
    (_phi4(hidden_act="gelu_new"), "hidden_act 'gelu_new' is not supported"),
    (_phi4(head_dim=64), r"head_dim 64 != hidden_size / num_attention_heads = 128"),
    (_phi4(num_key_value_heads=3), r"num_heads \(40\) must be a multiple of num_kv_heads \(3\)"),
    (_phi4(num_attention_heads=48), "hidden_size 5120 is not divisible by num_attention_heads 48"),
    (_phi4(hidden_size=_DELETE), "missing required field 'hidden_size'"),
    (_phi4(vocab_size=0), "'vocab_size' must be a positive integer"),
])
def test_refuses_configs_it_would_mis_model(hf, match):
    with pytest.raises(ConfigError, match=match):
        Phi4Config.from_hf_dict(hf)


def test_refuses_transformers_built_phi3_variants():
    transformers = pytest.importorskip("transformers")
    # Phi-3-mini-128k style: longrope scaling, 2047-token sliding window.
    mini = transformers.Phi3Config(
        hidden_size=3072, num_attention_heads=32, max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48})
    with pytest.raises(ConfigError, match="'longrope' is not supported"):
        Phi4Config.from_hf_dict(mini.to_dict())
    partial = transformers.Phi3Config(hidden_size=64, num_attention_heads=4, partial_rotary_factor=0.5)
    with pytest.raises(ConfigError, match="partial_rotary_factor 0.5"):
        Phi4Config.from_hf_dict(partial.to_dict())
    windowed = transformers.Phi3Config(hidden_size=64, num_attention_heads=4, sliding_window=2047)
    with pytest.raises(ConfigError, match="sliding_window=2047"):
        Phi4Config.from_hf_dict(windowed.to_dict())


# ----------------------------------------------------------------------------- Phi4Config itself

@pytest.mark.parametrize("changes, match", [
    ({"num_kv_heads": 3}, "must be a multiple of num_kv_heads"),
    ({"head_dim": 127}, "head_dim must be even"),
    ({"rope_theta": 0.0}, "rope_theta must be positive"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps must be positive"),
    ({"num_layers": 0}, "'num_layers' must be a positive integer"),
    ({"param_dtype": "int8"}, "param_dtype must be one of"),
    ({"remat_policy": "everything"}, "remat_policy must be one of"),
    ({"attention_impl": "triton"}, "attention_impl must be one of"),
    ({"not_a_field": 1}, r"unknown config field\(s\): \['not_a_field'\]"),
])
def test_config_validation(changes, match):
    with pytest.raises(ConfigError, match=match):
        get_preset("tiny", **changes)


def test_presets_and_dict_round_trip():
    with pytest.raises(ConfigError, match="unknown model preset 'phi5'"):
        get_preset("phi5")
    for c in PRESETS.values():
        assert Phi4Config.from_dict(c.to_dict()) == c
        assert c.head_dim % 2 == 0 and c.num_heads % c.num_kv_heads == 0
    with pytest.raises(ConfigError, match="unknown config field"):
        Phi4Config.from_dict({"hidden": 3})


def test_every_field_is_architecture_or_runtime():
    # init_from lets runtime fields differ from the checkpoint's; a new field must be classified.
    from phi4_jax.model.config import RUNTIME_FIELDS
    fields = {f.name for f in dataclasses.fields(Phi4Config)}
    assert set(ARCH_FIELDS).isdisjoint(RUNTIME_FIELDS)
    assert set(ARCH_FIELDS) | set(RUNTIME_FIELDS) == fields
    assert set(runtime(get_preset("tiny"))) == set(RUNTIME_FIELDS)
