"""Scale boxes stay visible on objects of their own colour (keylines beside the box)."""

import numpy as np

from scanformer_jax.visualize import scan_picture as sp
from visualize_fixtures import letterbox_meta


def test_a_box_on_its_own_colour_shows_its_keylines():
  # 256 x 200 image into a 128 frame (scale 0.5: whole pixels), filled with the colour
  # of scale 1's box, the answer here.
  colour = sp.SCALE_COLOURS[1]
  image = np.empty((200, 256, 3), np.uint8)
  image[:] = colour
  meta = letterbox_meta(200, 256, 128)
  x0, y0, x1, y1 = 40, 30, 200, 170
  frame = np.array([(x0 + x1) / 4, (y0 + y1) / 4, (x1 - x0) / 2, (y1 - y0) / 2]) / 128
  taken = (np.ones(4, bool), np.ones(16, bool))
  pic = sp.scan_picture(image, meta, np.tile(frame, (2, 1)), taken, "x")
  xm = (x0 + x1) // 2
  thick = 2 * 2  # the answer: twice max(2, round(256 / 250))
  assert tuple(pic[y0, xm]) == colour and tuple(pic[y0 + thick - 1, xm]) == colour
  assert tuple(pic[y0 - 2, xm]) == sp.OUTLINE_DARK  # outside, one pixel off
  assert tuple(pic[y0 + thick + 1, xm]) == sp.OUTLINE_LIGHT  # inside, one pixel off
  assert tuple(pic[y0 - 1, xm]) == colour and tuple(pic[y0 + thick, xm]) == colour


def test_gallery_header_names_the_run(tmp_path):
  from scanformer_jax.visualize import gallery  # pylint: disable=g-import-not-at-top
  from visualize_fixtures import make_records  # pylint: disable=g-import-not-at-top
  records, images = make_records(3)
  facts = {"workdir": "/runs/<demo>", "checkpoint_step": 300, "split": "validation",
           "model_samples_per_s": 812.25}
  path = gallery.write_gallery(tmp_path, records, {"acc@0.5": 0.5},
                               lambda r: images[r.sample_id], size=3, run_facts=facts)
  page = open(path, encoding="utf-8").read()
  assert "<h2>Run</h2>" in page and "/runs/&lt;demo&gt;" in page
  assert "checkpoint step</td><td>300" in page and "812.2" in page
  assert page.index("<h2>Run</h2>") < page.index("<h2>Metrics</h2>")
