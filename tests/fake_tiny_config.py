"""Test experiment: a very small ScanFormer on `data.dataset="fake"` (no files).

Shared by the trainer tests (in-process and through the CLI) so they compile the
same programs, which the persistent compilation cache then reuses across processes.
"""

from scanformer_jax import experiment as E

MODEL = dict(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2, encoder1_layers=1,
             image_sizes=(32, 64), patch_size=16, pos_grid_size=4, max_text_len=8,
             vocab_size=40, box_head_layers=2)


def get_config() -> E.ExperimentConfig:
  return E.ExperimentConfig(
      model=E.model_config(**MODEL),
      data=E.DataConfig(dataset="fake", eval_splits=("validation",)),
      loss=E.LossConfig(target_ratio=(1.0, 0.5)),
      optim=E.OptimConfig(learning_rate=3e-3, backbone_learning_rate=1e-3, warmup_steps=2),
      train=E.TrainConfig(num_steps=6, batch_size=8, log_every=1),
      eval=E.EvalConfig(batch_size=8),
      checkpoint=E.CheckpointConfig(every_steps=2, max_to_keep=3),
  )
