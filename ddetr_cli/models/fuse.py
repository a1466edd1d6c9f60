"""Inference-only rewrites of a detector: batch norm folded into the preceding
convolutions, and the backbone's convolutions in channels_last.

Every batch norm of the ResNet trunk follows a bias-free convolution, and at
inference it is an affine map per channel (``x * scale + shift``), so
``bn(conv(x)) = conv'(x)`` with ``conv'.weight = conv.weight * scale`` and
``conv'.bias = shift``: one pass over each feature map fewer (53 in R50). The
result equals the unfused model's up to float rounding (tested to 1e-5).

A fused model has other state-dict keys (no ``bn*``, a ``bias`` per
convolution), so it is for inference only: it cannot be put back in training
mode, and :func:`~ddetr_cli.checkpoints.save_model` refuses it. ``load_model``
(which training, export and saving read) returns unfused models; the inference
paths that own their model (the predict and eval runner, ``bench --model``)
fuse it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..errors import DdetrError
from .backbone import BatchNorm2d, FrozenBatchNorm2d, ResNet

FUSED_ATTR = "fused_for_inference"  # set to True on a fused model


def fuse_for_inference(model: nn.Module, *, channels_last: bool | None = None) -> nn.Module:
    """Folds every batch norm of the backbone into its convolution, in place,
    and (``channels_last``) runs the backbone's convolutions in channels_last
    memory order (its outputs are contiguous again); None: on a CPU model,
    where it was measured faster (oneDNN convolutions without layout
    reorders), not on a GPU. ``model`` must be in eval mode (a learnt batch norm
    folds its running statistics). Returns ``model``; a second call does nothing."""
    if getattr(model, FUSED_ATTR, False):
        return model
    if model.training:
        raise DdetrError("fuse_for_inference needs a model in eval mode (call model.eval() first)", param="model")
    if channels_last is None:
        channels_last = next(model.parameters()).device.type == "cpu"
    with torch.no_grad():
        for parent, conv_name, norm_name in list(_conv_norm_pairs(model)):
            conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
            setattr(parent, conv_name, fold(conv, norm))
            setattr(parent, norm_name, nn.Identity())
    for trunk in model.modules():
        if isinstance(trunk, ResNet):
            trunk.channels_last = channels_last
            if channels_last:
                trunk.to(memory_format=torch.channels_last)
    setattr(model, FUSED_ATTR, True)
    return model


def is_fused(model: nn.Module) -> bool:
    return bool(getattr(model, FUSED_ATTR, False))


def fold(conv: nn.Conv2d, norm: nn.Module) -> nn.Conv2d:
    """A new convolution computing ``norm(conv(x))`` for a frozen or eval-mode
    batch norm ``norm`` (float32 arithmetic, then the convolution's dtype)."""
    scale = norm.weight.float() * (norm.running_var.float() + norm.eps).rsqrt()  # [C_out]
    shift = norm.bias.float() - norm.running_mean.float() * scale  # [C_out]
    if conv.bias is not None:
        shift = shift + conv.bias.float() * scale
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                      dilation=conv.dilation, groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight.float() * scale.view(-1, 1, 1, 1))  # [C_out, C_in/groups, kH, kW]
    fused.bias.copy_(shift)
    fused.requires_grad_(False)
    return fused


def _conv_norm_pairs(model: nn.Module) -> Iterator[tuple[nn.Module, str, str]]:
    """(parent, convolution name, batch-norm name) for every batch norm that
    directly follows a convolution: ``convK``/``bnK`` of the stem and the
    blocks, and ``downsample`` = Sequential(conv, bn)."""
    norms = (FrozenBatchNorm2d, BatchNorm2d, nn.BatchNorm2d)
    for parent in model.modules():
        if isinstance(parent, nn.Sequential) and len(parent) == 2 and isinstance(parent[0], nn.Conv2d) \
                and isinstance(parent[1], norms):
            yield parent, "0", "1"
        for k in (1, 2, 3):
            conv, norm = getattr(parent, f"conv{k}", None), getattr(parent, f"bn{k}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(norm, norms):
                yield parent, f"conv{k}", f"bn{k}"
