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


def test_finetune_note_says_why_the_class_head_was_reset():
    from ddetr_cli.engine.runs.assemble import transfer_weights

    src, dst = _tiny_model(num_classes=2), _tiny_model(num_classes=3)
    notes = transfer_weights(dst, src.state_dict(), [5, 6], 2, [1, 2, 3])
    assert any("do not cover" in n for n in notes) and not any("no category ids" in n for n in notes), notes
    notes = transfer_weights(dst, src.state_dict(), None, 2, [1, 2, 3])
    assert any("no category ids" in n for n in notes), notes


def test_opencv_and_ffmpeg_stay_quiet_on_a_broken_video(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + os.urandom(2000))
    code = ("import ddetr_cli.data.sources as s, cv2, sys\n"
            "items = list(s.iter_sources(s.expand_sources([sys.argv[1]])))\n"
            "print(items[0].error is not None)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")}
    r = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"  # reported by ddetr, as an unreadable input
    assert "WARN" not in r.stderr and "moov atom" not in r.stderr, r.stderr


# ----------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from ddetr_cli.checkpoints import save_model

    model = _tiny_model()
    model.category_ids = [1, 2, 3]
    return save_model(model, tmp_path_factory.mktemp("relw") / "tiny.pt")


def _png(path: Path) -> Path:
    import cv2
    import numpy as np

    assert cv2.imwrite(str(path), np.full((40, 56, 3), 90, np.uint8))
    return path


def _predict(args, cwd: Path):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return _cli(["predict", *args, "--imgsz", "64", "--device", "cpu"])
    finally:
        os.chdir(old)


def test_predict_checks_the_output_folder_before_any_inference(tmp_path, weights, monkeypatch):
    import errno

    from ddetr_cli.engine.runs import folders

    _png(tmp_path / "a.png")
    real_open = os.open

    def read_only(path, flags, *a):
        if str(path).endswith(folders.CLAIM):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(folders.os, "open", read_only)
    r = _predict([str(tmp_path / "a.png"), "-w", str(weights), "--out", str(tmp_path / "ro")], tmp_path)
    assert r.exit_code != 0
    assert "a.png:" not in r.stdout  # no image was predicted
    err = r.stderr.strip().splitlines()
    assert "cannot write to the run folder" in err[-1] and "ro" in err[-1] and "--out" in err[-1], r.stderr
    assert "Traceback" not in r.output


def test_concurrent_runs_never_share_a_folder(tmp_path):
    import multiprocessing as mp

    from ddetr_cli.engine.runs.folders import allocate_run_dir

    with mp.get_context("fork").Pool(4) as pool:
        dirs = pool.starmap(allocate_run_dir, [(tmp_path, "exp")] * 8)
    assert len(set(dirs)) == 8


def test_predict_creates_nothing_when_there_is_nothing_to_do(tmp_path, weights):
    r = _predict([str(tmp_path / "*.jpg"), "-w", str(weights)], tmp_path)
    assert r.exit_code != 0 and "nothing to predict" in r.stderr and "no image or video files match" in r.stderr
    assert not (tmp_path / "runs").exists()
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    r = _predict([str(tmp_path / "bad.jpg"), "-w", str(weights)], tmp_path)
    assert r.exit_code != 0 and "none of the 1 input(s) could be read" in r.stderr
    assert not (tmp_path / "runs" / "predict" / "exp").exists()  # claimed, then removed: nothing was kept


def test_predict_folder_says_what_it_does_not_read_and_includes_videos(tmp_path, weights):
    import cv2
    import numpy as np

    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    _png(d / "a.png")
    (d / "notes.txt").write_text("x")
    writer = cv2.VideoWriter(str(d / "v.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (56, 40))
    if not writer.isOpened():
        pytest.skip("no video encoder in this OpenCV build")
    for i in range(2):
        writer.write(np.full((40, 56, 3), 40 * i, np.uint8))
    writer.release()
    r = _predict([str(d), "-w", str(weights)], tmp_path)
    assert r.exit_code == 0, r.output
    assert "1 subfolder(s) and 1 other file(s) not read" in r.stderr
    preds = json.loads((tmp_path / "runs" / "predict" / "exp" / "predictions.json").read_text())
    assert [Path(p["file"]).name for p in preds] == ["a.png", "v.avi", "v.avi"]
    assert not (tmp_path / "runs" / "predict" / "exp" / ".ddetr-run").exists()  # the claim is released


def test_predict_refuses_nan_conf(tmp_path, weights):
    r = _predict([str(_png(tmp_path / "a.png")), "-w", str(weights), "--conf", "nan"], tmp_path)
    assert r.exit_code != 0 and "--conf" in r.stderr and "nan" in r.stderr
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------ files on disk


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_outputs_get_the_umask_permissions(tmp_path, umask, mode):
    from ddetr_cli.checkpoints.io import atomic_torch_save, atomic_write_text

    old = os.umask(umask)
    try:
        a = atomic_write_text(tmp_path / "a.json", "[]")
        b = atomic_torch_save({"x": torch.zeros(1)}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert (a.stat().st_mode & 0o777, b.stat().st_mode & 0o777) == (mode, mode)


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from ddetr_cli.checkpoints import io as ckio
    from ddetr_cli.errors import OutputError

    last = tmp_path / "weights" / "last.pt"
    ckio.atomic_torch_save({"x": torch.ones(2)}, last)

    def full(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OutputError) as info:
        ckio.atomic_torch_save({"x": torch.zeros(2)}, last)
    assert str(info.value) == f"no space left on device while writing {last}; the previous checkpoint is intact"
    monkeypatch.undo()
    assert torch.equal(torch.load(last, weights_only=True)["x"], torch.ones(2))
    assert [f.name for f in last.parent.iterdir()] == ["last.pt"]  # no temp file left

    def enospc(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match=r"no space left on device while writing .*metrics.csv$"):
        ckio.atomic_write(tmp_path / "metrics.csv", enospc)


def test_stale_temp_files_are_recognised(tmp_path):
    from ddetr_cli.checkpoints.io import remove_stale_temps

    for name in (".last.pt.k2j_x9a1.tmp", ".best.pt.abcdefgh.tmp", "keep.tmp", ".hidden", "last.pt"):
        (tmp_path / name).write_text("x")
    removed = sorted(p.name for p in remove_stale_temps(tmp_path))
    assert removed == [".best.pt.abcdefgh.tmp", ".last.pt.k2j_x9a1.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "keep.tmp", "last.pt"]


# ---------------------------------------------------------- one-line errors


def _small_cfg(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "small.yaml"
    p.write_text("train:\n  imgsz: 64\n  min_scale: 48\n  scale_step: 16\n  max_size: 80\n  eval_size: 64\n"
                 "  eval_max_size: 80\n  crop: false\n" + extra)
    return p


@pytest.mark.parametrize("section,needle", [
    ("model:\n  num_queries: \"50\"\n", "num_queries: expected an integer, got '50'"),
    ("model:\n  d_model: huge\n", "d_model: expected an integer, got 'huge'"),
    ("model:\n  two_stage: 3\n", "two_stage: expected true or false"),
])
def test_typed_model_values_are_one_line_errors(shapes, tmp_path, section, needle):
    r = _cli(["train", str(shapes), "--max-iters", "1", "--workers", "0", "--out", str(tmp_path / "run"),
              "--config", str(_write(tmp_path / "c.yaml", section))])
    assert r.exit_code != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in r.output, r.stderr
    assert not (tmp_path / "run").exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_empty_crop_scales_is_one_line_error(shapes, tmp_path):
    r = _cli(["train", str(shapes), "--max-iters", "1", "--workers", "0", "--out", str(tmp_path / "run"),
              "--config", str(_write(tmp_path / "c.yaml", "train:\n  crop: true\n  crop_scales: []\n"))])
    # The size checks name the option (click's usage error: the value is refused like a bad flag) and the fix.
    error = [line for line in r.stderr.strip().splitlines() if line.startswith("Error:")]
    assert r.exit_code != 0 and len(error) == 1 and "crop-scales" in error[0] and "positive sizes" in error[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_safetensors_sidecar_with_string_values_is_one_line_error(tmp_path):
    from ddetr_cli.checkpoints import load_model, save_model
    from ddetr_cli.checkpoints.native import sidecar_path
    from ddetr_cli.errors import CheckpointError

    st = save_model(_tiny_model(), tmp_path / "m.safetensors")
    side = sidecar_path(st)
    meta = json.loads(side.read_text())
    meta["model_config"]["num_queries"] = "50"
    side.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"m\.(json|safetensors).*num_queries: expected an integer") as info:
        load_model(st)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- training


def _cfg(shapes: Path, **kw):
    from ddetr_cli.engine.config import TrainConfig

    base = dict(model="tiny", epochs=2, batch_size=4, workers=0, imgsz=64, min_scale=48, scale_step=16, max_size=80,
                eval_size=64, eval_max_size=80, crop=False, lr=2e-4, lr_drop=1, warmup_iters=2, ema=True, ema_warmup=5,
                data=str(shapes), seed=3, eval_every=1)
    base.update(kw)
    return TrainConfig(**base).validate()


def _trainer(cfg, run_dir: Path, resume: dict | None = None, garble_rng: bool = True):
    from ddetr_cli.engine.run_train import build_trainer

    if garble_rng:
        torch.manual_seed(int.from_bytes(os.urandom(4), "little"))  # whatever the caller's RNG holds
    return build_trainer(cfg, run_dir, torch.device("cpu"), ckpt=resume)


def _rows(run_dir: Path) -> list[dict]:
    import csv

    return list(csv.DictReader((run_dir / "metrics.csv").read_text().splitlines()))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_seed_reproduces_a_run_bitwise(shapes, tmp_path, one_thread):
    states = []
    for i in range(2):
        t = _trainer(_cfg(shapes, max_iters=3, ema=False), tmp_path / f"r{i}")
        t.fit()
        states.append({k: v.clone() for k, v in t.model.state_dict().items()})
    assert _same(*states)
    other = _trainer(_cfg(shapes, max_iters=1, ema=False, seed=4), tmp_path / "r9")
    assert not _same(states[0], other.model.state_dict())  # the seed decides the initialisation


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_preemption_signal_saves_and_resume_equals_uninterrupted(shapes, tmp_path, one_thread, signame):
    import signal

    from ddetr_cli.engine.loops.train import TrainingInterrupted
    from ddetr_cli.engine.report.progress import Reporter
    from ddetr_cli.engine.runs.checkpoint import load_train_checkpoint

    full = _trainer(_cfg(shapes, epochs=1), tmp_path / "full")
    full.fit()

    class SignalAfterFirstStep(Reporter):
        def step(self, values):
            os.kill(os.getpid(), getattr(signal, signame))

    t = _trainer(_cfg(shapes, epochs=1), tmp_path / "cut")
    t.reporter = SignalAfterFirstStep()
    with pytest.raises(TrainingInterrupted) as info:
        t.fit()
    assert info.value.signal_name == signame
    assert signal.getsignal(getattr(signal, signame)) is signal.SIG_DFL  # handlers restored
    ckpt = load_train_checkpoint(tmp_path / "cut" / "weights" / "last.pt")
    assert ckpt["global_step"] == 1 and ckpt["step_in_epoch"] == 1
    rest = _trainer(_cfg(shapes, epochs=1), tmp_path / "cut", resume=ckpt)
    rest.fit()
    assert _same(rest.model.state_dict(), full.model.state_dict())
    assert _rows(tmp_path / "cut") == [{**r, "time": _rows(tmp_path / "cut")[0]["time"]} for r in _rows(tmp_path / "full")]


def test_kill_between_last_step_save_and_epoch_end_leaves_whole_rows(shapes, tmp_path, one_thread):
    """save_every == iterations per epoch: last.pt of the epoch's last step, then a kill before the
    epoch-end save. The resumed run's metrics row has every loss column, equal to an uninterrupted run's."""
    from ddetr_cli.engine.loops.train import Trainer
    from ddetr_cli.engine.runs.checkpoint import load_train_checkpoint

    full = _trainer(_cfg(shapes, epochs=1, save_every_iters=2), tmp_path / "full")
    full.fit()

    class Killed(BaseException):
        pass

    t = _trainer(_cfg(shapes, epochs=1, save_every_iters=2), tmp_path / "cut")

    def die(row):
        raise Killed

    t._validate_and_keep_best = die
    with pytest.raises(Killed):
        t.fit()
    weights = tmp_path / "cut" / "weights"
    (weights / ".last.pt.ab12cd34.tmp").write_bytes(b"half a checkpoint")  # what a kill -9 mid-save leaves
    (tmp_path / "cut" / "metrics.csv").write_text("epoch,loss\n1,\n")  # and a row of an older version
    ckpt = load_train_checkpoint(weights / "last.pt")
    assert ckpt["step_in_epoch"] == 2 and ckpt["epoch"] == 0
    rest = _trainer(_cfg(shapes, epochs=1, save_every_iters=2), tmp_path / "cut", resume=ckpt)
    assert isinstance(rest, Trainer)
    rest.fit()
    assert sorted(p.name for p in weights.iterdir()) == ["best.pt", "last.pt"]
    cut, ref = _rows(tmp_path / "cut"), _rows(tmp_path / "full")
    assert len(cut) == 1 and all(cut[0][k] != "" for k in ("loss", "loss_ce", "loss_bbox", "loss_giou", "lr", "AP"))
    assert {k: v for k, v in cut[0].items() if k != "time"} == {k: v for k, v in ref[0].items() if k != "time"}


def test_val_split_without_annotations_warns_and_still_writes_best(shapes, tmp_path):
    from ddetr_cli.engine.run_train import run_training

    root = tmp_path / "noann"
    shutil.copytree(shapes.parent, root)
    from ddetr_cli.data import load_dataset_config

    val = Path(load_dataset_config(str(root / shapes.name)).split("val").annotations)
    doc = json.loads(val.read_text())
    doc["annotations"] = []
    val.write_text(json.dumps(doc))
    warnings: list[str] = []
    out = tmp_path / "run"
    run_training(str(root / shapes.name), config_path=_small_cfg(tmp_path), warn=warnings.append, log=lambda m: None,
                 overrides={"max_iters": 1, "workers": 0, "batch_size": 4, "out": str(out), "device": "cpu"})
    assert any("no annotations" in w and "best.pt" in w for w in warnings), warnings
    assert (out / "weights" / "best.pt").is_file()


# ---------------------------------------------------------- fault injection


def _train_proc(args: list[str], env: dict, err: Path):
    """``ddetr train ARGS`` in a child process, its stderr going to ``err``."""
    import subprocess
    import sys

    with open(err, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "ddetr_cli", "train", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=fh)


def _claimed_by(run: Path, pid: int) -> bool:
    try:
        return (run / ".ddetr-run").read_text().split()[1] == str(pid)
    except (OSError, IndexError):
        return False


@pytest.mark.slow  # five short training processes: about 40 s on 2 cores
def test_fault_injection_kill_and_sigterm_then_resume(shapes, tmp_path):
    """A tiny run killed at random points (kill -9 and SIGTERM), resumed each time: last.pt always loads,
    no temp file remains, metrics.csv has one whole row per epoch, and the final weights equal an
    uninterrupted run's, bit for bit. The schedule is seeded (DDETR_FAULT_SEED) so a failure reproduces."""
    import random
    import signal
    import time

    from ddetr_cli.checkpoints.io import safe_torch_load

    seed = int(os.environ.get("DDETR_FAULT_SEED", "12"))
    rng = random.Random(seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cfg = _small_cfg(tmp_path)
    common = ["--model", "tiny", "--imgsz", "64", "--epochs", "2", "--batch-size", "4", "--workers", "0",
              "--save-every", "2", "--config", str(cfg)]

    t0 = time.perf_counter()
    err_file = tmp_path / "stderr.txt"
    ref = _train_proc([str(shapes), *common, "--out", str(tmp_path / "ref")], env, err_file)
    while not (tmp_path / "ref" / "weights").is_dir() and ref.poll() is None:
        time.sleep(0.02)
    t1 = time.perf_counter()
    assert ref.wait(timeout=300) == 0, err_file.read_text()
    span, train_span = time.perf_counter() - t0, time.perf_counter() - t1  # whole run; from the training's start

    run = tmp_path / "run"
    last = run / "weights" / "last.pt"
    faults = ["SIGTERM", "kill", "kill"]
    log = []
    for fault in faults:
        args = ["--resume", str(run)] if last.exists() else [str(shapes), *common, "--out", str(run)]
        proc = _train_proc(args, env, err_file)
        if fault == "SIGTERM":  # once this process has claimed the run folder (a signal during interpreter
            deadline = time.perf_counter() + 120  # start-up, before ddetr runs, kills it like kill -9 would)
            while not _claimed_by(run, proc.pid) and proc.poll() is None and time.perf_counter() < deadline:
                time.sleep(0.02)
        delay = rng.uniform(0.0, (train_span if fault == "SIGTERM" else span) * 0.9)
        try:
            proc.wait(timeout=delay)
        except Exception:  # still running: the fault
            proc.send_signal(signal.SIGKILL if fault == "kill" else signal.SIGTERM)
        code = proc.wait(timeout=120)
        err = err_file.read_text()
        log.append((fault, round(delay, 2), code))
        if code == 143:  # SIGTERM: a one-line message with the resume command
            assert "ddetr train --resume" in err and "Traceback" not in err, err
        if last.exists():
            state = safe_torch_load(last)  # always loads
        finished = last.exists() and state["epoch"] >= 2
        assert code in (0, 143, -9), (log, err)
        if finished:
            break
    while True:  # resume to the end
        if last.exists() and safe_torch_load(last)["epoch"] >= 2:
            break
        args = ["--resume", str(run)] if last.exists() else [str(shapes), *common, "--out", str(run)]
        proc = _train_proc(args, env, err_file)
        assert proc.wait(timeout=300) == 0, (log, err_file.read_text())

    if log[-1][2] == -9:  # killed after its last save (e.g. in the final evaluation): the next resume tidies up
        proc = _train_proc(["--resume", str(run)], env, err_file)
        assert proc.wait(timeout=300) == 1 and "already finished" in err_file.read_text(), (log, err_file.read_text())
    print("faults (kind, delay s, exit code):", log)
    leftovers = [p.name for p in run.rglob("*") if p.name.endswith(".tmp") or p.name == ".ddetr-run"]
    assert leftovers == [], (log, leftovers)
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2"], (log, rows)
    assert all(r[k] != "" for r in rows for k in ("loss", "loss_ce", "loss_bbox", "loss_giou", "lr", "AP")), rows
    got, want = safe_torch_load(last), safe_torch_load(tmp_path / "ref" / "weights" / "last.pt")
    assert got["global_step"] == want["global_step"] == 4
    assert _same(got["model"], want["model"]), log
    assert _same(got["ema"]["model"], want["ema"]["model"]), log


def test_slurm_script_stops_training_and_requeues_on_preemption(tmp_path):
    """scripts/slurm_train.sh with stand-ins for srun / scontrol / ddetr: SIGUSR1 (SLURM's --signal) makes it
    SIGTERM the training, wait for it and requeue the job; a requeued job continues with --resume."""
    import signal
    import subprocess
    import time

    script = Path(__file__).resolve().parents[1] / "scripts" / "slurm_train.sh"
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stubs = {
        "scontrol": f'echo "scontrol $*" >> {log}; [ "$1" = show ] && echo localhost; exit 0',
        "srun": f'echo "srun $*" >> {log}; trap \'echo "train got TERM" >> {log}; exit 143\' TERM; '
                f'echo started >> {log}; while true; do sleep 0.05; done',
        "ddetr": "exit 0",
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n1",
           "GPUS_PER_NODE": "1", "RUN_DIR": str(tmp_path / "run")}
    proc = subprocess.Popen(["bash", str(script), "data.yaml", "--epochs", "3"], env=env, cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (log.exists() and "started" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    calls = log.read_text()
    assert proc.returncode == 0, err
    assert f"train data.yaml --epochs 3 --out {tmp_path / 'run'}" in calls
    assert "train got TERM" in calls and "scontrol requeue 77" in calls, calls
    assert calls.index("train got TERM") < calls.index("scontrol requeue 77")  # saved before the requeue

    (tmp_path / "run" / "weights").mkdir(parents=True)
    (tmp_path / "run" / "weights" / "last.pt").write_bytes(b"x")
    log.write_text("")
    proc = subprocess.Popen(["bash", str(script), "data.yaml", "--epochs", "3"], env=env, cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True)
    while "started" not in log.read_text() and time.time() < deadline + 30:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert f"train --resume {tmp_path / 'run'}" in log.read_text()


def test_train_out_in_use_is_refused_and_a_dead_claim_is_taken_over(shapes, tmp_path):
    import socket
    import subprocess

    from ddetr_cli.engine.run_train import run_training
    from ddetr_cli.engine.runs.folders import CLAIM, allocate_run_dir, claim_run_dir, release_run_dir
    from ddetr_cli.errors import RunError

    out = tmp_path / "run"
    out.mkdir()
    assert claim_run_dir(out)  # another run (this process) holds it
    with pytest.raises(RunError, match="in use by another run"):
        run_training(str(shapes), config_path=_small_cfg(tmp_path), log=lambda m: None, warn=lambda m: None,
                     overrides={"max_iters": 1, "workers": 0, "out": str(out), "device": "cpu"})
    release_run_dir(out)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / CLAIM).write_text(f"{socket.gethostname()} {dead.pid}\n")  # left by a killed run
    assert allocate_run_dir(tmp_path, "exp") == tmp_path / "exp"


def test_resume_from_a_checkpoint_without_metrics_rows_keeps_the_csv(shapes, tmp_path, one_thread):
    from ddetr_cli.engine.runs.checkpoint import load_train_checkpoint

    _trainer(_cfg(shapes, epochs=1, ema=False), tmp_path / "run").fit()
    ckpt = load_train_checkpoint(tmp_path / "run" / "weights" / "last.pt")
    del ckpt["metrics_rows"], ckpt["epoch_losses"]  # as written before these keys existed
    _trainer(_cfg(shapes, epochs=2, ema=False), tmp_path / "run", resume=ckpt).fit()
    assert [r["epoch"] for r in _rows(tmp_path / "run")] == ["1", "2"]


def test_eval_checks_the_coco_json_folder_before_inference(shapes, tmp_path, monkeypatch):
    import errno
    import tempfile

    from ddetr_cli.engine import run_evaluation
    from ddetr_cli.errors import OutputError

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OutputError, match="cannot write .*dets.json: Read-only file system") as info:
        run_evaluation(str(shapes), tmp_path / "missing-weights.pt", coco_json=tmp_path / "dets.json")
    assert info.value.param == "coco_json"  # raised before the (missing) weights were even looked at
