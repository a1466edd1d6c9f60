"""Deformable transformer: encoder, decoder and the two-stage proposal head.

Module names are those of the official release (``transformer.encoder.layers.i
.{self_attn,norm1,linear1,linear2,norm2}``, ``transformer.decoder.layers.i
.{self_attn (nn.MultiheadAttention),norm2,cross_attn,norm1,linear1,linear2,
norm3}``, ``transformer.level_embed``, ``transformer.reference_points`` or the
two-stage ``enc_output(_norm)``/``pos_trans(_norm)``), so official checkpoints
load by name. Layers are post-norm, FFNs use ReLU.

Level geometry (:class:`~ddetr_cli.ops.geometry.LevelGeometry`: sizes as Python
ints, the official CPU tensors, the offset normaliser on the model's device) is
made once per input size and device and passed to every layer, so no layer reads
a tensor back to the host and CUDA runs never sync on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.geometry import LevelGeometry
from .config import ModelConfig
from .deformable_attention import MSDeformAttn
from .position_encoding import proposal_pos_embed


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) with x clamped to [0, 1] and both x and 1-x clamped to >= eps."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, H, W] bool (True = padding) -> [B, 2] (w, h) fraction of valid columns / rows."""
    _, H, W = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)  # [B]
    valid_w = (~mask[:, 0, :]).sum(1)  # [B]
    return torch.stack([valid_w.float() / W, valid_h.float() / H], -1)  # [B, 2]


def encoder_reference_points(shapes: list[tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
    """Pixel centres normalised by each image's valid size.

    shapes: L (H, W) pairs; valid_ratios [B, L, 2] -> [B, S, L, 2] (x, y)."""
    device = valid_ratios.device
    refs = []
    for lvl, (H, W) in enumerate(shapes):
        ref_y, ref_x = torch.meshgrid(
            torch.arange(H, dtype=torch.float32, device=device) + 0.5,  # = linspace(0.5, H - 0.5, H), exactly;
            torch.arange(W, dtype=torch.float32, device=device) + 0.5,  # arange keeps H, W symbolic under export
            indexing="ij",
        )  # [H, W] each
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * H)  # [B, H*W]
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * W)  # [B, H*W]
        refs.append(torch.stack((ref_x, ref_y), -1))  # [B, H*W, 2]
    ref = torch.cat(refs, 1)  # [B, S, 2]
    return ref[:, :, None] * valid_ratios[:, None]  # [B, S, L, 2]


class DeformableTransformerEncoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int,
                 backend: str | None = None) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, geometry, padding_mask):
        """src, pos [B, S, C]; reference_points [B, S, L, 2]; padding_mask [B, S] -> [B, S, C]."""
        src2 = self.self_attn(src + pos, reference_points, src, geometry, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(F.relu(self.linear1(src), inplace=True)))  # [B, S, C]
        return self.norm2(src + self.dropout3(src2))


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, layers: list[DeformableTransformerEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(layers)

    def forward(self, src, geometry, valid_ratios, pos, padding_mask):
        """src, pos [B, S, C]; valid_ratios [B, L, 2]; padding_mask [B, S] -> memory [B, S, C]."""
        reference_points = encoder_reference_points(geometry.shapes, valid_ratios)  # [B, S, L, 2], once for all layers
        out = src
        for layer in self.layers:
            out = layer(out, pos, reference_points, geometry, padding_mask)
        return out


class DeformableTransformerDecoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int,
                 backend: str | None = None) -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, geometry, padding_mask, self_attn_mask=None):
        """tgt, query_pos [B, Q, C]; reference_points [B, Q, L, 2|4]; memory [B, S, C];
        self_attn_mask [Q, Q] bool (True: may not attend) or None -> [B, Q, C]."""
        q = k = tgt + query_pos  # [B, Q, C]
        tgt2 = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]  # [B, Q, C]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.cross_attn(tgt + query_pos, reference_points, memory, geometry, padding_mask)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(F.relu(self.linear1(tgt), inplace=True)))  # [B, Q, C]
        return self.norm3(tgt + self.dropout4(tgt2))


class DeformableTransformerDecoder(nn.Module):
    """Returns every layer's output; with ``bbox_embed`` set (box refinement)
    each layer refines the reference boxes in logit space (detached)."""

    def __init__(self, layers: list[DeformableTransformerDecoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(layers)
        # set by the detector for box refinement / two-stage (aliases of its heads)
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(self, tgt, reference_points, memory, geometry, valid_ratios, query_pos, padding_mask,
                self_attn_mask=None):
        """tgt, query_pos [B, Q, C]; reference_points [B, Q, 2|4] in [0, 1]; memory [B, S, C];
        valid_ratios [B, L, 2]; self_attn_mask [Q, Q] bool or None -> (hidden states [num_layers] x [B, Q, C],
        reference points after each layer [num_layers] x [B, Q, 2|4])."""
        out = tgt
        ratios2 = valid_ratios[:, None]  # [B, 1, L, 2]
        ratios4 = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # [B, 1, L, 4]
        hs, refs = [], []
        for lid, layer in enumerate(self.layers):
            ratios = ratios4 if reference_points.shape[-1] == 4 else ratios2
            ref_input = reference_points[:, :, None] * ratios  # [B, Q, L, 2|4]
            out = layer(out, query_pos, ref_input, memory, geometry, padding_mask, self_attn_mask)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[lid](out)  # [B, Q, 4]
                if reference_points.shape[-1] == 4:
                    new_ref = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    new_ref = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1).sigmoid()
                reference_points = new_ref.detach()
            hs.append(out)
            refs.append(reference_points)
        return hs, refs


class DeformableTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, backend = cfg.d_model, cfg.msda_backend
        self.d_model = d
        self.nhead = cfg.nheads
        self.two_stage = cfg.two_stage
        self.two_stage_num_proposals = cfg.num_queries
        self.encoder = DeformableTransformerEncoder([
            DeformableTransformerEncoderLayer(d, cfg.dim_feedforward, cfg.dropout, cfg.num_feature_levels, cfg.nheads,
                                              cfg.enc_n_points, backend)
            for _ in range(cfg.enc_layers)
        ])
        self.decoder = DeformableTransformerDecoder([
            DeformableTransformerDecoderLayer(d, cfg.dim_feedforward, cfg.dropout, cfg.num_feature_levels, cfg.nheads,
                                              cfg.dec_n_points, backend)
            for _ in range(cfg.dec_layers)
        ])
        self.level_embed = nn.Parameter(torch.empty(cfg.num_feature_levels, d))
        self._geometries: dict[tuple, LevelGeometry] = {}  # see level_geometry()
        if cfg.two_stage:
            self.enc_output = nn.Linear(d, d)
            self.enc_output_norm = nn.LayerNorm(d)
            self.pos_trans = nn.Linear(d * 2, d * 2)
            self.pos_trans_norm = nn.LayerNorm(d * 2)
        else:
            self.reference_points = nn.Linear(d, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def set_backend(self, backend: str | None) -> None:
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.backend = backend

    def level_geometry(self, shapes: list[tuple[int, int]], device: torch.device) -> LevelGeometry:
        """The :class:`LevelGeometry` of these level sizes with its offset
        normaliser on ``device``, made once per geometry: a host-to-device copy
        per forward would sync with the host and cannot be captured in a CUDA
        graph. The cache holds the last few."""
        key = (tuple(shapes), str(device))
        cached = self._geometries.get(key)
        if cached is None:
            if len(self._geometries) >= 16:
                self._geometries.pop(next(iter(self._geometries)))
            cached = LevelGeometry.build(shapes, device)
            self._geometries[key] = cached
        return cached

    def gen_encoder_output_proposals(self, memory: torch.Tensor, padding_mask: torch.Tensor,
                                     shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """memory [B, S, C], padding_mask [B, S] -> (object queries [B, S, C],
        proposals [B, S, 4] in logit space, +inf where padded or out of (0.01, 0.99))."""
        B = memory.shape[0]
        proposals, start = [], 0
        for lvl, (H, W) in enumerate(shapes):
            mask_l = padding_mask[:, start:start + H * W].view(B, H, W)  # [B, H, W]
            valid_h = (~mask_l[:, :, 0]).sum(1)  # [B]
            valid_w = (~mask_l[:, 0, :]).sum(1)  # [B]
            grid_y, grid_x = torch.meshgrid(
                torch.arange(H, dtype=torch.float32, device=memory.device),  # = linspace(0, H - 1, H)
                torch.arange(W, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = torch.stack([grid_x, grid_y], -1)  # [H, W, 2]
            scale = torch.stack([valid_w, valid_h], -1).view(B, 1, 1, 2)  # [B, 1, 1, 2]
            grid = (grid[None].expand(B, -1, -1, -1) + 0.5) / scale  # [B, H, W, 2]
            wh = torch.full_like(grid, 0.05 * (2.0 ** lvl))  # [B, H, W, 2]
            proposals.append(torch.cat((grid, wh), -1).view(B, -1, 4))
            start += H * W
        props = torch.cat(proposals, 1)  # [B, S, 4]
        valid = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)  # [B, S, 1]
        props = torch.log(props / (1 - props))
        props = props.masked_fill(padding_mask[..., None], float("inf"))
        props = props.masked_fill(~valid, float("inf"))
        out = memory.masked_fill(padding_mask[..., None], 0.0)
        out = out.masked_fill(~valid, 0.0)
        out = self.enc_output_norm(self.enc_output(out))  # [B, S, C]
        return out, props

    def _box_queries(self, coords_unact: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Two-stage query position and content [B, K, C] each from boxes in logit
        space [B, K, 4]: their sine embedding through ``pos_trans`` (the encoder
        proposals' and the denoising queries' one path)."""
        C = self.d_model
        pos = proposal_pos_embed(coords_unact, num_pos_feats=C // 2).to(dtype)  # [B, K, 2C]
        query_pos, tgt = torch.split(self.pos_trans_norm(self.pos_trans(pos)), C, dim=2)  # [B, K, C] each
        return query_pos, tgt

    def forward(self, srcs, masks, pos_embeds, query_embed=None, has_padding: bool | None = None,
                one2many: int = 0, one2many_embed: torch.Tensor | None = None, denoise=None):
        """
        Args:
            srcs, pos_embeds: L tensors [B, C, H_l, W_l]; masks: L tensors [B, H_l, W_l] (True = padding).
            query_embed: [Q, 2C] (query_pos, tgt) when not two-stage.
            has_padding: False skips zeroing padded values in every attention layer
                (a no-op then); None checks CPU masks and assumes padding on other devices
                (checking would sync).
            one2many: hybrid matching (training only): extra one-to-many queries after the
                usual ones (two-stage: the next encoder proposals; else ``one2many_embed``
                [one2many, 2C]), which the usual queries never see in self-attention.
            denoise: denoising queries (training only, two-stage,
                :class:`~ddetr_cli.models.denoising.DenoiseQueries`), appended last: their
                embeddings come from their boxes through ``pos_trans`` as the proposals' do,
                plus their label content; no other query sees them.

        Returns:
            hs: dec_layers tensors [B, Q, C]; init_reference [B, Q, 2|4];
            inter_references: dec_layers tensors [B, Q, 2|4]; and for two-stage the
            encoder proposals' logits [B, S, num_classes] and box logits [B, S, 4] (else None).
        """
        # torch.export (ONNX export with dynamic sizes): sizes stay symbolic, so the level
        # geometry is passed as Python (H, W) pairs instead of tensors, and padding is assumed
        exporting = torch.compiler.is_exporting()
        shapes = [(s.shape[-2], s.shape[-1]) if exporting else (int(s.shape[-2]), int(s.shape[-1])) for s in srcs]
        src_flatten = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # [B, S, C]
        mask_flatten = torch.cat([m.flatten(1) for m in masks], 1)  # [B, S]
        pos_flatten = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                                 for lvl, p in enumerate(pos_embeds)], 1)  # [B, S, C]
        if exporting:
            has_padding = True
            geometry = LevelGeometry.traced(shapes, torch.stack([
                torch.stack([m.new_ones(()).float() * m.shape[-1], m.new_ones(()).float() * m.shape[-2]]) for m in masks
            ]))  # offset normaliser [L, 2] (W, H)
        else:
            geometry = self.level_geometry(shapes, src_flatten.device)
        valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)  # [B, L, 2]
        if has_padding is None:
            has_padding = bool(mask_flatten.any()) if mask_flatten.device.type == "cpu" else True
        attn_mask = mask_flatten if has_padding else None  # [B, S] or None

        memory = self.encoder(src_flatten, geometry, valid_ratios, pos_flatten, attn_mask)  # [B, S, C]

        B, _, C = memory.shape
        enc_class = enc_coord_unact = None
        if self.two_stage:
            if self.decoder.class_embed is None or self.decoder.bbox_embed is None:
                raise RuntimeError("two-stage DeformableTransformer: the detector must set decoder.class_embed/bbox_embed")
            output_memory, output_proposals = self.gen_encoder_output_proposals(memory, mask_flatten, shapes)
            last = self.decoder.num_layers
            enc_class = self.decoder.class_embed[last](output_memory)  # [B, S, num_classes]
            enc_coord_unact = self.decoder.bbox_embed[last](output_memory) + output_proposals  # [B, S, 4]
            topk = (torch.sym_min if exporting else min)(self.two_stage_num_proposals + one2many, enc_class.shape[1])
            topk_idx = torch.topk(enc_class[..., 0], topk, dim=1)[1]  # [B, K]
            topk_coords = torch.gather(enc_coord_unact, 1, topk_idx.unsqueeze(-1).expand(-1, -1, 4)).detach()  # [B, K, 4]
            reference_points = topk_coords.sigmoid()
            query_pos, tgt = self._box_queries(topk_coords, memory.dtype)  # [B, K, C] each
        else:
            if query_embed is None:
                raise ValueError("DeformableTransformer: query_embed is required unless two_stage")
            if one2many:
                query_embed = torch.cat([query_embed, one2many_embed], 0)  # [Q + Q2, 2C]
            query_pos, tgt = torch.split(query_embed, C, dim=1)  # [Q, C] each
            query_pos = query_pos.unsqueeze(0).expand(B, -1, -1)  # [B, Q, C]
            tgt = tgt.unsqueeze(0).expand(B, -1, -1)  # [B, Q, C]
            reference_points = self.reference_points(query_pos).float().sigmoid()  # [B, Q, 2]
        init_reference = reference_points
        self_attn_mask = None
        if one2many:
            total = tgt.shape[1]
            first = min(self.two_stage_num_proposals, total) if self.two_stage else total - one2many
            self_attn_mask = torch.zeros((total, total), dtype=torch.bool, device=tgt.device)  # [Q + Q2, Q + Q2]
            self_attn_mask[:first, first:] = True  # the one-to-one queries never see the one-to-many ones
            self_attn_mask[first:, :first] = True  # and the other way round (as H-DETR)
        if denoise is not None:
            if not self.two_stage:
                raise ValueError("denoising queries need a two-stage model")
            dn_query_pos, dn_tgt = self._box_queries(inverse_sigmoid(denoise.boxes), memory.dtype)  # [B, N, C] each
            self_attn_mask = denoise.extend_self_attn_mask(self_attn_mask, tgt.shape[1])  # [Q + N, Q + N]
            query_pos = torch.cat([query_pos, dn_query_pos], 1)  # [B, Q + N, C]
            tgt = torch.cat([tgt, dn_tgt + denoise.content.to(dn_tgt.dtype)], 1)  # [B, Q + N, C]
            reference_points = torch.cat([reference_points, denoise.boxes.to(reference_points.dtype)], 1)  # [B, Q + N, 4]
            init_reference = reference_points
        hs, inter_references = self.decoder(tgt, reference_points, memory, geometry, valid_ratios, query_pos, attn_mask,
                                            self_attn_mask)
        return hs, init_reference, inter_references, enc_class, enc_coord_unact
