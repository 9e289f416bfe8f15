"""The program cache: a second start reads the traced forward and the parameter shapes
instead of tracing the model, and a change of code or config is a new key."""

import jax
import numpy as np
import pytest

from scanformer_jax import compile_cache, data_source, forward, predictor as predictor_lib
from scanformer_jax import train_state, workdir as workdir_lib
from tiny_run import tiny_run
from visualize_fixtures import noise

TEXT = "the small red square"


@pytest.fixture
def programs(tmp_path, monkeypatch):
  """An empty program cache of this test's own (jax's compilation cache on)."""
  compile_cache.enable()
  folder = tmp_path / "programs"
  monkeypatch.setattr(compile_cache, "programs_dir", lambda: str(folder))
  return folder


@pytest.fixture
def forward_traces(monkeypatch):
  """How often the model's forward is traced (each trace calls forward.rows once)."""
  calls = []
  rows = forward.rows

  def counting(*args, **kwargs):
    calls.append(1)
    return rows(*args, **kwargs)

  monkeypatch.setattr(forward, "rows", counting)
  return calls


def test_second_predictor_reads_the_traced_forward(tmp_path_factory, programs,
                                                   forward_traces):
  run = workdir_lib.load_for_inference(str(tiny_run(tmp_path_factory)))
  tokenizer = data_source.load_tokenizer(run.config)
  image = noise(60, 80, seed=3)
  first = predictor_lib.Predictor(run, tokenizer)(image, TEXT)
  assert len(forward_traces) == 1
  assert sorted(p.name.split("-")[0] for p in programs.iterdir()) == ["forward", "params"]

  again = predictor_lib.Predictor(run, tokenizer)
  second = again(image, TEXT)
  assert len(forward_traces) == 1  # read from the cache, not traced
  assert again.trace_count == 1  # one program built for batch size 1
  np.testing.assert_array_equal(first.boxes, second.boxes)
  for a, b in zip(first.taken, second.taken):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(first.pred_iou, second.pred_iou)



def test_keys_change_with_code_settings_and_registry(monkeypatch):
  settings = {"model": {"hidden_size": 8}, "mode": "sparse", "batch": 1}
  key = compile_cache.cache_key("forward", settings)
  assert key == compile_cache.cache_key("forward", dict(settings))
  assert key != compile_cache.cache_key("forward", {**settings, "mode": "dense"})
  assert key != compile_cache.cache_key("params", settings)
  plugin_rule = test_keys_change_with_code_settings_and_registry  # a file outside the package
  assert key != compile_cache.cache_key("forward", settings, [plugin_rule])
  monkeypatch.setattr(compile_cache, "source_fingerprint", lambda objects=(): "edited")
  assert key != compile_cache.cache_key("forward", settings)  # other source code


def test_parameter_shapes_are_cached(tmp_path_factory, programs, monkeypatch):
  cfg = workdir_lib.load_config(str(tiny_run(tmp_path_factory))).model
  traced = workdir_lib.abstract_params(cfg)  # traces the init, then stores its shapes
  assert traced == train_state.abstract_params(cfg)

  def no_trace(cfg):
    raise AssertionError("traced although the shapes are cached")

  monkeypatch.setattr(train_state, "abstract_params", no_trace)
  cached = workdir_lib.abstract_params(cfg)
  assert jax.tree.structure(cached) == jax.tree.structure(traced)
  assert jax.tree.leaves(cached) == jax.tree.leaves(traced)
  # Another model shape is another key: traced (here: refused), never the old shapes.
  with pytest.raises(AssertionError, match="traced although"):
    workdir_lib.abstract_params(cfg.replace(hidden_size=2 * cfg.hidden_size))


def test_code_without_a_source_file_is_never_cached(programs):
  namespace = {}
  exec("def rule(candidates, scores, cfg, scale):\n  return candidates", namespace)  # pylint: disable=exec-used
  assert compile_cache.cache_key("forward", {"mode": "sparse"}, [namespace["rule"]]) is None
  assert compile_cache.cache_key("forward", {"mode": "sparse"}, [jax.nn.sigmoid]) is not None
  compile_cache.store_blob(None, b"x")
  assert compile_cache.load_blob(None) is None and not programs.exists()


def test_no_cache_env_stores_nothing(monkeypatch, tmp_path):
  monkeypatch.setenv(compile_cache.OFF_ENV, "1")
  assert compile_cache.programs_dir() is None
  compile_cache.store_blob("forward-x", b"x")
  assert compile_cache.load_blob("forward-x") is None
