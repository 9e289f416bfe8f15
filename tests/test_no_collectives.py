"""Data-parallel sparse eval needs no collectives (issue 16).

With the batch sharded over 4 faked CPU devices and the parameters replicated, the
compiled eval step of `tiny()` at a small capacity must not move data between
devices: selection (top-k, capacity slots, scatters back to the grid) is per sample.
The device count must be fixed before jax starts, hence the subprocess.
"""

import json

import train_helpers

COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all",
               "reduce-scatter")

CODE = r"""
import json, re, jax, jax.numpy as jnp
from scanformer_jax import sharding, train_state
from scanformer_jax.config import MeshConfig, ModelConfig
from scanformer_jax.eval_step import EvalStep
assert jax.device_count() == 4, jax.devices()
cfg = ModelConfig.tiny(capacity=(4, 8, 16))
mesh_cfg = MeshConfig(data=4)
mesh = sharding.make_mesh(mesh_cfg)
abstract = train_state.abstract_params(cfg)
shardings = sharding.tree_shardings(abstract, mesh, mesh_cfg)
params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                      abstract, shardings)
rows = sharding.batch_sharding(mesh)
spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
b, r, l = 8, cfg.image_size, cfg.max_text_len
batch = {"image": spec((b, r, r, 3)), "text_ids": spec((b, l), jnp.int32),
         "text_mask": spec((b, l), bool), "box": spec((b, 4)), "valid": spec((b,), bool)}
hlo = EvalStep(cfg, mesh, shardings).lower(params, batch).compile().as_text()
found = {op: [line.strip()[:200] for line in hlo.splitlines()
              if re.search(r"\b" + op + r"(-start)?\(", line)] for op in %(ops)r}
replicated = all(s.is_fully_replicated for s in jax.tree.leaves(shardings))
print("RESULT" + json.dumps({"found": found, "replicated": replicated,
                             "sort": "sort(" in hlo}))
"""


def test_sharded_sparse_eval_step_has_no_collectives():
  proc = train_helpers.run_python(
      CODE % {"ops": COLLECTIVES},
      extra_env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  result = json.loads(line[len("RESULT"):])
  assert result["replicated"]  # Parameters replicated: pure data parallelism.
  assert result["sort"]  # The program does select (a small capacity): not vacuous.
  assert result["found"] == {op: [] for op in COLLECTIVES}, result["found"]
