"""Mapping a model's class indices to a dataset's category ids."""

from __future__ import annotations

from collections.abc import Sequence

from ...errors import ClassMismatchError

COCO_OFFICIAL_CLASSES = (91, 92)  # official COCO heads: class index == COCO category id


def resolve_label_map(
    num_classes: int,
    model_category_ids: Sequence[int] | None,
    dataset_category_ids: Sequence[int],
    *,
    what: str = "checkpoint",
    model_names: Sequence[str] | None = None,
    dataset_names: Sequence[str] | None = None,
) -> list[int | None]:
    """Returns ``label_to_cat`` (length ``num_classes``): the dataset category id
    predicted by each model class index, or None for classes the dataset does not
    have (their detections are dropped).

    - the model records category ids that cover the dataset's -> map by id;
    - else, unique class names (``model_names`` / ``dataset_names``) that cover
      the dataset's -> map by name (the same data in COCO and YOLO format);
    - same class count and no ids recorded -> same order as the dataset;
    - a 91/92-way official COCO head -> class index is the COCO id;
    - otherwise :class:`ClassMismatchError`.
    """
    ds = [int(c) for c in dataset_category_ids]
    ds_set = set(ds)
    if model_category_ids is not None and len(model_category_ids) == num_classes:
        ids = [int(c) for c in model_category_ids]
        if ds_set <= set(ids):
            return [c if c in ds_set else None for c in ids]
        if len(ids) == len(ds) and ids == list(range(len(ds))):
            return list(ds)  # the model only knows contiguous indices
        by_name = _by_name(model_names, dataset_names, ds)
        if by_name is not None and len(by_name) == num_classes:
            return by_name
        missing = sorted(ds_set - set(ids))
        raise ClassMismatchError(
            f"{what} has {num_classes} classes (category ids {_short(ids)}) that do not cover the "
            f"dataset's category ids {_short(missing)}; fine-tune it on this dataset first (`weights`)"
        )
    if num_classes == len(ds):
        return list(ds)
    if num_classes in COCO_OFFICIAL_CLASSES and all(0 <= c < num_classes for c in ds):
        return [i if i in ds_set else None for i in range(num_classes)]
    raise ClassMismatchError(
        f"{what} predicts {num_classes} classes but the dataset has {len(ds)} categories and the {what} "
        "records no category ids to match them by"
    )


def _by_name(model_names: Sequence[str] | None, dataset_names: Sequence[str] | None,
             ds: list[int]) -> list[int | None] | None:
    if not model_names or not dataset_names or len(dataset_names) != len(ds):
        return None
    model_names, dataset_names = [str(n) for n in model_names], [str(n) for n in dataset_names]
    if len(set(model_names)) != len(model_names) or not set(dataset_names) <= set(model_names):
        return None
    cat = dict(zip(dataset_names, ds))
    return [cat.get(n) for n in model_names]


def _short(ids: Sequence[int]) -> str:
    ids = list(ids)
    return ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")
