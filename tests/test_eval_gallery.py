"""`scanformer eval --gallery DIR`: the split's gallery page from a trained run, every
image on disk, and one load in a real headless Chromium."""

import re

import pytest

from chromium_setup import find_or_install_chromium, run_headless
from scanformer_jax.cli import eval as eval_cmd
from test_gallery_browser import _CHECK
from tiny_run import tiny_run

SIZE = 6


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory):
  workdir = tiny_run(tmp_path_factory)
  out = tmp_path_factory.mktemp("eval_gallery")
  assert eval_cmd.main(["--workdir", str(workdir), "--split", "validation", "--gallery",
                        str(out), "--gallery-size", str(SIZE), "--no-progress"]) == 0
  return out


def test_gallery_page_lists_the_split(gallery_dir):
  page = (gallery_dir / "index.html").read_text(encoding="utf-8")
  sources = re.findall(r'<img src="([^"]+)"', page)
  assert len(sources) == SIZE
  for src in sources:
    assert (gallery_dir / src).is_file(), src
  assert "synthetic/tiny validation" in page
  assert "acc@0.5" in page and "keep ratio" in page and "count" in page
  cards = re.findall(r"sample (validation/\d+) ", page)
  assert len(cards) == len(set(cards)) == SIZE  # distinct samples of the split
  assert page.count("ground truth") == SIZE


def test_gallery_header_names_the_run(gallery_dir, tmp_path_factory):
  """The header: which workdir, checkpoint step and split, and the model-only speed."""
  page = (gallery_dir / "index.html").read_text(encoding="utf-8")
  run_table = page.split("<h2>Run</h2>", 1)[1].split("<h2>", 1)[0]
  workdir = tiny_run(tmp_path_factory)
  assert f'<td class="name">workdir</td><td>{workdir.resolve()}</td>' in run_table
  assert '<td class="name">checkpoint step</td><td>2</td>' in run_table
  assert '<td class="name">split</td><td>validation</td>' in run_table
  speed = re.search(r"samples/s \(model only[^<]*</td><td>([\d.e+]+)</td>", run_table)
  assert speed and float(speed.group(1)) > 0


def test_eval_gallery_needs_one_split(tmp_path_factory, tmp_path, capsys):
  workdir = tiny_run(tmp_path_factory)
  rc = eval_cmd.main(["--workdir", str(workdir), "--split", "validation,test", "--gallery",
                      str(tmp_path / "g"), "--no-progress"])
  assert rc == 2
  assert "--split NAME" in capsys.readouterr().err


def test_eval_gallery_images_load_in_chromium(gallery_dir, tmp_path):
  chromium = find_or_install_chromium()
  page = (gallery_dir / "index.html").read_text(encoding="utf-8")
  check = gallery_dir / "check.html"
  check.write_text(page.replace("</body>", _CHECK + "</body>"), encoding="utf-8")
  dom = run_headless(chromium, str(tmp_path / "profile"),
                     ["--dump-dom", "--virtual-time-budget=5000", check.as_uri()])
  found = re.search(r'<pre id="image-check">(.*?)</pre>', dom, re.S)
  assert found, f"the check script did not run; DOM starts: {dom[:500]}"
  states = dict(reversed(line.split(" ", 1)) for line in found.group(1).splitlines())
  assert states.pop("missing_on_purpose.png") == "BROKEN"
  assert len(states) == SIZE and set(states.values()) == {"LOADED"}, states
