"""The demo: a tiny ScanFormer trained from scratch on the synthetic REC set, on CPU.

    scanformer data synthetic --data-dir runs/data --config train=20000,validation=1000,test=1000,size=128,attribute=1,superlative=0,relation=0,max_objects=4,object_scale=1.4
    scanformer train --config experiments/configs/synthetic_tiny.py --workdir runs/demo

The task: scenes of 2-4 objects of the four shapes (circle, square, triangle,
cross) in five colours and two sizes; each expression names the target by a unique
subset of its attributes ("the small red triangle", "the green object", "the
cross"). Superlatives and relations are switched off: a from-scratch model on two
CPU cores does not learn them in the 15-minute budget. Scales 16/32/64 px with 8 px
patches (2x2, 4x4, 8x8 grids). Objects span 17-45 % of the side (object_scale=1.4):
at the default 12-32 % the small ones are 8-11 px at 64 px, one or two patches wide.
Most patches are still background, and the keep-ratio targets ask the scan to take
half of scale 1 and a quarter of scale 2. Shape is the slow part to learn
(experiments/training.md has every setting tried).
"""

from data_pipelines import synthetic_builder
from scanformer_jax import config as C

# The synthetic dataset the demo builds (data_pipelines/synthetic_builder.py spec).
SYNTHETIC_SPEC = ("train=20000,validation=1000,test=1000,size=128,"
                  "attribute=1,superlative=0,relation=0,max_objects=4,object_scale=1.4")
# Derived, so that editing the spec can never train on a stale cached dataset.
DATASET = synthetic_builder.dataset_name(SYNTHETIC_SPEC)


def get_config() -> C.ExperimentConfig:
  model = C.ModelConfig(
      hidden_size=128, num_layers=4, num_heads=4, mlp_dim=256, encoder1_layers=2,
      image_sizes=(16, 32, 64), patch_size=8, pos_grid_size=8,
      # The longest demo expression is 6 tokens ("[CLS] the small red square [SEP]").
      vocab_size=32, max_text_len=8, box_head_layers=2,
      # From scratch, BERT's 0.02 init leaves every token nearly alike and training
      # crawls; ~1/sqrt(hidden) (LeCun-like) learns several times faster, and a
      # sin-cos position table lets the box head read positions from step 0.
      initializer_range=0.09, pos_embed_init="sincos",
      # The exit heads for the early-exit curve (`eval --exit-sweep`). They read
      # stop_gradient(REG): the grounding model trains exactly as without them.
      exit_heads=("iou", "halt", "uncertainty"))
  return C.ExperimentConfig(
      model=model,
      # No augmentation: ~3 epochs of 20k expressions do not overfit, and the
      # unaugmented task is learned faster within the CPU budget.
      # Without augmentation every epoch decodes the same PNGs: `ready_rows` decodes
      # the train split once into uint8 arrays (runs/data/ready/), so the 2 cores
      # run the train step instead of the PNG decoder.
      data=C.DataConfig(dataset=DATASET, data_dir="runs/data",
                        eval_splits=("validation",), augment=False, ready_rows=True),
      loss=C.LossConfig(target_ratio=(1.0, 0.5, 0.25), ratio_weight=2.0,
                        # Per-patch grounding supervision for the selection head (see
                        # LossConfig.select_weight; 0 is DESIGN.md's objective). From
                        # scratch it is what breaks the constant-box plateau: at 1000
                        # steps it lifts val Acc@0.5 from 0.09 to 0.39 (probe runs,
                        # four shapes).
                        select_weight=5.0),
      # From scratch: one learning rate for everything.
      optim=C.OptimConfig(learning_rate=1e-3, backbone_learning_rate=1e-3,
                          warmup_steps=200, weight_decay=0.05, grad_clip_norm=1.0),
      # The first 1000 steps see every patch before hard Gumbel selection starts:
      # from scratch, random masks on the REG inputs otherwise halve the learning
      # speed (val Acc@0.5 0.359 -> 0.569 at 2000 steps).
      # After the warm-up the sparse train step (train.path="sparse": the same loss
      # and gradients as the dense one, paying for the patches Gumbel takes), at
      # about twice the warm-up's examples/s.
      # Eight optimizer steps per compiled call (train.steps_per_call): one dispatch,
      # one host transfer and one host check per eight steps, the same updates as
      # eight single steps (experiments/train_profile.md measures the loop).
      train=C.TrainConfig(num_steps=3600, batch_size=32, log_every=200,
                          select_warmup_steps=1000, path="sparse", steps_per_call=8),
      # 200 rows: each of the demo's two CPU devices (run_demo.data_parallel_env)
      # sorts its 100 rows into 7 capacity groups of 15 (model.capacity_group_rows
      # 16). With batch 50 on one device the groups' small matmuls ran the sparse
      # eval only 1.3x dense in a probe, against 2.2-2.6x here.
      # The exit path's sub-batches in eighths from a quarter up: with halt_head:0.95
      # 52 % of the samples go on to scale 1 and 36 % to scale 2, which halves round
      # up to 100 % and 50 %. Probes (paired timing): halves realised 0.68 of the
      # GFLOPs saving, quarters 0.69-0.70, these 0.74.
      eval=C.EvalConfig(batch_size=200,
                        exit_sub_batches=(0.25, 0.375, 0.5, 0.625, 0.75, 1.0)),
      checkpoint=C.CheckpointConfig(every_steps=1000, max_to_keep=2),
  )
