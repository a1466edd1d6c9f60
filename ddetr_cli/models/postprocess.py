"""Model outputs -> scored boxes in image pixels (the official PostProcess)."""

from __future__ import annotations

import torch

from .box_ops import box_cxcywh_to_xyxy


@torch.no_grad()
def postprocess(outputs: dict, target_sizes: torch.Tensor, top_k: int = 100,
                score_threshold: float = 0.0) -> list[dict[str, torch.Tensor]]:
    """
    Args:
        outputs: ``pred_logits`` [B, Q, C] and ``pred_boxes`` [B, Q, 4] (cx, cy, w, h) in [0, 1].
        target_sizes: [B, 2] (h, w) of each image in pixels (the size the boxes should map to).
        top_k: detections kept per image, the best over all Q*C (query, class) pairs.
        score_threshold: then drop detections scoring below this.

    Returns:
        B dicts with ``scores`` [K] float, ``labels`` [K] int64 class index and
        ``boxes`` [K, 4] (x0, y0, x1, y1) in pixels, sorted by score.
    """
    logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
    if logits.dim() != 3 or pred_boxes.shape[:2] != logits.shape[:2]:
        raise ValueError(f"outputs: pred_logits {tuple(logits.shape)} and pred_boxes {tuple(pred_boxes.shape)} do not match")
    target_sizes = torch.as_tensor(target_sizes, device=logits.device)
    if target_sizes.shape != (logits.shape[0], 2):
        raise ValueError(f"target_sizes: expected [{logits.shape[0]}, 2] (h, w), got {tuple(target_sizes.shape)}")
    B, Q, C = logits.shape
    prob = logits.float().sigmoid().view(B, Q * C)  # [B, Q*C]
    scores, index = torch.topk(prob, min(top_k, Q * C), dim=1)  # [B, K]
    query = torch.div(index, C, rounding_mode="floor")  # [B, K]
    labels = index % C  # [B, K]
    boxes = box_cxcywh_to_xyxy(pred_boxes.float())  # [B, Q, 4]
    boxes = torch.gather(boxes, 1, query.unsqueeze(-1).expand(-1, -1, 4))  # [B, K, 4]
    img_h, img_w = target_sizes.float().unbind(1)  # [B] each
    scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)  # [B, 4]
    boxes = boxes * scale[:, None, :]
    results = []
    for s, lab, b in zip(scores, labels, boxes):
        keep = s >= score_threshold
        results.append({"scores": s[keep], "labels": lab[keep], "boxes": b[keep]})
    return results
