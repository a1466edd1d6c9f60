"""``TrainConfig``: every training knob in one typed dataclass.

Resolution order (later wins): dataclass defaults < the built-in ``shapes``
recipe (for the synthetic dataset) < ``train:`` section of the dataset YAML <
``train:`` section of a ``--config`` YAML < command-line options. The ``model:``
sections are kept separately (:attr:`TrainConfig.model_overrides`) and applied to
the model preset. Unknown keys raise :class:`TrainConfigError` naming the key.

Image sizes: ``imgsz`` is the shorter side the model sees at inference, as in
``ddetr eval`` and ``ddetr predict``; training uses it as the largest of its
multi-scale sizes. Every other size left unset (None) follows ``imgsz`` by the
official proportions (:func:`derived_sizes`; for 800: scales 480..800 by 32,
crops 384..600 after a resize to 400/500/600, longer side <= 1333, evaluated
at 800 / 1333). A layer that sets ``imgsz`` without ``eval_size`` resets
``eval_size`` to follow it, and ``max_size`` likewise ``eval_max_size``.
:meth:`TrainConfig.validate` fills the derived sizes and refuses
contradictions, naming both values and the option that fixes them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.yaml_file import read_yaml
from ..errors import TrainConfigError
from ..models.config import VARIANTS
from ..models.criterion import CLASS_LOSSES
from .parts.amp import AMP_MODES
from .recipes import RECIPE_YIELDS, SHAPES_RECIPE


@dataclass
class TrainConfig:
    # schedule
    epochs: int = 50
    batch_size: int = 2
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_linear_proj_mult: float = 0.1
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    lr_drop: int | None = None  # epoch of the x0.1 drop; None -> 80% of `epochs` (official 40/50)
    warmup_iters: int = 0
    ema: bool = False
    ema_decay: float = 0.9998
    ema_warmup: int = 2000  # EMA decay ramps as decay * (1 - exp(-updates / ema_warmup))
    amp: str = "off"  # off | auto | bf16 | fp16
    # data
    workers: int = 2
    device: str = "auto"
    imgsz: int = 800  # shorter side at inference; the largest training scale
    # None: follows imgsz by the official proportions (derived_sizes)
    multi_scale: bool = True  # False: train at imgsz alone (min_scale, scale_step unused)
    min_scale: int | None = None
    scale_step: int | None = None
    max_size: int | None = None
    eval_size: int | None = None
    eval_max_size: int | None = None
    crop: bool = True
    crop_min: int | None = None
    crop_max: int | None = None
    crop_scales: list[int] | None = None
    # run control
    data: str | None = None  # dataset YAML or "shapes" (recorded for --resume)
    seed: int = 42
    save_every_iters: int = 0
    eval_every: int = 1  # epochs
    max_iters: int = 0  # stop after this many optimizer steps in total (0: no limit)
    time_limit: float | None = None  # minutes; stop cleanly (with a checkpoint) after this
    time_lr_drop: float = 0.8  # with time_limit: the lr drops x0.1 once this share of the budget is spent
    project: str = "runs/train"
    name: str = "exp"
    out: str | None = None
    weights: str | None = None
    pretrained_backbone: str | None = None  # torchvision ResNet-50 .pth for ImageNet init
    # training-only convergence aids (never change the saved model)
    hybrid: bool = False  # H-DETR hybrid matching: an extra one-to-many query group
    hybrid_queries: int = 0  # queries of the one-to-many group (0: 6 x the model's queries, as H-DETR)
    hybrid_k: int = 6  # each target repeated k times for the one-to-many group
    hybrid_weight: float = 1.0  # weight of the one-to-many losses
    denoise: bool = False  # DINO contrastive denoising queries (two-stage models)
    denoise_groups: int = 5  # groups of noised ground truth, each a positive and a negative per target
    denoise_box_noise: float = 1.0  # corner noise, in half box sizes (positives < 1x, negatives 1-2x)
    denoise_label_noise: float = 0.5  # a label is replaced by a random class with half this probability
    denoise_weight: float = 1.0  # weight of the denoising losses
    # model
    model: str = "r50"  # preset name or a YAML file of ModelConfig fields
    variant: str | None = None  # base | refine | two-stage; None: as the model preset
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # loss
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    focal_alpha: float = 0.25
    class_loss: str = "focal"  # focal (official) | varifocal (IoU-aware scores, training-only)
    aux_loss: bool = True

    def _check_sizes(self) -> None:
        """Contradictory sizes: one-line errors naming both values and the fix."""

        def clash(key: str, msg: str, fix: str) -> None:
            raise TrainConfigError(f"`{key}` {msg}: {fix}", param=key)

        if self.scale_step < 1:
            clash("scale_step", f"must be >= 1 (got {self.scale_step})", "set `scale_step` to 1 or more")
        if self.min_scale < 1:
            clash("min_scale", f"must be >= 1 (got {self.min_scale})", "set a positive `min_scale`")
        if self.min_scale > self.imgsz:
            clash("min_scale", f"{self.min_scale} is larger than `imgsz` {self.imgsz}",
                  f"lower `min_scale` (<= {self.imgsz}), or leave it unset to follow `imgsz`")
        if self.max_size < self.imgsz:
            clash("max_size", f"{self.max_size} is smaller than `imgsz` {self.imgsz}",
                  f"raise `max_size` (>= {self.imgsz}), or leave it unset to follow `imgsz`")
        if self.eval_max_size < self.eval_size:
            clash("eval_max_size", f"{self.eval_max_size} is smaller than `eval_size` {self.eval_size}",
                  f"raise `eval_max_size` (>= {self.eval_size}), or leave it unset to follow `max_size`")
        if self.eval_size < 16:
            clash("eval_size", f"must be >= 16 (got {self.eval_size})", "set `eval_size` to 16 or more")
        if self.crop:
            if self.crop_min < 1 or self.crop_min > self.crop_max:
                clash("crop_min", f"{self.crop_min} is not in 1..`crop_max` {self.crop_max}",
                      "lower `crop_min` or raise `crop_max`, or leave both unset to follow `imgsz`")
            if not self.crop_scales or min(self.crop_scales) < 1:
                clash("crop_scales", f"must be positive sizes (got {self.crop_scales})",
                      "leave `crop_scales` unset to follow `imgsz`")
            if max(self.crop_scales) < self.crop_min:
                clash("crop_scales", f"{max(self.crop_scales)} (the largest) is smaller than `crop_min` {self.crop_min}",
                      "raise `crop_scales` or lower `crop_min`, or leave both unset to follow `imgsz`")

    def train_scales(self) -> list[int]:
        """Shorter-side sizes for multi-scale training: ``imgsz`` down to
        ``min_scale`` by ``scale_step``, ascending (the official 480..800 by 32); [imgsz] without multi_scale."""
        return [self.imgsz] if not self.multi_scale else sorted(range(self.imgsz, self.min_scale - 1, -self.scale_step))

    def effective_lr_drop(self) -> int:
        return self.lr_drop if self.lr_drop is not None else max(1, round(self.epochs * 0.8))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        return merge(cls(), data, source)

    def validate(self) -> TrainConfig:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise TrainConfigError(f"{key}: {msg}")

        need(self.epochs >= 1, "epochs", f"must be >= 1 (got {self.epochs})")
        need(self.batch_size >= 1, "batch_size", f"must be >= 1 (got {self.batch_size})")
        need(self.lr > 0, "lr", f"must be > 0 (got {self.lr})")
        need(self.lr_backbone >= 0, "lr_backbone", "must be >= 0")
        need(self.workers >= 0, "workers", "must be >= 0")
        need(self.imgsz >= 32, "imgsz", f"must be >= 32 (got {self.imgsz})")
        derived = derived_sizes(self.imgsz)
        if self.max_size is not None:
            derived["eval_max_size"] = self.max_size  # the inference cap follows the training cap
        for key, value in derived.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self._check_sizes()
        need(self.hybrid_queries >= 0, "hybrid_queries", f"must be >= 0 (got {self.hybrid_queries})")
        need(self.hybrid_k >= 1, "hybrid_k", f"must be >= 1 (got {self.hybrid_k})")
        need(self.denoise_groups >= 1, "denoise_groups", f"must be >= 1 (got {self.denoise_groups})")
        need(self.denoise_box_noise >= 0, "denoise_box_noise", f"must be >= 0 (got {self.denoise_box_noise})")
        need(0 <= self.denoise_label_noise <= 1, "denoise_label_noise", f"must be in [0, 1] (got {self.denoise_label_noise})")
        need(not (self.denoise and self.hybrid), "denoise",
             "cannot be combined with `hybrid` in this release: turn one of them off (--no-hybrid or --no-denoise)")
        need(self.class_loss in CLASS_LOSSES, "class_loss", f"{self.class_loss!r} is not one of {', '.join(CLASS_LOSSES)}")
        need(self.amp in AMP_MODES, "amp", f"{self.amp!r} is not one of {', '.join(AMP_MODES)}")
        need(self.variant is None or self.variant in VARIANTS, "variant", f"{self.variant!r} is not one of {', '.join(VARIANTS)}")
        need(self.save_every_iters >= 0, "save_every_iters", "must be >= 0")
        need(self.eval_every >= 1, "eval_every", "must be >= 1")
        need(self.time_limit is None or self.time_limit > 0, "time_limit", "must be > 0 minutes")
        need(0 < self.time_lr_drop <= 1, "time_lr_drop", f"must be in (0, 1] (got {self.time_lr_drop})")
        need(0 < self.ema_decay < 1, "ema_decay", "must be in (0, 1)")
        need(self.lr_drop is None or self.lr_drop >= 1, "lr_drop", "must be >= 1")
        need(not self.crop or len(self.crop_scales) >= 1, "crop_scales", "needs at least one size (or set crop: false)")
        need(all(v >= 1 for v in self.crop_scales), "crop_scales", f"sizes must be >= 1 (got {self.crop_scales})")
        need(1 <= self.crop_min <= self.crop_max, "crop_min", f"must be in [1, crop_max] (got {self.crop_min}, {self.crop_max})")
        return self


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_ALIASES = {"batch": "batch_size", "batch-size": "batch_size", "time-limit": "time_limit", "save_every": "save_every_iters"}


def _coerce(key: str, value: Any, current: Any, source: str) -> Any:
    ftype = str(_FIELDS[key].type)
    if value is None:
        if "None" in ftype:
            return None
        raise TrainConfigError(f"{source}: {key}: must not be empty")
    try:
        if ftype.startswith("bool"):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise TypeError
        if ftype.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if ftype.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if ftype.startswith("str"):
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
        if ftype.startswith("list"):
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [int(v) for v in value]
        if ftype.startswith("dict"):
            if not isinstance(value, dict):
                raise TypeError
            return {**current, **value}
    except (TypeError, ValueError):
        raise TrainConfigError(f"{source}: {key}: expected {ftype}, got {value!r}") from None
    return value


def merge(cfg: TrainConfig, updates: dict[str, Any] | None, source: str) -> TrainConfig:
    """Returns a copy of ``cfg`` with ``updates`` applied (keys checked, values coerced)."""
    if not updates:
        return dataclasses.replace(cfg)
    if not isinstance(updates, dict):
        raise TrainConfigError(f"{source}: expected a mapping of training options, got {type(updates).__name__}")
    values = cfg.to_dict()
    given = set()
    for raw_key, value in updates.items():
        key = _ALIASES.get(str(raw_key), str(raw_key).replace("-", "_"))
        if key not in _FIELDS:
            close = [k for k in _FIELDS if k.startswith(key[:4])]
            hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
            raise TrainConfigError(f"{source}: unknown training option {raw_key!r}{hint}")
        values[key] = _coerce(key, value, values[key], source)
        given.add(key)
    for size, eval_size in (("imgsz", "eval_size"), ("max_size", "eval_max_size")):
        if size in given and eval_size not in given:  # one meaning of imgsz: the inference size
            values[eval_size] = None  # follows it again (TrainConfig.validate)
    return TrainConfig(**values)


# The official recipe at imgsz 800: scales 480..800 by 32, crops 384..600 after
# a resize to 400/500/600, longer side <= 1333.
_OFFICIAL = 800


def derived_sizes(imgsz: int) -> dict[str, Any]:
    """The sizes that follow ``imgsz`` by the official proportions
    (``derived_sizes(800)`` is the official recipe exactly)."""
    r = imgsz / _OFFICIAL
    step = max(1, round(32 * r))
    max_size = max(imgsz, round(1333 * r))
    return {
        "scale_step": step,
        "min_scale": max(1, imgsz - 10 * step),
        "max_size": max_size,
        "eval_size": imgsz,
        "eval_max_size": max_size,
        "crop_min": max(1, round(384 * r)),
        "crop_max": max(1, round(600 * r)),
        "crop_scales": [max(1, round(s * r)) for s in (400, 500, 600)],
    }


def read_config_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a ``--config`` YAML: returns (train section, model section). A file
    without sections is taken as a flat train section."""
    data = read_yaml(path, what="config file", error=TrainConfigError)
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise TrainConfigError(f"{path}: expected a mapping at the top level")
    if "train" in data or "model" in data:
        extra = [k for k in data if k not in ("train", "model")]
        if extra:
            raise TrainConfigError(f"{path}: unknown top-level key {extra[0]!r} (expected 'train' and/or 'model')")
        train, model = data.get("train") or {}, data.get("model") or {}
        for name, sec in (("train", train), ("model", model)):
            if not isinstance(sec, dict):
                raise TrainConfigError(f"{path}: '{name}' must be a mapping")
        return train, model
    return data, {}


def resolve(
    *,
    dataset_source: str | None,
    dataset_train: dict[str, Any] | None,
    dataset_model: dict[str, Any] | None,
    config_path: str | Path | None,
    cli: dict[str, Any],
) -> TrainConfig:
    """Applies every layer in order and validates the result. A recipe's key
    gives way to a user's key it cannot combine with (:data:`RECIPE_YIELDS`)."""
    cfg = TrainConfig()
    recipe = SHAPES_RECIPE if dataset_source == "shapes" else {}
    cfg = merge(cfg, recipe, "shapes recipe")
    user_keys = set(dataset_train or {}) | {k for k, v in cli.items() if v is not None}  # set after the recipe
    src = dataset_source or "dataset YAML"
    cfg = merge(cfg, dataset_train, f"{src}: train")
    if dataset_model:
        cfg = merge(cfg, {"model_overrides": dict(dataset_model)}, f"{src}: model")
    if config_path is not None:
        train, model = read_config_yaml(config_path)
        user_keys |= set(train)
        cfg = merge(cfg, train, f"{config_path}: train")
        if model:
            cfg = merge(cfg, {"model_overrides": dict(model)}, f"{config_path}: model")
    cfg = merge(cfg, {k: v for k, v in cli.items() if v is not None}, "command line")
    for key, rivals in RECIPE_YIELDS.items():
        if key in recipe and key not in user_keys and any(r in user_keys and getattr(cfg, r) for r in rivals):
            setattr(cfg, key, _FIELDS[key].default)  # e.g. the user's --hybrid turns the recipe's denoise off
    if not cfg.multi_scale and user_keys & {"min_scale", "scale_step"}:
        raise TrainConfigError("`multi_scale` off trains at `imgsz` alone: drop `min_scale`/`scale_step`, or turn "
                               "`multi_scale` on", param="multi_scale")
    return cfg.validate()
