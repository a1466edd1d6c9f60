"""The training loop: epochs of :func:`~.step.train_step`, EMA, AMP, periodic COCO validation, atomic
checkpoints and exact resume.

Determinism contract: at the start of every epoch all RNGs are seeded from ``(seed, epoch, rank)`` and the
sample order is a function of ``(seed, epoch)`` (:class:`~..parts.sampler.EpochSampler`), so a run resumed at
an epoch boundary reproduces the uninterrupted run. Mid-epoch checkpoints (``save_every_iters``) store the RNG
states and the number of batches done; resuming skips those batches and continues the epoch (bit-exact with
``workers=0``; with worker processes the augmentation of the remaining batches may differ).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...checkpoints.native import model_payload
from ...data import collate, collate_eval
from ...errors import MatchingError, TrainingError
from ..config import TrainConfig
from ..parts import distributed as dist_utils
from ..parts.amp import needs_grad_scaler, resolve_amp
from ..parts.ema import ModelEMA
from ..parts.interrupt import GracefulInterrupt
from ..parts.optim import base_lrs, build_optimizer
from ..parts.sampler import EpochSampler, ShardSampler
from ..parts.schedule import StepWarmupSchedule
from ..report.metrics import LOSS_COLUMNS, STAT_NAMES, MetricsLog
from ..report.progress import NullReporter, Reporter
from ..runs.budget import TimeBudget, val_batches
from ..runs.checkpoint import remove_stale_temps, save_checkpoint
from ..runs.rng import capture_rng_state, restore_rng_state, seed_everything, seed_worker
from .evaluate import EvalResult, evaluate
from .outcome import TrainingInterrupted, TrainResult
from .step import branch_state, build_criterion, build_train_module, load_branch_state, move_targets, train_step


class Trainer:
    """Holds a model, its data and the run folder; :meth:`fit` trains.

    ``model``: the un-wrapped detector (``model(images, mask)`` contract);
    ``train_set`` / ``val_set``: datasets of (image [3,H,W], target) items;
    ``coco_val``: pycocotools COCO of the validation split; ``label_to_cat``:
    class index -> val category id; ``run_dir``: the run folder (may be set
    after construction, before :meth:`fit`). Build one with
    :func:`ddetr_cli.engine.run_train.build_trainer`.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, train_set, val_set, coco_val, label_to_cat: list[int | None],
                 run_dir: Path | None, device: torch.device, *, reporter: Reporter | None = None, resume: dict | None = None,
                 plot: bool = True) -> None:  # fmt: skip
        self.cfg = cfg
        self.device = device
        self.info = dist_utils.current_info()
        self.reporter = reporter if (reporter is not None and self.info.is_main) else NullReporter()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.train_set, self.val_set, self.coco_val, self.label_to_cat = train_set, val_set, coco_val, label_to_cat
        self.plot = plot

        self.model = model.to(device)
        self.criterion = build_criterion(cfg, len(label_to_cat))
        self.optimizer = build_optimizer(self.model, cfg)
        self.train_module = build_train_module(self.model, cfg, self.optimizer)  # + a training-only branch, if any
        self.dtype = resolve_amp(cfg.amp, device)[0]  # build_trainer warns when it falls back to float32
        self.scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(self.dtype, device) else None
        self.ema = ModelEMA(self.model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema else None
        self.ddp_model: nn.Module = self.train_module
        if self.info.distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.train_module, device_ids=ids)
        self.sampler = EpochSampler(len(train_set), cfg.batch_size, seed=cfg.seed, rank=self.info.rank,
                                    world_size=self.info.world_size)  # fmt: skip
        self.schedule = StepWarmupSchedule(cfg.effective_lr_drop(), cfg.warmup_iters)
        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.step_in_epoch = 0  # batches done in epoch `self.epoch` (mid-epoch resume)
        self.best_ap = -1.0
        self.history: list[dict[str, Any]] = []  # metrics rows, saved in last.pt (metrics.csv is rebuilt from them)
        self._sums: dict[str, float] = {}  # loss sums over the steps of this epoch so far (kept across a resume)
        self._count = 0
        self._rows_from_ckpt: bool | None = None  # None: a new run; False: a checkpoint older than metrics_rows
        self._rng_resume: dict | None = None
        self._interrupt = GracefulInterrupt(self.device)
        self._drop_forced = False
        if resume is not None:
            self._load_resume(resume)

    @property
    def weights_dir(self) -> Path:
        return self.run_dir / "weights"

    # ------------------------------------------------------------ checkpoints
    def _load_resume(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        load_branch_state(self.train_module, ckpt.get("hybrid"))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        lrs = base_lrs(self.cfg)
        for g in self.optimizer.param_groups:  # base lrs follow the (possibly new) config
            g["base_lr"] = lrs[g.get("name", "main")]
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
        running = ckpt.get("epoch_losses") or {}
        if self.step_in_epoch and running:
            self._sums, self._count = dict(running["sums"]), int(running["count"])
        self._rows_from_ckpt = "metrics_rows" in ckpt
        self.history = [dict(r) for r in ckpt.get("metrics_rows", [])]

    def _train_payload(self) -> dict[str, Any]:
        payload = model_payload(self.model)
        payload.update(
            optimizer=self.optimizer.state_dict(),
            scheduler={**self.schedule.state_dict(), "drop_forced": self._drop_forced},
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            ema=self.ema.state_dict() if self.ema is not None else None,
            epoch=self.epoch,
            global_step=self.global_step,
            step_in_epoch=self.step_in_epoch,
            best_ap=self.best_ap,
            epoch_losses={"sums": dict(self._sums), "count": self._count},
            metrics_rows=[dict(r) for r in self.history],
            rng={str(r): s for r, s in enumerate(dist_utils.all_gather_object(capture_rng_state()))},
            train_config=self.cfg.to_dict(),
            hybrid=branch_state(self.train_module),
        )
        return payload

    def save_last(self) -> None:
        payload = self._train_payload()  # collective (RNG gather): every rank
        if self.info.is_main:
            save_checkpoint(payload, self.weights_dir / "last.pt")

    def _save_best(self, eval_model: nn.Module, ap: float) -> None:
        payload = model_payload(eval_model)
        payload.update({"epoch": self.epoch, "ap": ap, "train_config": self.cfg.to_dict()})
        save_checkpoint(payload, self.weights_dir / "best.pt")

    # ---------------------------------------------------------------- data
    def _loader(self, skip_batches: int):
        self.sampler.set_epoch(self.epoch, skip_batches)
        return torch.utils.data.DataLoader(  # the sampler yields whole batches (or one short one): no drop_last
            self.train_set, batch_size=self.cfg.batch_size, sampler=self.sampler, collate_fn=collate,
            generator=torch.Generator().manual_seed(self.cfg.seed * 1000 + self.epoch),
            num_workers=self.cfg.workers, pin_memory=self.device.type == "cuda", worker_init_fn=seed_worker,
        )  # fmt: skip

    def _val_loader(self):
        sampler = ShardSampler(len(self.val_set), self.info.rank, self.info.world_size)
        return torch.utils.data.DataLoader(self.val_set, batch_size=max(1, self.cfg.batch_size), sampler=sampler,
                                           collate_fn=collate_eval, num_workers=self.cfg.workers,
                                           pin_memory=self.device.type == "cuda")  # fmt: skip

    def validate(self) -> EvalResult | None:
        """COCO evaluation of the EMA (if on) or live weights. The RNG states are
        restored afterwards, so validation never changes the training stream."""
        eval_model = self.ema.module if self.ema is not None else self.model
        rng = capture_rng_state()
        self.reporter.eval_start(len(self.val_set))
        try:
            result = evaluate(eval_model, self._val_loader(), self.coco_val, self.label_to_cat, self.device,
                              amp_dtype=self.dtype, on_batch=self.reporter.eval_step)  # fmt: skip
        finally:
            restore_rng_state(rng)
        self.reporter.eval_end(result)
        return result

    # ---------------------------------------------------------------- loops
    def fit(self) -> TrainResult:
        """Trains until ``epochs`` (or max_iters / time_limit). A first Ctrl-C
        finishes the current step, saves ``last.pt`` and raises
        :class:`TrainingInterrupted`; a second one interrupts at once."""
        with self._interrupt:
            return self._fit()

    def _fit(self) -> TrainResult:
        cfg = self.cfg
        if self.run_dir is None:
            raise ValueError("Trainer.run_dir is not set")
        metrics = MetricsLog(self.run_dir, plot=self.plot, warn=self.reporter.warn)
        if self.info.is_main:
            self.weights_dir.mkdir(parents=True, exist_ok=True)
            for folder in (self.run_dir, self.weights_dir):  # what a killed write left behind
                remove_stale_temps(folder)
            if self._rows_from_ckpt is False:  # an older checkpoint: keep the rows of metrics.csv
                self.history = metrics.read()
            elif self._rows_from_ckpt:
                metrics.write(self.history)  # rows the checkpoint knows, whole; drops any written after it
        iters = self.sampler.batches_per_epoch()
        if iters == 0:
            raise TrainingError(f"training set has {len(self.train_set)} images: fewer than one batch of {cfg.batch_size}")
        budget = TimeBudget(cfg.time_limit, val_batches(len(self.val_set), cfg.batch_size, self.info.world_size),
                            cfg.time_lr_drop)
        stopped: str | None = None
        last_eval: EvalResult | None = None
        while self.epoch < cfg.epochs and stopped is None:
            epoch_t0 = time.perf_counter()
            means, stopped = self._train_epoch(iters, budget)
            epoch_finished = stopped is None or self.step_in_epoch >= iters
            if epoch_finished:
                self.epoch += 1
                self.step_in_epoch = 0
            self.reporter.epoch_end(self.epoch - (1 if epoch_finished else 0), means)
            row: dict[str, Any] = {"epoch": self.epoch if epoch_finished else self.epoch + self.step_in_epoch / iters}
            row.update({k: means.get(k, float("nan")) for k in LOSS_COLUMNS})
            row["lr"] = self.optimizer.param_groups[0]["lr"]
            if stopped is not None or self.epoch % cfg.eval_every == 0 or self.epoch >= cfg.epochs:
                t_eval = time.perf_counter()
                last_eval = self._validate_and_keep_best(row)
                budget.note_eval(time.perf_counter() - t_eval)
                if stopped is None and self.epoch < cfg.epochs and budget.limited and self._agree(budget.exhausted()):
                    stopped = "time limit"  # no time for a step and another validation: this one is the final one
            row["time"] = time.perf_counter() - epoch_t0
            self.history.append(row)
            if epoch_finished:
                self._sums, self._count = {}, 0
            self.save_last()  # the row goes into last.pt first: a kill before metrics.csv is written loses nothing
            if self.info.is_main:
                metrics.write(self.history)
            if stopped is None and self.epoch < cfg.epochs and self._interrupt.requested():
                raise TrainingInterrupted(self.weights_dir / "last.pt", self._interrupt.signal_name or "SIGINT")
        dist_utils.barrier()
        return TrainResult(self.run_dir, self.epoch, self.global_step, self.best_ap, last_eval, stopped, self.history)

    def _train_epoch(self, iters: int, budget: TimeBudget) -> tuple[dict[str, float], str | None]:
        """Trains the rest of epoch ``self.epoch``; returns (mean losses over the
        processes, why it stopped early or None)."""
        cfg = self.cfg
        if self.step_in_epoch and self._rng_resume is not None:
            restore_rng_state(self._rng_resume)
            self._rng_resume = None
        else:
            self.step_in_epoch = 0
            seed_everything(cfg.seed + 1_000_003 * self.epoch + 7919 * self.info.rank)
        if not self.step_in_epoch:
            self._sums, self._count = {}, 0
        self.reporter.epoch_start(self.epoch, cfg.epochs, iters, self.step_in_epoch)
        sums = self._sums
        count, data_time, stopped = 0, 0.0, None
        t_data = t_iter0 = time.perf_counter()
        self.train_module.train()
        for images, mask, targets in self._loader(self.step_in_epoch):
            data_time += time.perf_counter() - t_data
            if budget.limited and not self._drop_forced and self._agree(budget.drop_due()):
                self._drop_forced = True  # time-boxed run: lr drop at time_lr_drop of the budget
                self.reporter.info(f"{cfg.time_lr_drop:.0%} of the time limit reached: dropping the learning rate x0.1")
            epoch_for_lr = max(self.epoch, self.schedule.lr_drop) if self._drop_forced else self.epoch
            lr = self.schedule.apply(self.optimizer, epoch_for_lr, self.global_step)
            images = images.to(self.device, non_blocking=True)  # [B, 3, H, W]
            mask = mask.to(self.device, non_blocking=True)  # [B, H, W]
            total, losses = self._step(images, mask, move_targets(targets, self.device))
            self.global_step += 1
            self.step_in_epoch += 1
            count += 1
            self._count += 1
            values = {"loss": float(total), **{k: float(losses[k]) for k in LOSS_COLUMNS[1:] if k in losses}}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            now = time.perf_counter()
            shown = {k: v / self._count for k, v in sums.items()}
            shown.update(lr=lr, it_s=count / max(now - t_iter0, 1e-9), data_share=data_time / max(now - t_iter0, 1e-9))
            if self.device.type == "cuda":
                shown["mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.reporter.step(shown)
            budget.note_steps((now - t_iter0 - data_time) / count)
            if self._interrupt.requested():
                self.save_last()  # between steps: a consistent state
                raise TrainingInterrupted(self.weights_dir / "last.pt", self._interrupt.signal_name or "SIGINT")
            if cfg.save_every_iters and self.global_step % cfg.save_every_iters == 0:
                self.save_last()
            if cfg.max_iters and self.global_step >= cfg.max_iters:
                stopped = "max iters"
            elif budget.limited and self._agree(budget.exhausted()):
                stopped = "time limit"
            if stopped:
                break
            t_data = time.perf_counter()
        means = dist_utils.reduce_dict_mean({k: v / max(self._count, 1) for k, v in sums.items()}, self.device)
        return means, stopped

    def _step(self, images: torch.Tensor, mask: torch.Tensor, targets: list[dict]):
        """One optimizer step (+ EMA update); failures become one-line errors."""
        cfg = self.cfg
        try:
            total, losses, _ = train_step(self.ddp_model, self.criterion, self.optimizer, images, mask, targets,
                                          clip_max_norm=cfg.clip_max_norm, dtype=self.dtype, scaler=self.scaler,
                                          aux_loss=cfg.aux_loss)  # fmt: skip
        except (TrainingError, MatchingError) as exc:
            raise TrainingError(
                f"epoch {self.epoch + 1}, iteration {self.step_in_epoch + 1} (global step {self.global_step + 1}): {exc}; "
                f"stopped without saving (last good checkpoint: {self.weights_dir / 'last.pt'}). "
                "Try a lower `lr`, or `amp` off"
            ) from None
        except torch.OutOfMemoryError:
            raise TrainingError(
                f"out of memory at batch size {cfg.batch_size}, image size {cfg.imgsz}: "
                "try a smaller `batch_size` or `imgsz`, or `amp` bf16"
            ) from None
        if self.ema is not None:
            self.ema.update(self.model)
        return total, losses

    def _validate_and_keep_best(self, row: dict[str, Any]) -> EvalResult | None:
        """Validates, adds the COCO numbers to ``row`` and saves ``best.pt`` on a new best AP."""
        result = self.validate()
        if self.info.is_main and result is not None:
            row.update(dict(zip(STAT_NAMES[:6], result.stats[:6])))
            ap = result.stats[0]
            if ap > self.best_ap or not self.coco_val.getAnnIds():  # no ground truth: keep the latest
                self.best_ap = ap
                self._save_best(self.ema.module if self.ema is not None else self.model, ap)
        self.best_ap = dist_utils.broadcast_object(self.best_ap)
        return result

    def _agree(self, flag: bool) -> bool:
        """Rank 0's decision on every rank (clocks differ between processes)."""
        if not self.info.distributed:
            return flag
        return bool(dist_utils.broadcast_object(flag))
