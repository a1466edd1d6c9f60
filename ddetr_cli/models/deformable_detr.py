"""The Deformable DETR detector: backbone, input projections, transformer and
heads, in the three official variants (base, box refinement, two-stage).

The forward contract::

    model(images [B, 3, H, W], padding_mask [B, H, W] bool (True = padded) | None)
      -> {"pred_logits": [B, Q, num_classes], "pred_boxes": [B, Q, 4] (cx, cy, w, h) in [0, 1],
          "aux_outputs": [{"pred_logits", "pred_boxes"}] * (dec_layers - 1)  # training + aux_loss
          "enc_outputs": {"pred_logits": [B, S, C], "pred_boxes": [B, S, 4]}}  # training + two-stage

Boxes are relative to each image's valid (unpadded) area. State-dict keys are
the official release keys, heads included: non-refine models repeat one shared
head module under ``class_embed.i``/``bbox_embed.i``; box refinement has one
head per decoder layer, aliased as ``transformer.decoder.bbox_embed.i``;
two-stage adds a head for the encoder proposals (index ``dec_layers``) and
aliases ``transformer.decoder.class_embed.i``.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DdetrError
from .backbone import Backbone, Joiner, downsample_mask
from .config import ModelConfig
from .deformable_transformer import DeformableTransformer, inverse_sigmoid
from .fuse import is_fused
from .position_encoding import PositionEmbeddingSine


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (``layers.j``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., input_dim] -> [..., output_dim]."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class DeformableDETR(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.class_names: list[str] = [str(i) for i in range(cfg.num_classes)]
        self.category_ids: list[int] | None = None
        # (shorter side, longer-side cap) the model was trained / validated at; None: the official 800 / 1333
        self.input_size: tuple[int, int] | None = None
        d = cfg.d_model
        self.num_queries = cfg.num_queries
        self.num_feature_levels = cfg.num_feature_levels
        self.transformer = DeformableTransformer(cfg)
        self.backbone = Joiner(Backbone(cfg), PositionEmbeddingSine(d // 2, normalize=True))

        class_embed = nn.Linear(d, cfg.num_classes)
        bbox_embed = MLP(d, d, 4, 3)
        if not cfg.two_stage:
            self.query_embed = nn.Embedding(cfg.num_queries, d * 2)

        in_channels = self.backbone.num_channels
        projs = [nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(32, d)) for c in in_channels]
        cin = in_channels[-1]
        for _ in range(cfg.num_feature_levels - len(in_channels)):
            projs.append(nn.Sequential(nn.Conv2d(cin, d, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, d)))
            cin = d
        self.input_proj = nn.ModuleList(projs)

        # official init: focal-loss prior on the class bias, zero last box layer
        prior_prob = 0.01
        with torch.no_grad():
            class_embed.bias.fill_(-math.log((1 - prior_prob) / prior_prob))
            nn.init.zeros_(bbox_embed.layers[-1].weight)
            nn.init.zeros_(bbox_embed.layers[-1].bias)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

        num_pred = cfg.dec_layers + 1 if cfg.two_stage else cfg.dec_layers
        if cfg.with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            with torch.no_grad():
                self.bbox_embed[0].layers[-1].bias[2:].fill_(-2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            with torch.no_grad():
                bbox_embed.layers[-1].bias[2:].fill_(-2.0)
            self.class_embed = nn.ModuleList([class_embed for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([bbox_embed for _ in range(num_pred)])
            self.transformer.decoder.bbox_embed = None
        if cfg.two_stage:
            self.transformer.decoder.class_embed = self.class_embed
            with torch.no_grad():
                for head in self.bbox_embed:
                    head.layers[-1].bias[2:].fill_(0.0)

    def train(self, mode: bool = True) -> DeformableDETR:
        if mode and is_fused(self):
            raise DdetrError("this model was fused for inference (fuse_for_inference): it cannot train; "
                             "load the weights again to train", param="model")
        return super().train(mode)

    def set_msda_backend(self, backend: str | None) -> None:
        """``auto``/None | ``native`` | ``torch`` for every deformable-attention module."""
        self.config = self.config.replace(msda_backend=backend)
        self.transformer.set_backend(backend)

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor | None = None,
                return_aux: bool | None = None, *, one2many: int = 0,
                one2many_embed: torch.Tensor | None = None, denoise=None) -> dict:
        """
        Args:
            images: [B, 3, H, W] normalised float images (padded to a common size).
            padding_mask: [B, H, W] bool, True on padded pixels; None = no padding.
            return_aux: include ``aux_outputs`` (when ``config.aux_loss``) and, for
                two-stage, ``enc_outputs``; default: ``self.training``.
            one2many: hybrid matching (training only, :mod:`.hybrid`): this many extra
                one-to-many queries (two-stage: the next encoder proposals; else the rows of
                ``one2many_embed`` [one2many, 2C]), masked from the others in self-attention.
                Their outputs come under ``"one2many"`` (``pred_logits``, ``pred_boxes``,
                ``aux_outputs``); every other output is the plain model's.
            denoise: denoising queries (training only, two-stage, :mod:`.denoising`),
                appended after every other query and unseen by them; their outputs come
                under ``"denoise"`` as the one-to-many ones do.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected [B, 3, H, W], got {tuple(images.shape)}")
        B, _, H, W = images.shape
        has_padding = None if padding_mask is not None else False
        if padding_mask is None:
            padding_mask = torch.zeros((B, H, W), dtype=torch.bool, device=images.device)
        elif tuple(padding_mask.shape) != (B, H, W):
            raise ValueError(f"padding_mask: expected {(B, H, W)}, got {tuple(padding_mask.shape)}")
        padding_mask = padding_mask.to(device=images.device, dtype=torch.bool)

        features, masks, pos = self.backbone(images, padding_mask)
        srcs = [proj(f) for proj, f in zip(self.input_proj, features)]  # L_backbone x [B, C, H_l, W_l]
        masks, pos = list(masks), list(pos)
        for lvl in range(len(srcs), self.num_feature_levels):
            src = self.input_proj[lvl](features[-1] if lvl == len(features) else srcs[-1])  # [B, C, H_l, W_l]
            mask = downsample_mask(padding_mask, src.shape[-2:])  # [B, H_l, W_l]
            srcs.append(src)
            masks.append(mask)
            pos.append(self.backbone[1](mask).to(src.dtype))

        query_embed = None if self.config.two_stage else self.query_embed.weight  # [Q, 2C]
        hs, init_reference, inter_references, enc_class, enc_coord_unact = self.transformer(
            srcs, masks, pos, query_embed, has_padding, one2many, one2many_embed, denoise)

        want_aux = self.training if return_aux is None else return_aux
        # Without aux outputs only the last layer's heads are needed (the box
        # refinement inside the decoder already ran its own heads).
        levels = range(len(hs)) if want_aux and self.config.aux_loss else [len(hs) - 1]
        logits, boxes = [], []
        for lvl in levels:
            h = hs[lvl]
            reference = inverse_sigmoid(init_reference if lvl == 0 else inter_references[lvl - 1])  # [B, Q, 2|4]
            delta = self.bbox_embed[lvl](h).float()  # [B, Q, 4]
            if reference.shape[-1] == 4:
                coord = delta + reference
            else:
                coord = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            logits.append(self.class_embed[lvl](h))  # [B, Q, num_classes]
            boxes.append(coord.sigmoid())  # [B, Q, 4]

        denoised = None
        if denoise is not None:
            n = denoise.num_queries
            denoised = {"pred_logits": logits[-1][:, -n:], "pred_boxes": boxes[-1][:, -n:]}  # [B, N, C], [B, N, 4]
            if want_aux and self.config.aux_loss:
                denoised["aux_outputs"] = [{"pred_logits": a[:, -n:], "pred_boxes": b[:, -n:]}
                                           for a, b in zip(logits[:-1], boxes[:-1])]
            logits, boxes = [a[:, :-n] for a in logits], [b[:, :-n] for b in boxes]
        extra = None
        if one2many:
            tokens = sum(int(s.shape[-2] * s.shape[-1]) for s in srcs)
            first = min(self.num_queries, tokens) if self.config.two_stage else self.num_queries  # the one-to-one queries
            extra = {"pred_logits": logits[-1][:, first:], "pred_boxes": boxes[-1][:, first:]}  # [B, Q2, C], [B, Q2, 4]
            if want_aux and self.config.aux_loss:
                extra["aux_outputs"] = [{"pred_logits": a[:, first:], "pred_boxes": b[:, first:]}
                                        for a, b in zip(logits[:-1], boxes[:-1])]
            logits, boxes = [a[:, :first] for a in logits], [b[:, :first] for b in boxes]
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if want_aux and self.config.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        if extra is not None:
            out["one2many"] = extra
        if denoised is not None:
            out["denoise"] = denoised
        if want_aux and self.config.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_class, "pred_boxes": enc_coord_unact.sigmoid()}
        return out


def build_model(cfg: ModelConfig) -> DeformableDETR:
    """A randomly initialised model (official init) for ``cfg``."""
    return DeformableDETR(cfg)
