"""ONNX export and onnxruntime: parity with PyTorch on every variant (padded batch of
two different-sized images), the dynamic graph at other sizes and batch sizes, the
metadata, ``ddetr export``, and predict / eval with ``--weights model.onnx``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from ddetr_cli.checkpoints import save_model  # noqa: E402
from ddetr_cli.export import TOLERANCE, export_onnx, read_metadata, verify_onnx  # noqa: E402
from ddetr_cli.export.onnx import sample_batch  # noqa: E402
from ddetr_cli.models import ModelConfig, apply_variant, build_model  # noqa: E402
from ddetr_cli.engine.run_predict import load_runner  # noqa: E402
from ddetr_cli.runtime.onnx import OnnxRunner  # noqa: E402

NAMES = ["circle", "square", "triangle"]


def tiny(variant: str, seed: int = 0, levels: int = 4):
    """A small model of ``variant`` (base | refine | two-stage | single-scale), heads moved off their init;
    ``levels``: feature levels (export time grows with them)."""
    cfg = dict(num_classes=3, backbone="resnet", backbone_block="basic", backbone_depths=[1, 1, 1, 1], backbone_width=8,
               d_model=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=48, num_queries=8, dropout=0.0,
               enc_n_points=2, dec_n_points=2, num_feature_levels=levels)
    if variant == "single-scale":
        cfg["num_feature_levels"], variant = 1, "base"
    torch.manual_seed(seed)
    model = build_model(apply_variant(ModelConfig(**cfg), variant)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.class_names, model.category_ids = list(NAMES), [3, 7, 11]
    return model


# Exports are the slow part (torch.export reasons about every op): each variant is
# exported once. base and refine here (static: about 3x faster than dynamic);
# two-stage by the shared dynamic export below (its parity test uses padded
# batches); single-scale by `ddetr export --static` in the CLI test, whose
# self-check is the same padded-batch parity check and whose file the
# static-size error test reuses.
@pytest.mark.parametrize("variant,levels", [("base", 4), ("refine", 3)])  # 4: the extra stride-64 level once
def test_static_export_parity_every_variant(tmp_path, variant, levels):
    model = tiny(variant, levels=levels)
    path = export_onnx(model, tmp_path / "m.onnx", imgsz=(96, 128), dynamic=False)
    res = verify_onnx(model, path, (96, 128), dynamic=False)  # padded batch of two different-sized images
    assert res.shape == (2, 3, 96, 128)
    assert res.max_abs_diff <= TOLERANCE, (variant, res)


@pytest.fixture(scope="module")
def dynamic_export(tmp_path_factory):
    """One dynamic export (two-stage, the most involved graph) shared by the tests below; three
    feature levels (C3-C5, no extra level): a dynamic export costs about a minute per level on 2 cores."""
    root = tmp_path_factory.mktemp("onnx")
    model = tiny("two-stage", levels=3)
    model.input_size = (80, 112)
    weights = save_model(model, root / "tiny.pt")
    path = export_onnx(model, root / "tiny.onnx", imgsz=(96, 128))
    return model, weights, path


@pytest.mark.parametrize("batch,height,width", [(2, 96, 128), (2, 133, 83), (1, 70, 150), (3, 112, 112)])
def test_dynamic_graph_matches_at_other_sizes(dynamic_export, batch, height, width):
    model, _, path = dynamic_export
    images, mask = sample_batch(height, width, seed=batch)
    if batch == 1:
        images, mask = images[1:], mask[1:]
    elif batch == 3:
        images, mask = torch.cat([images, images[:1].flip(-1)]), torch.cat([mask, mask[:1]])
    runner = OnnxRunner(path)
    model.set_msda_backend("native")  # parity holds against the default op too
    with torch.no_grad():
        ref = model(images, mask)
    got = runner(images, mask)
    for key in ("pred_logits", "pred_boxes"):
        assert got[key].shape == ref[key].shape
        assert (got[key] - ref[key]).abs().max().item() <= TOLERANCE, (key, batch, height, width)


def test_metadata_and_runner_attributes(dynamic_export):
    model, _, path = dynamic_export
    meta = read_metadata(path)
    assert meta["class_names"] == NAMES and meta["category_ids"] == [3, 7, 11] and meta["dynamic"] is True
    assert meta["preprocess"]["size"] == 80 and meta["preprocess"]["max_size"] == 112
    assert meta["preprocess"]["mean"] == [0.485, 0.456, 0.406] and meta["model_config"]["two_stage"] is True
    runner = load_runner(path, "cpu")
    assert runner.class_names == NAMES and runner.category_ids == [3, 7, 11]
    assert runner.input_size == (80, 112) and runner.config.num_classes == 3
    assert runner.source == str(path)


def _invoke(args, cwd: Path):
    from ddetr_cli.cli.main import cli

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, args)
    finally:
        os.chdir(old)


def _images(folder: Path) -> Path:
    import cv2
    import numpy as np

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(60, 80), (90, 70), (75, 75)]):
        cv2.imwrite(str(folder / f"{i + 1}.png"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    return folder


def test_predict_onnx_gives_the_same_detections(dynamic_export, tmp_path):
    _, weights, path = dynamic_export
    imgs = _images(tmp_path / "imgs")
    runs = {}
    for name, w in (("torch", weights), ("onnx", path)):
        res = _invoke(["predict", str(imgs), "-w", str(w), "--device", "cpu", "--conf", "0", "--batch-size", "2",
                       "--out", str(tmp_path / name)], tmp_path)
        assert res.exit_code == 0, res.output
        runs[name] = json.loads((tmp_path / name / "predictions.json").read_text())
    assert "onnxruntime" in res.output
    assert len(runs["torch"]) == len(runs["onnx"]) == 3
    for a, b in zip(runs["torch"], runs["onnx"]):
        assert [d["category_id"] for d in a["detections"]] == [d["category_id"] for d in b["detections"]]
        for da, db in zip(a["detections"], b["detections"]):
            assert da["label"] == db["label"] and abs(da["score"] - db["score"]) <= 1e-4
            assert max(abs(x - y) for x, y in zip(da["box"], db["box"])) <= 0.05


def test_eval_onnx_gives_the_same_detections(dynamic_export, tmp_path):
    from ddetr_cli.engine import run_evaluation

    model, weights, path = dynamic_export
    root = tmp_path / "data"
    imgs = _images(root / "images")
    images = [{"id": i + 1, "file_name": f"{i + 1}.png", "height": h, "width": w}
              for i, (h, w) in enumerate([(60, 80), (90, 70), (75, 75)])]
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 3, "bbox": [5, 20, 40, 40], "area": 1600, "iscrowd": 0}]
    cats = [{"id": c, "name": n} for c, n in zip([3, 7, 11], NAMES)]
    (root / "val.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    (root / "data.yaml").write_text(f"path: {root}\ntrain: {{images: images, annotations: val.json}}\n"
                                    f"val: {{images: images, annotations: val.json}}\n")
    assert imgs.is_dir()
    dets = {}
    for name, w in (("torch", weights), ("onnx", path)):
        ev = run_evaluation(str(root / "data.yaml"), w, device="cpu", workers=0, batch_size=2)
        dets[name] = sorted(ev.result.detections, key=lambda d: (d["image_id"], -d["score"]))
    assert len(dets["torch"]) == len(dets["onnx"]) > 0
    for a, b in zip(dets["torch"], dets["onnx"]):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert abs(a["score"] - b["score"]) <= 1e-4


def test_export_cli_verifies_and_fails_cleanly(tmp_path):
    model = tiny("single-scale")
    weights = save_model(model, tmp_path / "s.pt")
    res = _invoke(["export", "-w", str(weights), "--imgsz", "96", "96", "--static"], tmp_path)
    assert res.exit_code == 0, res.output  # the self-check fails the command above the tolerance
    diff = float(re.search(r"max abs diff (\S+) ", res.output).group(1))
    assert diff <= TOLERANCE and (tmp_path / "s.onnx").is_file()  # single-scale parity on a padded batch
    # a static graph given another size: one line from run_prediction, no traceback
    img = _images(tmp_path / "imgs")
    res = _invoke(["predict", str(img), "-w", str(tmp_path / "s.onnx"), "--device", "cpu", "--imgsz", "64"], tmp_path)
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    error = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "static size 96x96" in error[0] and "--dynamic" in error[0], res.output
    res = _invoke(["export", "-w", str(tmp_path / "nope.pt")], tmp_path)
    assert res.exit_code == 1 and "nope.pt" in res.output and "Traceback" not in res.output
    res = _invoke(["export", "-w", str(weights), "--opset", "13"], tmp_path)
    assert res.exit_code == 2 and "--opset" in res.output


def test_onnx_without_onnxruntime_is_one_line(dynamic_export, monkeypatch, tmp_path):
    import sys

    _, _, path = dynamic_export
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    res = _invoke(["predict", str(_images(tmp_path / "i")), "-w", str(path), "--device", "cpu"], tmp_path)
    assert res.exit_code == 1
    error = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "onnxruntime" in error[0] and 'ddetr[onnx]' in error[0]
