"""HF checkpoint load/save: export to transformers, bit-exact round trips, config forms, errors."""
import json
import os
import re
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from tepo_jax.checkpoints import CheckpointError, load_hf, load_hf_config, save_hf
from tepo_jax.checkpoints.safetensors_io import SafetensorsReader, write_safetensors
from tepo_jax.models.config import ModelConfig, UnsupportedConfigError, from_hf_config
from tepo_jax.testing.hf_models import hf_logits, make_tiny_hf_checkpoint

LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)
SMALL = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)


def _all_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory (any number of shards), by name."""
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            reader = SafetensorsReader(os.path.join(path, name))
            for key in reader.keys():
                assert key not in out, f"{key} stored twice"
                out[key] = np.array(reader.get(key))
    return out


def _assert_bit_exact(src, dst):
    a, b = _all_tensors(src), _all_tensors(dst)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), key


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen"))
    return path, make_tiny_hf_checkpoint(path, "qwen2", **SMALL, head_dim=12)


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    """bf16 Llama 3.1 with llama3 scaling, saved by transformers in several shards."""
    path = str(tmp_path_factory.mktemp("llama"))
    model = make_tiny_hf_checkpoint(path, "llama", **SMALL, rope_scaling=LLAMA3, dtype="bfloat16",
                                    max_shard_size="20KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    return path, model


def test_round_trip_fp16_bit_exact(tmp_path):
    path = str(tmp_path / "fp16")
    make_tiny_hf_checkpoint(path, "qwen2", **SMALL, dtype="float16", tie_word_embeddings=True)
    model = load_hf(path)
    assert model.embed[...].dtype == jnp.float16 and model.cfg.dtype == jnp.float16
    save_hf(model, tmp_path / "out")
    _assert_bit_exact(path, tmp_path / "out")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _our_logits(model, tokens) -> np.ndarray:
    tokens = jnp.asarray(tokens)
    return np.asarray(model(tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape))[0])


def _assert_logits_match_transformers(path, model):
    """Our logits for `model` vs transformers' own load of checkpoint `path` (fp32: <= 1e-4)."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tokens = np.random.RandomState(3).randint(0, 64, (2, 19))
    np.testing.assert_allclose(_our_logits(model, tokens), hf_logits(reference, tokens), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- export and round trips


def test_export_loads_in_transformers_with_identical_logits(qwen, tmp_path):
    path, torch_model = qwen
    save_hf(load_hf(path), tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == "Qwen2ForCausalLM"
    tokens = np.random.RandomState(0).randint(0, 64, (2, 17))
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(torch_model, tokens))


def test_round_trip_fp32_bit_exact(qwen, tmp_path):
    path, _ = qwen
    save_hf(load_hf(path), tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    _assert_bit_exact(path, tmp_path / "out")
    assert load_hf_config(tmp_path / "out") == load_hf_config(path)


def test_round_trip_bf16_multishard_bit_exact(llama_bf16, tmp_path):
    path, torch_model = llama_bf16
    model = load_hf(path)
    assert model.embed[...].dtype == jnp.bfloat16 and model.cfg.rope_scaling is not None
    save_hf(model, tmp_path / "out", max_shard_bytes=16_000)
    files = os.listdir(tmp_path / "out")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    _assert_bit_exact(path, tmp_path / "out")
    assert _all_tensors(tmp_path / "out")["lm_head.weight"].dtype == ml_dtypes.bfloat16
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.dtype == torch.bfloat16
    tokens = np.random.RandomState(1).randint(0, 64, (1, 40))
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(torch_model, tokens))


def test_bf16_loaded_as_fp32_and_saved_as_bf16_is_bit_exact(llama_bf16, tmp_path):
    path, _ = llama_bf16
    model = load_hf(path, param_dtype=jnp.float32)
    assert model.layers[0].attn.q_proj[...].dtype == jnp.float32 and model.cfg.dtype == jnp.float32
    save_hf(model, tmp_path / "out", dtype=jnp.bfloat16)
    _assert_bit_exact(path, tmp_path / "out")
    assert json.load(open(tmp_path / "out" / "config.json"))["dtype"] == "bfloat16"


def test_save_over_existing_checkpoint_removes_stale_shards(llama_bf16, tmp_path):
    path, _ = llama_bf16
    out = _copy(path, tmp_path / "out")
    save_hf(load_hf(path), out)  # one file now; the old shards and index must be gone
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"]
    _assert_bit_exact(path, out)


def _random_decoder(cfg: ModelConfig):
    """A Decoder for `cfg` with every parameter random (biases are initialised to zero, and a
    zero bias that an export drops would go unnoticed)."""
    import jax
    from flax import nnx

    from tepo_jax.models.decoder import Decoder

    model = Decoder(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    noise = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, noise))
    return model


TINY_CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, rope_theta=10_000.0)


def test_llama_with_attention_bias_exports_to_transformers(tmp_path):
    model = _random_decoder(ModelConfig(family="llama", qkv_bias=True, o_bias=True, **TINY_CFG))
    save_hf(model, tmp_path / "out")
    assert json.load(open(tmp_path / "out" / "config.json"))["attention_bias"] is True
    _assert_logits_match_transformers(tmp_path / "out", model)


UNDESCRIBABLE_BIASES = {  # ModelConfig fields config.json cannot express: expected message
    "llama_qkv_only": (dict(family="llama", qkv_bias=True), r"Llama config with qkv_bias=True and o_bias=False"),
    "llama_o_only": (dict(family="llama", o_bias=True), r"Llama config with qkv_bias=False and o_bias=True"),
    "qwen2_no_qkv": (dict(family="qwen2", qkv_bias=False), r"Qwen2 config with qkv_bias=False"),
    "qwen2_o_bias": (dict(family="qwen2", qkv_bias=True, o_bias=True), r"Qwen2 config with o_bias or mlp_bias"),
}


@pytest.mark.parametrize("case", sorted(UNDESCRIBABLE_BIASES))
def test_export_of_biases_config_json_cannot_describe_is_refused(qwen, tmp_path, case):
    """transformers would silently drop such biases; the refusal comes before an existing
    checkpoint in the target directory is touched."""
    fields, match = UNDESCRIBABLE_BIASES[case]
    out = _copy(qwen[0], tmp_path / "out")
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    with pytest.raises(UnsupportedConfigError, match=match):
        save_hf(_random_decoder(ModelConfig(**fields, **TINY_CFG)), out)
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before


# ---------------------------------------------------------------- config.json forms


def _old_form(new: dict) -> dict:
    """The pre-v5 transformers layout: rope_theta / rope_scaling / torch_dtype."""
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "dtype")}
    rope = dict(new["rope_parameters"])
    old["rope_theta"] = rope.pop("rope_theta")
    old["torch_dtype"] = new["dtype"]
    old["rope_scaling"] = None if rope["rope_type"] == "default" else {**rope, "type": rope.pop("rope_type")}
    return old


def test_config_old_and_new_forms_agree(llama_bf16, tmp_path):
    path, torch_model = llama_bf16
    new = json.load(open(os.path.join(path, "config.json")))
    assert "rope_parameters" in new and "rope_scaling" not in new
    old = _old_form(new)
    assert from_hf_config(old) == from_hf_config(new)
    cfg = from_hf_config(old)
    assert cfg.rope_scaling.original_max_position_embeddings == 32 and cfg.rope_theta == 500_000.0
    assert cfg.param_dtype == jnp.bfloat16 and cfg.family == "llama" and not cfg.qkv_bias
    # The old form also loads end to end, and gives the same model.
    out = _copy(path, tmp_path / "old")
    json.dump(old, open(os.path.join(out, "config.json"), "w"))
    a, b = load_hf(out, param_dtype=jnp.float32), load_hf(path, param_dtype=jnp.float32)
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, 64, (1, 50)))
    positions = jnp.arange(50)[None]
    np.testing.assert_array_equal(np.asarray(a(tokens, positions)[0]), np.asarray(b(tokens, positions)[0]))


def test_qwen_config_defaults(qwen):
    # The builder randomises norms and biases too, so the parity tests exercise them.
    params = dict(qwen[1].named_parameters())
    assert (params["model.layers.0.input_layernorm.weight"] != 1).all()
    assert params["model.layers.1.self_attn.v_proj.bias"].abs().min() > 0
    cfg = load_hf_config(qwen[0])
    assert cfg.family == "qwen2" and cfg.qkv_bias and not cfg.o_bias and cfg.head_dim == 12
    assert cfg.rope_scaling is None and cfg.rope_theta == 1_000_000.0 and cfg.num_kv_heads == 2


def test_qwen2_ignores_attention_bias_and_mlp_bias_like_transformers(qwen, tmp_path):
    """Qwen2 always has q/k/v biases and never o_proj / MLP ones; transformers ignores the two
    fields for it, so a config.json that sets them must still load (and export)."""
    out = _edit_config(qwen[0], tmp_path / "c", lambda c: c.update(attention_bias=True, mlp_bias=True))
    model = load_hf(out)
    assert model.cfg == load_hf_config(qwen[0])
    _assert_logits_match_transformers(out, model)


# ---------------------------------------------------------------- errors


def _rewrite(file, edit):
    reader = SafetensorsReader(file)
    tensors = {k: np.array(reader.get(k)) for k in reader.keys()}
    edit(tensors)
    write_safetensors(file, tensors)


def _one_line_error(path, match, **kw):
    with pytest.raises(CheckpointError, match=match) as info:
        load_hf(path, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_key(qwen, tmp_path):
    out = _copy(qwen[0], tmp_path / "c")
    _rewrite(os.path.join(out, "model.safetensors"),
             lambda t: [t.pop(f"model.layers.1.self_attn.{p}_proj.bias") for p in "kv"])
    msg = _one_line_error(out, r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.bias'")
    assert msg == (f"{out}: missing tensor 'model.layers.1.self_attn.k_proj.bias' (and 1 more); "
                   "model.safetensors does not hold it")


@pytest.mark.parametrize("in_index", [True, False])
def test_missing_key_in_sharded_checkpoint_says_what_the_index_lists(llama_bf16, tmp_path, in_index):
    out = _copy(llama_bf16[0], tmp_path / "c")
    key = "model.layers.1.mlp.up_proj.weight"
    file, index = _index(out)
    shard = index["weight_map"][key]
    _rewrite(os.path.join(out, shard), lambda t: t.pop(key))
    if not in_index:
        del index["weight_map"][key]
        json.dump(index, open(file, "w"))
    where = f"model.safetensors.index.json lists it in {shard}, which does not hold it" if in_index else \
        "model.safetensors.index.json does not list it"
    _one_line_error(out, rf"^{re.escape(out)}: missing tensor {re.escape(repr(key))}; {re.escape(where)}$")


def test_unexpected_key(qwen, tmp_path):
    out = _copy(qwen[0], tmp_path / "c")
    _rewrite(os.path.join(out, "model.safetensors"),
             lambda t: t.update({"model.layers.0.mlp.up_proj.bias": np.zeros(96, np.float32)}))
    msg = _one_line_error(out, r"unexpected tensor 'model\.layers\.0\.mlp\.up_proj\.bias'")
    assert msg.endswith(os.path.join(out, "model.safetensors"))


def _add_inv_freq(tensors):
    """Rotary buffers as Llama-2-era conversions store them (wrong values on purpose: they
    must be ignored, as transformers ignores them)."""
    for i in range(SMALL["num_layers"]):
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)


def test_rotary_inv_freq_buffers_are_ignored_like_transformers(tmp_path):
    path = str(tmp_path / "llama")
    make_tiny_hf_checkpoint(path, "llama", **SMALL)
    _rewrite(os.path.join(path, "model.safetensors"), _add_inv_freq)
    _assert_logits_match_transformers(path, load_hf(path))


def test_misshaped_key(qwen, tmp_path):
    out = _copy(qwen[0], tmp_path / "c")
    _rewrite(os.path.join(out, "model.safetensors"),
             lambda t: t.update({"model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"][:-1]}))
    _one_line_error(out, r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight' .* shape \[95, 32\], expected \[96, 32\]")


def test_tied_checkpoint_with_lm_head(tmp_path):
    """Tied: lm_head.weight is not expected; tolerated only when it equals the embedding."""
    path = str(tmp_path / "tied")
    make_tiny_hf_checkpoint(path, "qwen2", **SMALL, tie_word_embeddings=True)
    file = os.path.join(path, "model.safetensors")
    assert "lm_head.weight" not in SafetensorsReader(file).keys()  # transformers omits it
    _rewrite(file, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    assert load_hf(path).cfg.tie_word_embeddings
    # The copy is accepted alongside ignored buffers, and does not hide a real extra tensor.
    _rewrite(file, _add_inv_freq)
    _assert_logits_match_transformers(path, load_hf(path))
    _rewrite(file, lambda t: t.update({"model.layers.0.mlp.up_proj.bias": np.zeros(96, np.float32)}))
    _one_line_error(path, r"unexpected tensor 'model\.layers\.0\.mlp\.up_proj\.bias'")
    _rewrite(file, lambda t: t.pop("model.layers.0.mlp.up_proj.bias"))
    # A different head: transformers unties and uses it; we say how to get that.
    _rewrite(file, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    _one_line_error(path, rf"^{re.escape(path)}: tie_word_embeddings is true but lm_head\.weight differs "
                          r"from model\.embed_tokens\.weight \(max abs diff 1\); set tie_word_embeddings "
                          r"to false in config\.json to load the stored head$")


def test_untied_checkpoint_without_lm_head(qwen, tmp_path):
    out = _copy(qwen[0], tmp_path / "c")
    _rewrite(os.path.join(out, "model.safetensors"), lambda t: t.pop("lm_head.weight"))
    _one_line_error(out, rf"^{re.escape(out)}: missing tensor 'lm_head\.weight'; model\.safetensors does not hold it$")


def test_wrong_path(tmp_path):
    _one_line_error(tmp_path / "nope", r"nope: no such checkpoint directory")
    os.makedirs(tmp_path / "empty")
    _one_line_error(tmp_path / "empty", r"config\.json: not found")


def test_unsupported_architecture(qwen, tmp_path):
    out = _copy(qwen[0], tmp_path / "c")
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    _one_line_error(out, r"config\.json: unsupported architecture \['GPT2LMHeadModel'\]")


def test_truncated_safetensors(llama_bf16, tmp_path):
    out = _copy(llama_bf16[0], tmp_path / "c")
    shard = os.path.join(out, next(f for f in os.listdir(out) if f.startswith("model-00002-of-")))
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 10)
    _one_line_error(out, r"model-00002-of-\d+\.safetensors: unreadable safetensors file")


def test_missing_shard(llama_bf16, tmp_path):
    out = _copy(llama_bf16[0], tmp_path / "c")
    shard = sorted(f for f in os.listdir(out) if f.startswith("model-"))[0]
    os.remove(os.path.join(out, shard))
    _one_line_error(out, rf"{shard}: listed in model\.safetensors\.index\.json but missing")


def test_tensors_are_sliced_per_device_before_any_host_copy(llama_bf16):
    """load_hf reads each tensor as a view of the memory-mapped file (the name map's transposes
    are strided views) and converts only each device's slice, so no tensor is ever copied whole
    on the host first; sharded over 8 devices (bf16 file, fp32 params) it equals one device."""
    import jax
    from flax import nnx

    from tepo_jax.checkpoints import hf
    from tepo_jax.checkpoints.name_map import name_map
    from tepo_jax.models.decoder import build_abstract
    from tepo_jax.sharding import MeshConfig, make_mesh

    path = llama_bf16[0]
    cfg = load_hf_config(path, param_dtype=jnp.float32)
    targets = nnx.to_pure_dict(nnx.state(build_abstract(cfg)))
    by_tensor = hf._open_shards(path)
    kinds = set()
    for rule in name_map(cfg):
        reader = by_tensor[rule.hf_name]
        value = hf._read_tensor(rule, reader, hf._get(targets, rule.path))
        assert value.dtype == ml_dtypes.bfloat16 and np.may_share_memory(value, reader.get(rule.hf_name)), rule.hf_name
        kinds.add(rule.kind)
    assert len(kinds) == 3  # copies, input-first linears, o_proj
    sharded = load_hf(path, mesh=make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), param_dtype=jnp.float32)
    plain = dict(nnx.to_flat_state(nnx.state(load_hf(path, param_dtype=jnp.float32), nnx.Param)))
    for p, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
        assert var[...].dtype == jnp.float32 and len(var[...].sharding.device_set) == 8, p
        np.testing.assert_array_equal(np.asarray(jax.device_get(var[...])), np.asarray(plain[p][...]), err_msg=str(p))


# ---------------------------------------------------------------- malformed config.json / index / values


def _edit_config(src, dst, edit) -> str:
    """A copy of checkpoint `src` whose config.json is `edit(cfg)` (or cfg edited in place)."""
    out = _copy(src, dst)
    file = os.path.join(out, "config.json")
    cfg = json.load(open(file))
    result = edit(cfg)
    json.dump(cfg if result is None else result, open(file, "w"))
    return out


_LLAMA3_STR_FACTOR = dict(rope_type="llama3", factor="8", low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32)
MALFORMED_CONFIGS = {  # name: (edit of the qwen fixture's config.json, expected message)
    "heads_zero": (lambda c: c.update(num_attention_heads=0, head_dim=None),
                   r"num_attention_heads must be a positive integer, got 0"),
    "kv_heads_negative": (lambda c: c.update(num_key_value_heads=-2),
                          r"num_key_value_heads must be a positive integer, got -2"),
    "kv_heads_zero": (lambda c: c.update(num_key_value_heads=0),
                      r"num_key_value_heads must be a positive integer, got 0"),
    "heads_not_multiple_of_kv": (lambda c: c.update(num_attention_heads=5),
                                 r"num_attention_heads=5 is not a multiple of num_key_value_heads=2"),
    "hidden_not_divisible": (lambda c: c.update(num_attention_heads=6, head_dim=None),
                             r"hidden_size=32 is not divisible by num_attention_heads=6"),
    "hidden_str": (lambda c: c.update(hidden_size="thirty-two"),
                   r"hidden_size must be a positive integer, got 'thirty-two'"),
    "hidden_float": (lambda c: c.update(hidden_size=32.0), r"hidden_size must be a positive integer, got 32\.0"),
    "vocab_bool": (lambda c: c.update(vocab_size=True), r"vocab_size must be a positive integer, got True"),
    "vocab_null": (lambda c: c.update(vocab_size=None), r"vocab_size must be a positive integer, got None"),
    "eps_str": (lambda c: c.update(rms_norm_eps="tiny"), r"rms_norm_eps must be a finite number > 0, got 'tiny'"),
    "eps_nan": (lambda c: c.update(rms_norm_eps=float("nan")), r"rms_norm_eps must be a finite number > 0, got nan"),
    "theta_zero": (lambda c: c["rope_parameters"].update(rope_theta=0),
                   r"rope_parameters\.rope_theta must be a finite number > 0, got 0"),
    "llama3_factor_str": (lambda c: c["rope_parameters"].update(_LLAMA3_STR_FACTOR),
                          r"rope_parameters\.factor must be a finite number > 0, got '8'"),
    "tie_str": (lambda c: c.update(tie_word_embeddings="false"), r"tie_word_embeddings must be true or false"),
    "eos_str": (lambda c: c.update(eos_token_id="</s>"), r"eos_token_id must be a token id"),
    "top_level_list": (lambda c: [c], r"the top level must be a JSON object, got list"),
    "rope_scaling_str": (lambda c: c.update(rope_scaling="llama3"),
                         r"rope_scaling must be an object or null, got 'llama3'"),
    "architectures_str": (lambda c: c.update(architectures="Qwen2ForCausalLM"),
                          r"architectures must be a list of class names"),
    "architecture_unsupported": (lambda c: c.update(architectures=["Qwen3ForCausalLM"]),
                                 r"unsupported architecture \['Qwen3ForCausalLM'\] in architectures"),
    "architecture_vs_model_type": (lambda c: c.update(architectures=["LlamaForCausalLM"]),
                                   r"architectures \['LlamaForCausalLM'\] does not match model_type 'qwen2'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_CONFIGS))
def test_malformed_config_field_is_a_one_line_error_naming_it(qwen, tmp_path, case):
    edit, match = MALFORMED_CONFIGS[case]
    out = _edit_config(qwen[0], tmp_path / "c", edit)
    msg = _one_line_error(out, match)
    assert msg.startswith(os.path.join(out, "config.json") + ": "), msg


def test_quantized_checkpoint_is_refused_before_its_tensors(qwen, tmp_path):
    out = _edit_config(qwen[0], tmp_path / "c", lambda c: c.update(quantization_config={"quant_method": "fp8"}))
    msg = _one_line_error(out, "quantized")
    assert msg == (f"{os.path.join(out, 'config.json')}: quantized checkpoint (quant_method fp8) is not "
                   "supported; use the unquantized (bf16/fp16/fp32) weights")


def _index(path) -> tuple[str, dict]:
    file = os.path.join(path, "model.safetensors.index.json")
    return file, json.load(open(file))


def test_index_weight_map_value_not_a_file_name(llama_bf16, tmp_path):
    out = _copy(llama_bf16[0], tmp_path / "c")
    file, index = _index(out)
    index["weight_map"]["model.norm.weight"] = [index["weight_map"]["model.norm.weight"]]
    json.dump(index, open(file, "w"))
    msg = _one_line_error(out, r"weight_map\['model\.norm\.weight'\] must be a file name")
    assert msg.startswith(file + ": "), msg


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_index_pointing_outside_the_checkpoint_is_refused(llama_bf16, tmp_path, where):
    """A shard moved next to the checkpoint and named by `../` or an absolute path would load;
    a checkpoint must be self-contained."""
    out = _copy(llama_bf16[0], tmp_path / "c")
    file, index = _index(out)
    shard = sorted(set(index["weight_map"].values()))[1]
    os.makedirs(tmp_path / "other")
    shutil.move(os.path.join(out, shard), tmp_path / "other" / shard)
    moved = f"../other/{shard}" if where == "relative" else str(tmp_path / "other" / shard)
    index["weight_map"] = {k: moved if v == shard else v for k, v in index["weight_map"].items()}
    json.dump(index, open(file, "w"))
    key = min(k for k, v in index["weight_map"].items() if v == moved)
    _one_line_error(out, rf"weight_map\[{key!r}\] = {re.escape(repr(moved))} points outside the checkpoint directory")


@pytest.mark.parametrize("case", ["nan_fp32", "inf_bf16_shard_on_mesh", "fp16_overflow"])
def test_non_finite_tensor_is_refused(qwen, llama_bf16, tmp_path, case):
    """Checked per device slice as it is converted (also on a mesh, and after a conversion to a
    narrower dtype, which may overflow); the message names the tensor and its file (the shard,
    for a sharded checkpoint)."""
    from tepo_jax.sharding import MeshConfig, make_mesh

    src, key = (llama_bf16[0], "model.layers.1.self_attn.o_proj.weight") if "bf16" in case else \
        (qwen[0], "model.layers.1.mlp.down_proj.weight")
    out = _copy(src, tmp_path / "c")
    file = next(os.path.join(out, f) for f in sorted(os.listdir(out))
                if f.endswith(".safetensors") and key in SafetensorsReader(os.path.join(out, f)).keys())

    def edit(t):
        w = t[key].copy()
        w[3, 5] = {"nan_fp32": np.nan, "inf_bf16_shard_on_mesh": np.inf, "fp16_overflow": 1e6}[case]
        t[key] = w

    _rewrite(file, edit)
    kw = {"mesh": make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))} if "mesh" in case else {}
    if case == "fp16_overflow":
        kw["param_dtype"] = jnp.float16
    what = "values that overflow the parameter dtype float16" if case == "fp16_overflow" else "NaN or inf values"
    _one_line_error(out, rf"tensor {re.escape(repr(key))} in {re.escape(file)} has {what}", **kw)
