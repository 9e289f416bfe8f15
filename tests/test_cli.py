"""Experiment configs and `--set` overrides; user errors of every command give one
clear line and exit code 2, a traceback only with --verbose."""

import glob
import os

import pytest

import train_helpers
from scanformer_jax import cli, config_io
from scanformer_jax.cli import eval as eval_cmd
from scanformer_jax.cli import predict as predict_cmd
from scanformer_jax.cli import train as train_cmd
from scanformer_jax.config import ModelConfig
from scanformer_jax.errors import UserError

CONFIGS = sorted(p for p in glob.glob(os.path.join(train_helpers.ROOT, "experiments",
                                                   "configs", "*.py"))
                 if not os.path.basename(p).startswith("_"))


def test_overrides_are_typed():
  config = config_io.load_config_file(train_helpers.FAKE_CONFIG)
  config = config_io.apply_overrides(config, [
      "train.num_steps=12", "optim.learning_rate=3e-4", "data.augment=false",
      "data.eval_splits=val,testA,testB", "model.image_sizes=(32, 64)",
      "model.capacity=None", "mesh.process_id=1", "data.vocab_path=/x/vocab.txt",
      "train.init_from=~/vilt", "loss.target_ratio=[1, 0.4]"])
  assert config.train.num_steps == 12 and config.optim.learning_rate == 3e-4
  assert config.data.augment is False
  assert config.data.eval_splits == ("val", "testA", "testB")
  assert config.model.image_sizes == (32, 64) and config.model.capacity is None
  assert config.loss.target_ratio == (1.0, 0.4)
  assert config.train.init_from == "~/vilt"
  # The model section is the architecture alone; the JSON round trip is exact.
  assert type(config.model) is ModelConfig and not hasattr(config.model, "init_from")
  assert config_io.from_dict(config_io.to_dict(config)) == config


@pytest.mark.parametrize("override, message", [
    ("train.num_step=3", "unknown config key 'train.num_step'"),
    ("nosection.x=1", "unknown config key"),
    ("train.num_steps=1.5", "expects an integer"),
    ("train.num_steps", "expects key=value"),
    ("data.augment=maybe", "true/false"),
    ("model.image_sizes=(32, 48)", "twice the previous"),
    ("model.vocab_size=None", "may not be None"),
])
def test_bad_overrides(override, message):
  config = config_io.load_config_file(train_helpers.FAKE_CONFIG)
  with pytest.raises(UserError, match=message.replace("(", r"\(")):
    config_io.apply_overrides(config, [override])


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_experiment_configs_load(path):
  config = config_io.load_config_file(path)
  assert len(config.loss.target_ratio) == config.model.num_scales
  assert config.train.batch_size % 8 == 0  # Splits over 8-device hosts.
  if not os.path.basename(path).startswith("synthetic_"):
    assert config.model == ModelConfig.vilt_b32()


@pytest.mark.parametrize("path", [p for p in CONFIGS
                                  if os.path.basename(p).startswith("synthetic_")],
                         ids=os.path.basename)
def test_synthetic_text_length_fits_its_expressions(path):
  """A synthetic config's max_text_len holds every expression its data spec draws.

  A shorter one would train on truncated sentences (counted, but still wrong).
  """
  from data_pipelines import synthetic, synthetic_builder  # pylint: disable=g-import-not-at-top
  from data_pipelines.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  module = config_io.load_config_module(path)
  config = module.get_config()
  assert config.data.dataset == synthetic_builder.dataset_name(module.SYNTHETIC_SPEC)
  max_len = config.model.max_text_len
  scene_config = synthetic_builder.config_from_spec(module.SYNTHETIC_SPEC).scene_config()
  tokenizer = Tokenizer(synthetic.vocab(), max_len)
  texts = [e.text for _, scene in synthetic.generate_split(0, "train", 300, scene_config)
           for e in scene.expressions]
  assert len(texts) == 300
  truncated = [t for t in texts if tokenizer.encode(t)[2]]
  assert not truncated, f"max_text_len {max_len} truncates e.g. {truncated[:3]}"


def test_resume_refuses_a_different_model_and_keeps_the_workdir(tmp_path, capsys, caplog):
  """A workdir started with other parameter shapes is refused before anything is
  written (its config.json survives); other changes only warn."""
  from scanformer_jax import trainer  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "w"
  workdir.mkdir()
  started = config_io.load_config_file(train_helpers.FAKE_CONFIG)
  config_json = workdir / "config.json"
  config_io.save_json(started, str(config_json))
  before = config_json.read_text()
  width = started.model.mlp_dim
  err = _errors(train_cmd.main, ["--config", train_helpers.FAKE_CONFIG, "--workdir",
                                 str(workdir), "--set", f"model.mlp_dim={2 * width}"], capsys)
  assert "holds a run of a different model" in err
  assert f"model.mlp_dim {width} -> {2 * width}" in err
  assert config_json.read_text() == before
  # Same parameter shapes, other settings: resumable, with a warning.
  trainer._check_resumed_config(  # pylint: disable=protected-access
      str(config_json), config_io.apply_overrides(started, ["optim.learning_rate=0.5",
                                                              "model.select_threshold=0.3"]))
  assert "resuming anyway" in caplog.text


def _errors(main, argv, capsys):
  rc = main(argv)
  err = capsys.readouterr().err
  assert rc == 2, err
  assert "Traceback" not in err
  return err


def test_user_errors_exit_2(tmp_path, capsys):
  err = _errors(train_cmd.main, ["--config", str(tmp_path / "missing.py"), "--workdir",
                                 str(tmp_path / "w")], capsys)
  assert "config file not found" in err
  err = _errors(train_cmd.main, ["--config", train_helpers.FAKE_CONFIG, "--workdir",
                                 str(tmp_path / "w"), "--set", "train.bogus=1"], capsys)
  assert "unknown config key 'train.bogus'" in err
  err = _errors(eval_cmd.main, ["--workdir", str(tmp_path / "empty")], capsys)
  assert "config.json" in err
  err = _errors(eval_cmd.main, ["--config", train_helpers.FAKE_CONFIG, "--workdir",
                                str(tmp_path / "empty")], capsys)
  assert "no checkpoints" in err
  err = _errors(predict_cmd.main, ["--workdir", str(tmp_path / "empty"), "--image", "x.png",
                                   "--text", "the red circle"], capsys)
  assert "config.json" in err
  bad = tmp_path / "bad_config.py"
  bad.write_text("def get_config():\n  return 42\n")
  err = _errors(train_cmd.main, ["--config", str(bad), "--workdir", str(tmp_path / "w")],
                capsys)
  assert "must return an ExperimentConfig" in err


def test_dispatcher_routes_to_the_commands(capsys):
  for name in ("train", "eval", "predict", "bench", "convert-vilt"):
    with pytest.raises(SystemExit) as exit_info:
      cli.main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"scanformer {name}" in out
    if name in ("train", "eval", "predict"):
      assert "--workdir" in out and "--set" in out


def test_overrides_validate_once_after_all_of_them():
  """A section is validated with every override applied, so their order does not
  matter: 3 heads alone do not divide the fake config's hidden size 32, 48 / 3 do."""
  config = config_io.load_config_file(train_helpers.FAKE_CONFIG)
  assert config.model.hidden_size % 3
  for overrides in (["model.hidden_size=48", "model.num_heads=3"],
                    ["model.num_heads=3", "model.hidden_size=48"]):
    model = config_io.apply_overrides(config, overrides).model
    assert (model.hidden_size, model.num_heads) == (48, 3)
  with pytest.raises(UserError, match="model.num_heads.*divisible by num_heads"):
    config_io.apply_overrides(config, ["model.num_heads=3"])


def test_model_config_json_codec_round_trip():
  cfg = ModelConfig.tiny(capacity=(4, 8, 16), exit_heads=("iou",))
  assert config_io.model_config_from_dict(config_io.model_config_to_dict(cfg)) == cfg
  with pytest.raises(UserError, match="unknown key model.bogus"):
    config_io.model_config_from_dict({"bogus": 1})


def test_verbose_shows_the_traceback(tmp_path, capsys, monkeypatch):
  from scanformer_jax.cli import common  # pylint: disable=g-import-not-at-top
  # Debug logging would outlive the test on pytest's (then closed) stderr.
  monkeypatch.setattr(common, "setup_logging", lambda verbose: None)
  argv = ["--config", str(tmp_path / "missing.py"), "--workdir", str(tmp_path / "w")]
  assert train_cmd.main(argv + ["--verbose"]) == 2
  err = capsys.readouterr().err
  assert "Traceback" in err
  assert err.strip().splitlines()[-1].startswith("scanformer train: error: config file")


def test_every_command_fails_the_same_way(tmp_path, capsys):
  err = _errors(cli.main, ["convert-vilt", "--src", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "o")], capsys)
  assert err.startswith("scanformer convert-vilt: error: ") and "does not exist" in err
  err = _errors(cli.main, ["data", "inspect", "--dataset", "synthetic", "--split", "train",
                           "--data-dir", str(tmp_path), "--num", "0"], capsys)
  assert err.startswith("scanformer data: error: --num must be >= 1")
  err = _errors(cli.main, ["nosuchcommand"], capsys)
  assert "unknown command 'nosuchcommand'" in err


def test_version(capsys):
  assert cli.main(["--version"]) == 0
  assert capsys.readouterr().out.startswith("scanformer ")


def test_jit_side_modules_import_no_config_io():
  """The model, step and sharding modules never load the file-reading config code."""
  code = ("import sys\n"
          "from scanformer_jax import (checkpointing, eval_step, losses, model, optim,\n"
          "    sharding, train_state, train_step)\n"
          "assert 'scanformer_jax.config_io' not in sys.modules, 'config_io imported'\n")
  train_helpers.run_python(code)


def test_workdir_paths(tmp_path):
  from scanformer_jax import workdir  # pylint: disable=g-import-not-at-top
  config = config_io.load_config_file(train_helpers.FAKE_CONFIG)
  w = str(tmp_path / "w")
  assert workdir.config_path(w) == os.path.join(w, "config.json")
  assert workdir.checkpoint_dir(config, w) == os.path.join(w, "checkpoints")
  elsewhere = config_io.apply_overrides(config, ["checkpoint.directory=~/ckpts"])
  assert workdir.checkpoint_dir(elsewhere, w) == os.path.expanduser("~/ckpts")
  with pytest.raises(UserError, match="no config.json"):
    workdir.load_config(w)


@pytest.mark.parametrize("override, message", [
    ("loss.l1_weight=1e400", "loss.l1_weight=inf must be finite and >= 0"),
    ("optim.learning_rate=-1", "optim.learning_rate=-1.0 must be finite and >= 0"),
    ("train.batch_size=0", "train.batch_size=0 must be >= 1"),
    ("eval.batch_size=-8", "eval.batch_size=-8 must be >= 1"),
    ("checkpoint.max_to_keep=0", "checkpoint.max_to_keep=0 must be >= 1"),
    ("train.max_consecutive_skipped=-1", "train.max_consecutive_skipped=-1 must be >= 0"),
    ("loss.target_ratio=1,1e999", r"loss.target_ratio\[1\]=inf must be finite"),
    ("optim.b2=1.5", "optim.b2=1.5 must be finite and >= 0 and <= 1"),
])
def test_bad_config_values_are_refused_at_load(override, message, tmp_path, capsys):
  """Non-finite or negative numbers and empty batches never reach training: one line
  naming the key, from --set, from config.json and from a config file."""
  config = config_io.load_config_file(train_helpers.FAKE_CONFIG)
  with pytest.raises(UserError, match=message):
    config_io.apply_overrides(config, [override])
  err = _errors(train_cmd.main, ["--config", train_helpers.FAKE_CONFIG, "--workdir",
                                 str(tmp_path / "w"), "--set", override], capsys)
  assert len(err.strip().splitlines()) == 1
  key, _, value = override.partition("=")
  section, _, field = key.partition(".")
  data = config_io.to_dict(config)
  data[section][field] = float(value) if "," not in value else [1.0, float("inf")]
  path = tmp_path / "config.json"
  path.write_text(__import__("json").dumps(data))
  with pytest.raises(UserError, match=message):
    config_io.load_json(str(path))
  bad = tmp_path / "bad_values.py"
  bad.write_text("import dataclasses\nfrom scanformer_jax import config as C\n"
                 "def get_config():\n"
                 "  return C.ExperimentConfig(train=C.TrainConfig(batch_size=0))\n")
  with pytest.raises(UserError, match=f"{bad}: invalid config: train.batch_size=0"):
    config_io.load_config_file(str(bad))


def test_missing_synthetic_data_names_a_build_command_that_works(tmp_path, capsys):
  """The demo config without its data: the printed "Build it with" command is one the
  data CLI accepts, and it builds exactly the dataset the config reads."""
  import shlex  # pylint: disable=g-import-not-at-top
  from data_pipelines import cli as data_cli, synthetic_builder  # pylint: disable=g-import-not-at-top
  config = os.path.join(train_helpers.ROOT, "experiments", "configs", "synthetic_tiny.py")
  err = _errors(train_cmd.main, ["--config", config, "--workdir", str(tmp_path / "w"),
                                 "--set", f"data.data_dir={tmp_path / 'data'}"], capsys)
  assert "Build it with: scanformer data synthetic" in err
  argv = shlex.split(err.split("Build it with: ")[1].strip())
  assert argv[:3] == ["scanformer", "data", "synthetic"]
  args = data_cli._parser().parse_args(argv[2:])  # pylint: disable=protected-access
  wanted = config_io.load_config_file(config).data.dataset
  assert synthetic_builder.dataset_name(args.config) == wanted
  assert args.data_dir == str(tmp_path / "data")


def test_refer_dataset_without_a_vocab_names_the_config_key():
  from data_pipelines import tokenizer  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match="set data.vocab_path, or train.init_from") as info:
    tokenizer.for_dataset("refer/refcoco_unc", None, 12)
  assert "tokenizer_path" not in str(info.value) and "--tokenizer-path" not in str(info.value)


def test_refcoco_configs_read_the_recommended_refer_builds():
  """README: `scanformer data refer --dataset D --split-by S --data-dir runs/data`
  builds `refer/<D>_<S>` under runs/data, which is what the benchmark configs read."""
  from data_pipelines import refer_builder  # pylint: disable=g-import-not-at-top
  for name, dataset, split_by in (("refcoco.py", "refcoco", "unc"),
                                  ("refcocoplus.py", "refcoco+", "unc"),
                                  ("refcocog.py", "refcocog", "umd"),
                                  ("referit.py", "refclef", "berkeley")):
    config = config_io.load_config_file(os.path.join(train_helpers.ROOT, "experiments",
                                                     "configs", name))
    assert config.data.dataset == "refer/" + refer_builder.config_name(dataset, split_by)
    assert config.data.data_dir == "runs/data"


def test_synthetic_build_prints_no_download_noise(tmp_path, capfd):
  from data_pipelines import synthetic_builder  # pylint: disable=g-import-not-at-top
  synthetic_builder.build(str(tmp_path), "train=4,validation=2,test=2,size=32")
  out, err = capfd.readouterr()
  assert "Downloading and preparing" not in out + err
  assert "downloaded and prepared" not in out + err


def test_train_has_an_explicit_extend_flag(capsys):
  with pytest.raises(SystemExit):
    train_cmd.main(["--help"])
  assert "--extend" in capsys.readouterr().out
