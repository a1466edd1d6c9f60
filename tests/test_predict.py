"""Prediction: sources, predictor, run folders, drawing, charts and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from ddetr_cli.data.sources import expand_sources, iter_sources
from ddetr_cli.engine.loops.predict import Detection, summarize
from ddetr_cli.engine.report.plots import plot_results as plot_metrics
from ddetr_cli.engine.runs.folders import allocate_run_dir, release_run_dir, split_out
from ddetr_cli.viz import PALETTE, draw_detections

NAMES = ["circle", "square", "triangle"]


def _img(path: Path, h=48, w=64, value=120) -> Path:
    img = np.full((h, w, 3), value, np.uint8)
    cv2.rectangle(img, (10, 10), (30, 30), (0, 0, 255), -1)
    assert cv2.imwrite(str(path), img)
    return path


def _video(path: Path, frames=4, h=48, w=64) -> Path:
    for fourcc in ("mp4v", "MJPG"):
        target = path if fourcc == "mp4v" else path.with_suffix(".avi")
        writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*fourcc), 5.0, (w, h))
        if writer.isOpened():
            for i in range(frames):
                writer.write(np.full((h, w, 3), 30 * i, np.uint8))
            writer.release()
            return target
    pytest.skip("no video encoder available in this OpenCV build")


# ------------------------------------------------------------------ no model needed
def test_expand_and_iter_sources(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for name in ("b.png", "a.jpg", "c.txt"):
        _img(d / name) if name != "c.txt" else (d / name).write_text("x")
    (d / "bad.png").write_bytes(b"not an image")
    video = _video(tmp_path / "v.mp4", frames=3)
    entries = expand_sources([str(d), str(tmp_path / "imgs" / "*.png"), str(video), str(tmp_path / "nope.jpg"),
                              str(tmp_path / "*.none")])  # fmt: skip
    names = [(p.name, err is not None) for p, err in entries]
    assert names[:3] == [("a.jpg", False), ("b.png", False), ("bad.png", False)]  # sorted, images only
    assert names[3:5] == [("b.png", False), ("bad.png", False)]
    assert names[5:] == [(video.name, False), ("nope.jpg", True), ("*.none", True)]

    items = list(iter_sources(expand_sources([str(d), str(video)])))
    assert [i.path.name for i in items] == ["a.jpg", "b.png", "bad.png", video.name, video.name, video.name]
    assert items[2].error and "bad.png" in items[2].error and items[2].image is None
    assert [i.frame for i in items[3:]] == [0, 1, 2] and items[3].image.shape == (48, 64, 3)
    assert items[0].image.shape == (48, 64, 3) and items[0].frame is None


def test_predict_run_folders(tmp_path):
    project = tmp_path / "runs" / "predict"
    a = allocate_run_dir(project, "exp")
    (a / "x").write_text("1")
    b = allocate_run_dir(project, "exp")
    assert (a.name, b.name) == ("exp", "exp2")  # the same naming as train
    out = tmp_path / "mine"
    assert allocate_run_dir(*split_out(out)) == out
    assert allocate_run_dir(*split_out(out)) == tmp_path / "mine2"  # claimed at once: never shared
    release_run_dir(tmp_path / "mine2")  # nothing written: the folder goes
    assert not (tmp_path / "mine2").exists()
    release_run_dir(out)
    assert allocate_run_dir(*split_out(out)) == out  # an empty, unclaimed folder is used as is


def test_draw_detections_and_summary():
    image = np.zeros((100, 160, 3), np.uint8)
    dets = [Detection("square", 2, 0.9, (10, 20, 60, 80), 1), Detection("circle", 1, 0.5, (100, 0, 150, 40), 0),
            Detection("square", 2, 0.7, (70, 50, 90, 99), 1)]  # fmt: skip
    out = draw_detections(image, dets)
    assert out.shape == image.shape and image.sum() == 0  # input untouched
    assert (out[50, 10] == PALETTE[1]).all()  # left edge of the square's box in its class colour
    assert out.sum() > 0
    assert summarize(dets) == "2 square, 1 circle"
    assert draw_detections(image, []).sum() == 0


def test_plot_metrics(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    rows = ["epoch,loss,loss_ce,lr,AP,AP50,APs,time"]
    for e in range(1, 6):
        rows.append(f"{e},{2 / e},{1 / e},0.0002,{0.1 * e},{0.15 * e},-1,3.5")
    rows.append("6,,,,,,,")
    csv_path.write_text("\n".join(rows) + "\n")
    out = plot_metrics(csv_path, tmp_path / "results.png")
    img = cv2.imread(str(out))
    assert img is not None and img.shape[0] > 200 and img.shape[1] > 400
    (tmp_path / "one.csv").write_text("epoch,loss\n1,0.5\n")
    assert plot_metrics(tmp_path / "one.csv", tmp_path / "one.png").is_file()
    with pytest.raises(ValueError, match="missing.csv"):
        plot_metrics(tmp_path / "missing.csv", tmp_path / "x.png")


# ------------------------------------------------------------------ with a tiny model
@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    import torch

    from ddetr_cli.checkpoints.native import save_model
    from ddetr_cli.models import build_model, preset

    torch.manual_seed(0)
    model = build_model(preset("tiny", num_classes=3)).eval()
    model.class_names = list(NAMES)
    model.category_ids = [1, 2, 3]
    path = tmp_path_factory.mktemp("w") / "tiny.pt"
    save_model(model, path)
    return path


def _run(args, cwd: Path):
    from ddetr_cli.cli.main import cli

    old = os.getcwd()
    os.chdir(cwd)  # runs/predict/N is relative to the working directory
    try:
        return CliRunner().invoke(cli, args, catch_exceptions=False)
    finally:
        os.chdir(old)


FAST = ["--device", "cpu", "--imgsz", "64", "--max-size", "96"]


def test_predict_image_dir_glob_with_conf(tmp_path, weights):
    d = tmp_path / "imgs"
    d.mkdir()
    _img(d / "1.png")
    _img(d / "2.jpg", 40, 50)
    res = _run(["predict", str(d / "1.png"), "-w", str(weights), *FAST, "--conf", "0", "--top-k", "5"], tmp_path)
    assert res.exit_code == 0, res.output
    assert "1.png: 5 detections (" in res.output and "Speed:" in res.output and " ms" in res.output
    run1 = tmp_path / "runs" / "predict" / "exp"
    preds = json.loads((run1 / "predictions.json").read_text())
    assert len(preds) == 1
    p = preds[0]
    assert p["file"].endswith("1.png") and (p["width"], p["height"]) == (64, 48) and "frame" not in p
    assert len(p["detections"]) == 5
    scores = [x["score"] for x in p["detections"]]
    assert scores == sorted(scores, reverse=True)
    for det in p["detections"]:
        assert set(det) == {"label", "category_id", "score", "box"}
        assert det["label"] in NAMES and det["category_id"] == NAMES.index(det["label"]) + 1
        x1, y1, x2, y2 = det["box"]
        assert 0 <= x1 <= x2 <= 64 and 0 <= y1 <= y2 <= 48

    # directory + glob, a second run goes to a fresh folder; --conf filters everything out
    res = _run(["predict", str(d), str(d / "*.jpg"), "-w", str(weights), *FAST, "--conf", "0.99", "--coco-json"],
               tmp_path)  # fmt: skip
    assert res.exit_code == 0, res.output
    run2 = tmp_path / "runs" / "predict" / "exp2"
    preds = json.loads((run2 / "predictions.json").read_text())
    assert [Path(x["file"]).name for x in preds] == ["1.png", "2.jpg", "2.jpg"]
    assert all(x["detections"] == [] for x in preds)
    assert "0 detections" in res.output
    assert json.loads((run2 / "results_coco.json").read_text()) == []
    assert json.loads((run1 / "predictions.json").read_text())[0]["file"].endswith("1.png")  # untouched


def test_predict_video_viz_json_and_coco(tmp_path, weights):
    video = _video(tmp_path / "clip.mp4", frames=3)
    img = _img(tmp_path / "000000000139.png")
    out = tmp_path / "out"
    args = ["predict", str(img), str(video), "-w", str(weights), *FAST, "--conf", "0", "--top-k", "3",
            "--viz", "--coco-json", "--json", "--out", str(out), "--batch-size", "2"]  # fmt: skip
    from ddetr_cli.cli.main import cli

    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    saved = json.loads((out / "predictions.json").read_text())
    assert printed == saved
    assert [x.get("frame") for x in saved] == [None, 0, 1, 2]
    assert saved[0]["image_id"] == 139
    assert (out / "000000000139.png").is_file()
    annotated = cv2.VideoCapture(str(out / f"{video.stem}.mp4"))
    assert annotated.isOpened() and int(annotated.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    annotated.release()
    coco = json.loads((out / "results_coco.json").read_text())
    assert len(coco) == 4 * 3
    assert {c["image_id"] for c in coco} >= {139} and all(c["category_id"] in (1, 2, 3) for c in coco)
    assert all(len(c["bbox"]) == 4 and c["bbox"][2] >= 0 for c in coco)
    # --out DIR is not empty any more: the next run picks out2
    res = CliRunner().invoke(cli, [*args[:-4], "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0 and (tmp_path / "out2" / "predictions.json").is_file()


def test_predict_unreadable_input_continues_and_fails(tmp_path, weights):
    good = _img(tmp_path / "good.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x00garbage")
    res = _run(["predict", str(bad), str(good), str(tmp_path / "missing.png"), "-w", str(weights), *FAST], tmp_path)
    assert res.exit_code != 0
    assert "bad.jpg: not a decodable image" in res.output
    assert "missing.png: no such file" in res.output
    assert "good.png: " in res.output
    assert "2 of 3 input(s) could not be read" in res.output
    preds = json.loads((tmp_path / "runs" / "predict" / "exp" / "predictions.json").read_text())
    assert [Path(p["file"]).name for p in preds] == ["good.png"]
    assert "Traceback" not in res.output


def test_predict_missing_weights_and_bad_checkpoint(tmp_path):
    from ddetr_cli.cli.main import cli

    img = _img(tmp_path / "a.png")
    res = CliRunner().invoke(cli, ["predict", str(img), "-w", str(tmp_path / "nope.pt"), "--device", "cpu"])
    assert res.exit_code != 0
    assert "nope.pt" in res.output and "fundamentalvision/Deformable-DETR" in res.output
    assert "SenseTime/deformable-detr" in res.output and "r50-two-stage" in res.output
    res = CliRunner().invoke(cli, ["predict", str(img), "--device", "cpu"])  # the default model; offline, empty cache
    assert res.exit_code != 0 and "hf download SenseTime/deformable-detr-with-box-refine-two-stage" in res.output
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    res = CliRunner().invoke(cli, ["predict", str(img), "-w", str(junk), "--device", "cpu"])
    assert res.exit_code != 0 and "junk.pt" in res.output and "Traceback" not in res.output


def test_predict_cuda_without_gpu(tmp_path, weights):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from ddetr_cli.cli.main import cli

    res = CliRunner().invoke(cli, ["predict", str(_img(tmp_path / "a.png")), "-w", str(weights), "--device", "cuda"])
    assert res.exit_code != 0 and "CUDA" in res.output


class _StubModel:
    """Stands in for the network: query 0 says class 1 with a centred box
    half the image's size, query 1 says class 0 with a low score."""

    class_names = ["circle", "square", "triangle"]
    category_ids = [3, 7, 11]

    def __call__(self, images, padding_mask):
        import torch

        b = images.shape[0]
        logits = torch.full((b, 4, 3), -9.0)
        logits[:, 0, 1] = 3.0
        logits[:, 1, 0] = -1.0
        boxes = torch.tensor([0.5, 0.5, 0.5, 0.5]).repeat(b, 4, 1)
        return {"pred_logits": logits, "pred_boxes": boxes}


def test_predictor_maps_classes_and_boxes_to_original_pixels():
    from ddetr_cli.engine.loops.predict import Predictor
    from ddetr_cli.engine.loops.runner import TorchRunner

    p = Predictor(TorchRunner(_StubModel(), "cpu"), imgsz=32, max_size=64, conf=0.2, top_k=10, batch_size=2)
    small, large = np.zeros((48, 64, 3), np.uint8), np.zeros((100, 50, 3), np.uint8)
    out = p.predict_batch([small, large])
    assert [len(d) for d in out] == [2, 2]
    best = out[0][0]
    assert (best.label, best.category_id, best.class_index) == ("square", 7, 1)
    assert best.score == pytest.approx(1 / (1 + np.exp(-3.0)), abs=1e-5)
    assert best.box == pytest.approx((16, 12, 48, 36))
    assert out[1][0].box == pytest.approx((12.5, 25, 37.5, 75))
    assert out[0][1].label == "circle" and out[0][1].category_id == 3
    assert p.timing.images == 2 and set(p.timing.per_image_ms()) == {"preprocess", "inference", "postprocess"}
    assert Predictor(TorchRunner(_StubModel()), conf=0.96).predict_batch([small])[0] == []


def test_predict_defaults_to_the_size_the_model_was_trained_at(tmp_path):
    import torch

    from ddetr_cli.checkpoints.native import save_model
    from ddetr_cli.models import build_model, preset

    torch.manual_seed(0)
    model = build_model(preset("tiny", num_classes=3)).eval()
    model.input_size = (72, 90)
    path = tmp_path / "small.pt"
    save_model(model, path)
    _img(tmp_path / "a.png")
    res = _run(["predict", str(tmp_path / "a.png"), "-w", str(path), "--device", "cpu"], tmp_path)
    assert res.exit_code == 0, res.output
    assert "at imgsz 72 on cpu" in res.output
    res = _run(["predict", str(tmp_path / "a.png"), "-w", str(path), "--device", "cpu", "--imgsz", "64"], tmp_path)
    assert "at imgsz 64 on cpu" in res.output
