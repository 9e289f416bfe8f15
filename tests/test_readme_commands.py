"""Every command in the ```bash blocks of README.md and the pages experiments/*.md is
either run here, offline, on tiny fixtures, or listed with the reason it cannot be.

A fixture stands in for each input the docs assume (the `refer` annotations and COCO
images, a Hugging Face ViLT directory, `photo.jpg`) inside a temporary working
directory, so the commands run as written from there; test-only `--set` overrides
shrink the model and the step counts. A command too slow for the suite, or one that
needs what no fixture provides (a TPU pod, GCS, the network, the real ViLT weights),
is parsed instead: its flags by the command's own argument parser, its `--config` and
`--set` by the config loader. A command in a README that is not listed below fails
`test_every_readme_command_is_listed`; a listed command no README has any more fails
it too, so this file always says how each documented command is checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Optional

import pytest

import data_fixtures
import train_helpers

ROOT = Path(train_helpers.ROOT)
# The top-level README first, then every page under experiments/ (a new page is
# checked without being named here).
READMES = ("README.md", *sorted(p.relative_to(ROOT).as_posix()
                                for p in (ROOT / "experiments").glob("*.md")))
# Shell variables of the multi-host commands, for parsing them.
VARIABLES = {"$TPU": "tpu", "$ZONE": "zone", "$BUCKET": "bucket", "$USER": "user",
             "$N": "2", "$i": "0"}


@dataclasses.dataclass(frozen=True)
class Run:
  """Run the command from the fixture directory, with `extra` arguments appended."""
  extra: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Parse:
  """Parse the flags (and resolve --config/--set) only; `why` it is not run here."""
  why: str


@dataclasses.dataclass(frozen=True)
class Skip:
  """Neither run nor parsed: `why`."""
  why: str


# The fake ViLT of tests/test_convert_vilt.py as a ScanFormer backbone, at 16/32/64 px.
FAKE_VILT_MODEL = ("model.vocab_size=37", "model.max_text_len=12", "model.hidden_size=24",
                   "model.num_layers=2", "model.num_heads=2", "model.mlp_dim=40",
                   "model.encoder1_layers=1", "model.patch_size=8", "model.pos_grid_size=3",
                   "model.image_sizes=16,32,64", "model.box_head_layers=2")
FEW_STEPS = ("train.num_steps=2", "train.batch_size=2", "train.log_every=1",
             "optim.warmup_steps=1", "eval.batch_size=2", "eval.every_steps=2",
             "checkpoint.every_steps=2", "data.worker_count=0")
REFCOCO_TRAIN = ("scanformer train --config experiments/configs/refcoco.py --workdir "
                 "runs/refcoco --set train.init_from=weights/vilt-b32")
POD = "needs a Cloud TPU pod slice"
DEMO_RUN = "needs the runs/demo workdir of `make demo`"
DEMO_DATA = "needs the synthetic dataset `make demo` builds in runs/data"
TOUR_RUN = "needs the runs/mine workdir of the README's tour"

# In the order they run (a command runs once, however many READMEs show it).
COMMANDS: dict[str, object] = {
    "make demo": Skip("the full 13-minute demo (experiments/run_demo.py); run by hand"),
    "make test": Skip("runs this suite itself"),
    "pip install -e '.[refcoco-build]'": Skip("needs the network"),
    "scanformer data synthetic --data-dir runs/data": Parse("20k scenes: minutes"),
    "scanformer data synthetic --data-dir runs/data --config small": Run(),
    ("scanformer data synthetic --data-dir runs/data --config "
     "train=20000,validation=1000,test=1000,size=128"): Parse("20k scenes: minutes"),
    ("scanformer data refer --refer-root refer/data --dataset refcoco --split-by unc "
     "--image-dir coco/train2014 --data-dir runs/data"): Run(),
    ("scanformer data refer --refer-root refer/data --dataset refcoco+ --split-by unc "
     "--image-dir coco/train2014 --data-dir runs/data"): Run(),
    ("scanformer data refer --refer-root refer/data --dataset refcocog --split-by umd "
     "--image-dir coco/train2014 --data-dir runs/data"): Run(),
    ("scanformer data refer --refer-root refer/data --dataset refclef --split-by berkeley "
     "--image-dir saiapr_tc-12 --data-dir runs/data"): Run(),
    ("scanformer data refcoco --manual-dir <M> --data-dir runs/data --configs "
     "refcoco_unc,refcocog_umd"): Parse("needs TensorFlow; tests/test_data_builders.py "
                                        "builds the catalog fixture"),
    ("scanformer data inspect --dataset refer/refcoco_unc --split val --data-dir runs/data "
     "--num 5 --json --out /tmp/inspect"): Run(),
    ("scanformer data ready --config experiments/configs/synthetic_tiny.py --time-batches "
     "200"): Parse(DEMO_DATA + "; tests/test_data_ready_rows.py runs the command"),
    "scanformer convert-vilt --src vilt-b32-mlm --out weights/vilt-b32": Run(),
    ("scanformer convert-vilt --src vilt_200k_mlm_itm.ckpt --out weights/vilt-b32 --vocab "
     "vocab.txt"): Parse("needs the original ViLT checkpoint (a torch file)"),
    REFCOCO_TRAIN: Run(tuple(a for kv in FAKE_VILT_MODEL + FEW_STEPS for a in ("--set", kv))
                       + ("--no-progress",)),
    ("scanformer eval --workdir runs/refcoco --split validation,testA,testB --json "
     "runs/refcoco/eval.json"): Run(("--no-progress",)),
    ('scanformer predict --workdir runs/refcoco --image photo.jpg --text "the man on the '
     'left" --out scan.png'): Run(),
    "tensorboard --logdir runs/refcoco/tensorboard": Run(),
    ("scanformer calibrate --workdir runs/refcoco --split validation --quantile "
     "0.995"): Run(("--no-progress",)),
    "scanformer eval --workdir runs/refcoco --split validation --json eval.json": Run(
        ("--no-progress",)),
    ("scanformer eval --workdir runs/refcoco --split validation --mode dense --json "
     "eval_dense.json"): Run(("--no-progress",)),
    "scanformer bench --latency --workdir runs/refcoco --steps 20": Run(
        ("--steps", "2", "--warmup", "1")),
    "scanformer bench --throughput --workdir runs/refcoco --split validation": Run(
        ("--steps", "1")),
    ('scanformer predict --workdir runs/demo --image photo.jpg --text "the red square" '
     "--out scan.png"): Parse(DEMO_RUN),
    # The README's tour: a second demo-sized run on the data `make demo` built.
    "scanformer train --config experiments/configs/synthetic_tiny.py --workdir runs/mine": Parse(
        DEMO_DATA + "; trains for minutes"),
    "scanformer calibrate --workdir runs/mine --split validation": Parse(TOUR_RUN),
    "scanformer eval --workdir runs/mine --split test --json runs/mine/eval.json": Parse(
        TOUR_RUN),
    ('scanformer predict --workdir runs/mine --image runs/demo/predict_input.png --text '
     '"the purple cross" --out scan.png'): Parse(TOUR_RUN + " and the demo's input image"),
    ("scanformer eval --workdir runs/mine --exit-calibrate --split validation --report-split "
     "test --risk 0.01 --delta 0.1"): Parse(TOUR_RUN),
    ("scanformer eval --workdir runs/mine --split validation --report-split test --exit-sweep "
     "runs/mine/exit_sweep"): Parse(TOUR_RUN),
    ("scanformer eval --workdir runs/demo --exit-calibrate --split validation --report-split "
     "test --risk 0.01 --delta 0.1 --exit-criteria halt_head,iou_head"): Parse(DEMO_RUN),
    "scanformer serve --workdir runs/mine": Parse(TOUR_RUN + "; a server runs until stopped"),
    "scanformer export --workdir runs/mine --out runs/mine-export": Parse(TOUR_RUN),
    ('python runs/mine-export/run_exported.py --image runs/demo/predict_input.png --text '
     '"the purple cross"'): Skip("the export of the tour; tests/test_export.py runs the "
                                 "runner on a tiny export"),
    ("scanformer predict --workdir runs/demo --input queries.jsonl --output preds.jsonl "
     "[--out-dir scans/] [--batch-size 16]"): Parse(DEMO_RUN + "; tests/test_predict_jsonl.py "
                                                     "runs batch mode"),
    ("scanformer eval --workdir runs/demo --split validation --gallery runs/demo/gallery "
     "--gallery-size 24"): Parse(DEMO_RUN + "; tests/test_eval_gallery.py runs --gallery"),
    ("scanformer eval --workdir runs/demo --split validation --exit-sweep "
     "runs/demo/exit_sweep"): Parse(DEMO_RUN + "; tests/test_train_synthetic.py runs "
                                    "--exit-sweep"),
    ("scanformer eval --workdir runs/demo --split validation --exit-sweep "
     "runs/demo/exit_sweep --exit-criteria iou_head:0.8,box_stability:0.9"): Parse(DEMO_RUN),
    ("scanformer bench --model vilt_b32 --batch-size 8 --keep-ratio 0.25 [--steps 10] "
     "[--dtype bfloat16] [--json out.json]"): Parse("ViLT-B/32 timing: minutes"),
    "scanformer bench --latency --model tiny --steps 30": Parse("a latency benchmark"),
    ("scanformer bench --train --model tiny --batch-size 8 --keep-ratio 0.25 --steps 5 "
     "--warmup 1"): Parse("a training-step benchmark"),
    ("scanformer bench --train --model vilt_b32 --batch-size 8 --keep-ratio 0.25 --steps 3 "
     "--warmup 1"): Parse("ViLT-B/32 training-step timing: minutes"),
    "python experiments/bench_model.py --keep-ratios 0.1,0.25,0.5,1.0": Parse(
        "ViLT-B/32 timing: minutes"),
    "python experiments/bench_pipeline.py": Parse("a throughput benchmark"),
    "python experiments/profile_train_step.py --config experiments/configs/synthetic_tiny.py": Parse(
        "a profile of the demo's train steps: minutes"),
    ("python experiments/profile_train_step.py --config experiments/configs/synthetic_tiny.py "
     "--steps-per-call 8 --speed-only --steps 6"): Parse("the demo's train steps timed: minutes"),
    "python experiments/probe_object_features.py --workdir runs/demo": Parse(DEMO_RUN),
    "python experiments/bench_exit_overhead.py --workdir runs/demo --pairs 40": Parse(DEMO_RUN),
    "scanformer bench --train --loop --config experiments/configs/synthetic_tiny.py": Parse(
        "the demo's training loop against the baseline loop: minutes"),
    ("gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command \"git clone "
     "<repo> scanformer-jax && cd scanformer-jax && make install && .venv/bin/pip install "
     "'jax[tpu]'\""): Skip(POD),
    "gsutil -m cp -r runs/data/refer gs://$BUCKET/data/": Skip("needs GCS"),
    ("gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command \"cd "
     "scanformer-jax && .venv/bin/scanformer train --config experiments/configs/refcoco.py "
     "--workdir runs/refcoco --set mesh.distributed=true --set "
     "checkpoint.directory=gs://$BUCKET/runs/refcoco/checkpoints --set "
     "data.data_dir=gs://$BUCKET/data --set train.init_from=/home/$USER/vilt-b32\""): Parse(
         POD + "; the scanformer command inside is parsed"),
    (REFCOCO_TRAIN + " --set model.dtype=bfloat16"): Parse(
        "needs GPUs and the real ViLT weights"),
    ("scanformer train --config experiments/configs/refcoco.py --workdir runs/refcoco --set "
     "mesh.distributed=true --set mesh.coordinator_address=host0:12345 --set "
     "mesh.num_processes=$N --set mesh.process_id=$i --set "
     "checkpoint.directory=/shared/runs/refcoco/checkpoints --set "
     "data.data_dir=/shared/data --set train.init_from=/shared/vilt-b32"): Parse(
         "needs several hosts"),
}


def _normalize(command: str) -> str:
  """One spelling per command: shell words, runs of spaces inside them collapsed."""
  words = [" ".join(w.split()) for w in shlex.split(command, comments=True)]
  return " ".join(shlex.quote(w) if " " in w else w for w in words)


def readme_commands(path: Path) -> list[str]:
  """The commands of every ```bash block: continuation lines joined, comments dropped."""
  text = path.read_text(encoding="utf-8")
  commands = []
  for block in re.findall(r"^ *```bash\n(.*?)^ *```", text, flags=re.S | re.M):
    for line in re.sub(r"\\\n", " ", block).splitlines():
      if _normalize(line):
        commands.append(_normalize(line))
  return commands


def _documented() -> dict[str, str]:
  """{command: the README it is in (the first)}."""
  out = {}
  for name in READMES:
    for command in readme_commands(ROOT / name):
      out.setdefault(command, name)
  return out


def test_every_readme_command_is_listed():
  documented = _documented()
  listed = {_normalize(c): action for c, action in COMMANDS.items()}
  missing = [f"{where}: {c}" for c, where in documented.items() if c not in listed]
  assert not missing, ("README commands neither run nor listed in "
                       "tests/test_readme_commands.py:\n" + "\n".join(missing))
  stale = [c for c in listed if c not in documented]
  assert not stale, "listed commands no README shows any more:\n" + "\n".join(stale)
  for command, action in listed.items():
    if isinstance(action, (Parse, Skip)):
      assert action.why, command


# ----------------------------------------------------------------------------------
# Fixtures: the inputs the docs assume, in a fresh working directory.

_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "on", "left", "right",
          "red", "green", "blue", "yellow", "box", "one", "thing", "square", "top",
          "bottom", "man", "person", "in", "middle", "tall", "rectangle", "blob", "to",
          "of", "and", "small", "large", "big", "white", "black", "dog", "cat"]


def _make_inputs(cwd: Path) -> None:
  import test_convert_vilt  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  data_fixtures.make_refer_fixture(cwd / "fixture")
  refcoco = cwd / "fixture" / "refer" / "refcoco"
  for dataset, split_by in (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd"),
                            ("refclef", "berkeley")):
    folder = cwd / "refer" / "data" / dataset
    folder.mkdir(parents=True)
    shutil.copy(refcoco / "instances.json", folder)
    shutil.copy(refcoco / "refs(unc).p", folder / f"refs({split_by}).p")
  for images in ("coco/train2014", "saiapr_tc-12"):
    shutil.copytree(cwd / "fixture" / "images", cwd / images)
  assert len(_VOCAB) == test_convert_vilt.HF_CONFIG["vocab_size"]
  test_convert_vilt.write_hf_dir(cwd / "vilt-b32-mlm")
  (cwd / "vilt-b32-mlm" / "vocab.txt").write_text("\n".join(_VOCAB) + "\n")
  Image.new("RGB", (80, 60), (90, 120, 200)).save(cwd / "photo.jpg")


# ----------------------------------------------------------------------------------
# Running and parsing.


def _argv(tokens: list[str], cwd: Path) -> list[str]:
  """Repository paths made absolute, /tmp outputs moved into `cwd`, [optional] kept."""
  out = []
  for t in tokens:
    t = t.strip("[]")
    for name, value in VARIABLES.items():
      t = t.replace(name, value)
    if t.startswith("experiments/"):
      t = str(ROOT / t)
    elif t.startswith("/tmp/"):
      t = str(cwd / t[len("/tmp/"):])
    out.append(t)
  return out


class _Parsed(Exception):
  def __init__(self, namespace):
    super().__init__("parsed")
    self.namespace = namespace


def _parse_only(monkeypatch, main, argv) -> argparse.Namespace:
  """Calls `main(argv)` until its argument parser is done, then stops it."""
  original = argparse.ArgumentParser.parse_args

  def parse_args(self, args=None, namespace=None):
    raise _Parsed(original(self, args, namespace))

  with monkeypatch.context() as m:
    m.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    with pytest.raises(_Parsed) as parsed:
      main(argv)
  return parsed.value.namespace


def _check_parsed(args: argparse.Namespace) -> None:
  """What the parser cannot check: the config and --set keys, a synthetic spec."""
  from scanformer_jax import config_io  # pylint: disable=g-import-not-at-top
  if getattr(args, "config", None) and hasattr(args, "overrides"):
    config_io.apply_overrides(config_io.load_config_file(args.config), args.overrides)
  if getattr(args, "cmd", None) == "synthetic":
    from data_pipelines import synthetic_builder  # pylint: disable=g-import-not-at-top
    synthetic_builder.config_from_spec(args.config)


def _script_main(path: str):
  spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


def _remote_command(tokens: list[str]) -> list[str]:
  """The scanformer command inside `gcloud ... --command "cd X && .venv/bin/scanformer ..."`."""
  inner = tokens[tokens.index("--command") + 1]
  part = [p for p in inner.split("&&") if "scanformer " in p][-1]
  words = shlex.split(part)
  return ["scanformer"] + words[1:]


def _execute(command: str, action, cwd: Path, monkeypatch, capsys) -> None:
  from scanformer_jax import cli  # pylint: disable=g-import-not-at-top
  tokens = shlex.split(command)
  if tokens[0] == "gcloud":
    tokens = _remote_command(tokens)
  argv = _argv(tokens, cwd)
  if argv[0] == "scanformer":
    main, argv = cli.main, argv[1:]
  elif argv[0] == "python":
    main, argv = _script_main(argv[1]), argv[2:]
  elif argv[0] == "tensorboard":
    _check_tensorboard(cwd / argv[argv.index("--logdir") + 1])
    return
  else:
    raise AssertionError(f"no way to run {command!r}")
  if isinstance(action, Parse):
    _check_parsed(_parse_only(monkeypatch, main, argv))
    return
  rc = main(argv + list(action.extra))
  captured = capsys.readouterr()
  assert rc == 0, f"{command} exited {rc}\n{captured.err[-4000:]}"


def _check_tensorboard(logdir: Path) -> None:
  """The viewer is installed, and it reads the run's scalars."""
  assert shutil.which("tensorboard", path=os.path.dirname(sys.executable)), (
      "tensorboard is not installed next to this python")
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(logdir))
  events.Reload()
  assert "train/loss" in events.Tags()["scalars"], events.Tags()


@pytest.mark.slow
def test_readme_commands_run(tmp_path, monkeypatch, capsys):
  """Builds, converts, trains, evaluates and predicts exactly as the READMEs say."""
  documented = _documented()
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  _make_inputs(tmp_path)
  from scanformer_jax.cli import common  # pylint: disable=g-import-not-at-top
  # Logging setup would outlive the test on pytest's (then closed) streams.
  monkeypatch.setattr(common, "setup_logging", lambda verbose: None)
  for command, action in COMMANDS.items():
    command = _normalize(command)
    if isinstance(action, Skip) or command not in documented:
      continue  # A command gone from the READMEs fails the listing test instead.
    _execute(command, action, tmp_path, monkeypatch, capsys)
  assert (tmp_path / "runs" / "refcoco" / "eval.json").is_file()
  assert (tmp_path / "scan.png").is_file()
  assert sorted(os.listdir(tmp_path / "inspect"))


# ----------------------------------------------------------------------------------
# Links between the pages.


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> '-'."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
  text = re.sub(r"^ *```.*?^ *```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
  return {_slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def test_every_link_between_pages_resolves():
  """A relative link in a README or page names a file that exists, and its #anchor
  a heading of that file."""
  broken = []
  for name in READMES:
    page = ROOT / name
    text = re.sub(r"^ *```.*?^ *```", "", page.read_text(encoding="utf-8"),
                  flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"[a-z]+://", target):
        continue
      file_part, _, anchor = target.partition("#")
      linked = (page.parent / file_part).resolve() if file_part else page
      if not linked.exists():
        broken.append(f"{name}: {target} (no such file)")
      elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
        broken.append(f"{name}: {target} (no such heading)")
  assert not broken, "broken links:\n" + "\n".join(broken)
