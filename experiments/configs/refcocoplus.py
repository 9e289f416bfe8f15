"""RefCOCO+ (UNC splits; no absolute-location words): val / testA / testB.

    scanformer data refer --refer-root refer/data --dataset refcoco+ --split-by unc \
        --image-dir coco/train2014 --data-dir runs/data
    scanformer train --config experiments/configs/refcocoplus.py --workdir runs/refcocoplus \
        --set train.init_from=weights/vilt-b32

Data: `refer/refcocoplus_unc` (catalog build: `--set data.dataset=refcocoplus_unc`).
Recipe: _vilt_rec.py.
"""

from _vilt_rec import vilt_rec_config  # Sibling module (configs import each other).


def get_config():
  return vilt_rec_config("refer/refcocoplus_unc", ("validation", "testA", "testB"))
