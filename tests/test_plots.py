"""Validation plots (matplotlib, Agg): files written, confusion-matrix counts."""

from __future__ import annotations

import cv2
import numpy as np

from ddetr_cli.data import load_dataset_config
from ddetr_cli.data.split import open_split
from ddetr_cli.engine.report.plots import confusion_matrix, plot_results, write_val_plots

from test_yolo import write_both


def test_confusion_matrix_counts_with_background(tmp_path):
    coco_yaml, _ = write_both(tmp_path, category_ids=(1, 2, 3))
    val = open_split(load_dataset_config(coco_yaml).val)
    anns = [a for a in val.coco.dataset["annotations"] if not a["iscrowd"]]
    first = anns[0]
    wrong = 1 + first["category_id"] % 3
    dets = [{**first, "score": 0.9, "category_id": wrong},  # right place, wrong class
            {"image_id": first["image_id"], "category_id": 1, "bbox": [0.0, 0.0, 1.0, 1.0], "score": 0.8},  # background
            {"image_id": first["image_id"], "category_id": 1, "bbox": [5.0, 5.0, 3.0, 3.0], "score": 0.1}]  # under conf
    dets += [{**a, "score": 0.7} for a in anns[1:]]  # all others right
    m, cats = confusion_matrix(val.coco, dets, conf=0.25)
    assert cats == [1, 2, 3] and m.shape == (4, 4)
    assert m[cats.index(wrong), cats.index(first["category_id"])] == 1
    assert m[cats.index(1), 3] == 1  # predicted on background
    assert m[3].sum() == 0  # nothing missed
    assert np.trace(m[:3, :3]) == len(anns) - 1


def test_val_plots_and_results_png(tmp_path):
    coco_yaml, _ = write_both(tmp_path)
    dc = load_dataset_config(coco_yaml)
    val = open_split(dc.val)
    dets = [{**a, "score": 0.8} for a in val.coco.dataset["annotations"]]
    out = write_val_plots(tmp_path / "run", val, dets, 0.25, train_set=open_split(dc.train), class_names=val.class_names)
    assert sorted(p.name for p in out) == ["PR_curve.png", "confusion_matrix.png", "labels.png", "val_batch_pred.jpg"]
    for p in out:
        image = cv2.imread(str(p))
        assert image is not None and image.shape[0] > 200, p
    write_val_plots(tmp_path / "empty", val, [], 0.25)  # no detections: still drawn
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,loss,lr,AP,APl,time\n1,2.0,0.0002,0.1,-1,3\n2,1.5,0.00002,0.2,-1,3\n")
    assert cv2.imread(str(plot_results(csv_path, tmp_path / "results.png"))) is not None
