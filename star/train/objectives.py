"""ST-AR's training objective (docs/st-ar.md), one function per term:

    L = L_AR + alpha * L_MIM + beta * (L_step + L_view) / 2                         `total_loss`

    L_AR    next-token cross-entropy of the student, through the masked pass         GPT.forward(targets=...)
    mask    a share of image key positions hidden from every query                   `key_mask`
    L_MIM   cosine distance of student and EMA-teacher final normed states           `cosine_distance`
    L_step  InfoNCE: a position against another position of the same view            `step_loss`
    L_view  InfoNCE: a position against the matching position of the other view      `view_loss`
    teacher an EMA copy of the student, in eval mode                                 `make_teacher`, `update_teacher`

`micro_batch_losses` computes every term of one micro-batch from the student's and the teacher's named
features; the trainer (star/train/loop.py) does the rest of a step. Sequence layout: position 0 is the class,
position s >= 1 holds image token s - 1 as input; contrastive positions are drawn among s = 1 .. S - 1.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from star.train.distributed import local_shards
from star.train.star_settings import StarSettings

LOSS_TERMS = ("loss_ar", "loss_mim", "loss_step", "loss_view")


def total_loss(settings: StarSettings, terms: dict) -> torch.Tensor:
    contrastive = (terms["loss_step"] + terms["loss_view"]) / 2
    return terms["loss_ar"] + settings.mim_weight * terms["loss_mim"] + settings.contrastive_weight * contrastive


# ----------------------------------------------------------------------------------------------------------
# What each pass sees


def drop_class_labels(labels: torch.Tensor, prob: float, null_class: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by `null_class` independently with probability `prob` (LlamaGen's class dropout). Once
    per image, so every view of it, the student and the teacher all see the same label."""
    if prob <= 0.0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < prob  # [B]
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def key_mask(batch: int, seq_len: int, ratio: float, generator: torch.Generator | None = None,
             device=None, cls_token_num: int = 1) -> torch.Tensor:
    """Causal boolean attention mask [B, 1, S, S] (True = attend) with round(ratio * (S - cls)) image key
    positions per sequence hidden from every query. Class positions and the diagonal are never hidden, so no row
    is empty; the mask is shared across layers and heads. Boolean is the form SDPA takes without a per-layer
    conversion (an additive float mask would be cast to the compute dtype in every layer)."""
    num_image = seq_len - cls_token_num
    num_hidden = int(round(ratio * num_image))
    scores = torch.rand(batch, num_image, generator=generator, device=device)  # [B, S - cls]
    visible_columns = torch.ones(batch, 1, 1, seq_len, dtype=torch.bool, device=device)  # [B, 1, 1, S]
    if num_hidden > 0:
        chosen = scores.topk(num_hidden, dim=1).indices + cls_token_num  # [B, hidden]
        visible_columns.view(batch, seq_len).scatter_(1, chosen, False)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()  # [S, S]
    diagonal = torch.eye(seq_len, dtype=torch.bool, device=device)
    return causal & (visible_columns | diagonal)  # [B, 1, S, S]


def sample_positions(batch: int, seq_len: int, count: int, generator: torch.Generator | None, device,
                     cls_token_num: int = 1) -> torch.Tensor:
    """K distinct image positions per row: [batch, K] in cls .. S - 1."""
    scores = torch.rand(batch, seq_len - cls_token_num, generator=generator, device=device)
    return scores.topk(count, dim=1).indices + cls_token_num


def gather_positions(features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """features [N, S, D], positions [N, K] -> [N, K, D]."""
    return features.gather(1, positions[..., None].expand(-1, -1, features.shape[-1]))


# ----------------------------------------------------------------------------------------------------------
# The terms


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def info_nce(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
             valid: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE over a batch: row b's positive is teacher[b], negatives are the other rows' teacher features.

    student, teacher: [..., B, D]; leading dims are independent problems. valid: [..., B] rows to score
    (invalid rows still serve as negatives). Cosine similarity / temperature.
    """
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    logits = s @ t.transpose(-1, -2) / temperature  # [..., B, B]
    targets = torch.arange(logits.shape[-1], device=logits.device).expand(logits.shape[:-1])
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    if valid is None:
        return losses.mean()
    weights = valid.reshape(-1).float()
    return (losses * weights).sum() / weights.sum().clamp_min(1.0)


def step_loss(student_proj: torch.Tensor, teacher_feat: torch.Tensor, temperature: float) -> torch.Tensor:
    """L_step. student_proj, teacher_feat: [B, M, K, D] at the same sampled positions. For each view m and
    ordered pair i != j: positive = teacher (same image, same view, position j); negatives = other images."""
    B, M, K, D = student_proj.shape
    s = student_proj.permute(1, 2, 0, 3)[:, :, None].expand(M, K, K, B, D)  # [M, i, j, B, D]
    t = teacher_feat.permute(1, 2, 0, 3)[:, None, :].expand(M, K, K, B, D)
    off_diagonal = ~torch.eye(K, dtype=torch.bool, device=student_proj.device)
    return info_nce(s[:, off_diagonal], t[:, off_diagonal], temperature)  # [M, K(K-1), B, D]


def view_loss(student_proj: torch.Tensor, teacher_other: torch.Tensor, valid: torch.Tensor,
              temperature: float) -> torch.Tensor:
    """L_view. student_proj [B, M, K, D] at view m's positions; teacher_other [B, M, K, D] = teacher features of
    view (m+1) % M at the matching positions; valid [B, M, K] where a match exists."""
    s = student_proj.permute(1, 2, 0, 3)  # [M, K, B, D]
    t = teacher_other.permute(1, 2, 0, 3)
    return info_nce(s, t, temperature, valid.permute(1, 2, 0))


@dataclass
class Features:
    """What one network contributes to the self-guided terms, shaped [B, M, ...] (B images, M views)."""

    final: torch.Tensor  # [B, M, S, D] final normed states (L_MIM)
    middle: torch.Tensor | None = None  # [B, M, S, D] states after the contrastive layer (teacher)
    projected: torch.Tensor | None = None  # [B, M, K, D] the student's projected middle states at `positions`


def star_losses(settings: StarSettings, student: Features, teacher: Features, positions: torch.Tensor | None,
                view_match: torch.Tensor, cls_token_num: int = 1) -> dict:
    """L_MIM, L_step and L_view of one micro-batch. positions [B * M, K]: the sampled contrastive positions;
    view_match [B, M, T]: the token of view (m+1) % M matching token t of view m, or -1."""
    B, M, S, D = student.final.shape
    zero = student.final.new_zeros(())
    terms = {"loss_mim": zero, "loss_step": zero, "loss_view": zero}
    if settings.use_mim:
        terms["loss_mim"] = cosine_distance(student.final, teacher.final)
    if student.projected is None:
        return terms
    teacher_here = gather_positions(teacher.middle.reshape(B * M, S, D), positions).reshape(B, M, -1, D)
    if settings.use_step:
        terms["loss_step"] = step_loss(student.projected, teacher_here, settings.contrastive_temperature)
    if settings.use_view and M > 1:
        token_index = positions.reshape(B, M, -1) - cls_token_num  # [B, M, K] image-token index in view m
        matched = view_match.gather(2, token_index)  # [B, M, K] token index in view (m+1) % M
        # The last token of a grid is never an input position, so it has no hidden state: treat as no match.
        valid = (matched >= 0) & (matched < S - cls_token_num)
        other_positions = matched.clamp(0, S - 1 - cls_token_num) + cls_token_num
        other_view = torch.roll(teacher.middle, shifts=-1, dims=1)  # [B, M, S, D]: view (m+1) % M at slot m
        teacher_other = gather_positions(other_view.reshape(B * M, S, D), other_positions.reshape(B * M, -1))
        terms["loss_view"] = view_loss(student.projected, teacher_other.reshape(B, M, -1, D), valid,
                                       settings.contrastive_temperature)
    return terms


# ----------------------------------------------------------------------------------------------------------
# One micro-batch


def micro_batch_losses(batch, student, teacher, settings: StarSettings | None, model_config, generator) -> dict:
    """Every loss term of one micro-batch, and their total under "loss".

    batch: a TokenBatch (tokens [B, M, T], labels [B], view_match); student: the StudentWithProjector the
    optimizer trains (wrapped by DDP/FSDP); teacher: the EMA teacher's forward; settings None: plain LlamaGen.
    The generator's draws, in order: class dropout, the mask, the contrastive positions.
    """
    tokens = batch.tokens  # [B, M, T]
    B, M, T = tokens.shape
    cls = model_config.cls_token_num
    S = cls + T - 1
    labels = drop_class_labels(batch.labels, model_config.class_dropout_prob, model_config.null_class, generator)
    flat_tokens = tokens.reshape(B * M, T)
    flat_labels = labels.repeat_interleave(M)  # [B M]
    star = settings is not None
    mask, layer, positions = None, None, None
    if star and settings.use_mim:
        mask = key_mask(B * M, S, settings.mask_ratio, generator, tokens.device, cls_token_num=cls)  # bool, once
    if star and (settings.use_step or settings.use_view):
        layer = settings.contrastive_layer
        positions = sample_positions(B * M, S, settings.num_positions, generator, tokens.device, cls)  # [B M, K]
    # targets: the chunked head computes the next-token loss without materialising [N, S, V] logits
    output, projected = student(flat_tokens[:, :-1], flat_labels, attn_mask=mask, layer=layer, positions=positions,
                                return_final_hidden=star, targets=flat_tokens)
    terms = {"loss_ar": output.loss}
    if not star:
        zero = terms["loss_ar"].new_zeros(())
        return {**terms, "loss_mim": zero, "loss_step": zero, "loss_view": zero, "loss": terms["loss_ar"]}
    with torch.no_grad():  # the teacher needs hidden states only: no LM head
        teacher_out = teacher(flat_tokens[:, :-1], flat_labels, return_layers=(layer,) if layer else (),
                              return_final_hidden=True, head=False)
    shape = (B, M, S, -1)
    student_features = Features(output.final_hidden.reshape(shape), projected=None if projected is None else
                                projected.reshape(B, M, -1, projected.shape[-1]))
    teacher_features = Features(teacher_out.final_hidden.reshape(shape),
                                middle=teacher_out.hidden[layer].reshape(shape) if layer else None)
    terms.update(star_losses(settings, student_features, teacher_features, positions, batch.view_match, cls))
    terms["loss"] = total_loss(settings, terms)
    return terms


# ----------------------------------------------------------------------------------------------------------
# The networks around the GPT


class Projector(nn.Module):
    """Student-only MLP (SimSiam-style, LayerNorm instead of BatchNorm so it needs no cross-rank sync): D -> D."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class StudentWithProjector(nn.Module):
    """The trainable part as one module, so DDP/FSDP see a single forward: the GPT pass, plus the projector on
    the contrastive layer's states at the sampled positions."""

    def __init__(self, student: nn.Module, projector: nn.Module | None):
        super().__init__()
        self.student = student
        self.projector = projector

    def forward(self, tokens, labels, attn_mask=None, layer: int | None = None, positions=None,
                return_final_hidden: bool = False, targets=None):
        """targets: the full token sequence [N, T]; the next-token loss is then computed inside the model's
        forward by the chunked head (output.loss, no logits), so DDP/FSDP/compile see it as part of the pass."""
        output = self.student(tokens, labels, attn_mask=attn_mask, return_layers=(layer,) if layer else (),
                              return_final_hidden=return_final_hidden, targets=targets)
        projected = None
        if self.projector is not None and layer:
            projected = self.projector(gather_positions(output.hidden[layer], positions))  # [N, K, D]
        return output, projected


def make_teacher(student: nn.Module) -> nn.Module:
    """The EMA teacher at step 0: a copy of the student, in eval mode (no dropout), never trained."""
    teacher = copy.deepcopy(student).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher = decay * teacher + (1 - decay) * student, parameter by parameter; under FSDP2 each rank updates its
    own shard of the teacher from its own shard of the student (the same rows: see distributed.shard_teacher_like)."""
    teacher_params, student_params = local_shards(teacher, student)
    torch._foreach_lerp_(teacher_params, [p.to(teacher_params[0].dtype) for p in student_params], 1.0 - decay)
