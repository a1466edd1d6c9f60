"""Sizes follow --imgsz: a small-image custom dataset trains, evaluates and
resumes with no other size option; contradictions name both values and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ddetr_cli.engine.config import TrainConfig, derived_sizes, resolve
from ddetr_cli.errors import TrainConfigError


def _cli(args):
    from ddetr_cli.cli.main import cli

    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_sizes_follow_imgsz_by_the_official_proportions():
    official = TrainConfig().validate()
    assert official.train_scales() == list(range(480, 801, 32))
    assert (official.max_size, official.crop_min, official.crop_max, official.crop_scales) == (1333, 384, 600, [400, 500, 600])
    assert (official.eval_size, official.eval_max_size) == (800, 1333)
    small = TrainConfig(imgsz=128).validate()
    assert small.train_scales()[-1] == 128 and small.train_scales()[0] == derived_sizes(128)["min_scale"] == 78
    assert small.max_size == small.eval_max_size == 213 and small.eval_size == 128
    assert small.crop_min <= small.crop_max <= small.imgsz
    # explicit values win; eval sizes follow imgsz / max_size of the layer that sets them
    cfg = resolve(dataset_source=None, dataset_train={"min_scale": 100, "max_size": 300}, dataset_model=None,
                  config_path=None, cli={"imgsz": 160})
    assert cfg.min_scale == 100 and cfg.max_size == cfg.eval_max_size == 300 and cfg.eval_size == 160


@pytest.mark.parametrize("train, expect", [
    ({"min_scale": 480}, "`min_scale` 480 is larger than `imgsz` 128: lower `min_scale`"),
    ({"max_size": 100}, "`max_size` 100 is smaller than `imgsz` 128: raise `max_size`"),
    ({"crop_min": 90, "crop_max": 80}, "`crop_min` 90 is not in 1..`crop_max` 80"),
    ({"eval_size": 200, "eval_max_size": 150}, "`eval_max_size` 150 is smaller than `eval_size` 200"),
])
def test_contradictions_name_both_values_and_the_fix(train, expect):
    with pytest.raises(TrainConfigError) as err:
        resolve(dataset_source=None, dataset_train=None, dataset_model=None, config_path=None, cli={"imgsz": 128, **train})
    assert expect in str(err.value)
    assert err.value.param == expect.split("`")[1]


def test_cli_contradiction_names_flags(tmp_path):
    r = _cli(["train", "shapes", "--imgsz", "128", "--min-scale", "480", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "--min-scale" in r.output and "--imgsz" in r.output and "480" in r.output


def test_one_training_scale_follows_imgsz_and_gives_way_to_a_range(tmp_path):
    def shapes(**cli):
        return resolve(dataset_source="shapes", dataset_train=None, dataset_model=None, config_path=None, cli=cli)

    assert shapes().train_scales() == [128]  # the recipe: every shapes image is 128 px
    assert shapes(imgsz=96).train_scales() == [96]  # follows --imgsz, with no clash
    assert shapes(min_scale=100, scale_step=14).train_scales() == [100, 114, 128]  # the user's range wins
    assert shapes(multi_scale=True).train_scales() == list(range(78, 129, 5))
    custom = resolve(dataset_source=None, dataset_train={"multi_scale": False}, dataset_model=None, config_path=None,
                     cli={"imgsz": 160})
    assert custom.train_scales() == [160]
    with pytest.raises(TrainConfigError, match="`multi_scale` off trains at `imgsz` alone") as err:
        shapes(multi_scale=False, min_scale=100)
    assert err.value.param == "multi_scale"
    r = _cli(["train", "shapes", "--no-multi-scale", "--scale-step", "8", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "'--multi-scale'" in r.output and "drop --min-scale/--scale-step" in r.output
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def custom_dataset(tmp_path_factory) -> Path:
    """128-px images in COCO format under a user's own data.yaml (not the built-in recipe)."""
    from ddetr_cli.data import ensure_shapes_dataset

    base = tmp_path_factory.mktemp("small")
    shapes_yaml = Path(ensure_shapes_dataset(base / "gen", n_train=8, n_val=4, size=128))
    root = shapes_yaml.parent
    data = base / "mine" / "data.yaml"
    data.parent.mkdir()
    data.write_text(yaml.safe_dump({"path": str(root),
                                    "train": {"images": "train", "annotations": "annotations/train.json"},
                                    "val": {"images": "val", "annotations": "annotations/val.json"}}))
    # the same validation split in YOLO format
    ann = json.loads((root / "annotations" / "val.json").read_text())
    ids = sorted(c["id"] for c in ann["categories"])
    (root / "labels" / "val").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "images" / "val").symlink_to(root / "val")
    for img in ann["images"]:
        lines = [f"{ids.index(a['category_id'])} {(a['bbox'][0] + a['bbox'][2] / 2) / img['width']:.8f} "
                 f"{(a['bbox'][1] + a['bbox'][3] / 2) / img['height']:.8f} {a['bbox'][2] / img['width']:.8f} "
                 f"{a['bbox'][3] / img['height']:.8f}" for a in ann["annotations"] if a["image_id"] == img["id"]]
        (root / "labels" / "val" / Path(img["file_name"]).with_suffix(".txt")).write_text("\n".join(lines) + "\n")
    names = [c["name"] for c in sorted(ann["categories"], key=lambda c: c["id"])]
    (base / "mine" / "yolo.yaml").write_text(yaml.safe_dump({"path": str(root), "train": "images/val",
                                                             "val": "images/val", "names": names}))
    return data


def test_imgsz_128_tiny_trains_evaluates_resumes(custom_dataset, tmp_path):
    out = tmp_path / "run"
    r = _cli(["train", str(custom_dataset), "--model", "tiny", "--imgsz", "128", "--batch-size", "4", "--epochs", "1",
              "--workers", "0", "--out", str(out)])
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert saved["min_scale"] == 78 and saved["max_size"] == 213 and saved["eval_size"] == 128 and saved["crop"] is True
    r = _cli(["train", "--resume", str(out), "--epochs", "2"])
    assert r.exit_code == 0, r.output
    best = out / "weights" / "best.pt"
    for f in ("results.png", "PR_curve.png", "confusion_matrix.png", "labels.png", "val_batch_pred.jpg"):
        assert (out / f).is_file(), f
    r = _cli(["eval", str(custom_dataset), "-w", str(best), "--workers", "0", "--json", "--out", str(tmp_path / "val")])
    assert r.exit_code == 0, r.output
    coco = json.loads(r.stdout)
    for f in ("PR_curve.png", "confusion_matrix.png", "labels.png", "val_batch_pred.jpg"):
        assert (tmp_path / "val" / f).is_file(), f
    # `ddetr eval` on the same split in YOLO format: the same numbers
    r = _cli(["eval", str(custom_dataset.parent / "yolo.yaml"), "-w", str(best), "--workers", "0", "--json", "--no-plots"])
    assert r.exit_code == 0, r.output
    yolo = json.loads(r.stdout)
    assert coco["AP"] == pytest.approx(yolo["AP"], abs=1e-6) and coco["AP50"] == pytest.approx(yolo["AP50"], abs=1e-6)
