"""The demo: a tiny ScanFormer trained from scratch on the synthetic REC set, on CPU.

    scanformer data synthetic --data-dir runs/data --config train=20000,validation=1000,test=1000,size=128
    scanformer train --config experiments/configs/synthetic_tiny.py --workdir runs/demo

Scales 32/64/128 px with 16 px patches (2x2, 4x4, 8x8 grids). Scenes hold 2-6 small
objects, so most patches are background: the keep-ratio targets ask the scan to
take half of scale 1 and a quarter of scale 2.
"""

from scanformer_jax import experiment as E

# The synthetic dataset the demo builds (data_pipelines/synthetic_builder.py spec).
SYNTHETIC_SPEC = "train=20000,validation=1000,test=1000,size=128"
DATASET = "synthetic/custom_20000_1000_1000_128px_seed0"


def get_config() -> E.ExperimentConfig:
  model = E.model_config(
      hidden_size=128, num_layers=4, num_heads=4, mlp_dim=256, encoder1_layers=2,
      image_sizes=(32, 64, 128), patch_size=16, pos_grid_size=8,
      vocab_size=32, max_text_len=16, box_head_layers=2,
      # From scratch, BERT's 0.02 init leaves every token nearly alike and training
      # crawls; ~1/sqrt(hidden) (LeCun-like) learns several times faster, and a
      # sin-cos position table lets the box head read positions from step 0.
      initializer_range=0.09, pos_embed_init="sincos")
  return E.ExperimentConfig(
      model=model,
      data=E.DataConfig(dataset=DATASET, data_dir="runs/data",
                        eval_splits=("validation",), augment=True),
      loss=E.LossConfig(target_ratio=(1.0, 0.5, 0.25), ratio_weight=2.0,
                        # Auxiliary grounding signal for the selection head (see
                        # LossConfig.select_weight); 0 is the paper's objective.
                        select_weight=1.0),
      # From scratch: one learning rate for everything.
      optim=E.OptimConfig(learning_rate=5e-4, backbone_learning_rate=5e-4,
                          warmup_steps=300, weight_decay=0.05, grad_clip_norm=1.0),
      # ~8 minutes on an idle 2-core CPU (~5 steps/s at batch 16).
      train=E.TrainConfig(num_steps=2500, batch_size=16, log_every=50),
      eval=E.EvalConfig(batch_size=50),
      checkpoint=E.CheckpointConfig(every_steps=500, max_to_keep=2),
  )
