"""Every bad input class at the data level: skipped and counted with a clear reason
(pipelines), or one DataError line naming the file (predict's single-image path);
and every PIL image mode decodes to the right RGB pixels, upright."""

from __future__ import annotations

import io
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from data_fixtures import block_sample, encode
from data_pipelines import images, pipeline, processing, synthetic, transforms
from data_pipelines.bad_input import BadSample
from data_pipelines.errors import DataError
from data_pipelines.tokenizer import Tokenizer
from scanformer_jax.errors import UserError

TOK = Tokenizer(synthetic.vocab(), 8)


def _png_header(width: int, height: int) -> bytes:
  """A tiny PNG whose header claims width x height RGB pixels (data not decodable)."""

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
          + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _truncated_jpeg() -> bytes:
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
  data = encode(noise, "JPEG")
  return data[:len(data) // 2]  # the header parses, the pixels do not


BAD_IMAGES = {
    "corrupt": (b"\xff\xd8 definitely not a jpeg", "cannot open image"),
    "truncated": (_truncated_jpeg(), "cannot decode image"),
    "truncated PNG": (encode(np.random.default_rng(1).integers(0, 256, (64, 64, 3)).astype(
        np.uint8))[:3000], "cannot decode image"),
    "zero-byte": (b"", "zero-byte image"),
    "1x1": (encode(np.zeros((1, 1, 3), np.uint8)), "image too small (1x1 px"),
    "huge": (_png_header(9000, 9000), "image too large (9000x9000 = 81000000 pixels"),
    "decompression bomb": (_png_header(20000, 20000), "image too large"),
}
BAD_TEXTS = {
    "empty": ("", "empty expression"),
    "whitespace-only": (" \t\n  ", "empty expression"),
    "control-only": ("\x00\x07\x1b\x7f", "empty expression"),
    "zero-width-only": ("\u200b\u200c\u200d\u2060\ufeff", "empty expression"),
}
BAD_BOXES = {
    "zero-area": ([10.0, 5.0, 10.0, 20.0], "zero-area box"),
    "negative": ([20.0, 5.0, 10.0, 20.0], "negative width or height"),
    "NaN": ([float("nan"), 5.0, 10.0, 20.0], "malformed box"),
    "infinite": ([0.0, 5.0, float("inf"), 20.0], "malformed box"),
    "out-of-image": ([30.0, 5.0, 90.0, 20.0], "outside the 48x32 image"),
    "negative coordinates": ([-10.0, -10.0, 20.0, 20.0], "outside the 48x32 image"),
    "wrong shape": ([1.0, 2.0, 3.0], "malformed box"),
}


def _check(raw: dict, reason: str, message: str) -> None:
  proc = processing.SampleProcessor(32, 8, TOK, None)
  assert proc(raw)["bad"] == reason  # the pipelines skip and count it by this reason
  with pytest.raises(BadSample, match=message.replace("(", r"\(").replace("+", r"\+")):
    proc.process(raw, None)


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_bad_image_is_a_counted_skip_with_a_reason(name):
  data, message = BAD_IMAGES[name]
  _check(block_sample(0, image=data), "image", message)


@pytest.mark.parametrize("name", BAD_TEXTS)
def test_bad_expression_is_a_counted_skip_with_a_reason(name):
  text, message = BAD_TEXTS[name]
  _check(block_sample(0, text=text), "expression", message)


@pytest.mark.parametrize("name", BAD_BOXES)
def test_bad_box_is_a_counted_skip_with_a_reason(name):
  box, message = BAD_BOXES[name]
  raw = block_sample(0, box=[4.0, 4.0, 20.0, 24.0])
  raw["box"] = np.asarray(box, np.float64)
  _check(raw, "box", message)


def test_expressions_kept_as_the_tokenizer_reads_them():
  proc = processing.SampleProcessor(32, 8, TOK, None)
  row = proc(block_sample(0, text="the\x00 l\u00e9ft\u200b  block"))
  assert "bad" not in row and row["meta"]["expression"] == "the l\u00e9ft block"
  ids, _, _ = TOK.encode("the left block")
  np.testing.assert_array_equal(row["text_ids"], ids)  # accents stripped as BERT does
  emoji = proc(block_sample(0, text="\U0001F642 \u2603"))  # kept: [UNK] [UNK], as ViLT
  assert emoji["text_ids"][1:3].tolist() == [TOK.unk_id] * 2
  long_row = proc(block_sample(0, text="the left block " * 20))
  assert long_row["meta"]["truncated"] and long_row["text_mask"].all()


def test_pipeline_counts_every_bad_class(caplog):
  caplog.set_level(logging.INFO, logger="data_pipelines")
  good = [block_sample(i) for i in range(8)]
  bad = ([block_sample(0, image=d) for d, _ in BAD_IMAGES.values()]
         + [block_sample(0, text=t) for t, _ in BAD_TEXTS.values()]
         + [dict(block_sample(0), box=np.asarray(b, np.float64)) for b, _ in BAD_BOXES.values()])
  src = good + bad
  for i, s in enumerate(src):
    s["index"] = i
  it = pipeline.make_eval_iter("synthetic", "validation", None, image_size=32, max_text_len=8,
                               global_batch_size=8, num_workers=0, source=src,
                               max_bad_fraction=0.9)
  batches = list(it)
  assert sum(int(b["valid"].sum()) for b in batches) == len(good)
  t = it.stats.totals
  assert (t["image"], t["expression"], t["box"]) == (len(BAD_IMAGES), len(BAD_TEXTS),
                                                     len(BAD_BOXES))
  # The first few are logged with why.
  logged = [r.getMessage() for r in caplog.records if "bad sample skipped" in r.getMessage()]
  assert len(logged) == processing.LOGGED_BAD_SAMPLES
  messages = [m for _, m in (*BAD_IMAGES.values(), *BAD_TEXTS.values(), *BAD_BOXES.values())]
  assert all(any(m in line for m in messages) for line in logged), logged


# ------------------------------------------------------------ predict's single image
@pytest.mark.parametrize("name", BAD_IMAGES)
def test_predict_bad_image_file_is_one_line_naming_it(name, tmp_path):
  data, message = BAD_IMAGES[name]
  path = tmp_path / f"{name}.png"
  path.write_bytes(data)
  with pytest.raises(DataError) as e:
    processing.load_image_file(path)
  text = str(e.value)
  assert isinstance(e.value, UserError) and "\n" not in text
  assert text.startswith(f"bad image {path}: ") and message in text


def test_predict_missing_image_and_directory(tmp_path):
  with pytest.raises(DataError, match=f"image not found: {tmp_path / 'nope.jpg'}"):
    processing.load_image_file(tmp_path / "nope.jpg")
  with pytest.raises(DataError, match=f"cannot read image {tmp_path}"):
    processing.load_image_file(tmp_path)


@pytest.mark.parametrize("text", [t for t, _ in BAD_TEXTS.values()])
def test_predict_empty_expression_is_one_line(text):
  img = np.full((40, 60, 3), 90, np.uint8)
  with pytest.raises(DataError) as e:
    processing.preprocess_single(img, text, TOK, 32, 8, source="photo.jpg")
  msg = str(e.value)
  assert msg.startswith("photo.jpg: the expression is unusable: ") and "\n" not in msg
  assert "--text" in msg


def test_predict_tiny_image_array_is_one_line():
  with pytest.raises(DataError, match=r"^photo.jpg: the image is unusable: image too small"):
    processing.preprocess_single(np.zeros((1, 1, 3), np.uint8), "the left block", TOK, 32, 8,
                                 source="photo.jpg")


def test_predict_truncation_is_reported(caplog):
  caplog.set_level(logging.WARNING, logger="data_pipelines")
  img = np.full((40, 60, 3), 90, np.uint8)
  _, meta = processing.preprocess_single(img, "the left block " * 10, TOK, 32, 8)
  assert meta["truncated"][0]
  assert "longer than 8 tokens and was truncated" in caplog.text


# -------------------------------------------------------------------------- modes
def _two_halves(mode: str, left, right, size=(16, 12)) -> Image.Image:
  img = Image.new(mode, size, left)
  img.paste(right, (size[0] // 2, 0, size[0], size[1]))
  return img


def _saved(img: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  return buf.getvalue()


def _palette(mode: str) -> Image.Image:
  img = Image.new(mode, (16, 12))
  pal = [0, 0, 0] * 256
  pal[3:6] = [200, 30, 30]
  pal[6:9] = [30, 30, 200]
  img.putpalette(pal)
  img.paste((1, 255) if mode == "PA" else 1, (0, 0, 8, 12))
  img.paste((2, 0) if mode == "PA" else 2, (8, 0, 16, 12))
  return img


# mode -> (image, the RGB of its left and right halves after decoding)
MODES = {
    "1": (_two_halves("1", 0, 1), (0, 0, 0), (255, 255, 255)),
    "L": (_two_halves("L", 77, 200), (77,) * 3, (200,) * 3),
    "LA": (_two_halves("LA", (77, 255), (200, 0)), (77,) * 3, (200,) * 3),  # alpha dropped
    "P": (_palette("P"), (200, 30, 30), (30, 30, 200)),
    "PA": (_palette("PA"), (200, 30, 30), (30, 30, 200)),
    "RGB": (_two_halves("RGB", (10, 20, 30), (200, 100, 50)), (10, 20, 30), (200, 100, 50)),
    "RGBA": (_two_halves("RGBA", (10, 20, 30, 255), (200, 100, 50, 0)), (10, 20, 30),
             (200, 100, 50)),
    "CMYK": (_two_halves("CMYK", (0, 255, 255, 0), (0, 0, 0, 255)), (255, 0, 0), (0, 0, 0)),
    "I;16": (_two_halves("I;16", 0, 32896), (0,) * 3, (128,) * 3),
    "I;16B": (_two_halves("I;16B", 65535, 257 * 64), (255,) * 3, (64,) * 3),
    "I": (_two_halves("I", 40000, 1000), (156,) * 3, (4,) * 3),
    "F": (_two_halves("F", 0.25, 1.0), (64,) * 3, (255,) * 3),
}
# How each mode reaches the pipeline: as a file where a common format stores it.
FORMATS = {"1": "PNG", "L": "PNG", "LA": "PNG", "P": "PNG", "RGB": "PNG", "RGBA": "PNG",
           "CMYK": "TIFF", "I;16": "PNG", "I;16B": "TIFF", "I": "TIFF", "F": "TIFF"}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_decodes_to_its_rgb(mode):
  img, left, right = MODES[mode]
  data = _saved(img, FORMATS[mode]) if mode in FORMATS else img
  opened = images.open_image(data)
  assert opened.mode == mode or mode == "1" and opened.mode in ("1", "L")
  rgb = np.asarray(images.to_rgb(opened))  # [H, W, 3]
  assert rgb.dtype == np.uint8 and rgb.shape == (12, 16, 3)
  np.testing.assert_array_equal(rgb[:, :8].reshape(-1, 3), [left] * 96)
  np.testing.assert_array_equal(rgb[:, 8:].reshape(-1, 3), [right] * 96)
  # The letterbox path (`transforms.render`) sees the same pixels.
  pix = np.asarray(transforms.render(images.open_image(data),
                                     transforms.letterbox_geometry(16, 12, 16)))
  np.testing.assert_array_equal(pix[2, 2], left)
  np.testing.assert_array_equal(pix[2, 13], right)


def test_sixteen_bit_png_is_not_white_in_predict_and_pipeline(tmp_path):
  ramp = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)  # 0..61420
  path = tmp_path / "ramp16.png"
  Image.fromarray(ramp).save(path)
  assert Image.open(path).mode.startswith("I")
  want = np.round(ramp * (255 / 65535)).astype(np.uint8)
  got = processing.load_image_file(path)
  np.testing.assert_array_equal(got[..., 0], want)
  proc = processing.SampleProcessor(64, 8, TOK, None)
  row = proc(block_sample(0, w=64, h=48, image=path.read_bytes()))
  assert (row["pixels"] == 255).mean() < 0.01
  np.testing.assert_allclose(row["pixels"][..., 0].astype(int), want, atol=1)


def test_float_image_with_nan_is_bad():
  arr = np.full((12, 16), 0.5, np.float32)
  arr[3, 3] = np.nan
  with pytest.raises(BadSample, match="non-finite"):
    images.to_rgb(images.open_image(Image.fromarray(arr)))


def test_exif_orientation_is_applied():
  arr = np.zeros((20, 40, 3), np.uint8)
  arr[:, :20] = (255, 0, 0)  # left half red, as stored
  exif = Image.Exif()
  exif[0x0112] = 6  # viewers rotate 90 degrees clockwise: the left half goes on top
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="JPEG", exif=exif, quality=95)
  img = images.open_image(buf.getvalue())
  assert img.size == (20, 40)
  rgb = np.asarray(images.to_rgb(img)).astype(int)
  assert rgb[5, 10, 0] > 200 and rgb[5, 10, 1] < 50  # top: red
  assert rgb[35, 10, 0] < 50  # bottom: black
