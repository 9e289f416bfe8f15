"""The persistent compilation cache: on by default, where it says, off on request."""

import os

import train_helpers
from scanformer_jax import cli, compile_cache

_PROBE = ("import os, jax\n"
          "from scanformer_jax import compile_cache\n"
          "path = compile_cache.enable()\n"
          "jax.jit(lambda x: x * 3 + 1)(2.0).block_until_ready()\n"
          "print(path, len(os.listdir(path)) if path else -1)")


def test_compiled_programs_land_in_the_cache_dir(tmp_path):
  cache = tmp_path / "cache"
  proc = train_helpers.run_python(_PROBE, {"JAX_COMPILATION_CACHE_DIR": "",
                                           "SCANFORMER_CACHE_DIR": str(cache)})
  path, entries = proc.stdout.split()
  assert path == str(cache) and int(entries) >= 1


def test_no_cache_env_turns_it_off(tmp_path):
  cache = tmp_path / "cache"
  proc = train_helpers.run_python(_PROBE, {"JAX_COMPILATION_CACHE_DIR": "",
                                           "SCANFORMER_CACHE_DIR": str(cache),
                                           "SCANFORMER_NO_CACHE": "1"})
  assert proc.stdout.split() == ["None", "-1"]
  assert not cache.exists()


def test_default_dir_follows_xdg(monkeypatch, tmp_path):
  monkeypatch.delenv(compile_cache.DIR_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compile_cache.default_dir() == os.path.join(str(tmp_path), "scanformer_jax", "jax")


def test_help_says_where_the_cache_is(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert compile_cache.DIR_ENV in out and "SCANFORMER_NO_CACHE=1" in out
  assert "export" in out and "serve" in out
