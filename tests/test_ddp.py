"""Data-parallel equivalence: 2 gloo processes on CPU, each with half the batch,
give the same updated weights as 1 process with the whole batch (the criterion's
num_boxes all-reduce makes the loss normalisation global)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

STEPS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(n: int = 4):
    g = torch.Generator().manual_seed(11)
    images = torch.randn(n, 3, 64, 64, generator=g)  # [B, 3, H, W], one size: no extra padding
    mask = torch.zeros(n, 64, 64, dtype=torch.bool)
    targets = []
    for i in range(n):
        k = 1 + i % 3  # different box counts per image
        cxcy = torch.rand(k, 2, generator=g) * 0.5 + 0.25
        wh = torch.rand(k, 2, generator=g) * 0.3 + 0.1
        targets.append({"labels": torch.randint(0, 3, (k,), generator=g), "boxes": torch.cat([cxcy, wh], 1)})
    return images, mask, targets


def _train(model, images, mask, targets):
    from ddetr_cli.engine.config import TrainConfig
    from ddetr_cli.engine.parts.optim import build_optimizer
    from ddetr_cli.engine.loops.step import build_criterion, train_step

    cfg = TrainConfig(lr=1e-3)
    raw = model.module if hasattr(model, "module") else model
    opt = build_optimizer(raw, cfg)
    crit = build_criterion(cfg, 3)
    for _ in range(STEPS):
        train_step(model, crit, opt, images, mask, targets, clip_max_norm=cfg.clip_max_norm)
    return {k: v.detach().clone() for k, v in raw.state_dict().items()}


def _model():
    from ddetr_cli.models import build_model, preset

    torch.manual_seed(0)
    return build_model(preset("tiny", num_classes=3, dropout=0.0)).train()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        images, mask, targets = _batch()
        per = len(images) // world
        sl = slice(rank * per, (rank + 1) * per)
        ddp = torch.nn.parallel.DistributedDataParallel(_model())
        state = _train(ddp, images[sl], mask[sl], targets[sl])
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


def test_two_process_step_equals_single_process(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    ddp_state = torch.load(out, weights_only=True)
    torch.set_num_threads(1)
    single = _train(_model(), *_batch())
    init = _model().state_dict()
    moved = 0
    for k, v in single.items():
        # Adam turns the rounding noise of near-zero gradients (the key bias of
        # self-attention has an exactly-zero one) into steps of up to lr = 1e-3
        # times that noise: a few 1e-6 here, where a wrong gradient moves by ~1e-3.
        assert torch.allclose(ddp_state[k], v, atol=5e-6, rtol=1e-4), k
        moved += int(not torch.equal(v, init[k]))
    assert moved > 10  # the step really changed weights


def test_distributed_helpers_single_process(monkeypatch):
    from ddetr_cli.engine.parts import distributed as d

    assert d.all_gather_object({"a": 1}) == [{"a": 1}]
    t = torch.tensor([2.0])
    assert d.all_reduce_mean(t).item() == 2.0
    # the launch is read from the environment: nothing, torchrun, SLURM
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    assert d.env_dist_info() == d.DistInfo(0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert d.env_dist_info() == d.DistInfo(0, 1, 0)  # SLURM without MASTER_ADDR: not a DDP launch
    monkeypatch.setenv("MASTER_ADDR", "node1")
    assert d.env_dist_info() == d.DistInfo(5, 8, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    info = d.env_dist_info()  # torchrun's variables win
    assert info == d.DistInfo(3, 4, 2) and info.distributed and not info.is_main


@pytest.mark.slow
def test_torchrun_cli_two_processes(tmp_path):
    """`ddetr train` under torchrun with 2 CPU processes (gloo): trains, gathers
    the evaluation, and only rank 0 writes the run folder."""
    from ddetr_cli.data import ensure_shapes_dataset

    data = ensure_shapes_dataset(tmp_path / "shapes", n_train=8, n_val=4, size=64)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  min_scale: 48\n  scale_step: 16\n  max_size: 80\n  eval_size: 64\n  eval_max_size: 80\n  crop: false\n")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "ddetr_cli", "train", str(data), "--model", "tiny", "--imgsz", "64", "--epochs", "1", "--batch-size", "2",
           "--workers", "0", "--device", "cpu", "--out", str(out), "--config", str(cfg)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "weights" / "last.pt").is_file() and (out / "metrics.csv").is_file()
    assert sum(line.startswith("AP ") for line in r.stdout.splitlines()) == 1  # rank 0 only
