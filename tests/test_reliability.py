"""Reliability (issue 12): nothing silently wrong, nothing lost.

Unreadable evaluation images, signals, seeded runs, claimed output folders,
leftovers after a crash, one-line errors, messages and file permissions.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner


def _cli(args, env=None):
    from ddetr_cli.cli.main import cli

    return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from ddetr_cli.data import ensure_shapes_dataset

    root = tmp_path_factory.mktemp("relshapes") / "shapes"
    return Path(ensure_shapes_dataset(root, n_train=8, n_val=4, size=64))


def _tiny_model(num_classes=3, seed=0):
    from ddetr_cli.models import build_model, preset

    torch.manual_seed(seed)
    return build_model(preset("tiny", num_classes=num_classes)).eval()


def _copy_with_garbage_val_image(shapes: Path, tmp_path: Path) -> tuple[Path, int, str]:
    """A copy of the dataset whose second val image is random bytes; returns
    (yaml, that image's id, its file name)."""
    root = tmp_path / "broken"
    shutil.copytree(shapes.parent, root)
    doc = yaml.safe_load((root / shapes.name).read_text())
    from ddetr_cli.data import load_dataset_config

    sc = load_dataset_config(str(root / shapes.name)).split("val")
    img = json.loads(Path(sc.annotations).read_text())["images"][1]
    (Path(sc.images) / img["file_name"]).write_bytes(os.urandom(3000))
    assert doc is not None
    return root / shapes.name, int(img["id"]), img["file_name"]


# ------------------------------------------------------------ unreadable images


def test_unreadable_val_image_is_scored_empty_never_substituted(shapes, tmp_path):
    from ddetr_cli.data import CocoDetection, collate_eval, load_dataset_config, make_eval_transforms
    from ddetr_cli.engine.loops.evaluate import coco_evaluate, evaluate

    broken_yaml, bad_id, bad_name = _copy_with_garbage_val_image(shapes, tmp_path)
    model = _tiny_model()
    label_to_cat = None

    def run(yaml_path):
        nonlocal label_to_cat
        sc = load_dataset_config(str(yaml_path)).split("val")
        ds = CocoDetection(sc.images, sc.annotations, make_eval_transforms(64, 80), mark_unreadable=True)
        label_to_cat = list(ds.category_ids)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_eval)
        return ds, evaluate(model, loader, ds.coco, label_to_cat, torch.device("cpu"))

    ds, broken = run(broken_yaml)
    _, intact = run(shapes)
    per_image = collections.Counter(d["image_id"] for d in broken.detections)
    assert bad_id not in per_image and max(per_image.values()) <= 100  # no image scored twice
    assert broken.num_images == len(ds) == 4
    assert len(broken.unreadable) == 1 and bad_name in broken.unreadable[0]
    assert "4 image(s), 1 of them unreadable" in broken.coverage
    expected = coco_evaluate(ds.coco, [d for d in intact.detections if d["image_id"] != bad_id], ds.coco.getImgIds())
    assert broken.stats == pytest.approx(expected.stats)
    scan = ds.scan()
    assert scan.unreadable_skipped == 1 and scan.unreadable_examples == [bad_name]  # the scan table's count is true


def test_cli_eval_names_the_unreadable_image_and_counts_it(shapes, tmp_path):
    from ddetr_cli.checkpoints import save_model

    broken_yaml, _, bad_name = _copy_with_garbage_val_image(shapes, tmp_path)
    model = _tiny_model()
    from ddetr_cli.data.shapes import CATEGORY_IDS

    model.category_ids = list(CATEGORY_IDS)
    w = tmp_path / "m.pt"
    save_model(model, w)
    r = _cli(["eval", str(broken_yaml), "-w", str(w), "--workers", "0", "--imgsz", "64", "--json"])
    assert r.exit_code == 0, r.output
    assert bad_name in r.stderr and "unreadable" in r.stderr
    assert "COCO bbox over 4 image(s), 1 of them unreadable" in r.stderr
    out = json.loads(r.stdout)
    assert out["images"] == 4 and out["unreadable"] == 1


# ------------------------------------------------------------------ messages


class _Sneaky:
    def __reduce__(self):
        return (os.getcwd, ())


def test_checkpoint_messages_never_suggest_unsafe_loading(tmp_path):
    import collections as c
    import random

    from ddetr_cli.checkpoints.io import safe_torch_load
    from ddetr_cli.errors import CheckpointError

    torch.save({"p": _Sneaky()}, tmp_path / "evil.pth")
    torch.save({"p": c.OrderedDict(a=1), "q": random.Random(1)}, tmp_path / "evil2.pth")
    (tmp_path / "noise.pt").write_bytes(random.Random(3).randbytes(4096))
    expect = {"evil.pth": "posix.getcwd", "evil2.pth": "random.Random", "noise.pt": "not a readable PyTorch checkpoint"}
    for name, needle in expect.items():
        with pytest.raises(CheckpointError) as info:
            safe_torch_load(tmp_path / name)
        msg = str(info.value)
        assert name in msg and needle in msg, msg
        assert "\n" not in msg and "False" not in msg and "Re-running" not in msg and "trust" not in msg, msg
