"""RefCOCO (UNC splits): ViLT-B/32 ScanFormer, evaluated on val / testA / testB.

    scanformer convert-vilt --out ~/vilt_b32                       # once
    scanformer train --config experiments/configs/refcoco.py --workdir runs/refcoco \
        --set train.init_from=~/vilt_b32 --set data.vocab_path=~/vilt_b32/vocab.txt
    scanformer eval --workdir runs/refcoco --json runs/refcoco/eval.json

Data: `refcoco_unc` (TFDS catalog `ref_coco`); for the refer-layout build use
`--set data.dataset=refer/refcoco_unc`. Recipe: see _vilt_rec.py.
"""

from _vilt_rec import vilt_rec_config  # Sibling module (configs import each other).

NUM_TRAIN_EXPRESSIONS = 120_624  # RefCOCO unc train


def get_config():
  return vilt_rec_config("refcoco_unc", ("validation", "testA", "testB"),
                         NUM_TRAIN_EXPRESSIONS)
