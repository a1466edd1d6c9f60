"""Every `ddetr` command of the README runs, at tiny sizes, so the README
cannot drift from the CLI again.

Commands come from the README's code blocks and inline code spans. Each runs in
one working folder, in README order (the quick start's training run is the one
its predict command reads), with its placeholders (coco.yaml, shapes, best.pt,
image.jpg, cpu|cuda, the hub's short names) mapped onto tiny files and tiny-size
options appended: options given later win, so the README's own options are all
parsed and checked. Short names resolve in a hub-layout cache holding a tiny
model (offline, as every test). A command that repeats an earlier one (same
arguments once mapped) runs once. Exports are the slow part (tracing and the
ONNX optimizer: about 50 s each here): at the tiny sizes every export of one
checkpoint writes the same graph, so a second export of a checkpoint runs the
whole command (parsing, loading, onnxruntime verification) with the earlier
file copied in place of tracing again. The op benchmark's cases are checked
against the known names and run at the decoder case, the only small one
(the encoder cases are full-size maps: about 10 s each). Commands that name
`--device cuda` (the GPU figures) are skipped: CI has no GPU.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = "train:\n  min_scale: 48\n  scale_step: 16\n  eval_size: 64\n  eval_max_size: 80\n  crop: false\n"
TINY = {
    "train": ["--model", "tiny", "--imgsz", "64", "--max-size", "80", "--max-iters", "1", "--batch-size", "2",
              "--workers", "0", "--device", "cpu", "--epochs", "1"],
    "train --resume": ["--workers", "0", "--device", "cpu", "--max-iters", "2"],
    "eval": ["--workers", "0", "--device", "cpu", "--imgsz", "64", "--max-size", "80", "--batch-size", "2"],
    "predict": ["--device", "cpu", "--imgsz", "64", "--max-size", "80"],
    # static (about 3x faster to export than dynamic) at the size predict gives image.jpg (48x64 -> 60x80)
    # and bench's --input-size: the README's .onnx then runs in predict and bench
    "export": ["--imgsz", "60", "80", "--static"],
    "bench": ["--warmup", "0", "--repeats", "1", "--threads", "1", "--case", "decoder", "--batch-size", "1",
              "--input-size", "60", "80", "--no-hf", "--no-torch"],
}


def readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    found: list[str] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            for part in line.split("&&"):
                part = part.split(" #")[0].strip()
                if part.startswith("ddetr "):
                    found.append(part)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [c for c in re.findall(r"`(ddetr [^`]+)`", prose) if "…" not in c and "RUN_DIR" not in c]
    return found


def needs_gpu(command: str) -> bool:
    """The GPU section's commands (measured on a lent GPU; CI has none)."""
    return "--device cuda" in command


def test_the_readme_has_commands():
    cmds = readme_commands()
    for sub in ("train", "eval", "predict", "bench"):
        assert any(c.split()[1] == sub for c in cmds), sub
    assert "ddetr eval coco.yaml -w best.pt" in cmds


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path, monkeypatch):
    import torch

    from ddetr_cli.checkpoints import save_model
    from ddetr_cli.cli.main import cli
    from ddetr_cli.data import ensure_shapes_dataset
    from ddetr_cli.models import build_model, preset

    shapes = ensure_shapes_dataset(tmp_path / "shapes", n_train=4, n_val=2, size=64)
    root = shapes.parent
    work = tmp_path / "work"
    work.mkdir()
    coco = work / "coco.yaml"  # a user's dataset: not the built-in one, so runs are called exp, exp2, ...
    coco.write_text(yaml.safe_dump({"path": str(root), "train": {"images": "train", "annotations": "annotations/train.json"},
                                    "val": {"images": "val", "annotations": "annotations/val.json"}}))
    (work / "small.yaml").write_text(SMALL)
    torch.manual_seed(0)
    model = build_model(preset("tiny", num_classes=3)).eval()
    model.category_ids, model.input_size = [1, 2, 3], (64, 80)
    save_model(model, work / "best.pt")
    assert cv2.imwrite(str(work / "image.jpg"), np.full((48, 64, 3), 100, np.uint8))
    home = tmp_path / "home"
    (home / ".cache" / "ddetr").mkdir(parents=True)
    os.symlink(root, home / ".cache" / "ddetr" / "shapes-v1")
    monkeypatch.setenv("HOME", str(home))
    from hub_cache import make_hub_cache

    hub = tmp_path / "hub"
    make_hub_cache(hub, "SenseTime/deformable-detr-with-box-refine-two-stage")  # the default model, r50-two-stage
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.chdir(work)
    names = {"coco.yaml": str(coco), "DATA": str(coco), "shapes": str(shapes), "W": "best.pt", "cpu|cuda": "cpu",
             "photo.jpg": "image.jpg", "r50-480x640.onnx": "r50-two-stage.onnx", "--weights": "-w"}

    import ddetr_cli.export
    from ddetr_cli.bench.op import CASES

    real_export = ddetr_cli.export.export_onnx
    exported: dict[str, Path] = {}  # weights -> the file its first export wrote

    ran, seen = [], set()
    for command in readme_commands():
        if needs_gpu(command):
            continue
        args = [names.get(a, os.path.expanduser(a)) for a in shlex.split(command)[1:]]
        if tuple(args) in seen:
            continue
        seen.add(tuple(args))
        sub = args[0]
        extra = TINY.get("train --resume" if sub == "train" and "--resume" in args else sub, [])
        if sub == "train" and "--resume" not in args:
            extra = [*extra, "--config", "small.yaml"]
        if sub == "bench":
            for i, a in enumerate(args[:-1]):
                if a == "--case":
                    assert args[i + 1] in CASES, f"{command}: unknown case {args[i + 1]}"
                    args[i + 1] = "decoder"
        if sub == "export":
            weights = args[args.index("-w") + 1]

            def export(model, out, _weights=weights, **kw):
                if _weights in exported:
                    shutil.copyfile(exported[_weights], out)
                    return Path(out)
                exported[_weights] = path = real_export(model, out, **kw)
                return path

            monkeypatch.setattr(ddetr_cli.export, "export_onnx", export)
        res = CliRunner().invoke(cli, [*args, *extra], catch_exceptions=False)
        assert res.exit_code == 0, f"{command}\n{res.output}"
        ran.append(sub)
    assert {"train", "eval", "predict", "export", "bench"} <= set(ran)
    assert (work / "runs" / "train" / "shapes" / "weights" / "best.pt").is_file()  # the quick start's run
    assert (work / "runs" / "predict" / "exp" / "predictions.json").is_file()
