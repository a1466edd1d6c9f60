"""YOLO-format (Ultralytics) datasets: the same scan, targets and evaluation as
the same annotations in COCO format; clear errors naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from ddetr_cli.data import load_dataset_config
from ddetr_cli.data.split import open_split
from ddetr_cli.engine.loops.evaluate import coco_evaluate
from ddetr_cli.errors import ConfigError, DatasetError

NAMES = ["circle", "square", "triangle"]
W, H = 64, 32  # 1/64 and 1/32 are exact decimals: both formats hold the very same boxes


def _samples(n: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        boxes = []
        for _ in range(0 if i == n - 1 else int(rng.integers(1, 4))):  # the last image: a negative
            x0, y0 = int(rng.integers(0, W - 12)), int(rng.integers(0, H - 10))
            boxes.append((int(rng.integers(0, 3)), x0, y0, int(rng.integers(4, W - x0 + 1)), int(rng.integers(4, H - y0 + 1))))
        out.append((f"im{i}.png", image, boxes))
    return out


def write_both(root: Path, samples=None, category_ids=(3, 7, 11)) -> tuple[Path, Path]:
    """The same images and boxes as a COCO dataset and a YOLO dataset; returns both YAML paths."""
    samples = samples or _samples()
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i, (name, image, boxes) in enumerate(samples, start=1):
            cv2.imwrite(str(root / "images" / split / name), image)
            images.append({"id": i, "file_name": name, "width": W, "height": H})
            lines = []
            for c, x, y, w, h in boxes:
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": category_ids[c], "bbox": [x, y, w, h],
                             "area": w * h, "iscrowd": 0})
                lines.append(f"{c} {(x + w / 2) / W:.6f} {(y + h / 2) / H:.6f} {w / W:.6f} {h / H:.6f}")
            if boxes or i % 2:  # an empty label file and a missing one are both negatives
                (root / "labels" / split / Path(name).with_suffix(".txt")).write_text("\n".join(lines) + "\n")
        cats = [{"id": c, "name": n} for c, n in zip(category_ids, NAMES)]
        (root / f"{split}.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    coco = root / "coco.yaml"
    coco.write_text(yaml.safe_dump({"path": str(root), "train": {"images": "images/train", "annotations": "train.json"},
                                    "val": {"images": "images/val", "annotations": "val.json"}}))
    yolo = root / "data.yaml"
    yolo.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                    "names": dict(enumerate(NAMES))}))
    return coco, yolo


def test_same_annotations_same_scan_targets_and_ap(tmp_path):
    coco_yaml, yolo_yaml = write_both(tmp_path)
    dc, dy = load_dataset_config(coco_yaml), load_dataset_config(yolo_yaml)
    assert (dc.format, dy.format) == ("coco", "yolo") and dy.names == NAMES
    c, y = open_split(dc.val, names=dc.names), open_split(dy.val, names=dy.names)
    rc, ry = c.scan(), y.scan()
    for key in ("images", "boxes", "categories", "empty_images", "degenerate_boxes", "missing_files"):
        assert getattr(rc, key) == getattr(ry, key), key
    assert ry.boxes > 0 and ry.empty_images >= 1
    for i in range(len(c)):  # the same training targets
        np.testing.assert_allclose(c._records[i].boxes, y._records[i].boxes, atol=1e-4)
        np.testing.assert_array_equal(c._records[i].labels, y._records[i].labels)
    # the same predictions (by class index, jittered ground truth) score the same AP
    rng = np.random.default_rng(1)
    preds = []
    for i, r in enumerate(c._records):
        for box, label in zip(r.boxes, r.labels):
            x0, y0, x1, y1 = (box + rng.normal(0, 1.5, 4)).tolist()
            preds.append((i, int(label), [x0, y0, x1 - x0, y1 - y0], float(rng.uniform(0.3, 1))))
        preds.append((i, 0, [1.0, 1.0, 10.0, 8.0], 0.2))  # a false positive per image

    def dets(ds):
        return [{"image_id": ds._records[i].image_id, "category_id": ds.to_category_id(k), "bbox": b, "score": s}
                for i, k, b, s in preds]

    ac, ay = coco_evaluate(c.coco, dets(c)), coco_evaluate(y.coco, dets(y))
    assert ac.stats[0] > 0.1
    np.testing.assert_allclose(ac.stats, ay.stats, atol=1e-9)


def test_lists_txt_and_names_as_list(tmp_path):
    _, yolo_yaml = write_both(tmp_path)
    (tmp_path / "val.txt").write_text("images/val/im0.png\n./images/val/im1.png\n\n/nonexistent/im9.png\n")
    yolo_yaml.write_text(yaml.safe_dump({"path": str(tmp_path), "train": ["images/train", "images/val"],
                                         "val": "val.txt", "names": NAMES, "nc": 3}))
    dy = load_dataset_config(yolo_yaml)
    assert len(dy.train.yolo.images) == 12 and len(dy.val.yolo.images) == 3
    report = open_split(dy.val, names=dy.names).scan()
    assert report.images == 3 and report.missing_files == 1


@pytest.mark.parametrize("line, expect", [
    ("0 0.5 0.5 0.2", "im0.txt:2: expected 'class cx cy w h' (5 numbers)"),
    ("5 0.5 0.5 0.2 0.2", "im0.txt:2: class 5 is out of range (names has 3 classes: 0..2)"),
    ("1 0.5 1.7 0.2 0.2", "im0.txt:2: coordinate 1.7 is outside [0, 1]"),
    ("one 0.5 0.5 0.2 0.2", "im0.txt:2: expected 'class cx cy w h' numbers"),
])
def test_bad_label_lines_name_file_and_line(tmp_path, line, expect):
    _, yolo_yaml = write_both(tmp_path)
    lf = tmp_path / "labels" / "val" / "im0.txt"
    lf.write_text("0 0.5 0.5 0.25 0.25\n" + line + "\n")
    dy = load_dataset_config(yolo_yaml)
    with pytest.raises(DatasetError, match=None) as err:
        open_split(dy.val, names=dy.names)
    assert expect in str(err.value) and str(lf) in str(err.value)


def test_yaml_errors(tmp_path):
    _, yolo_yaml = write_both(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"path": str(tmp_path), "train": "images/train", "val": "images/nope", "names": NAMES}))
    with pytest.raises(ConfigError, match="'val'.*neither an image folder"):
        load_dataset_config(bad)
    bad.write_text(yaml.safe_dump({"path": str(tmp_path), "train": "images/train", "val": "images/val", "names": NAMES, "nc": 4}))
    with pytest.raises(ConfigError, match="'nc' is 4 but 'names' lists 3"):
        load_dataset_config(bad)
    bad.write_text(yaml.safe_dump({"path": str(tmp_path), "train": "images/train", "val": "images/val"}))
    with pytest.raises(ConfigError, match="needs 'names'"):
        load_dataset_config(bad)


def test_cli_trains_on_yolo_with_the_coco_scan_table(tmp_path):
    from click.testing import CliRunner

    from ddetr_cli.cli.main import cli

    _, yolo_yaml = write_both(tmp_path)
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", str(yolo_yaml), "--model", "tiny", "--imgsz", "64", "--batch-size", "2",
                                 "--max-iters", "1", "--workers", "0", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "boxes (training)" in r.stderr and "circle, square, triangle" in r.stderr
    for f in ("weights/best.pt", "PR_curve.png", "labels.png"):
        assert (out / f).is_file(), f
