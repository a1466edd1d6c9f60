"""Assembling a training run from its configs: the model config, the datasets
(checked against their scans) and the model (fresh, fine-tuned or resumed).

Everything here raises :class:`~ddetr_cli.errors.DdetrError` subclasses with
one-line messages naming the file or field, before any training starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...data.yaml_file import read_yaml
from ...errors import ClassMismatchError, DatasetError, TrainConfigError
from ..config import TrainConfig
from ..parts.labelmap import resolve_label_map

_MODEL_META_KEYS = ("preset", "name", "variant")


def build_model_config(cfg: TrainConfig, num_classes: int, base: Any | None = None):
    """ModelConfig for training: ``base`` (e.g. a fine-tuning checkpoint's config)
    or the preset / YAML named by ``cfg.model``, then ``cfg.variant``, then the
    ``model:`` overrides, with ``num_classes`` set to the dataset's."""
    from ...models import ModelConfig, preset
    from ...models.config import PRESETS, apply_variant

    overrides = dict(cfg.model_overrides)
    overrides.pop("num_classes", None)
    name = overrides.pop("preset", None) or overrides.pop("name", None)
    variant = overrides.pop("variant", None)
    if base is not None and name is None:
        mc = base
    else:
        name = name or cfg.model
        if name in PRESETS:
            mc = preset(name)
        else:
            path = Path(name)
            if not path.is_file():
                raise TrainConfigError(f"{name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing YAML file",
                                       param="model")
            data = read_yaml(path, what="model config file", error=TrainConfigError) or {}
            if not isinstance(data, dict):
                raise TrainConfigError(f"{path}: expected a mapping of model config fields")
            data = dict(data)
            inner = data.pop("preset", None)
            try:
                mc = preset(inner, **data) if inner else ModelConfig.from_dict(data, source=str(path))
            except ValueError as exc:
                raise TrainConfigError(f"{path}: {exc}") from None
    try:
        v = cfg.variant or variant
        if v:
            mc = apply_variant(mc, v)
        mc = mc.replace(**overrides, num_classes=num_classes)
        if cfg.aux_loss is False:
            mc = mc.replace(aux_loss=False)
    except ValueError as exc:
        raise TrainConfigError(str(exc)) from None
    return mc


def from_scratch_backbone(mc, overrides: dict[str, Any]):
    """Freeze only what was pretrained: a backbone without pretrained weights
    trains every stage (stem and layer1 included) and learns its batch norm,
    unless the ``model:`` overrides say otherwise."""
    changes = {"backbone_frozen_stages": -1, "backbone_norm": "batch"}
    return mc.replace(**{k: v for k, v in changes.items() if k not in overrides})


@dataclass
class Datasets:
    train: Any
    val: Any
    category_ids: list[int]
    class_names: list[str]


def build_datasets(cfg: TrainConfig, dc) -> Datasets:
    """Train / val CocoDetection with the configured transforms. ``dc``: a
    ``DatasetConfig``. Raises DatasetError / TrainConfigError."""
    from ...data import make_eval_transforms, make_train_transforms

    crop = (cfg.crop_min, cfg.crop_max) if cfg.crop else None
    train_tf = make_train_transforms(cfg.train_scales(), cfg.max_size, crop=crop, crop_scales=cfg.crop_scales)
    from ...data.split import open_split

    train = open_split(dc.train, train_tf, names=dc.names)
    if len(train) == 0:
        raise DatasetError(f"{dc.train.annotations}: the training split has no images")
    if train.num_classes == 0:
        raise DatasetError(f"{dc.train.annotations}: the training split has no categories")
    val = open_split(dc.val, make_eval_transforms(cfg.eval_size, cfg.eval_max_size), category_ids=list(train.category_ids),
                     names=dc.names, mark_unreadable=True)
    if len(val) == 0:
        raise DatasetError(f"{dc.val.annotations}: the validation split has no images")
    names = list(dc.names) if dc.names else list(train.class_names)
    if len(names) != train.num_classes:
        raise DatasetError(
            f"{dc.source}: 'names' lists {len(names)} classes but {dc.train.annotations} has {train.num_classes} categories"
        )
    return Datasets(train, val, list(train.category_ids), names)


def transfer_weights(model, state: dict, src_category_ids: list[int] | None, src_num_classes: int, dst_category_ids: list[int]) -> list[str]:
    """Loads ``state`` into ``model`` for fine-tuning. Class-head rows are mapped by
    category id when the source covers the destination ids; otherwise the class
    head keeps its fresh initialisation. Other shape mismatches are skipped.
    Returns human-readable notes on what was not transferred."""
    import torch

    notes: list[str] = []
    own = model.state_dict()
    rows: list[int] | None = None
    try:
        label_map = resolve_label_map(src_num_classes, src_category_ids, dst_category_ids, what="the fine-tuning checkpoint")
        pos = {c: i for i, c in enumerate(label_map) if c is not None}
        rows = [pos[c] for c in dst_category_ids] if all(c in pos for c in dst_category_ids) else None
    except ClassMismatchError:
        rows = None
    new_state: dict[str, torch.Tensor] = {}
    reinit_head = False
    skipped: list[str] = []
    for k, v in state.items():
        if k not in own:
            continue
        if "class_embed" in k and v.shape[:1] == (src_num_classes,) and own[k].shape[:1] == (len(dst_category_ids),):
            if rows is not None:
                new_state[k] = v[rows].clone()
            else:
                reinit_head = True
            continue
        if own[k].shape != v.shape:
            skipped.append(k)
            continue
        new_state[k] = v
    missing = [k for k in own if k not in new_state]
    model.load_state_dict(new_state, strict=False)
    if rows is not None and rows != list(range(src_num_classes)):
        notes.append(f"class head: {src_num_classes} -> {len(dst_category_ids)} classes, rows taken by category id")
    if reinit_head:
        why = ("its category ids do not cover the dataset's" if src_category_ids is not None
               else "no category ids to map them by")
        notes.append(
            f"class head re-initialised: checkpoint has {src_num_classes} classes, dataset has {len(dst_category_ids)} "
            f"({why})"
        )
    if skipped:
        notes.append(f"{len(skipped)} tensor(s) with other shapes not loaded (e.g. {skipped[0]})")
    other_missing = [k for k in missing if "class_embed" not in k]
    if other_missing:
        notes.append(f"{len(other_missing)} tensor(s) missing from the checkpoint kept their initialisation (e.g. {other_missing[0]})")
    return notes


def build_model(cfg: TrainConfig, ds: Datasets, ckpt: dict | None = None, *, model_explicit: bool = False):
    """(model, notes) for a run on the datasets ``ds``: resumed from ``ckpt``,
    fine-tuned from ``cfg.weights`` (the checkpoint's config unless
    ``model_explicit``) or fresh (optionally with ``cfg.pretrained_backbone``).
    ``notes``: what fine-tuning did, one line each."""
    from ...models import ModelConfig
    from ...models import build_model as build_network

    notes: list[str] = []
    if ckpt is not None:
        mc = ModelConfig.from_dict(ckpt["model_config"], source="checkpoint model_config")
        model = build_network(mc)
    elif cfg.weights:
        from ...checkpoints import load_model

        src = load_model(cfg.weights)
        mc = build_model_config(cfg, len(ds.category_ids), base=None if model_explicit else src.config)
        model = build_network(mc)
        src_ids = list(src.category_ids) if getattr(src, "category_ids", None) is not None else None
        notes += transfer_weights(model, src.state_dict(), src_ids, int(src.config.num_classes), list(ds.category_ids))
        notes.insert(0, f"fine-tuning from {cfg.weights}")
    else:
        mc = build_model_config(cfg, len(ds.category_ids))
        if not cfg.pretrained_backbone:
            mc = from_scratch_backbone(mc, cfg.model_overrides)
        model = build_network(mc)
        if cfg.pretrained_backbone:
            from ...checkpoints.torchvision import load_backbone_weights

            load_backbone_weights(model, cfg.pretrained_backbone)
    model.class_names = list(ds.class_names)
    model.category_ids = list(ds.category_ids)
    model.input_size = (cfg.eval_size, cfg.eval_max_size)
    return model, notes


def check_scans(ds: Datasets, train_scan, val_scan, warn: Callable[[str], None]) -> None:
    """Stops on datasets that cannot train (no image file exists, no
    annotations); warns about every other problem the scans found."""
    for split, d, report in (("train", ds.train, train_scan), ("val", ds.val, val_scan)):
        if report.missing_files and report.missing_files >= len(d):
            raise DatasetError(f"{d.images_dir}: none of the {len(d)} images listed in {d.annotation_file} exist")
        if report.missing_files + report.unreadable_skipped >= len(d):
            raise DatasetError(f"{d.images_dir}: none of the {len(d)} images listed in {d.annotation_file} can be read")
        for problem in report.problems:
            warn(f"{split}: {problem}")
    if len(ds.train.coco.getAnnIds()) == 0:
        raise DatasetError(f"{ds.train.annotation_file}: the training split has no annotations")
    if len(ds.val.coco.getAnnIds()) == 0:
        warn(f"val: {ds.val.annotation_file} has images but no annotations: AP cannot be measured; "
             "best.pt follows the latest validated weights")
