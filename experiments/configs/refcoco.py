"""RefCOCO (UNC splits): ViLT-B/32 ScanFormer, evaluated on val / testA / testB.

    scanformer data refer --refer-root refer/data --dataset refcoco --split-by unc \
        --image-dir coco/train2014 --data-dir runs/data                 # once
    scanformer convert-vilt --src vilt-b32-mlm --out weights/vilt-b32   # once
    scanformer train --config experiments/configs/refcoco.py --workdir runs/refcoco \
        --set train.init_from=weights/vilt-b32
    scanformer eval --workdir runs/refcoco --json runs/refcoco/eval.json

Data: `refer/refcoco_unc` under runs/data; for the TFDS-catalog build use
`--set data.dataset=refcoco_unc`. Recipe: see _vilt_rec.py.
"""

from _vilt_rec import vilt_rec_config  # Sibling module (configs import each other).


def get_config():
  return vilt_rec_config("refer/refcoco_unc", ("validation", "testA", "testB"))
