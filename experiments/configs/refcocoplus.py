"""RefCOCO+ (UNC splits; no absolute-location words): val / testA / testB.

    scanformer train --config experiments/configs/refcocoplus.py --workdir runs/refcocoplus \
        --set train.init_from=~/vilt_b32 --set data.vocab_path=~/vilt_b32/vocab.txt

Data: `refcocoplus_unc` (catalog) or `refer/refcoco+_unc`. Recipe: _vilt_rec.py.
"""

from _vilt_rec import vilt_rec_config  # Sibling module (configs import each other).

NUM_TRAIN_EXPRESSIONS = 120_191  # RefCOCO+ unc train


def get_config():
  return vilt_rec_config("refcocoplus_unc", ("validation", "testA", "testB"),
                         NUM_TRAIN_EXPRESSIONS)
