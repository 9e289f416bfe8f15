"""Data-parallel sparse eval needs no collectives.

With the batch sharded over 4 faked CPU devices and the parameters replicated, the
compiled programs of `tiny()` must not move data between devices: the eval step at a
small fixed capacity (selection, capacity slots, scatters back to the grid are per
sample), the eval step with capacity buckets in row groups (each device sorts and
groups its own rows), and the exit scan (each device compacts its own rows).
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
from scanformer_jax.exit_scan import ExitScan
from scanformer_jax import early_exit
assert jax.device_count() == 4, jax.devices()
cfg = ModelConfig.tiny(capacity=(4, 8, 16), exit_heads=("iou",))
mesh_cfg = MeshConfig(data=4)
mesh = sharding.make_mesh(mesh_cfg)
abstract = train_state.abstract_params(cfg)
shardings = sharding.tree_shardings(abstract, mesh, mesh_cfg)
params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                      abstract, shardings)
rows = sharding.batch_sharding(mesh)
spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
b, r, l = 16, cfg.image_size, cfg.max_text_len
batch = {"image": spec((b, r, r, 3)), "text_ids": spec((b, l), jnp.int32),
         "text_mask": spec((b, l), bool), "box": spec((b, 4)), "valid": spec((b,), bool)}
grouped = cfg.replace(capacity_buckets=((4,), (4, 8, 16), (8, 32, 64)), capacity_group_rows=2)
hlos = {
    "fixed": EvalStep(cfg, mesh, shardings).lower(params, batch).compile().as_text(),
    "grouped": EvalStep(grouped, mesh, shardings).lower(params, batch).compile().as_text(),
    "exit": ExitScan(grouped, mesh, shardings, [early_exit.parse("iou_head:0.8")])._jitted.lower(
        params, batch, (jnp.int32(0), jnp.float32(0.8))).compile().as_text(),
}
result = {}
for name, hlo in hlos.items():
  found = {op: [line.strip()[:200] for line in hlo.splitlines()
                if re.search(r"\b" + op + r"(-start)?\(", line)] for op in %(ops)r}
  result[name] = {"found": found, "sort": "sort(" in hlo,
                  "conditional": "conditional(" in hlo}
replicated = all(s.is_fully_replicated for s in jax.tree.leaves(shardings))
print("RESULT" + json.dumps({"programs": result, "replicated": replicated}))
"""


def test_sharded_sparse_eval_step_has_no_collectives():
  proc = train_helpers.run_python(
      CODE % {"ops": COLLECTIVES},
      extra_env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  result = json.loads(line[len("RESULT"):])
  assert result["replicated"]  # Parameters replicated: pure data parallelism.
  programs = result["programs"]
  assert set(programs) == {"fixed", "grouped", "exit"}
  for name, program in programs.items():
    assert program["sort"], name  # It does select (a small capacity): not vacuous.
    assert program["found"] == {op: [] for op in COLLECTIVES}, (name, program["found"])
  # The bucketed and exit programs choose their branches on each device.
  assert programs["grouped"]["conditional"] and programs["exit"]["conditional"]
