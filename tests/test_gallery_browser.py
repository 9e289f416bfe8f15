"""The gallery page in a real headless Chromium: every image loads from disk.

The gallery is JS-free; the check injects a tiny script into a COPY of the page that
writes each image's load state into the DOM, which `--dump-dom` prints. One extra
image with a missing file is injected too, so the check is seen to catch a broken one.
"""

import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from chromium_setup import find_or_install_chromium, run_headless
from scanformer_jax.visualize import gallery
from visualize_fixtures import make_records

_CHECK = """
<img src="missing_on_purpose.png" alt="control">
<script>
window.addEventListener("load", function () {
  var lines = [];
  for (var i = 0; i < document.images.length; i++) {
    var img = document.images[i];
    var ok = img.complete && img.naturalWidth > 0;
    lines.push((ok ? "LOADED " : "BROKEN ") + img.getAttribute("src"));
  }
  var out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = lines.join("\\n");
  document.body.appendChild(out);
});
</script>
"""


@pytest.fixture(scope="session")
def chromium():
  return find_or_install_chromium()


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory):
  records, images = make_records(7)
  summary = {"acc@0.5": 0.43, "acc@0.5_per_scale": [0.2, 0.43], "keep_ratio": [1.0, 0.4],
             "count": len(records)}
  out = tmp_path_factory.mktemp("gallery")
  gallery.write_gallery(out, records, summary, lambda r: images[r.sample_id], size=5)
  return out


def test_every_gallery_image_loads_in_chromium(chromium, gallery_dir, tmp_path):
  page = open(gallery_dir / "index.html", encoding="utf-8").read()
  assert "<script" not in page  # the gallery itself stays JS-free
  expected = re.findall(r'<img src="([^"]+)"', page)
  assert len(expected) == 5
  check = gallery_dir / "check.html"  # beside index.html: the same relative paths
  check.write_text(page.replace("</body>", _CHECK + "</body>"), encoding="utf-8")
  dom = run_headless(chromium, str(tmp_path / "profile"),
                     ["--dump-dom", "--virtual-time-budget=5000", check.as_uri()])
  found = re.search(r'<pre id="image-check">(.*?)</pre>', dom, re.S)
  assert found, f"the check script did not run; DOM starts: {dom[:500]}"
  states = dict(reversed(line.split(" ", 1)) for line in found.group(1).splitlines())
  assert states.pop("missing_on_purpose.png") == "BROKEN"  # the check can fail
  assert sorted(states) == sorted(expected)
  assert set(states.values()) == {"LOADED"}, states


def test_gallery_screenshot_shows_content(chromium, gallery_dir, tmp_path):
  shot = tmp_path / "gallery.png"
  run_headless(chromium, str(tmp_path / "profile"),
               ["--window-size=1280,1600", f"--screenshot={shot}", "--virtual-time-budget=5000",
                (gallery_dir / "index.html").as_uri()])
  pixels = np.asarray(Image.open(shot).convert("RGB"))
  assert pixels.shape[:2] == (1600, 1280)
  assert pixels.std() > 10  # not a blank page
  if os.environ.get("SCANFORMER_KEEP_SCREENSHOT"):  # for a person to look at
    shutil.copy(shot, os.environ["SCANFORMER_KEEP_SCREENSHOT"])
