"""Weights by name (hub ids, @revision, short names) against a hub cache built on
disk with HF_HUB_OFFLINE=1, the default model of ``ddetr predict``, and the
one-line error when the cache is empty. Nothing here touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hub_cache import LABELS, make_hub_cache

from ddetr_cli.checkpoints import DEFAULT_MODEL, SHORT_NAMES, CheckpointError, HubError, load_model
from ddetr_cli.checkpoints.hub import HubRef, parse_source, resolve
from ddetr_cli.errors import DdetrError

pytest.importorskip("transformers")
pytest.importorskip("huggingface_hub")


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """The default model's repository (two-stage) and the base one, in a hub cache."""
    root = tmp_path_factory.mktemp("hf-hub")
    snap, hf = make_hub_cache(root, SHORT_NAMES[DEFAULT_MODEL], "two-stage")
    make_hub_cache(root, SHORT_NAMES["r50"], "base", seed=3)
    return root, snap, hf


@pytest.fixture
def offline_cache(hub_cache, monkeypatch):
    root, snap, hf = hub_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root, snap, hf


def test_parse_source(tmp_path):
    assert parse_source("r50") == HubRef("SenseTime/deformable-detr", None, "r50")
    assert parse_source("r50-two-stage@v1") == HubRef(SHORT_NAMES["r50-two-stage"], "v1", "r50-two-stage")
    assert parse_source("SenseTime/deformable-detr@abc123") == HubRef("SenseTime/deformable-detr", "abc123")
    for local in ("runs/best.pt", "./a/b", "~/w.pth", "/abs/dir", "a/b/c", "best.pt", "model.onnx", "dir/model.onnx"):
        assert parse_source(local) is None, local
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert parse_source("owner/name") is None  # an existing path wins over a hub id
    finally:
        os.chdir(old)


def _padded():
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 96, 128, generator=gen)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    images[1, :, 70:], images[1, :, :, 90:] = 0, 0
    mask[1, 70:], mask[1, :, 90:] = True, True
    return images, mask


@pytest.mark.parametrize("source", ["r50-two-stage", "SenseTime/deformable-detr-with-box-refine-two-stage",
                                    "SenseTime/deformable-detr-with-box-refine-two-stage@main"])
def test_load_by_name_matches_transformers(offline_cache, source):
    _, snap, hf = offline_cache
    resolved = resolve(source)
    assert resolved.path == snap and resolved.hub is not None
    model = load_model(source)
    assert model.config.two_stage and model.class_names == LABELS
    images, mask = _padded()
    with torch.no_grad():
        ref = hf(pixel_values=images, pixel_mask=(~mask).long())
        out = model(images, mask)
    torch.testing.assert_close(out["pred_logits"], ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["pred_boxes"], ref.pred_boxes, atol=1e-4, rtol=0)


def test_revision_by_commit_and_other_repo(offline_cache):
    root, snap, _ = offline_cache
    assert resolve(f"r50-two-stage@{snap.name}").path == snap
    base = load_model("r50")
    assert not base.config.two_stage and not base.config.with_box_refine


def test_empty_cache_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as info:
        load_model("r50-refine")
    msg = str(info.value)
    assert "\n" not in msg and "SenseTime/deformable-detr-with-box-refine" in msg
    assert "hf download SenseTime/deformable-detr-with-box-refine" in msg and "`weights` DIR" in msg  # no flag names
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, DdetrError)
    assert info.value.param is None  # the machine is offline, the value is fine: one `Error:` line, not usage


def test_cli_weights_help_lists_the_short_names():
    from ddetr_cli.cli import options
    from ddetr_cli.cli.main import cli

    assert tuple(options.SHORT_NAMES) == tuple(SHORT_NAMES)  # spelled out there to keep torch out of --help
    for command in ("predict", "eval", "train", "bench", "export"):
        res = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
        assert all(name in res.output for name in SHORT_NAMES), command


def test_missing_local_path_names_it_and_the_short_names(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such file.*r50, r50-refine, r50-two-stage"):
        load_model(tmp_path / "nope.pt")


def _image(path: Path) -> Path:
    img = np.full((60, 80, 3), 90, np.uint8)
    cv2.rectangle(img, (10, 10), (50, 40), (200, 40, 40), -1)
    cv2.imwrite(str(path), img)
    return path


def _invoke(args, cwd: Path):
    from ddetr_cli.cli.main import cli

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, args)
    finally:
        os.chdir(old)


def test_predict_viz_without_weights_uses_the_default_model(offline_cache, tmp_path):
    img = _image(tmp_path / "img.jpg")
    res = _invoke(["predict", str(img), "--viz", "--device", "cpu", "--imgsz", "64", "--conf", "0"], tmp_path)
    assert res.exit_code == 0, res.output
    assert f"default COCO model {DEFAULT_MODEL}" in res.output
    assert "SenseTime/deformable-detr-with-box-refine-two-stage" in res.output and "snapshots" in res.output
    run = tmp_path / "runs" / "predict" / "exp"
    assert (run / "predictions.json").is_file() and (run / "img.jpg").is_file()


def test_predict_without_weights_offline_and_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    img = _image(tmp_path / "img.jpg")
    res = _invoke(["predict", str(img), "--viz", "--device", "cpu"], tmp_path)
    assert res.exit_code == 1
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
    error = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1, res.output
    assert "SenseTime/deformable-detr-with-box-refine-two-stage" in error[0]
    assert "hf download" in error[0] and "--weights DIR" in error[0]
