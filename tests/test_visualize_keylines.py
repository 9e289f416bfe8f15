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
