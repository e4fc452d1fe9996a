import json
import os

import pytest

from mimo_jax.config import ConfigError, MiMoConfig

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def load(name):
    with open(os.path.join(CONFIGS, name)) as f:
        return json.load(f)


def test_real_configs():
    flash = MiMoConfig.from_json(os.path.join(CONFIGS, "mimo-v2-flash.json"))
    assert flash.num_layers == 48 and sum(not s for s in flash.sliding) == 9
    assert flash.window_keys == 129 and flash.num_kv_heads == 4 and flash.swa_num_kv_heads == 8
    assert flash.layer(0).rotary_dim == 64 and not flash.moe[0] and all(flash.moe[1:])
    assert flash.routed_scaling_factor == 1.0 and flash.context_len == 262144
    assert flash.layer(1).has_sink and not flash.layer(0).has_sink
    assert flash.layer(5).rope_theta == 5_000_000 and flash.layer(1).rope_theta == 10_000
    v25 = MiMoConfig.from_json(os.path.join(CONFIGS, "mimo-v2.5.json"))
    assert v25.fused_qkv and v25.context_len == 1048576 and v25.quantization["quant_method"] == "fp8"
    pro = MiMoConfig.from_json(os.path.join(CONFIGS, "mimo-v2.5-pro.json"))
    assert pro.num_layers == 70 and sum(not s for s in pro.sliding) == 10
    assert pro.hidden_size == 6144 and pro.num_experts == 384 and pro.value_scale == 0.612


def test_nested_text_config_and_alias():
    raw = load("mimo-v2.5.json")
    nested = {
        "architectures": ["MiMoV2FlashForCausalLM"],
        "text_config": {k: v for k, v in raw.items() if k != "architectures"},
    }
    a = MiMoConfig.from_dict(raw)
    b = MiMoConfig.from_dict(nested)
    assert b.architecture == "MiMoV2FlashForCausalLM"
    assert a.replace(architecture="x") == b.replace(architecture="x")


def test_context_len_preferred():
    raw = load("mimo-v2-flash.json")
    raw["context_len"] = 4096
    assert MiMoConfig.from_dict(raw).context_len == 4096


def test_native_spelling_window_and_heads():
    native = {
        "architectures": ["MiMoV2FlashForCausalLM"],
        "model_type": "mimo_v2_flash",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "moe_intermediate_size": 4,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 6,
        "v_head_dim": 4,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": 129,
        "layer_types": ["full_attention", "sliding_attention"],
        "mlp_layer_types": ["dense", "sparse"],
    }
    cfg = MiMoConfig.from_dict(native)
    assert cfg.window_keys == 129 and cfg.swa_num_kv_heads == 2
    assert cfg.layer(1).sliding and cfg.layer(1).moe and cfg.layer(1).window_keys == 129


@pytest.mark.parametrize(
    "change, message",
    [
        ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
        ({"n_shared_experts": 1}, "n_shared_experts=1"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "rope_scaling="),
        ({"hybrid_layer_pattern": [0, 1, 1]}, "hybrid_layer_pattern has 3 entries but num_hidden_layers=48"),
        ({"moe_layer_freq": [0] * 47}, "moe_layer_freq has 47 entries"),
        ({"hybrid_layer_pattern": [2] * 48}, "hybrid_layer_pattern[0]=2"),
        ({"architectures": ["LlamaForCausalLM"]}, "architectures=['LlamaForCausalLM']"),
        ({"n_group": 3}, "n_routed_experts=256 is not divisible by n_group=3"),
        ({"num_attention_heads": 6, "swa_num_attention_heads": 6}, "num_attention_heads=6 is not a multiple"),
        ({"hidden_size": -1}, "hidden_size=-1"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ],
)
def test_rejects_unsupported(change, message):
    raw = load("mimo-v2-flash.json")
    raw.update(change)
    with pytest.raises(ConfigError) as e:
        MiMoConfig.from_dict(raw)
    assert message in str(e.value)


def test_missing_and_invalid_json(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        MiMoConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MiMoConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ConfigError, match="missing required key 'num_hidden_layers'"):
        MiMoConfig.from_json(tmp_path)


def test_run_options_are_checked_and_resolved_by_platform():
    from mimo_jax.config import RunOptions

    assert RunOptions().platform == "cpu" and RunOptions().expert_impl == "ragged"
    assert RunOptions.for_platform("cuda").platform == "gpu"
    assert RunOptions.for_platform("gpu").expert_impl == "pallas_gpu"
    assert RunOptions.for_platform("tpu", moe_impl="dense").expert_impl == "dense"
    with pytest.raises(ValueError, match="platform 'metal'"):
        RunOptions(platform="metal")
    with pytest.raises(ValueError, match="MoE strategy 'fast'"):
        RunOptions(moe_strategy="fast")
    with pytest.raises(ValueError, match="capacity_factor=0"):
        RunOptions(capacity_factor=0)
    with pytest.raises(AttributeError):  # frozen: a model's options never change after it is built
        RunOptions().moe_impl = "dense"
    # decode rounds in CUDA graphs: on by default, off on request, and only a GPU compile gets the option
    graphs = RunOptions.for_platform("gpu").decode_compiler_options
    assert "WHILE" in graphs["xla_gpu_enable_command_buffer"].split(",")
    assert RunOptions.for_platform("gpu", decode_graphs=True).decode_compiler_options == graphs
    assert RunOptions.for_platform("gpu", decode_graphs=False).decode_compiler_options is None
    assert RunOptions.for_platform("tpu").decode_compiler_options is None
    assert RunOptions.for_platform("cpu", decode_graphs=True).decode_compiler_options is None


def test_model_options_are_fixed_at_construction():
    import jax.numpy as jnp
    from flax import nnx

    from mimo_jax.config import RunOptions
    from mimo_jax.model.mimo import MiMoModel

    cfg = MiMoConfig.from_dict(
        dict(
            architectures=["MiMoV2ForCausalLM"], vocab_size=16, hidden_size=8, intermediate_size=8,
            moe_intermediate_size=4, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=4, v_head_dim=4, moe_layer_freq=[0, 1], n_routed_experts=4, num_experts_per_tok=2,
            hybrid_layer_pattern=[0, 1], sliding_window_size=2, rope_theta=10000.0, swa_rope_theta=1000.0,
        )
    )
    model = MiMoModel(cfg, rngs=nnx.Rngs(0), options=RunOptions(moe_impl="dense", attention_impl="split"))
    setters = ("set_moe_impl", "set_attention_impl", "set_moe_strategy", "set_expert_layout")
    assert not any(hasattr(model, name) for name in setters)  # nothing changes a built model's graph
    assert {m.impl for m in model.moe_layers()} == {"dense"}
    assert {layer.self_attn.impl for layer in model.layers} == {"split"}
    view = model.with_options(RunOptions(moe_impl="ragged"))
    assert {m.impl for m in view.moe_layers()} == {"ragged"} and {m.impl for m in model.moe_layers()} == {"dense"}
    ids = jnp.arange(6, dtype=jnp.int32)[None]
    assert jnp.allclose(view(ids)[0], model(ids)[0], atol=1e-5)
    with pytest.raises(ValueError, match="unknown MoE implementation 'nope'"):
        MiMoModel(cfg, options=RunOptions(moe_impl="nope"))
    with pytest.raises(ValueError, match="unknown attention implementation 'nope'"):
        MiMoModel(cfg, options=RunOptions(attention_impl="nope"))


POSITIVE = "expected a positive number"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("rope_theta", "big", POSITIVE),
        ("rope_theta", 0, POSITIVE),
        ("rope_theta", -10000.0, POSITIVE),
        ("swa_rope_theta", None, POSITIVE),
        ("swa_rope_theta", [10000], POSITIVE),
        ("attention_value_scale", "x", POSITIVE),
        ("routed_scaling_factor", "x", POSITIVE),
        ("routed_scaling_factor", True, POSITIVE),
        ("partial_rotary_factor", "half", "expected a number in (0, 1]"),
        ("layernorm_epsilon", None, "expected a number >= 0"),
        ("layernorm_epsilon", -1e-05, "expected a number >= 0"),
        ("max_position_embeddings", "x", "expected a positive integer"),
        ("max_position_embeddings", 0, "expected a positive integer"),
        ("max_position_embeddings", -4096, "expected a positive integer"),
        ("context_len", 0, "expected a positive integer"),
        ("eos_token_id", "x", "expected token ids in [0, vocab_size=152576)"),
        ("eos_token_id", 152576, "expected token ids in [0, vocab_size=152576)"),
        ("eos_token_id", [151645, -1], "expected token ids in [0, vocab_size=152576)"),
        ("topk_method", "greedy", "is not supported (supported: 'noaux_tc')"),
        ("topk_method", "group_limited_greedy", "is not supported (supported: 'noaux_tc')"),
        ("n_group", "x", "expected a positive integer"),
    ],
)
def test_bad_values_name_file_key_and_value(tmp_path, key, value, expected):
    raw = load("mimo-v2-flash.json")
    raw[key] = value
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as e:
        MiMoConfig.from_json(tmp_path)
    sep = " " if expected.startswith("is not") else ": "
    assert str(e.value) == f"{tmp_path / 'config.json'}: {key}={value!r}{sep}{expected}"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["rope_parameters"]["full_attention"].update(rope_theta="big"),
            f"rope_parameters.full_attention.rope_theta='big': {POSITIVE}",
        ),
        (
            lambda c: c["rope_parameters"]["sliding_attention"].update(rope_theta=0),
            f"rope_parameters.sliding_attention.rope_theta=0: {POSITIVE}",
        ),
        (lambda c: c.update(rms_norm_eps=-1.0), "rms_norm_eps=-1.0: expected a number >= 0"),
    ],
)
def test_bad_values_in_transformers_spelling(edit, message):
    native = {
        "architectures": ["MiMoV2FlashForCausalLM"],
        "model_type": "mimo_v2_flash",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 6,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.334},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.334},
        },
    }
    MiMoConfig.from_dict(native)
    edit(native)
    with pytest.raises(ConfigError) as e:
        MiMoConfig.from_dict(native)
    assert str(e.value).endswith(message)


def test_edge_values_accepted():
    raw = load("mimo-v2-flash.json")
    raw.update(layernorm_epsilon=0, eos_token_id=[0, 152575], rope_theta=5_000_000, max_position_embeddings=1)
    cfg = MiMoConfig.from_dict(raw)
    assert cfg.rms_norm_eps == 0.0 and cfg.eos_token_ids == (0, 152575) and cfg.context_len == 1
    raw.update(eos_token_id=7, topk_method=None, routed_scaling_factor=2.5, attention_value_scale=None)
    cfg = MiMoConfig.from_dict(raw)
    assert cfg.eos_token_ids == (7,) and cfg.routed_scaling_factor == 2.5 and cfg.value_scale == 1.0


def test_mtp_hidden_wiring_is_a_checkpoint_option(tmp_path):
    """MTP layers read the post-norm hidden state unless a checkpoint's config says it was trained on the residual."""
    from mimo_jax.weights.demo import demo_model_dir

    demo = json.loads((demo_model_dir() / "config.json").read_text())
    demo.pop("mtp_hidden_before_norm", None)  # whichever wiring the shipped demo was trained on
    assert not MiMoConfig.from_dict(demo).mtp_hidden_before_norm  # the released checkpoints' wiring
    assert MiMoConfig.from_dict({**demo, "mtp_hidden_before_norm": True}).mtp_hidden_before_norm
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**demo, "mtp_hidden_before_norm": "yes"}))
    with pytest.raises(ConfigError, match="mtp_hidden_before_norm='yes'"):
        MiMoConfig.from_json(str(path))
