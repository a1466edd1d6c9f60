"""Evaluation: pycocotools agreement, category remapping, label maps, `ddetr eval`."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ddetr_cli.engine.loops.evaluate import coco_evaluate, evaluate, to_coco_results
from ddetr_cli.engine.parts.labelmap import resolve_label_map
from ddetr_cli.errors import ClassMismatchError

CAT_IDS = [3, 7, 11]  # deliberately non-contiguous


def make_gt(n_images=6, size=(80, 100), seed=0, cat_ids=CAT_IDS):
    rng = np.random.default_rng(seed)
    h, w = size
    images, anns = [], []
    aid = 1
    for i in range(n_images):
        images.append({"id": 100 + i, "file_name": f"{i}.jpg", "height": h, "width": w})
        for _ in range(int(rng.integers(1, 4))):
            bw, bh = float(rng.uniform(10, 40)), float(rng.uniform(10, 30))
            x, y = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
            anns.append({"id": aid, "image_id": 100 + i, "category_id": int(rng.choice(cat_ids)),
                         "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
            aid += 1
    cats = [{"id": c, "name": f"c{c}"} for c in cat_ids]
    return {"images": images, "annotations": anns, "categories": cats}


def coco_of(d):
    with contextlib.redirect_stdout(io.StringIO()):
        c = COCO()
        c.dataset = copy.deepcopy(d)
        c.createIndex()
    return c


def gt_as_detections(d):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0} for a in d["annotations"]]


def test_ground_truth_as_predictions_gives_ap_1():
    d = make_gt()
    res = coco_evaluate(coco_of(d), gt_as_detections(d))
    assert res.stats[0] == pytest.approx(1.0)
    assert res.stats[1] == pytest.approx(1.0)
    assert set(res.per_class) == set(CAT_IDS)
    assert len(res.summary.splitlines()) == 12
    assert res.summary.splitlines()[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all")


def test_matches_pycocotools_directly_on_imperfect_detections():
    d = make_gt(n_images=8, seed=3)
    rng = np.random.default_rng(5)
    dets = []
    for det in gt_as_detections(d):
        x, y, w, h = det["bbox"]
        shift = float(rng.uniform(0, 0.4)) * w
        dets.append({**det, "bbox": [x + shift, y, w, h], "score": float(rng.uniform(0.1, 1))})
        if rng.random() < 0.5:  # a false positive
            dets.append({**det, "bbox": [0.0, 0.0, 5.0, 5.0], "score": float(rng.uniform(0.1, 1))})
    ours = coco_evaluate(coco_of(d), dets)
    gt = coco_of(d)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(dets)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert np.allclose(ours.stats, ev.stats)
    assert 0.0 < ours.stats[0] < 1.0


def test_category_without_ground_truth_is_minus_one():
    d = make_gt(cat_ids=[3, 7])
    d["categories"].append({"id": 11, "name": "c11"})
    res = coco_evaluate(coco_of(d), gt_as_detections(d))
    assert res.per_class[11] == -1.0
    assert res.per_class[3] == pytest.approx(1.0)


def test_no_detections_gives_zero():
    res = coco_evaluate(coco_of(make_gt()), [])
    assert res.stats[0] == 0.0


class _Items(torch.utils.data.Dataset):
    """Images filled with their index; targets carry image_id / orig_size."""

    def __init__(self, d):
        self.images = d["images"]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        im = self.images[i]
        return torch.full((3, 16, 20), float(i)), {"image_id": im["id"], "orig_size": torch.tensor([im["height"], im["width"]])}


class _OracleModel(torch.nn.Module):
    """Predicts the ground truth of image idx (read from the pixels) with contiguous labels."""

    def __init__(self, d, cat_ids, Q=5):
        super().__init__()
        C = len(cat_ids)
        n = len(d["images"])
        self.logits = torch.full((n, Q, C), -10.0)
        self.boxes = torch.full((n, Q, 4), 0.1)
        for i, im in enumerate(d["images"]):
            anns = [a for a in d["annotations"] if a["image_id"] == im["id"]]
            for q, a in enumerate(anns):
                x, y, w, h = a["bbox"]
                W, H = im["width"], im["height"]
                self.boxes[i, q] = torch.tensor([(x + w / 2) / W, (y + h / 2) / H, w / W, h / H])
                self.logits[i, q, cat_ids.index(a["category_id"])] = 10.0

    def forward(self, images, mask):
        idx = images[:, 0, 0, 0].long()
        return {"pred_logits": self.logits[idx], "pred_boxes": self.boxes[idx]}


def _loader(d):
    from ddetr_cli.engine.parts.sampler import ShardSampler

    def collate(batch):
        ims, tgts = zip(*batch)
        return torch.stack(ims), torch.zeros(len(ims), 16, 20, dtype=torch.bool), list(tgts)

    return torch.utils.data.DataLoader(_Items(d), batch_size=4, sampler=ShardSampler(len(d["images"])), collate_fn=collate)


def test_category_remapping_round_trip_through_evaluate():
    d = make_gt()
    model = _OracleModel(d, CAT_IDS)
    res = evaluate(model, _loader(d), coco_of(d), [3, 7, 11], torch.device("cpu"))
    assert res.stats[0] == pytest.approx(1.0, abs=1e-6)
    assert {det["category_id"] for det in res.detections} <= set(CAT_IDS)
    # a wrong (identity-like) mapping cannot score perfectly
    wrong = evaluate(model, _loader(d), coco_of(d), [7, 11, 3], torch.device("cpu"))
    assert wrong.stats[0] < 0.5


def test_to_coco_results_maps_and_drops():
    out = to_coco_results(5, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), torch.tensor([[1.0, 2.0, 11.0, 22.0], [0, 0, 1, 1.0]]), [3, None])
    assert out == [{"image_id": 5, "category_id": 3, "bbox": [1.0, 2.0, 10.0, 20.0], "score": pytest.approx(0.9)}]


def test_resolve_label_map_cases():
    assert resolve_label_map(3, None, [3, 7, 11]) == [3, 7, 11]
    assert resolve_label_map(3, [3, 7, 11], [3, 7, 11]) == [3, 7, 11]
    assert resolve_label_map(4, [1, 3, 7, 11], [3, 7, 11]) == [None, 3, 7, 11]
    coco91 = resolve_label_map(91, None, [1, 2, 90])
    assert coco91[1] == 1 and coco91[90] == 90 and coco91[0] is None and coco91[5] is None
    with pytest.raises(ClassMismatchError, match="5 classes"):
        resolve_label_map(5, None, [3, 7, 11])
    with pytest.raises(ClassMismatchError, match="do not cover"):
        resolve_label_map(2, [3, 7], [3, 7, 11])
