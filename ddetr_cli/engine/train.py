"""The training loop: epochs of (forward, set loss, backward, clip, AdamW step),
EMA, AMP, periodic COCO validation, atomic checkpoints and exact resume.

Determinism contract: at the start of every epoch all RNGs are seeded from
``(seed, epoch, rank)`` and the sample order is a function of ``(seed, epoch)``
(:class:`~.sampler.EpochSampler`), so a run resumed at an epoch boundary
reproduces the uninterrupted run. Mid-epoch checkpoints (``save_every_iters``)
store the RNG states and the number of batches done; resuming skips those
batches and continues the epoch (bit-exact with ``workers=0``; with worker
processes the augmentation of the remaining batches may differ).
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints.io import atomic_write_text
from ..models.criterion import SetCriterion
from ..models.matcher import HungarianMatcher, MatchingError
from . import distributed as dist_utils
from .amp import amp_dtype, needs_grad_scaler
from .checkpointing import capture_rng_state, restore_rng_state, save_checkpoint, seed_everything
from .config import TrainConfig
from .ema import ModelEMA
from .evaluate import STAT_NAMES, EvalResult, ShardSampler, evaluate
from .interrupt import GracefulInterrupt
from .optim import build_optimizer
from .progress import NullReporter, Reporter
from .sampler import EpochSampler
from .schedule import StepWarmupSchedule


class TrainingError(ValueError):
    """Training cannot continue (diverged, out of memory, ...); one-line message."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, after ``last.pt`` was saved between two steps."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__(str(checkpoint))
        self.checkpoint = checkpoint


LOSS_COLUMNS = ("loss", "loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error")
CSV_COLUMNS = ("epoch", *LOSS_COLUMNS, "lr", *STAT_NAMES[:6], "time")


def build_criterion(cfg: TrainConfig, num_classes: int) -> SetCriterion:
    matcher = HungarianMatcher(cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou, cfg.focal_alpha)
    weights = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef, "loss_giou": cfg.giou_loss_coef}
    return SetCriterion(num_classes, matcher, weights, focal_alpha=cfg.focal_alpha)


def move_targets(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]


def train_step(
    model: nn.Module,
    criterion: SetCriterion,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    mask: torch.Tensor,
    targets: list[dict],
    *,
    clip_max_norm: float = 0.1,
    dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    aux_loss: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    """One optimisation step. images [B, 3, H, W], mask [B, H, W] (True = pad).
    Returns (weighted total loss, unweighted loss terms, grad norm before clipping).
    Raises :class:`TrainingError` on a non-finite loss before touching the weights."""
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
        outputs = model(images, mask)
    if not aux_loss:
        outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
    losses = criterion(outputs, targets)  # fp32
    total = criterion.weighted_total(losses)
    finite = torch.isfinite(total.detach()).float()
    dist_utils.all_reduce_mean(finite)  # every rank must agree to stop
    if finite.item() < 1.0:
        raise TrainingError("non-finite loss: " + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items() if k.startswith("loss") and "_" not in k[5:]))
    optimizer.zero_grad(set_to_none=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    if clip_max_norm > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip_max_norm))
    else:
        norm = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return total.detach(), {k: v.detach() for k, v in losses.items()}, norm


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    global_step: int
    best_ap: float
    last_eval: EvalResult | None
    stopped_early: str | None = None  # "time limit" | "max iters" | None
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Holds a model, its data and the run folder; :meth:`fit` trains.

    ``model``: the un-wrapped detector (``model(images, mask)`` contract);
    ``train_set`` / ``val_set``: datasets of (image [3,H,W], target) items;
    ``coco_val``: pycocotools COCO of the validation split; ``label_to_cat``:
    class index -> val category id; ``payload_fn(model) -> dict``: the model part
    of a checkpoint (``checkpoints.native.model_payload``).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        train_set,
        val_set,
        coco_val,
        label_to_cat: list[int | None],
        run_dir: Path,
        device: torch.device,
        *,
        payload_fn: Callable[[nn.Module], dict],
        collate_fn: Callable,
        reporter: Reporter | None = None,
        resume: dict | None = None,
        plot_fn: Callable[[Path, Path], Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.info = dist_utils.current_info()
        self.reporter = reporter if (reporter is not None and self.info.is_main) else NullReporter()
        self.run_dir = Path(run_dir)
        self.weights_dir = self.run_dir / "weights"
        self.train_set, self.val_set, self.coco_val = train_set, val_set, coco_val
        self.label_to_cat = label_to_cat
        self.payload_fn = payload_fn
        self.collate_fn = collate_fn
        self.plot_fn = plot_fn

        self.model = model.to(device)
        num_classes = len(label_to_cat)
        self.criterion = build_criterion(cfg, num_classes)
        self.optimizer = build_optimizer(self.model, cfg)
        self.dtype = amp_dtype(cfg.amp, device)
        self.scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(self.dtype, device) else None
        self.ema = ModelEMA(self.model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema else None
        self.ddp_model: nn.Module = self.model
        if self.info.distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.sampler = EpochSampler(
            len(train_set), cfg.batch_size, seed=cfg.seed, rank=self.info.rank, world_size=self.info.world_size
        )
        self.schedule = StepWarmupSchedule(cfg.effective_lr_drop(), cfg.warmup_iters)
        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.step_in_epoch = 0  # batches done in epoch `self.epoch` (mid-epoch resume)
        self.best_ap = -1.0
        self.history: list[dict[str, Any]] = []
        self._rng_resume: dict | None = None
        self._interrupt = GracefulInterrupt(self.device)
        self._drop_forced = False
        if resume is not None:
            self._load_resume(resume)

    # ------------------------------------------------------------ checkpoints
    def _load_resume(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for g in self.optimizer.param_groups:  # base lrs follow the (possibly new) config
            g["base_lr"] = {"main": self.cfg.lr, "backbone": self.cfg.lr_backbone}.get(g.get("name"), self.cfg.lr * self.cfg.lr_linear_proj_mult)
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema"):
            self.ema.load_state_dict(ckpt["ema"])
        self.epoch = int(ckpt["epoch"])
        self.global_step = int(ckpt["global_step"])
        self.step_in_epoch = int(ckpt.get("step_in_epoch", 0))
        self.best_ap = float(ckpt.get("best_ap", -1.0))
        self._drop_forced = bool(ckpt.get("scheduler", {}).get("drop_forced", False))
        rng = ckpt.get("rng")
        if self.step_in_epoch and isinstance(rng, dict):
            self._rng_resume = rng.get(str(self.info.rank), rng.get("0"))

    def _train_payload(self) -> dict[str, Any]:
        payload = self.payload_fn(self.model)
        payload.update(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": {**self.schedule.state_dict(), "drop_forced": self._drop_forced},
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "epoch": self.epoch,
                "global_step": self.global_step,
                "step_in_epoch": self.step_in_epoch,
                "best_ap": self.best_ap,
                "rng": self._gather_rng(),
                "train_config": self.cfg.to_dict(),
            }
        )
        return payload

    def _gather_rng(self) -> dict[str, Any]:
        states = dist_utils.all_gather_object(capture_rng_state())
        return {str(r): s for r, s in enumerate(states)}

    def save_last(self) -> None:
        payload = self._train_payload()  # collective (RNG gather): every rank
        if self.info.is_main:
            save_checkpoint(payload, self.weights_dir / "last.pt")

    def _save_best(self, eval_model: nn.Module, ap: float) -> None:
        payload = self.payload_fn(eval_model)
        payload.update({"epoch": self.epoch, "ap": ap, "train_config": self.cfg.to_dict()})
        save_checkpoint(payload, self.weights_dir / "best.pt")

    # ---------------------------------------------------------------- loops
    def _loader(self, skip_batches: int):
        self.sampler.set_epoch(self.epoch, skip_batches)
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + self.epoch)
        return torch.utils.data.DataLoader(
            self.train_set,
            batch_size=self.cfg.batch_size,
            sampler=self.sampler,
            collate_fn=self.collate_fn,
            num_workers=self.cfg.workers,
            pin_memory=self.device.type == "cuda",
            drop_last=False,  # the sampler already yields whole batches only (or one short one)
            generator=g,
            worker_init_fn=_seed_worker,
            persistent_workers=False,
        )

    def _val_loader(self):
        sampler = ShardSampler(len(self.val_set), self.info.rank, self.info.world_size)
        return torch.utils.data.DataLoader(
            self.val_set,
            batch_size=max(1, self.cfg.batch_size),
            sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=self.cfg.workers,
            pin_memory=self.device.type == "cuda",
        )

    def validate(self) -> EvalResult | None:
        """COCO evaluation of the EMA (if on) or live weights. The RNG states are
        restored afterwards, so validation never changes the training stream."""
        eval_model = self.ema.module if self.ema is not None else self.model
        rng = capture_rng_state()
        self.reporter.eval_start(len(self.val_set))
        try:
            result = evaluate(
                eval_model, self._val_loader(), self.coco_val, self.label_to_cat, self.device,
                amp_dtype=self.dtype, on_batch=self.reporter.eval_step,
            )
        finally:
            restore_rng_state(rng)
        self.reporter.eval_end(result)
        return result

    def fit(self) -> TrainResult:
        """Trains until ``epochs`` (or max_iters / time_limit). A first Ctrl-C
        finishes the current step, saves ``last.pt`` and raises
        :class:`TrainingInterrupted`; a second one interrupts at once."""
        with self._interrupt:
            return self._fit()

    def _fit(self) -> TrainResult:
        cfg = self.cfg
        t_start = time.perf_counter()
        limit_s = cfg.time_limit * 60 if cfg.time_limit else None
        eval_cost = 0.0
        eval_guess = 0.0
        stopped: str | None = None
        last_eval: EvalResult | None = None
        if self.info.is_main:
            self.weights_dir.mkdir(parents=True, exist_ok=True)
        iters = self.sampler.batches_per_epoch()
        if iters == 0:
            raise TrainingError(f"training set has {len(self.train_set)} images: fewer than one batch of {cfg.batch_size}")

        while self.epoch < cfg.epochs and stopped is None:
            epoch_t0 = time.perf_counter()
            if self.step_in_epoch and self._rng_resume is not None:
                restore_rng_state(self._rng_resume)
                self._rng_resume = None
            else:
                self.step_in_epoch = 0
                seed_everything(cfg.seed + 1_000_003 * self.epoch + 7919 * self.info.rank)
            self.reporter.epoch_start(self.epoch, cfg.epochs, iters, self.step_in_epoch)
            sums: dict[str, float] = {}
            count = 0
            data_time = 0.0
            t_data = time.perf_counter()
            t_iter0 = t_data
            self.model.train()
            for images, mask, targets in self._loader(self.step_in_epoch):
                data_time += time.perf_counter() - t_data
                if limit_s is not None and not self._drop_forced and self._agree(time.perf_counter() - t_start > 0.8 * limit_s - eval_guess):
                    self._drop_forced = True  # time-boxed run: lr drop at 80% of the budget
                    self.reporter.info("80% of the time limit reached: dropping the learning rate x0.1")
                lr = self.schedule.apply(self.optimizer, self.epoch if not self._drop_forced else max(self.epoch, self.schedule.lr_drop), self.global_step)
                images = images.to(self.device, non_blocking=True)
                mask = mask.to(self.device, non_blocking=True)
                targets = move_targets(targets, self.device)
                try:
                    total, losses, _ = train_step(
                        self.ddp_model, self.criterion, self.optimizer, images, mask, targets,
                        clip_max_norm=cfg.clip_max_norm, dtype=self.dtype, scaler=self.scaler, aux_loss=cfg.aux_loss,
                    )
                except (TrainingError, MatchingError) as exc:
                    raise TrainingError(
                        f"epoch {self.epoch + 1}, iteration {self.step_in_epoch + 1} (global step {self.global_step + 1}): {exc}; "
                        f"stopped without saving (last good checkpoint: {self.weights_dir / 'last.pt'}). "
                        "Try a lower --lr, or --amp off"
                    ) from None
                except torch.OutOfMemoryError:
                    raise TrainingError(
                        f"out of memory at batch size {cfg.batch_size}, image size {cfg.imgsz}: "
                        "try a smaller --batch-size or --imgsz, or --amp bf16"
                    ) from None
                if self.ema is not None:
                    self.ema.update(self.model)
                self.global_step += 1
                self.step_in_epoch += 1
                count += 1
                values = {"loss": float(total)}
                for k in LOSS_COLUMNS[1:]:
                    if k in losses:
                        values[k] = float(losses[k])
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                now = time.perf_counter()
                shown = {k: v / count for k, v in sums.items()}
                shown.update(lr=lr, it_s=count / max(now - t_iter0, 1e-9), data_share=data_time / max(now - t_iter0, 1e-9))
                if self.device.type == "cuda":
                    shown["mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                self.reporter.step(shown)
                if limit_s is not None and eval_cost == 0.0:
                    # before the first validation: guess its cost from the training speed
                    # (a forward pass is ~1/3 of a training step; x1.5 margin)
                    step_s = (now - t_iter0 - data_time) / count
                    eval_guess = 0.5 * step_s * math.ceil(len(self.val_set) / (cfg.batch_size * self.info.world_size))
                else:
                    eval_guess = eval_cost
                if self._interrupt.requested():
                    self.save_last()  # between steps: a consistent state
                    raise TrainingInterrupted(self.weights_dir / "last.pt")
                if cfg.save_every_iters and self.global_step % cfg.save_every_iters == 0:
                    self.save_last()
                if cfg.max_iters and self.global_step >= cfg.max_iters:
                    stopped = "max iters"
                elif limit_s is not None and self._agree(time.perf_counter() - t_start + eval_guess > limit_s):
                    stopped = "time limit"
                if stopped:
                    break
                t_data = time.perf_counter()

            means = dist_utils.reduce_dict_mean({k: v / max(count, 1) for k, v in sums.items()}, self.device)
            epoch_finished = stopped is None or self.step_in_epoch >= iters
            if epoch_finished:
                self.epoch += 1
                self.step_in_epoch = 0
            self.reporter.epoch_end(self.epoch - (1 if epoch_finished else 0), means)
            row: dict[str, Any] = {"epoch": self.epoch if epoch_finished else self.epoch + self.step_in_epoch / iters}
            row.update({k: means.get(k, float("nan")) for k in LOSS_COLUMNS})
            row["lr"] = self.optimizer.param_groups[0]["lr"]

            do_eval = stopped is not None or self.epoch % cfg.eval_every == 0 or self.epoch >= cfg.epochs
            if do_eval:
                t_eval = time.perf_counter()
                last_eval = self.validate()
                eval_cost = time.perf_counter() - t_eval
                if self.info.is_main and last_eval is not None:
                    row.update(dict(zip(STAT_NAMES[:6], last_eval.stats[:6])))
                    ap = last_eval.stats[0]
                    if ap > self.best_ap:
                        self.best_ap = ap
                        self._save_best(self.ema.module if self.ema is not None else self.model, ap)
                self.best_ap = dist_utils.broadcast_object(self.best_ap)
            row["time"] = time.perf_counter() - epoch_t0
            self.save_last()
            if self.info.is_main:
                self.history.append(row)
                self._append_metrics(row)
        dist_utils.barrier()
        return TrainResult(self.run_dir, self.epoch, self.global_step, self.best_ap, last_eval, stopped, self.history)

    def _agree(self, flag: bool) -> bool:
        """Rank 0's decision on every rank (clocks differ between processes)."""
        if not self.info.distributed:
            return flag
        return bool(dist_utils.broadcast_object(flag))

    def _append_metrics(self, row: dict[str, Any]) -> None:
        path = self.run_dir / "metrics.csv"
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        if not old:
            writer.writeheader()
        writer.writerow({k: _fmt(row.get(k, "")) for k in CSV_COLUMNS})
        atomic_write_text(path, old + buf.getvalue())
        if self.plot_fn is not None:
            try:
                self.plot_fn(path, self.run_dir / "results.png")
            except Exception as exc:  # a plot must never stop training
                self.reporter.warn(f"could not draw results.png: {exc}")


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.6g}"
    return v


def _seed_worker(worker_id: int) -> None:
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
