"""Training: config resolution, schedule, atomic checkpoints, exact resume, CLI."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from ddetr_cli.checkpoints.io import safe_torch_load
from ddetr_cli.engine.runs.checkpoint import load_train_checkpoint, save_checkpoint
from ddetr_cli.engine.runs.folders import allocate_run_dir
from ddetr_cli.engine.config import TrainConfig, resolve
from ddetr_cli.errors import TrainConfigError
from ddetr_cli.engine.parts.schedule import StepWarmupSchedule

# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_yaml(tmp_path_factory) -> Path:
    from ddetr_cli.data import ensure_shapes_dataset

    root = tmp_path_factory.mktemp("tinyshapes") / "shapes"
    return Path(ensure_shapes_dataset(root, n_train=8, n_val=4, size=64))


def tiny_cfg(yaml_path: Path, **kw) -> TrainConfig:
    base = dict(
        model="tiny", epochs=2, batch_size=4, workers=0, imgsz=64, min_scale=48, scale_step=16, max_size=80,
        eval_size=64, eval_max_size=80, crop=False, lr=2e-4, lr_drop=1, warmup_iters=2, ema=True, ema_warmup=5,
        data=str(yaml_path), seed=3, eval_every=2,
    )
    base.update(kw)
    return TrainConfig(**base).validate()


def make_trainer(cfg: TrainConfig, run_dir: Path, resume: dict | None = None):
    from ddetr_cli.engine.run_train import build_trainer

    torch.manual_seed(0)
    return build_trainer(cfg, run_dir, torch.device("cpu"), ckpt=resume)


def assert_same_state(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) if a[k].numel() else 0.0 for k in a)
    assert worst <= atol, worst


# ------------------------------------------------------------------- config


def test_config_resolution_order(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  lr: 0.001\n  epochs: 7\nmodel:\n  num_queries: 20\n")
    cfg = resolve(dataset_source="shapes", dataset_train={"epochs": 5, "batch_size": 3}, dataset_model={"dropout": 0.0},
                  config_path=cfg_file, cli={"epochs": 9})
    assert cfg.model == "tiny" and cfg.imgsz == 128  # shapes recipe
    assert cfg.batch_size == 3  # dataset YAML over recipe
    assert cfg.lr == 0.001  # --config over dataset
    assert cfg.epochs == 9  # CLI over everything
    assert cfg.model_overrides == {"dropout": 0.0, "num_queries": 20}


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(TrainConfigError, match="unknown training option 'lrr'"):
        resolve(dataset_source=None, dataset_train={"lrr": 1}, dataset_model=None, config_path=None, cli={})
    with pytest.raises(TrainConfigError, match="epochs: expected int"):
        resolve(dataset_source=None, dataset_train={"epochs": "many"}, dataset_model=None, config_path=None, cli={})
    for key, value in (("class_loss", "bce"), ("denoise_groups", 0)):
        with pytest.raises(TrainConfigError, match=key):
            resolve(dataset_source=None, dataset_train={key: value}, dataset_model=None, config_path=None, cli={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(TrainConfigError, match=r"bad.yaml: line \d+, column \d+: malformed YAML"):
        resolve(dataset_source=None, dataset_train=None, dataset_model=None, config_path=bad, cli={})


def test_schedule_warmup_and_drop():
    s = StepWarmupSchedule(lr_drop=40, warmup_iters=10)
    assert s.factor(0, 0) == pytest.approx(0.001)
    assert s.factor(0, 5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert s.factor(39, 1000) == 1.0 and s.factor(40, 1000) == pytest.approx(0.1)
    assert TrainConfig(epochs=50).effective_lr_drop() == 40
    assert TrainConfig(epochs=50, lr_drop=10).effective_lr_drop() == 10


def test_param_groups_follow_official_lrs():
    from ddetr_cli.engine.parts.optim import build_optimizer
    from ddetr_cli.models import build_model, preset

    model = build_model(preset("tiny", num_classes=3))
    opt = build_optimizer(model, TrainConfig())
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"main": 2e-4, "backbone": 2e-5, "linear_proj": pytest.approx(2e-5)}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            n = names[id(p)]
            assert (g["name"] == "backbone") == n.startswith("backbone.0")
            assert (g["name"] == "linear_proj") == ("sampling_offsets" in n or "reference_points" in n)
    assert opt.defaults["weight_decay"] == 1e-4


def test_run_dirs_never_overwrite(tmp_path):
    for expected in ("exp", "exp2", "exp3"):
        run = allocate_run_dir(tmp_path, "exp")
        assert run.name == expected
        (run / "config.yaml").write_text("x")  # a run writes into its folder at once
    (tmp_path / "run1").mkdir()  # an empty folder is used as is
    assert allocate_run_dir(tmp_path, "run1").name == "run1"
    (tmp_path / "run1" / "x").write_text("1")
    assert allocate_run_dir(tmp_path, "run1").name == "run1-2"  # never 'run12'


# -------------------------------------------------------------- checkpoints


def test_atomic_checkpoint_survives_crash_mid_save(tmp_path, monkeypatch):
    path = tmp_path / "weights" / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 1}, path)

    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial garbage")
        raise KeyboardInterrupt  # e.g. the job is killed mid-write

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    back = safe_torch_load(path)
    assert back["epoch"] == 1 and torch.equal(back["model"]["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left


def test_load_train_checkpoint_rejects_model_only(tmp_path):
    from ddetr_cli.checkpoints.io import CheckpointError

    p = tmp_path / "m.pt"
    save_checkpoint({"model": {}, "format": "ddetr"}, p)
    with pytest.raises(CheckpointError, match="not a resumable training checkpoint"):
        load_train_checkpoint(p)


# ------------------------------------------------------------ exact resume


@pytest.mark.slow
def test_exact_resume_epoch_boundary_and_mid_epoch(tiny_yaml, tmp_path, one_thread):
    # reference: 2 epochs straight
    full = make_trainer(tiny_cfg(tiny_yaml), tmp_path / "full")
    res = full.fit()
    assert res.epochs_done == 2 and res.global_step == 4
    ref = {k: v.clone() for k, v in full.model.state_dict().items()}
    ref_ema = {k: v.clone() for k, v in full.ema.module.state_dict().items()}

    # 1 epoch, then resume with --epochs 2 (extends the run)
    half = make_trainer(tiny_cfg(tiny_yaml, epochs=1), tmp_path / "half")
    half.fit()
    ckpt = load_train_checkpoint(tmp_path / "half" / "weights" / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["step_in_epoch"] == 0 and ckpt["global_step"] == 2
    for key in ("optimizer", "scheduler", "rng", "train_config", "ema", "model_config", "class_names", "category_ids"):
        assert key in ckpt
    resumed = make_trainer(tiny_cfg(tiny_yaml, epochs=2), tmp_path / "half", resume=ckpt)
    resumed.fit()
    assert_same_state(resumed.model.state_dict(), ref)
    assert_same_state(resumed.ema.module.state_dict(), ref_ema)

    # stop mid-epoch (3 of 4 iterations), resume: continues the epoch
    part = make_trainer(tiny_cfg(tiny_yaml, max_iters=3), tmp_path / "part")
    r = part.fit()
    assert r.stopped_early == "max iters"
    ckpt = load_train_checkpoint(tmp_path / "part" / "weights" / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["step_in_epoch"] == 1
    rest = make_trainer(tiny_cfg(tiny_yaml), tmp_path / "part", resume=ckpt)
    rest.fit()
    assert rest.global_step == 4
    assert_same_state(rest.model.state_dict(), ref)

    rows = list(csv.DictReader((tmp_path / "full" / "metrics.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"loss", "loss_ce", "lr", "AP", "AP50", "AP75", "APs", "APm", "APl", "time"} <= set(rows[0])
    assert (tmp_path / "full" / "weights" / "best.pt").is_file()


def test_non_finite_loss_stops_with_clear_error(tiny_yaml, tmp_path):
    from ddetr_cli.errors import TrainingError

    t = make_trainer(tiny_cfg(tiny_yaml, epochs=1, ema=False), tmp_path / "nan")
    with torch.no_grad():
        for p in t.model.parameters():
            p.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"epoch 1, iteration 1 \(global step 1\).*(non-finite|NaN)"):
        t.fit()
    assert not (tmp_path / "nan" / "weights" / "last.pt").exists()


# ---------------------------------------------------------------------- CLI


def _cli(args, env=None):
    from ddetr_cli.cli.main import cli

    return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)


@pytest.mark.slow
def test_cli_train_end_to_end_and_resume(tiny_yaml, tmp_path):
    out = tmp_path / "run"
    args = ["train", str(tiny_yaml), "--model", "tiny", "--imgsz", "64", "--epochs", "1", "--batch-size", "4",
            "--workers", "0", "--out", str(out), "--config", str(_small_cfg(tmp_path))]
    r = _cli(args)
    assert r.exit_code == 0, r.output
    assert "AP " in r.stdout
    for f in ("config.yaml", "metrics.csv", "weights/last.pt", "weights/best.pt"):
        assert (out / f).is_file(), f
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 1 and saved["model"]["num_classes"] == 3
    # the finished run refuses to resume without --epochs, then extends
    r = _cli(["train", "--resume", str(out)])
    assert r.exit_code != 0 and "already finished" in r.output
    r = _cli(["train", "--resume", str(out), "--epochs", "2"])
    assert r.exit_code == 0, r.output
    assert load_train_checkpoint(out / "weights" / "last.pt")["epoch"] == 2
    # eval of the trained weights (category ids recorded, sizes from the train config)
    r = _cli(["eval", str(tiny_yaml), "-w", str(out / "weights" / "best.pt"), "--workers", "0",
              "--coco-json", str(tmp_path / "dets.json"), "--out", str(tmp_path / "val")])
    assert (tmp_path / "val" / "PR_curve.png").is_file()
    assert r.exit_code == 0, r.output
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in r.stdout
    dets = json.loads((tmp_path / "dets.json").read_text())
    assert isinstance(dets, list) and all(len(d["bbox"]) == 4 for d in dets)
    # --json: the metrics as JSON on stdout, the same numbers
    r2 = _cli(["eval", str(tiny_yaml), "-w", str(out / "weights" / "best.pt"), "--workers", "0", "--json", "--no-plots"])
    assert r2.exit_code == 0, r2.output
    metrics = json.loads(r2.stdout)
    assert set(metrics) >= {"AP", "AP50", "ARl", "per_class"} and metrics["split"] == "val"
    assert "Average Precision" in r2.stderr


def test_cli_train_shapes_recipe_few_iterations(tiny_yaml, tmp_path):
    """A generated shapes dataset gets the shapes recipe (tiny model, EMA, ...)."""
    out = tmp_path / "shapes_run"
    r = _cli(["train", str(tiny_yaml), "--imgsz", "64", "--max-iters", "2", "--workers", "0", "--batch-size", "4",
              "--out", str(out), "--config", str(_small_cfg(tmp_path))])
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert saved["model"] == "tiny" and saved["ema"] is True and saved["max_iters"] == 2
    ckpt = load_train_checkpoint(out / "weights" / "last.pt")
    assert ckpt["global_step"] == 2 and ckpt["ema"] is not None
    assert "stopped at the max iters" in r.stderr


@pytest.mark.slow
def test_python_api_trains_and_evaluates_like_the_cli(tiny_yaml, tmp_path):
    """A script does what `ddetr train` / `ddetr eval` do, through the same engine functions."""
    from ddetr_cli.engine import RunError, run_evaluation, run_training

    out = tmp_path / "api_run"
    opts = {"imgsz": 64, "max_iters": 2, "workers": 0, "batch_size": 4, "out": str(out), "device": "cpu"}
    messages: list[str] = []
    result = run_training(str(tiny_yaml), config_path=_small_cfg(tmp_path), overrides=opts, log=messages.append)
    assert result is not None and result.run_dir == out
    assert result.global_step == 2 and result.stopped_early == "max iters"
    for f in ("config.yaml", "weights/last.pt"):
        assert (out / f).is_file(), f
    saved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert saved["model"] == "tiny" and saved["max_iters"] == 2  # shapes recipe + overrides, as on the CLI
    assert any(m.startswith(f"run folder: {out}") for m in messages)
    # the same checks as the CLI, as exceptions, before any training
    with pytest.raises(RunError, match="already holds a run"):
        run_training(str(tiny_yaml), config_path=_small_cfg(tmp_path), overrides=opts)
    with pytest.raises(RunError, match="drop `data` and `config_path`") as err:
        run_training(str(tiny_yaml), resume=out)
    assert err.value.usage
    ev = run_evaluation(str(tiny_yaml), out / "weights" / "last.pt", workers=0, device="cpu")
    assert ev is not None and len(ev.result.stats) == 12 and ev.imgsz == 64  # eval size from the run's config


def _small_cfg(tmp_path: Path) -> Path:
    p = tmp_path / "small.yaml"
    p.write_text("train:\n  min_scale: 48\n  scale_step: 16\n  max_size: 80\n  eval_size: 64\n  eval_max_size: 80\n  crop: false\n")
    return p


@pytest.mark.parametrize(
    "setup, expect",
    [
        ("missing", "not found"),
        ("malformed", "malformed YAML"),
        ("unknown_category", "category"),
        ("empty", "no images"),
        ("unknown_option", "unknown training option"),
    ],
)
def test_cli_bad_input_one_line_errors(tiny_yaml, tmp_path, setup, expect):
    root = tiny_yaml.parent
    data = tmp_path / "d.yaml"
    extra: list[str] = []
    if setup == "missing":
        data = tmp_path / "nope.yaml"
    elif setup == "malformed":
        data.write_text("train: {images: train\n")
    elif setup in ("unknown_category", "empty"):
        ann = json.loads((root / "annotations" / "train.json").read_text())
        if setup == "unknown_category":
            ann["annotations"][0]["category_id"] = 999
        else:
            ann["images"], ann["annotations"] = [], []
        (tmp_path / "train.json").write_text(json.dumps(ann))
        data.write_text(yaml.safe_dump({"path": str(root), "train": {"images": "train", "annotations": str(tmp_path / "train.json")},
                                        "val": {"images": "val", "annotations": "annotations/val.json"}}))
    elif setup == "unknown_option":
        data = tiny_yaml
        cfg = tmp_path / "c.yaml"
        cfg.write_text("train:\n  learning_rate: 0.1\n")
        extra = ["--config", str(cfg)]
    r = _cli(["train", str(data), "--out", str(tmp_path / "o"), "--workers", "0", *extra])
    assert r.exit_code != 0
    msg = r.stderr.strip()
    assert msg.startswith("Error:") and len(msg.splitlines()) == 1, msg
    assert expect in msg, msg
    assert "Traceback" not in r.output
    assert not (tmp_path / "o" / "weights").exists()  # nothing trained


# ---------------------------------------------------------------- fine-tune


def _tiny(num_classes: int, seed: int):
    from ddetr_cli.models import build_model, preset

    torch.manual_seed(seed)
    return build_model(preset("tiny", num_classes=num_classes))


def test_transfer_weights_maps_class_rows_by_category_id():
    from ddetr_cli.engine.runs.assemble import transfer_weights

    src, dst = _tiny(3, 0), _tiny(2, 1)
    notes = transfer_weights(dst, src.state_dict(), [1, 2, 3], 3, [1, 3])
    assert any("rows taken by category id" in n for n in notes)
    s, d = src.state_dict(), dst.state_dict()
    for k in d:
        if "class_embed" in k and d[k].shape[:1] == (2,):
            assert torch.equal(d[k], s[k][[0, 2]]), k
        elif d[k].shape == s[k].shape:
            assert torch.equal(d[k], s[k]), k


def test_transfer_weights_reinitialises_unmappable_class_head_and_says_so():
    from ddetr_cli.engine.runs.assemble import transfer_weights

    src, dst = _tiny(3, 0), _tiny(2, 1)
    fresh = {k: v.clone() for k, v in dst.state_dict().items()}
    notes = transfer_weights(dst, src.state_dict(), [1, 2, 3], 3, [5, 6])
    assert any("class head re-initialised" in n for n in notes)
    d = dst.state_dict()
    head = [k for k in d if "class_embed" in k]
    assert head and all(torch.equal(d[k], fresh[k]) for k in head)


def test_cli_eval_class_mismatch_is_one_line_error(tiny_yaml, tmp_path):
    from ddetr_cli.checkpoints import save_model

    model = _tiny(5, 0)  # 5 classes, no category ids recorded
    model.category_ids = None
    w = tmp_path / "m.pt"
    save_model(model, w)
    r = _cli(["eval", str(tiny_yaml), "--weights", str(w), "--workers", "0", "--imgsz", "64"])
    assert r.exit_code != 0
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1 and "5 classes" in msg and "3 categories" in msg, msg


def test_ctrl_c_saves_between_steps_and_resumes(tiny_yaml, tmp_path, one_thread):
    import signal

    from ddetr_cli.engine.report.progress import Reporter
    from ddetr_cli.engine.loops.train import TrainingInterrupted

    class CtrlCAfterFirstStep(Reporter):
        def step(self, values):
            os.kill(os.getpid(), signal.SIGINT)

    t = make_trainer(tiny_cfg(tiny_yaml, epochs=1, ema=False), tmp_path / "int")
    t.reporter = CtrlCAfterFirstStep()
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with pytest.raises(TrainingInterrupted):
        t.fit()
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    ckpt = load_train_checkpoint(tmp_path / "int" / "weights" / "last.pt")
    assert ckpt["global_step"] == 1 and ckpt["step_in_epoch"] == 1 and ckpt["epoch"] == 0


def test_ema_update_is_the_moving_average_and_copies_integer_buffers():
    """ema = d * ema + (1 - d) * model for every float tensor (one fused lerp), integer buffers copied."""
    from ddetr_cli.engine.parts.ema import ModelEMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model[1].num_batches_tracked.fill_(7)
    ema = ModelEMA(model, decay=0.9, warmup=1, updates=100)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].running_mean.add_(1.0)
        model[1].num_batches_tracked.fill_(9)
    ema.update(model)
    d = ema.current_decay()
    for k, v in ema.module.state_dict().items():
        new = model.state_dict()[k]
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, d * before[k] + (1 - d) * new, rtol=0, atol=1e-6)
            assert k == "1.running_var" or not torch.equal(v, before[k]), k  # running_var stayed 1
        else:
            assert torch.equal(v, new), k
