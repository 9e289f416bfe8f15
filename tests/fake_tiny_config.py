"""Test experiment: a very small ScanFormer on `data.dataset="fake"` (no files).

Shared by the trainer tests (in-process and through the CLI) so they compile the
same programs, which the persistent compilation cache then reuses across processes.
Importing `fake_data` (next to this file) registers the "fake" dataset, also in a
`scanformer train --config` subprocess.
"""

import fake_data  # noqa: F401  # pylint: disable=unused-import
from scanformer_jax import config as C

MODEL = dict(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2, encoder1_layers=1,
             image_sizes=(32, 64), patch_size=16, pos_grid_size=4, max_text_len=8,
             vocab_size=40, box_head_layers=2)


def get_config() -> C.ExperimentConfig:
  return C.ExperimentConfig(
      model=C.ModelConfig(**MODEL),
      data=C.DataConfig(dataset=fake_data.NAME, eval_splits=("validation",)),
      loss=C.LossConfig(target_ratio=(1.0, 0.5)),
      optim=C.OptimConfig(learning_rate=3e-3, backbone_learning_rate=1e-3, warmup_steps=2),
      train=C.TrainConfig(num_steps=6, batch_size=8, log_every=1),
      eval=C.EvalConfig(batch_size=8),
      checkpoint=C.CheckpointConfig(every_steps=2, max_to_keep=3),
  )
