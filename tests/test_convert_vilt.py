"""convert-vilt refusals and the `model.init_from` path into ScanFormer (no torch).

Sources here are Hugging Face ViLT directories written with numpy + safetensors
(keys and shapes as `ViltForMaskedLM.save_pretrained` writes them); parity with the
real HF model is in test_vilt.py.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from scanformer_jax import convert_vilt, vilt
from scanformer_jax.cli import convert_vilt as convert_cmd

HF_CONFIG = dict(vocab_size=37, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=40, max_position_embeddings=12, type_vocab_size=2,
                 modality_type_vocab_size=2, image_size=24, patch_size=8, layer_norm_eps=1e-12,
                 hidden_act="gelu", qkv_bias=True, max_image_length=-1, model_type="vilt")


def hf_state_dict(c: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Random tensors under ViltForMaskedLM's key names (backbone under `vilt.`)."""
  d, m, p = c["hidden_size"], c["intermediate_size"], c["patch_size"]
  n = (c["image_size"] // p) ** 2
  shapes = {
      "embeddings.text_embeddings.word_embeddings.weight": (c["vocab_size"], d),
      "embeddings.text_embeddings.position_embeddings.weight": (c["max_position_embeddings"], d),
      "embeddings.text_embeddings.token_type_embeddings.weight": (c["type_vocab_size"], d),
      "embeddings.text_embeddings.LayerNorm.weight": (d,),
      "embeddings.text_embeddings.LayerNorm.bias": (d,),
      "embeddings.cls_token": (1, 1, d),
      "embeddings.position_embeddings": (1, n + 1, d),
      "embeddings.patch_embeddings.projection.weight": (d, 3, p, p),
      "embeddings.patch_embeddings.projection.bias": (d,),
      "embeddings.token_type_embeddings.weight": (c["modality_type_vocab_size"], d),
      "layernorm.weight": (d,), "layernorm.bias": (d,),
      "pooler.dense.weight": (d, d), "pooler.dense.bias": (d,),
  }
  for i in range(c["num_hidden_layers"]):
    pre = f"encoder.layer.{i}"
    for name, shape in (("attention.attention.query", (d, d)), ("attention.attention.key", (d, d)),
                        ("attention.attention.value", (d, d)), ("attention.output.dense", (d, d)),
                        ("intermediate.dense", (m, d)), ("output.dense", (d, m)),
                        ("layernorm_before", None), ("layernorm_after", None)):
      shapes[f"{pre}.{name}.weight"] = shape or (d,)
      shapes[f"{pre}.{name}.bias"] = (shape or (d,))[:1]
  state = {f"vilt.{k}": rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  state["mlm_score.transform.dense.weight"] = rng.normal(size=(d, d)).astype(np.float32)
  state["mlm_score.bias"] = np.zeros((c["vocab_size"],), np.float32)
  return state


def write_hf_dir(path, config=None, state=None, seed=0):
  config = dict(HF_CONFIG, **(config or {}))
  path.mkdir(parents=True, exist_ok=True)
  state = hf_state_dict(config, np.random.default_rng(seed)) if state is None else state
  save_file(state, str(path / "model.safetensors"))
  (path / "config.json").write_text(json.dumps(config))
  (path / "vocab.txt").write_text("[PAD]\n[UNK]\n")
  return state


def run_cli(capsys, *argv):
  capsys.readouterr()
  code = convert_cmd.main(list(argv))
  out = capsys.readouterr()
  return code, out.out, out.err


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(HF state dict, converted directory)."""
  root = tmp_path_factory.mktemp("conv")
  state = write_hf_dir(root / "hf")
  assert convert_cmd.main(["--src", str(root / "hf"), "--out", str(root / "out")]) == 0
  return state, root / "out"


def test_values_land_in_our_layout(converted):
  state, out = converted
  params, cfg = vilt.load(out)
  assert (cfg.hidden_size, cfg.num_heads, cfg.pos_grid_size, cfg.image_sizes) == (
      24, 2, 3, (32, 64, 128))
  np.testing.assert_array_equal(params["layers_1"]["attn"]["query"]["kernel"],
                                state["vilt.encoder.layer.1.attention.attention.query.weight"].T)
  np.testing.assert_array_equal(params["patch_embed"]["kernel"],
                                state["vilt.embeddings.patch_embeddings.projection.weight"]
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["pos_embed"],
                                state["vilt.embeddings.position_embeddings"][0])
  np.testing.assert_array_equal(params["cls_token"], state["vilt.embeddings.cls_token"][0, 0])
  np.testing.assert_array_equal(params["text_embed"]["norm"]["scale"],
                                state["vilt.embeddings.text_embeddings.LayerNorm.weight"])
  assert (out / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"


def test_missing_tensor_is_refused(tmp_path, capsys):
  state = hf_state_dict(HF_CONFIG, np.random.default_rng(0))
  del state["vilt.encoder.layer.1.output.dense.bias"]
  write_hf_dir(tmp_path / "hf", state=state)
  code, out, err = run_cli(capsys, "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "o"))
  assert code == 2 and "Traceback" not in err + out
  assert "missing tensor encoder.layer.1.output.dense.bias" in err
  assert not (tmp_path / "o").exists()


def test_shape_mismatch_is_refused(tmp_path, capsys):
  state = hf_state_dict(dict(HF_CONFIG, intermediate_size=32), np.random.default_rng(0))
  write_hf_dir(tmp_path / "hf", state=state)  # config.json still says 40
  code, _, err = run_cli(capsys, "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "o"))
  assert code == 2 and "Traceback" not in err
  assert "shape mismatch: encoder.layer.0.intermediate.dense.weight is [32, 24]" in err


def test_bad_sources_are_refused(tmp_path, capsys):
  code, _, err = run_cli(capsys, "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
  assert code == 2 and "does not exist" in err
  write_hf_dir(tmp_path / "hf", config=dict(modality_type_vocab_size=3))
  code, _, err = run_cli(capsys, "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "o"))
  assert code == 2 and "modality_type_vocab_size=3" in err


def test_existing_output_needs_force(capsys, tmp_path):
  write_hf_dir(tmp_path / "hf")
  args = ["--src", str(tmp_path / "hf"), "--out", str(tmp_path / "o")]
  assert run_cli(capsys, *args)[0] == 0
  code, _, err = run_cli(capsys, *args)
  assert code == 2 and "--force" in err
  assert run_cli(capsys, *args, "--force")[0] == 0


def _fake_scanformer_params(cfg):
  """A ScanFormer-shaped tree without model.py: backbone + ScanFormer-only leaves."""
  flat = {k: np.zeros(s, np.float32) for k, s in vilt.param_shapes(cfg).items()
          if k[0] not in vilt.VILT_ONLY_GROUPS}
  params = {"backbone": traverse_util.unflatten_dict(flat)}
  params["reg_tokens"] = np.ones((cfg.num_scales, cfg.hidden_size), np.float32)
  params["box_head"] = {"out": {"kernel": np.ones((cfg.hidden_size, 4), np.float32)}}
  return {"params": params}


def test_init_from_copies_backbone_keeps_the_rest(converted):
  state, out = converted
  params, cfg = vilt.load(out)
  fresh = _fake_scanformer_params(cfg)
  loaded, summary = vilt.init_scanformer_from_vilt(fresh, str(out), cfg)
  assert set(loaded) == {"params"}
  got = loaded["params"]
  np.testing.assert_array_equal(got["backbone"]["layers_0"]["mlp"]["fc1"]["kernel"],
                                params["layers_0"]["mlp"]["fc1"]["kernel"])
  np.testing.assert_array_equal(got["backbone"]["modality_embed"]["embedding"],
                                state["vilt.embeddings.token_type_embeddings.weight"])
  np.testing.assert_array_equal(got["reg_tokens"], fresh["params"]["reg_tokens"])
  assert "initialised fresh: box_head, reg_tokens" in summary
  assert "unused from ViLT: cls_token, pooler" in summary


def test_init_reg_from_vilt_cls(converted):
  """train.init_reg_from_vilt_cls: every REG_s starts as ViLT's image [CLS]."""
  state, out = converted
  params, cfg = vilt.load(out)
  fresh = _fake_scanformer_params(cfg)
  loaded, summary = vilt.init_scanformer_from_vilt(fresh, str(out), cfg, reg_from_cls=True)
  reg = loaded["params"]["reg_tokens"]  # [S, D]
  cls = state["vilt.embeddings.cls_token"].reshape(-1)  # [D]
  assert reg.shape == (cfg.num_scales, cfg.hidden_size)
  for s in range(cfg.num_scales):
    np.testing.assert_array_equal(reg[s], cls)
  assert not np.array_equal(cls, np.ones_like(cls))  # Not the fresh init by chance.
  assert "initialised fresh: box_head (" in summary
  assert "unused from ViLT: pooler" in summary
  # Off (the default): REG keeps its own init.
  loaded, _ = vilt.init_scanformer_from_vilt(fresh, str(out), cfg)
  np.testing.assert_array_equal(loaded["params"]["reg_tokens"], fresh["params"]["reg_tokens"])


def test_trainer_passes_the_reg_choice(converted):
  """`train.init_reg_from_vilt_cls` reaches the copy (trainer's init_from loader)."""
  from scanformer_jax import config as C, trainer  # pylint: disable=g-import-not-at-top
  state, out = converted
  _, cfg = vilt.load(out)
  cls = state["vilt.embeddings.cls_token"].reshape(-1)
  for on in (True, False):
    config = C.ExperimentConfig(model=cfg, train=C.TrainConfig(
        init_from=str(out), init_reg_from_vilt_cls=on))
    fresh = _fake_scanformer_params(cfg)
    load = trainer._vilt_loader(config)  # pylint: disable=protected-access
    reg = load(fresh)["params"]["reg_tokens"]  # [S, D]
    assert np.array_equal(reg[-1], cls) == on


def test_init_from_rejects_other_backbones(converted):
  _, out = converted
  _, cfg = vilt.load(out)
  with pytest.raises(ValueError, match=r"max_text_len: 12 != 16"):
    vilt.init_scanformer_from_vilt(_fake_scanformer_params(cfg), out, cfg.replace(max_text_len=16))
  # Raw params (no config to compare): the shapes still decide.
  other = cfg.replace(pos_grid_size=4)
  with pytest.raises(ValueError, match=r"pos_embed.*pos_grid_size must match"):
    vilt.init_scanformer_from_vilt(_fake_scanformer_params(other), vilt.load(out)[0], other)
  with pytest.raises(ValueError, match="not a converted ViLT directory"):
    vilt.init_scanformer_from_vilt(_fake_scanformer_params(cfg), out / "params", cfg)


def test_init_from_fills_the_model_shape_from_the_converted_config(converted, tmp_path):
  """`--set train.init_from=DIR` alone: the converted backbone's shape, not the
  config file's ViLT-B/32; an explicit --set is never replaced, a conflict is one line."""
  from scanformer_jax.cli import common  # pylint: disable=g-import-not-at-top
  from scanformer_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from train_helpers import ROOT  # pylint: disable=g-import-not-at-top
  _, out = converted
  _, shape = vilt.load(out)
  refcoco = str(ROOT / "experiments" / "configs" / "refcoco.py")
  steps = ["train.num_steps=2", "optim.warmup_steps=1"]  # no train split to count here
  config = common.resolve_config(refcoco, str(tmp_path), [f"train.init_from={out}", *steps])
  for name in vilt.BACKBONE_FIELDS:
    assert getattr(config.model, name) == getattr(shape, name), name
  assert config.model.hidden_size == 24 and config.model.num_layers == 2
  assert config.model.encoder1_layers == shape.encoder1_layers == 1  # 6 of 2 layers cannot be
  assert config.model.image_sizes == (128, 256, 512)  # not a backbone field: the config's
  same = common.resolve_config(refcoco, str(tmp_path), [f"train.init_from={out}",
                                                        "model.hidden_size=24", *steps])
  assert same.model == config.model
  with pytest.raises(UserError, match=r"^--set model.hidden_size=32 conflicts with the "
                     r"converted ViLT in .* \(model.hidden_size=24\)") as e:
    common.resolve_config(refcoco, str(tmp_path), [f"train.init_from={out}",
                                                    "model.hidden_size=32", "model.num_heads=4",
                                                    *steps])
  assert "\n" not in str(e.value)


def test_converted_checkpoint_runs_in_scanformer(converted):
  try:
    from scanformer_jax.model import ScanFormer
  except ImportError as e:
    pytest.skip(f"scanformer_jax.model is not importable yet ({e})")
  _, out = converted
  vilt_params, vilt_cfg = vilt.load(out)
  cfg = vilt_cfg.replace(image_sizes=(16, 32), encoder1_layers=1)  # small scan, same backbone
  image = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 32, 32, 3)), jnp.float32)
  ids = jnp.array([[2, 5, 7, 0], [3, 4, 0, 0]], jnp.int32)
  mask = ids > 0
  model = ScanFormer(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0), image, ids, mask)
  rng = np.random.default_rng(1)  # random host params, as the trainer passes fetched ones
  host = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)
  params, summary = vilt.init_scanformer_from_vilt(host, out, cfg)
  assert "reg_tokens" in summary and "const_tokens" in summary
  flat = dict(jax.tree_util.tree_flatten_with_path(params["params"]["backbone"])[0])
  for path, value in jax.tree_util.tree_flatten_with_path(vilt_params)[0]:
    if path[0].key in ("cls_token", "pooler"):
      continue
    np.testing.assert_array_equal(flat[path], value, err_msg=str(path))
  np.testing.assert_array_equal(params["params"]["reg_tokens"], host["params"]["reg_tokens"])
  result = jax.jit(model.apply)(params, image, ids, mask)
  assert result.boxes.shape == (2, 2, 4) and np.isfinite(np.asarray(result.boxes)).all()


def test_hf_defaults_are_vilt_b32():
  """HF ViltConfig defaults (dandelin/vilt-b32-mlm) give ScanFormer's default config."""
  from scanformer_jax.config import ModelConfig
  cfg, notes = convert_vilt.config_from_hf({})
  assert cfg == ModelConfig.vilt_b32() and not notes
