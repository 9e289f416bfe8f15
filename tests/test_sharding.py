"""One train step on 8 faked CPU devices (data=8, and data=4 x fsdp=2) equals one device.

The device count must be fixed before jax starts, so the comparison runs in a
subprocess with `--xla_force_host_platform_device_count=8`; it builds all three
meshes there (the 1-device mesh from the first device).
"""

import json

import pytest

import train_helpers

CODE = r"""
import json, sys, jax, numpy as np
sys.path.insert(0, %(tests)r)
import fake_data
from scanformer_jax import config_io, optim, sharding, train_state, train_step
from data_pipelines.contract import DEVICE_KEYS
from scanformer_jax.config import MeshConfig
assert jax.device_count() == 8, jax.devices()
config = config_io.load_config_file(%(config)r)
cfg = config.model
tx, schedules = optim.make_optimizer(config.optim, config.train.num_steps)
rows = [fake_data.make_example(0, i, cfg.image_size, cfg.max_text_len) for i in range(8)]
batch = {k: np.stack([r[k] for r in rows]) for k in DEVICE_KEYS}
results = {}
host_state = None
for name, mesh_cfg, devices in [
    ("one", MeshConfig(data=1), jax.devices()[:1]),
    ("data8", MeshConfig(data=8), None),
    ("fsdp", MeshConfig(data=4, fsdp=2, fsdp_min_size=512), None)]:
  mesh = sharding.make_mesh(mesh_cfg, devices)
  shardings = train_state.state_shardings(cfg, tx, mesh, mesh_cfg)
  step = train_step.jit_train_step(
      train_step.make_train_step(cfg, config.loss, tx, schedules), shardings, mesh)
  if host_state is None:  # Initialise once; the other meshes get the same values.
    host_state = sharding.fetch(train_state.create_train_state(cfg, tx, 0, mesh, mesh_cfg))
  state = train_state.put_global(host_state, shardings)
  losses = []
  for _ in range(3):  # Step 1 has warmup lr 0; steps 2-3 move the parameters.
    state, metrics = step(state, sharding.to_global(batch, mesh))
    losses.append(float(metrics["loss"]))
  specs = [str(s.spec) for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding, state.params))]
  params = jax.tree.map(np.asarray, state.params)
  results[name] = {"losses": losses, "num_devices": len(state.step.sharding.device_set),
                   "fsdp_sharded": sum("fsdp" in s for s in specs),
                   "params": [p.ravel()[:64].tolist() + [float(np.abs(p).sum())]
                              for p in jax.tree.leaves(params)]}
print("RESULT" + json.dumps(results))
"""


@pytest.mark.slow
def test_eight_devices_match_one_device():
  proc = train_helpers.run_python(
      CODE % {"config": train_helpers.FAKE_CONFIG, "tests": train_helpers.TESTS},
      extra_env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  results = json.loads(line[len("RESULT"):])
  one = results["one"]
  assert one["num_devices"] == 1 and results["data8"]["num_devices"] == 8
  assert results["fsdp"]["fsdp_sharded"] > 0  # Some parameters really are split.
  assert one["losses"][1] != one["losses"][2]  # The parameters did move.
  for name in ("data8", "fsdp"):
    other = results[name]
    assert other["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-5), name
    for a, b in zip(one["params"], other["params"]):
      assert b == pytest.approx(a, rel=1e-4, abs=1e-5), name
