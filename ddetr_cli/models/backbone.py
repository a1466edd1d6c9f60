"""ResNet backbone with frozen batch norm, torchvision parameter names.

``Backbone.body`` holds ``conv1, bn1, layer1..layer4`` exactly as torchvision's
ResNet (no ``fc``), so ImageNet weights and the official Deformable DETR
checkpoints (``backbone.0.body.*``) load by name. Multi-scale models take C3-C5
(strides 8/16/32), single-scale models C5 only; DC5 dilates the last stage
(stride 32 -> 16). The stem and ``layer1`` never train (as the official, for
ImageNet weights) unless ``backbone_frozen_stages`` says otherwise; a backbone
trained from scratch freezes nothing and learns its batch norm
(``backbone_norm="batch"``), which computes what the frozen one does at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import RESNETS, ModelConfig
from .position_encoding import PositionEmbeddingSine


@dataclass(frozen=True)
class ResNetSpec:
    block: str  # basic | bottleneck
    depths: tuple[int, int, int, int]
    stem_channels: int
    channels: tuple[int, int, int, int]  # output channels of each stage


def resnet_spec(cfg: ModelConfig) -> ResNetSpec:
    """The concrete ResNet of ``cfg``: the named depth/block, scaled by
    ``backbone_width``, with any explicit ``backbone_*`` override applied."""
    block, depths = RESNETS.get(cfg.backbone, (None, None))
    block = cfg.backbone_block or block
    depths = tuple(cfg.backbone_depths) if cfg.backbone_depths is not None else depths
    if block is None or depths is None:
        raise ValueError(f"model config: backbone {cfg.backbone!r} needs backbone_block and backbone_depths")
    w = cfg.backbone_width
    expansion = 4 if block == "bottleneck" else 1
    channels = cfg.backbone_channels or [w * 2**i * expansion for i in range(4)]
    stem = cfg.backbone_stem_channels if cfg.backbone_stem_channels is not None else w
    if block == "bottleneck" and any(c % 4 for c in channels):
        raise ValueError(f"model config: bottleneck stage channels must be multiples of 4, got {list(channels)}")
    return ResNetSpec(block, tuple(int(d) for d in depths), int(stem), tuple(int(c) for c in channels))


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all buffers
    (``weight, bias, running_mean, running_var``); eps 1e-5 inside the rsqrt."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # present in torchvision BatchNorm2d weights
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W]."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()  # [C]
        shift = self.bias - self.running_mean * scale  # [C]
        # x * scale + shift in one pass over x
        return torch.addcmul(shift.view(1, -1, 1, 1).to(x.dtype), x, scale.view(1, -1, 1, 1).to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class BatchNorm2d(nn.BatchNorm2d):
    """Learnt batch norm with the state-dict keys of :class:`FrozenBatchNorm2d`
    (no ``num_batches_tracked``): in eval mode it computes the same."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps=eps)
        self.num_batches_tracked = None  # momentum is fixed: not needed, and not an official key

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                        error_msgs)


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _downsample(cin: int, cout: int, stride: int, norm=FrozenBatchNorm2d) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), norm(cout))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1, norm=FrozenBatchNorm2d) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride, dilation)
        self.bn1 = norm(cout)
        self.conv2 = _conv3x3(cout, cout, 1, dilation)
        self.bn2 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, ResNet v1.5), 1x1 expand (x4)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1, norm=FrozenBatchNorm2d) -> None:
        super().__init__()
        mid = cout // 4
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = norm(mid)
        self.conv2 = _conv3x3(mid, mid, stride, dilation)
        self.bn2 = norm(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-layout ResNet trunk without the classifier."""

    def __init__(self, spec: ResNetSpec, dilation: bool = False, learnt_norm_from: int = 5) -> None:
        """``learnt_norm_from``: stages (0 = stem, 1..4 = layer1..4) from this one on
        use :class:`BatchNorm2d`, the others :class:`FrozenBatchNorm2d`."""
        super().__init__()
        if dilation and spec.block != "bottleneck":
            raise ValueError("model config: dilation (DC5) needs a bottleneck ResNet (resnet50/101), as torchvision")
        block = Bottleneck if spec.block == "bottleneck" else BasicBlock
        self.channels_last = False  # set by fuse_for_inference: convolutions in channels_last memory order

        def norm(stage: int):
            return BatchNorm2d if stage >= learnt_norm_from else FrozenBatchNorm2d

        self.conv1 = nn.Conv2d(3, spec.stem_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(0)(spec.stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = spec.stem_channels
        for i, (depth, cout) in enumerate(zip(spec.depths, spec.channels)):
            stride = 1 if i == 0 else 2
            first_dilation = later_dilation = 1
            if dilation and i == 3:  # torchvision replace_stride_with_dilation=[False, False, True]
                stride, later_dilation = 1, 2
            blocks = [block(cin, cout, stride, first_dilation, norm(i + 1))]
            blocks += [block(cout, cout, 1, later_dilation, norm(i + 1)) for _ in range(depth - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor, return_layers: tuple[int, ...] = (2, 3, 4)) -> list[torch.Tensor]:
        """x [B, 3, H, W] -> the outputs of the stages in ``return_layers`` (1-based),
        contiguous (also when the trunk runs in channels_last)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # [B, stem, H/4, W/4]
        out = []
        for i in range(1, max(return_layers) + 1):
            x = getattr(self, f"layer{i}")(x)
            if i in return_layers:
                out.append(x.contiguous() if self.channels_last else x)
        return out


class Backbone(nn.Module):
    """``body`` (the ResNet) plus the feature selection and mask down-sampling."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        spec = resnet_spec(cfg)
        first_trained = cfg.backbone_frozen_stages + 1 if cfg.train_backbone else 5  # 0 = stem, 1..4 = layer1..4
        learnt = first_trained if cfg.backbone_norm == "batch" else 5
        self.body = ResNet(spec, dilation=cfg.dilation, learnt_norm_from=learnt)
        if cfg.num_feature_levels > 1:
            self.return_layers = (2, 3, 4)
            self.strides = [8, 16, 32]
            self.num_channels = list(spec.channels[1:])
        else:
            self.return_layers = (4,)
            self.strides = [32]
            self.num_channels = [spec.channels[3]]
        if cfg.dilation:
            self.strides[-1] //= 2
        trained = tuple(f"layer{i}" for i in range(max(1, first_trained), 5)) + (("conv1", "bn1") if first_trained <= 0 else ())
        for name, p in self.body.named_parameters():
            p.requires_grad_(name.startswith(trained))

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """images [B, 3, H, W], mask [B, H, W] bool (True = padding) ->
        [(feature [B, C_l, H_l, W_l], mask [B, H_l, W_l])] per returned stage."""
        feats = self.body(images, self.return_layers)
        return [(f, downsample_mask(mask, f.shape[-2:])) for f in feats]


def downsample_mask(mask: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """mask [B, H, W] bool -> [B, h, w] bool by nearest interpolation (as the official)."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


class Joiner(nn.Sequential):
    """``backbone.0`` = :class:`Backbone`, ``backbone.1`` = the sine position
    encoding (no parameters), matching the official module indices."""

    def __init__(self, backbone: Backbone, position: PositionEmbeddingSine) -> None:
        super().__init__(backbone, position)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, images: torch.Tensor, mask: torch.Tensor):  # type: ignore[override]
        """images [B, 3, H, W], mask [B, H, W] -> (features, masks, positions) lists,
        one entry per stage: [B, C_l, H_l, W_l], [B, H_l, W_l], [B, d_model, H_l, W_l]."""
        out = self[0](images, mask)
        feats = [f for f, _ in out]
        masks = [m for _, m in out]
        pos = [self[1](m).to(f.dtype) for f, m in out]
        return feats, masks, pos
