"""Shared recipe of the benchmark configs: ViLT-B/32 ScanFormer fine-tuned for REC.

The paper's optimisation details are not verified here (nothing in this project has
read its PDF); these follow the usual
ViLT/TransVG-style REC fine-tuning recipe and are all config fields:
  - model: ViLT-B/32 (768 x 12 layers, patch 32), scales 128/256/512, Encoder1 = 6
    layers, text length 40, initialised from converted ViLT weights
    (`scanformer convert-vilt --src <vilt> --out <dir>`, then
    `--set train.init_from=<dir>`, whose vocab.txt is then the tokenizer's);
  - AdamW (b2 0.999, weight decay 1e-4), global batch 128, peak learning rate 1e-4
    for the new parts (REG/scale/constant tokens, heads) and 1e-5 for the pretrained
    backbone, linear warmup over the first epoch then cosine decay to 0,
    gradient clipping at global norm 1.0;
  - 90 epochs over the training expressions. Both are in epochs
    (`train.num_epochs`, `optim.warmup_epochs`): `scanformer train` turns them into
    steps from the size of the built train split, whichever dataset and split
    `data.*` name (an explicit `--set train.num_steps` / `optim.warmup_steps` wins);
  - loss: L1 5, GIoU 2 on every scale's box; keep-ratio targets 1 / 0.5 / 0.25
    (the scan keeps about half of the 8x8 grid at 256 px and a quarter of the
    16x16 grid at 512 px: about a third of all patches, where the article's one
    figure is about 65% selected per sample), weight 2.
The data must be built first (README, "Data"): by default the configs read the
`scanformer data refer ... --data-dir runs/data` builds (`refer/<dataset>_<split_by>`);
for the TFDS-catalog builds use e.g. `--set data.dataset=refcoco_unc`.
"""

from scanformer_jax import config as C

BATCH = 128
EPOCHS = 90
WARMUP_EPOCHS = 1


def vilt_rec_config(dataset: str, eval_splits: tuple,
                    train_split: str = "train") -> C.ExperimentConfig:
  return C.ExperimentConfig(
      model=C.ModelConfig(
          # ViLT-B/32 backbone (ModelConfig defaults), set explicitly for readers.
          hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, patch_size=32,
          image_sizes=(128, 256, 512), encoder1_layers=6, max_text_len=40,
          vocab_size=30522, pos_grid_size=12, box_head_layers=3),
      # Where the README's `scanformer data refer ... --data-dir runs/data` builds.
      data=C.DataConfig(dataset=dataset, data_dir="runs/data",
                        # None: the vocab.txt that convert-vilt wrote into
                        # train.init_from.
                        vocab_path=None,
                        train_split=train_split, eval_splits=eval_splits, augment=True),
      loss=C.LossConfig(l1_weight=5.0, giou_weight=2.0, target_ratio=(1.0, 0.5, 0.25),
                        ratio_weight=2.0),
      # warmup_steps and train.num_steps follow from the epochs and the train split's
      # size when `scanformer train` starts (cli/common.py, with_epoch_schedule).
      optim=C.OptimConfig(learning_rate=1e-4, backbone_learning_rate=1e-5,
                          warmup_epochs=WARMUP_EPOCHS, weight_decay=1e-4, grad_clip_norm=1.0),
      # init_from: directory written by `scanformer convert-vilt`, or "none" to train from
      # scratch; training refuses until one is passed (`--set train.init_from=...`). REG_s
      # start from ViLT's pretrained image [CLS] (experiments/guide.md, "Initialisation choices").
      train=C.TrainConfig(num_epochs=EPOCHS, batch_size=BATCH, log_every=100,
                          init_from=C.INIT_FROM_REQUIRED, init_reg_from_vilt_cls=True),
      eval=C.EvalConfig(batch_size=128, every_steps=5000),
      checkpoint=C.CheckpointConfig(every_steps=2000, max_to_keep=3),
      mesh=C.MeshConfig(data=-1, fsdp=1),
  )
