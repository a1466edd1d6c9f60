"""Data layer: image decoding, transforms, dataset YAML, COCO datasets, shapes."""

from __future__ import annotations

import json
import logging
import pickle
import random
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ddetr_cli.data import (
    CocoDetection,
    ConfigError,
    DatasetError,
    ImageReadError,
    RandomHorizontalFlip,
    RandomResize,
    RandomSizeCrop,
    ToTensorNormalize,
    collate,
    default_train_scales,
    ensure_shapes_dataset,
    load_dataset_config,
    make_eval_transforms,
    make_train_transforms,
    preprocess,
    read_image,
)
from ddetr_cli.data.transforms import crop, resized_hw


def _rgb(h=24, w=32, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = 200  # red
    img[..., 1] = np.arange(w, dtype=np.uint8)[None, :] * 4
    img[..., 2] = rng.integers(0, 30, (h, w))
    return img


# ------------------------------------------------------------------ images
@pytest.mark.parametrize("suffix", [".png", ".bmp", ".webp", ".tiff", ".tif"])
def test_read_lossless_formats_rgb_order(tmp_path, suffix):
    img = _rgb()
    path = tmp_path / f"im{suffix}"
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if suffix == ".webp" else []
    assert cv2.imwrite(str(path), img[..., ::-1], params)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
    np.testing.assert_array_equal(out, img)


def test_read_jpeg_and_unicode_path(tmp_path):
    img = np.full((16, 16, 3), (220, 30, 40), np.uint8)
    path = tmp_path / "bild_äöü_图像.jpg"
    ok, buf = cv2.imencode(".jpg", img[..., ::-1])
    buf.tofile(path)
    out = read_image(path)
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - img.astype(int)).max() < 8  # RGB, not BGR


def test_read_grayscale_rgba_16bit(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    out = read_image(tmp_path / "g.png")
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[..., 0], gray)
    np.testing.assert_array_equal(out[..., 2], gray)

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 2] = 250  # BGR order on disk: red
    rgba[..., 3] = 0  # fully transparent: alpha is dropped, colour kept
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    out = read_image(tmp_path / "a.png")
    assert out.shape == (8, 8, 3)
    assert (out[..., 0] == 250).all() and (out[..., 1:] == 0).all()

    deep = np.full((8, 8, 3), 65535, np.uint16)
    deep[:, :4] = 257 * 100
    cv2.imwrite(str(tmp_path / "d.png"), deep)
    out = read_image(tmp_path / "d.png")
    assert out.dtype == np.uint8
    assert (out[:, 4:] == 255).all() and (out[:, :4] == 100).all()

    deep_gray = np.full((8, 8), 257 * 7, np.uint16)
    cv2.imwrite(str(tmp_path / "dg.tiff"), deep_gray)
    assert (read_image(tmp_path / "dg.tiff") == 7).all()


def test_read_applies_exif_orientation(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :10] = (0, 0, 255)  # left strip red (BGR)
    ok, buf = cv2.imencode(".jpg", img)
    data = buf.tobytes()
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + struct.pack(">I", 0)
    app1 = b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd
    (tmp_path / "o.jpg").write_bytes(data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:])
    out = read_image(tmp_path / "o.jpg")
    assert out.shape == (40, 20, 3)  # rotated 90 degrees clockwise
    assert out[:10, :, 0].mean() > 200 and out[-10:, :, 0].mean() < 50  # the strip is now on top


def test_read_errors_name_file(tmp_path):
    with pytest.raises(ImageReadError, match=r"missing\.png: no such file"):
        read_image(tmp_path / "missing.png")
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ImageReadError, match=r"corrupt\.jpg: not a decodable image"):
        read_image(bad)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.png: empty file"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(ImageReadError, match="is a directory"):
        read_image(tmp_path)
    assert issubclass(ImageReadError, ValueError)


# ------------------------------------------------------------------ transforms
def _sample(h=100, w=200):
    target = {
        "boxes": np.array([[10, 20, 50, 60], [150, 0, 200, 100]], np.float32),
        "labels": np.array([1, 2], np.int64),
        "image_id": 7,
    }
    return _rgb(h, w), target


def test_flip_moves_boxes():
    image, target = _sample()
    out, t = RandomHorizontalFlip(p=1.0)(image, target)
    np.testing.assert_array_equal(out, image[:, ::-1])
    np.testing.assert_allclose(t["boxes"], [[150, 20, 190, 60], [0, 0, 50, 100]])
    assert t["image_id"] == 7 and target["boxes"][0, 0] == 10  # input untouched
    same, t2 = RandomHorizontalFlip(p=0.0)(image, target)
    assert same is image


def test_resize_scales_boxes_and_respects_max_size():
    image, target = _sample(100, 200)
    out, t = RandomResize([50])(image, target)
    assert out.shape == (50, 100, 3)
    np.testing.assert_allclose(t["boxes"], target["boxes"] / 2)
    out, t = RandomResize([80], max_size=120)(image, target)
    assert max(out.shape[:2]) <= 120 and out.shape[:2] == (60, 120)
    assert resized_hw(480, 640, 800, 1333) == (800, 1066)
    assert resized_hw(100, 1000, 800, 1333) == (133, 1330)  # official rounding
    assert default_train_scales() == list(range(480, 801, 32))
    assert default_train_scales(128, 96, 16) == [96, 112, 128]


def test_crop_clips_and_removes_boxes():
    image, target = _sample(100, 200)
    out, t = crop(image, target, top=10, left=30, height=50, width=100)
    assert out.shape == (50, 100, 3)
    # box 0 clipped to the window, box 1 (x 150..200) falls outside -> removed with its label
    np.testing.assert_allclose(t["boxes"], [[0, 10, 20, 50]])
    np.testing.assert_array_equal(t["labels"], [1])
    random.seed(0)
    for _ in range(20):
        out, t = RandomSizeCrop(30, 500)(image, target)  # max larger than the image is capped
        h, w = out.shape[:2]
        assert 30 <= h <= 100 and 30 <= w <= 200
        b = t["boxes"]
        assert len(b) == len(t["labels"])
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (b[:, [0, 2]] <= w).all() and (b[:, [1, 3]] <= h).all() and (b >= 0).all()


def test_to_tensor_normalize_values_and_boxes():
    image = np.zeros((10, 20, 3), np.uint8)
    image[..., 0] = 255
    target = {"boxes": np.array([[0, 0, 10, 5]], np.float32), "labels": np.array([3]), "image_id": 1}
    x, t = ToTensorNormalize()(image, target)
    assert x.shape == (3, 10, 20) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225]))
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.25, 0.25, 0.5, 0.5]]))
    assert t["labels"].dtype == torch.int64 and t["size"].tolist() == [10, 20]


def test_train_and_eval_pipelines_output_normalized_boxes():
    random.seed(1)
    image, target = _sample(100, 200)
    tf = make_train_transforms(default_train_scales(96, 64, 16), 160, crop=(40, 90), crop_scales=[64, 80])
    for _ in range(10):
        x, t = tf(image, target)
        assert x.ndim == 3 and x.shape[0] == 3 and max(x.shape[1:]) <= 160
        assert t["size"].tolist() == list(x.shape[1:])
        assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
    x, t = make_eval_transforms(50, 1333)(image, target)
    assert x.shape == (3, 50, 100)
    torch.testing.assert_close(t["boxes"][0], torch.tensor([30 / 200, 40 / 100, 40 / 200, 40 / 100]))


def test_collate_pads_and_masks():
    a = (torch.ones(3, 4, 6), {"labels": torch.tensor([1])})
    b = (torch.ones(3, 5, 3), {"labels": torch.tensor([2])})
    images, mask, targets = collate([a, b])
    assert images.shape == (2, 3, 5, 6) and mask.shape == (2, 5, 6) and mask.dtype == torch.bool
    assert not mask[0, :4, :6].any() and mask[0, 4:].all()
    assert not mask[1, :5, :3].any() and mask[1, :, 3:].all()
    assert images[0, :, 4:].abs().sum() == 0 and images[1, :, :, 3:].abs().sum() == 0
    assert [t["labels"].item() for t in targets] == [1, 2]


def test_preprocess_batch():
    images, mask, sizes = preprocess([_rgb(100, 200), _rgb(60, 40)], size=50, max_size=1333)
    assert sizes.tolist() == [[100, 200], [60, 40]]
    assert images.shape == (2, 3, 75, 100)  # (50, 100) and (75, 50)
    assert not mask[0, :50, :100].any() and mask[0, 50:].all()
    assert not mask[1, :75, :50].any() and mask[1, :, 50:].all()


# ------------------------------------------------------------------ YAML configs
def _coco_files(tmp_path: Path) -> Path:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "ann.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    return tmp_path


def test_config_valid_relative_paths_and_names_mapping(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    _coco_files(root)
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    f = cfg_dir / "d.yaml"
    f.write_text(
        "path: ../data\n"
        "train: {images: imgs, annotations: ann.json, epochs: 12}\n"
        "val: {images: imgs, annotations: ann.json}\n"
        "names: {7: dog, 3: cat}\n"
        "model: {preset: tiny}\n"
        "train_options: {lr: 0.001}\n"
    )
    cfg = load_dataset_config(str(f))
    assert cfg.root == root.resolve() or cfg.root.resolve() == root.resolve()
    assert cfg.train.images.resolve() == (root / "imgs").resolve()
    assert cfg.names == ["cat", "dog"] and cfg.model == {"preset": "tiny"}
    assert cfg.train_options == {"epochs": 12, "lr": 0.001} and cfg.test is None


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("val: {images: imgs, annotations: ann.json}\n", r"missing required key 'train'"),
        ("train: {images: imgs}\nval: {images: imgs, annotations: ann.json}\n", r"'train\.annotations'"),
        ("train: imgs\nval: {images: imgs, annotations: ann.json}\n", r"'train' must be a mapping"),
        ("train: {images: nope, annotations: ann.json}\nval: {images: imgs, annotations: ann.json}\n", r"'train\.images'.*nope"),
        ("train: {images: imgs, annotations: x.json}\nval: {images: imgs, annotations: ann.json}\n", r"'train\.annotations'.*x\.json"),
        ("path: missing_root\ntrain: {images: imgs, annotations: ann.json}\n", r"'path'.*missing_root"),
        ("names: 3\ntrain: {images: imgs, annotations: ann.json}\nval: {images: imgs, annotations: ann.json}\n", "'names'"),
        ("trian: {}\n", r"unknown key 'trian'"),
        ("[1, 2]\n", "expected a mapping"),
        ("", "empty"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, pattern):
    _coco_files(tmp_path)
    f = tmp_path / "d.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_dataset_config(str(f))
    assert "d.yaml" in str(info.value) and "\n" not in str(info.value)


def test_config_malformed_yaml_reports_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  images: imgs\n  annotations: [unclosed\nval: x\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+, column \d+: malformed YAML"):
        load_dataset_config(str(f))
    f.write_text("a: 1\n\tb: 2\n")
    with pytest.raises(ConfigError, match=r"line 2"):
        load_dataset_config(str(f))


def test_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: dataset config file not found"):
        load_dataset_config(str(tmp_path / "nope.yaml"))


# ------------------------------------------------------------------ COCO
def _write_img(path: Path, h=40, w=60):
    cv2.imwrite(str(path), np.full((h, w, 3), 90, np.uint8))


def _coco(tmp_path: Path, images=None, annotations=None, categories=None, write_images=True) -> tuple[Path, Path]:
    images_dir = tmp_path / "images"
    images_dir.mkdir(exist_ok=True)
    if images is None:
        images = [{"id": i, "file_name": f"{i}.png", "width": 60, "height": 40} for i in (1, 2, 3)]
    if categories is None:
        categories = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "bird"}]
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 11, "bbox": [0, 0, 60, 40], "area": 2400, "iscrowd": 1},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [50, 30, 30, 30], "iscrowd": 0},  # clipped
            {"id": 4, "image_id": 2, "category_id": 3, "bbox": [70, 10, 5, 5], "iscrowd": 0},  # outside
            {"id": 5, "image_id": 2, "category_id": 11, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # zero width
        ]
    if write_images:
        for img in images:
            _write_img(images_dir / img["file_name"], img.get("height", 40), img.get("width", 60))
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return images_dir, ann


def test_coco_noncontiguous_ids_crowd_degenerate_empty(tmp_path):
    images_dir, ann = _coco(tmp_path)
    ds = CocoDetection(images_dir, ann, make_eval_transforms(40, 1333))
    assert ds.category_ids == [3, 7, 11] and ds.class_names == ["cat", "dog", "bird"]
    for i, cid in enumerate([3, 7, 11]):
        assert ds.to_contiguous(cid) == i and ds.to_category_id(i) == cid
    with pytest.raises(DatasetError):
        ds.to_contiguous(5)
    report = ds.scan()
    assert (report.images, report.boxes, report.empty_images) == (3, 2, 1)
    assert (report.crowd_boxes, report.degenerate_boxes, report.missing_files) == (1, 2, 0)
    assert dict(report.as_rows())["crowd boxes (eval only)"] == "1"
    # crowd kept for evaluation
    assert len(ds.coco.getAnnIds(iscrowd=True)) == 1 and len(ds.coco.getAnnIds()) == 5

    x, t = ds[0]
    assert x.shape == (3, 40, 60)
    assert t["labels"].tolist() == [1] and t["image_id"] == 1
    torch.testing.assert_close(t["boxes"], torch.tensor([[20 / 60, 10 / 40, 20 / 60, 10 / 40]]))
    assert t["orig_size"].tolist() == [40, 60] and t["size"].tolist() == [40, 60]
    x, t = ds[1]
    assert t["labels"].tolist() == [0]
    torch.testing.assert_close(t["boxes"], torch.tensor([[55 / 60, 35 / 40, 10 / 60, 10 / 40]]))
    x, t = ds[2]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    # the training mapping can be imposed on another split
    ds2 = CocoDetection(images_dir, ann, category_ids=[3, 7, 11, 12])
    assert ds2.num_classes == 4 and ds2.class_names[-1] == "12"


@pytest.mark.parametrize(
    "field, pattern",
    [
        ("unknown_category", r"unknown category id 99"),
        ("unknown_image", r"unknown image id 42"),
        ("dup_image", r"duplicate image id 1"),
        ("dup_ann", r"duplicate annotation id 1"),
        ("empty", r"empty dataset \(no images\)"),
        ("bad_bbox", r"'bbox' must be"),
    ],
)
def test_coco_validation_errors(tmp_path, field, pattern):
    images = [{"id": 1, "file_name": "1.png"}, {"id": 2, "file_name": "2.png"}]
    cats = [{"id": 1, "name": "a"}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}]
    if field == "unknown_category":
        anns.append({"id": 2, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5]})
    elif field == "unknown_image":
        anns.append({"id": 2, "image_id": 42, "category_id": 1, "bbox": [1, 1, 5, 5]})
    elif field == "dup_image":
        images.append({"id": 1, "file_name": "3.png"})
    elif field == "dup_ann":
        anns.append({"id": 1, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]})
    elif field == "empty":
        images = []
    elif field == "bad_bbox":
        anns[0]["bbox"] = [1, 2, 3]
    images_dir, ann = _coco(tmp_path, images, anns, cats)
    with pytest.raises(DatasetError, match=pattern) as info:
        CocoDetection(images_dir, ann)
    assert "ann.json" in str(info.value)
    if field in ("unknown_category", "unknown_image", "dup_image", "dup_ann"):
        report = CocoDetection(images_dir, ann, strict=False).scan()
        counts = (
            report.unknown_category_refs,
            report.unknown_image_refs,
            report.duplicate_image_ids,
            report.duplicate_annotation_ids,
        )
        assert sum(counts) == 1 and report.problems


def test_coco_malformed_json_reports_position(tmp_path):
    (tmp_path / "images").mkdir()
    bad = tmp_path / "ann.json"
    bad.write_text('{"images": [\n  {"id": 1, "file_name": "a.png"},\n  oops\n]}')
    with pytest.raises(DatasetError, match=r"ann\.json: invalid JSON at line 3, column 3"):
        CocoDetection(tmp_path / "images", bad)
    with pytest.raises(DatasetError, match=r"nothere\.json: annotation file not found"):
        CocoDetection(tmp_path / "images", tmp_path / "nothere.json")
    with pytest.raises(DatasetError, match="image folder not found"):
        CocoDetection(tmp_path / "noimgs", bad)


def test_coco_unreadable_image_is_skipped_and_counted(tmp_path, caplog):
    images_dir, ann = _coco(tmp_path)
    (images_dir / "2.png").write_bytes(b"garbage")
    (images_dir / "3.png").unlink()
    seen = []
    ds = CocoDetection(images_dir, ann, on_skip=lambda p, reason: seen.append(p.name))
    assert ds.scan().missing_files == 1
    with caplog.at_level(logging.WARNING, logger="ddetr_cli.data.coco"):
        _, t = ds[1]  # 2.png corrupt, 3.png missing -> wraps around to image 1
        assert t["image_id"] == 1
        _, t = ds[1]
    assert ds.skipped == 4 and seen == ["2.png", "3.png"]  # warned once per file
    assert sum("skipping unreadable image" in r.message for r in caplog.records) == 2
    scan = ds.scan()  # files, not read attempts: 2.png is unreadable, 3.png is missing
    assert scan.unreadable_skipped == 1 and scan.missing_files == 1


def test_coco_works_with_dataloader_workers(tmp_path):
    images_dir, ann = _coco(tmp_path)
    ds = CocoDetection(images_dir, ann, make_eval_transforms(40, 1333))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
    clone = pickle.loads(pickle.dumps(ds))  # spawn-started workers get a pickled copy
    assert clone.category_ids == ds.category_ids and clone[0][1]["image_id"] == 1
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [2, 1]
    assert [t["image_id"] for b in batches for t in b[2]] == [1, 2, 3]


# ------------------------------------------------------------------ shapes
def test_shapes_deterministic_cached_and_boxes_inside(tmp_path):
    a = ensure_shapes_dataset(tmp_path / "a", seed=3, n_train=12, n_val=4)
    b = ensure_shapes_dataset(tmp_path / "b", seed=3, n_train=12, n_val=4)
    c = ensure_shapes_dataset(tmp_path / "c", seed=4, n_train=12, n_val=4)
    for split in ("train", "val"):
        ja = (a.parent / "annotations" / f"{split}.json").read_text()
        assert ja == (b.parent / "annotations" / f"{split}.json").read_text()
    for i in range(12):
        assert (a.parent / "train" / f"{i:06d}.jpg").read_bytes() == (b.parent / "train" / f"{i:06d}.jpg").read_bytes()
    assert (a.parent / "annotations/train.json").read_text() != (c.parent / "annotations/train.json").read_text()

    mtime = (a.parent / "annotations/train.json").stat().st_mtime_ns
    assert ensure_shapes_dataset(tmp_path / "a", seed=3, n_train=12, n_val=4) == a  # cached
    assert (a.parent / "annotations/train.json").stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left

    cfg = load_dataset_config(str(a))
    assert cfg.names == ["circle", "square", "triangle"]
    ds = CocoDetection(cfg.train.images, cfg.train.annotations)
    assert ds.category_ids == [1, 2, 3] and ds.class_names == ["circle", "square", "triangle"]
    report = ds.scan()
    assert report.images == 12 and report.missing_files == 0 and report.degenerate_boxes == 0
    coco = json.loads(cfg.train.annotations.read_text())
    for a_ in coco["annotations"]:
        x, y, w, h = a_["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128 and w >= 10 and h >= 10
        assert a_["area"] == w * h
    counts = {}
    for a_ in coco["annotations"]:
        counts[a_["image_id"]] = counts.get(a_["image_id"], 0) + 1
    assert all(1 <= n <= 4 for n in counts.values())


def test_shapes_regenerates_incomplete_and_refuses_foreign_folder(tmp_path):
    y = ensure_shapes_dataset(tmp_path / "s", n_train=3, n_val=2)
    (y.parent / "val" / "000001.jpg").unlink()
    y2 = ensure_shapes_dataset(tmp_path / "s", n_train=3, n_val=2)
    assert (y2.parent / "val" / "000001.jpg").is_file()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    with pytest.raises(DatasetError, match="not a ddetr shapes dataset"):
        ensure_shapes_dataset(foreign, n_train=3, n_val=2)
    assert (foreign / "precious.txt").read_text() == "keep"


def test_shapes_race_keeps_the_folder_another_process_finished(tmp_path, monkeypatch):
    # Two trainings started together both find no dataset and generate it. The one that finishes
    # second must not swap the folder under the first, which is already reading it.
    import ddetr_cli.data.shapes as shapes

    root = tmp_path / "s"
    real_generate = shapes._generate
    winner: list[Path] = []
    calls = []

    def generate_while_another_finishes(folder, spec):
        calls.append(folder)
        if len(calls) == 1:  # the other process completes first, while this one is still generating
            winner.append(shapes.ensure_shapes_dataset(root, n_train=3, n_val=2))
            (root / "in-use.marker").write_text("open")
        real_generate(folder, spec)

    monkeypatch.setattr(shapes, "_generate", generate_while_another_finishes)
    assert shapes.ensure_shapes_dataset(root, n_train=3, n_val=2) == winner[0]
    assert (root / "in-use.marker").read_text() == "open"  # the same folder, not replaced
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the loser's copy is gone


def test_shapes_by_name_uses_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DDETR_CACHE", str(tmp_path / "cache"))
    import ddetr_cli.data.shapes as shapes

    real = shapes.ensure_shapes_dataset
    monkeypatch.setattr(shapes, "ensure_shapes_dataset", lambda root=None, **kw: real(root, n_train=4, n_val=2))
    cfg = load_dataset_config("shapes")
    assert cfg.root == tmp_path / "cache" / "shapes-v1"
    assert cfg.train.annotations.is_file()

