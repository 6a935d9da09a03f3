"""ST-AR's training objective (docs/st-ar.md), one function per term:

    L = L_AR + alpha * L_MIM + beta * (L_step + L_view) / 2                         `total_loss`

    L_AR    next-token cross-entropy of the student, through the masked pass         GPT.forward(targets=...)
    mask    a share of image key positions hidden from every query                   `mask_from_scores`
    L_MIM   cosine distance of student and EMA-teacher final normed states           `cosine_distance`
    L_step  InfoNCE: a position against another position of the same view            `step_loss`
    L_view  InfoNCE: a position against the matching position of the other view      `view_loss`
    teacher an EMA copy of the student, in eval mode                                 `make_teacher`, `update_teacher`
    draws   class dropout, the mask and the positions of a whole global batch        `draw_step`
    pool    the images an InfoNCE row is scored against (positives and negatives)    `global_pools`, `local_pool`

A step's draws depend on the seed and the step only, per global image, and with `--negatives global` (the
default) the InfoNCE negatives are the teacher's features of the whole global batch, gathered from every process
and micro-batch: the same command is the same method on 1 process or 64, with or without accumulation.
`teacher_targets` runs the teacher over a micro-batch, `micro_batch_losses` computes every term of one
micro-batch; the trainer (star/train/loop.py) does the rest of a step. Sequence layout: position 0 is the class,
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
from star.train.token_loader import first_global_row

LOSS_TERMS = ("loss_ar", "loss_mim", "loss_step", "loss_view")


def total_loss(star_settings: StarSettings, terms: dict, weight_scale: float = 1.0) -> torch.Tensor:
    """weight_scale: the factor on alpha and beta at this step (--star-warmup-steps ramps it from 0 to 1)."""
    contrastive = (terms["loss_step"] + terms["loss_view"]) / 2
    alpha, beta = weight_scale * star_settings.mim_weight, weight_scale * star_settings.contrastive_weight
    return terms["loss_ar"] + alpha * terms["loss_mim"] + beta * contrastive


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


def mask_from_scores(scores: torch.Tensor, seq_len: int, ratio: float, cls_token_num: int = 1) -> torch.Tensor:
    """Causal boolean attention mask [N, 1, S, S] (True = attend) hiding, per sequence, the round(ratio * (S - cls))
    image key positions with the highest `scores` [N, S - cls] from every query. Class positions and the diagonal
    are never hidden, so no row is empty; the mask is shared across layers and heads. Boolean is the form SDPA
    takes without a per-layer conversion (an additive float mask would be cast to the compute dtype in every
    layer)."""
    batch, device = scores.shape[0], scores.device
    num_hidden = int(round(ratio * (seq_len - cls_token_num)))
    visible_columns = torch.ones(batch, 1, 1, seq_len, dtype=torch.bool, device=device)  # [N, 1, 1, S]
    if num_hidden > 0:
        chosen = scores.topk(num_hidden, dim=1).indices + cls_token_num  # [N, hidden]
        visible_columns.view(batch, seq_len).scatter_(1, chosen, False)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()  # [S, S]
    diagonal = torch.eye(seq_len, dtype=torch.bool, device=device)
    return causal & (visible_columns | diagonal)  # [N, 1, S, S]


def key_mask(batch: int, seq_len: int, ratio: float, generator: torch.Generator | None = None,
             device=None, cls_token_num: int = 1) -> torch.Tensor:
    """`mask_from_scores` of a fresh draw: [B, 1, S, S]."""
    scores = torch.rand(batch, seq_len - cls_token_num, generator=generator, device=device)  # [B, S - cls]
    return mask_from_scores(scores, seq_len, ratio, cls_token_num)


def positions_from_scores(scores: torch.Tensor, count: int, cls_token_num: int = 1) -> torch.Tensor:
    """The `count` image positions with the highest scores [..., S - cls]: [..., count] in cls .. S - 1."""
    return scores.topk(count, dim=-1).indices + cls_token_num


def sample_positions(batch: int, seq_len: int, count: int, generator: torch.Generator | None, device,
                     cls_token_num: int = 1) -> torch.Tensor:
    """K distinct image positions per row: [batch, K] in cls .. S - 1."""
    scores = torch.rand(batch, seq_len - cls_token_num, generator=generator, device=device)
    return positions_from_scores(scores, count, cls_token_num)


def gather_positions(features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """features [N, S, D], positions [N, K] -> [N, K, D]."""
    return features.gather(1, positions[..., None].expand(-1, -1, features.shape[-1]))


def at_positions(features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """features [B, M, S, D], positions [B, M, K] -> [B, M, K, D]."""
    return features.gather(2, positions[..., None].expand(-1, -1, -1, features.shape[-1]))


# ----------------------------------------------------------------------------------------------------------
# Every random draw of one optimizer step


@dataclass
class StepDraws:
    """The random choices of one optimizer step's class dropout and self-guided terms, for its whole global batch
    (rows in global image order: star.train.token_loader.first_global_row). `draw_step` draws them from one
    generator seeded by the seed and the step, so neither the process count nor the accumulation split changes
    what any image gets, and resume repeats them. A micro-batch takes its rows with `rows`."""

    drop_label: torch.Tensor | None  # [G] bool: the label is replaced by the null class; None: no class dropout
    mask_scores: torch.Tensor | None  # [G, M, S - cls] the MIM key mask's draw; None without L_MIM
    positions: torch.Tensor | None  # [G, M, K] contrastive positions in cls .. S - 1; None without L_step / L_view

    def rows(self, start: int, count: int) -> StepDraws:
        return StepDraws(*(None if draw is None else draw[start : start + count]
                           for draw in (self.drop_label, self.mask_scores, self.positions)))


def draw_step(images: int, views: int, model_config, star_settings: StarSettings | None, generator: torch.Generator,
              device) -> StepDraws:
    """The draws of a global batch of `images` images with `views` views each, in this order: class dropout [G],
    the MIM mask's scores [G M, S - cls], the contrastive positions' scores [G M, S - cls] (each only when used).
    One process without accumulation gets what per-batch calls of drop_class_labels, key_mask and sample_positions
    on this generator would draw."""
    image_positions = model_config.block_size - 1  # S - cls: the positions holding an image token as input
    drop = None
    if model_config.class_dropout_prob > 0:
        drop = torch.rand(images, generator=generator, device=device) < model_config.class_dropout_prob  # [G]
    mask_scores, positions = None, None
    if star_settings is not None and star_settings.use_mim:
        mask_scores = torch.rand(images * views, image_positions, generator=generator, device=device)
        mask_scores = mask_scores.reshape(images, views, image_positions)
    if star_settings is not None and (star_settings.use_step or star_settings.use_view):
        scores = torch.rand(images * views, image_positions, generator=generator, device=device)
        positions = positions_from_scores(scores, star_settings.num_positions, model_config.cls_token_num)
        positions = positions.reshape(images, views, -1)  # [G, M, K]
    return StepDraws(drop, mask_scores, positions)


def conditioning_labels(labels: torch.Tensor, draws: StepDraws, null_class: int) -> torch.Tensor:
    """The labels [B] both networks see: class dropout applied once per image (every view, student and teacher)."""
    if draws.drop_label is None:
        return labels
    return torch.where(draws.drop_label, torch.full_like(labels, null_class), labels)


# ----------------------------------------------------------------------------------------------------------
# The terms


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def contrastive_logits(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cosine similarity / temperature of every student row [..., b, D] with every teacher row [..., G, D]:
    [..., b, G] in float32 (leading dims broadcast)."""
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    return s @ t.transpose(-1, -2) / temperature


def info_nce_of_logits(logits: torch.Tensor, first_row: int = 0, valid: torch.Tensor | None = None,
                       exclude: torch.Tensor | None = None, denominator=None) -> torch.Tensor:
    """InfoNCE from logits [..., b, G]: row r's positive is column first_row + r, every other column a negative,
    except the columns `exclude` [b, G] marks (another copy of the row's image: never its own negative).
    valid [..., b]: the rows scored (an unscored row's column still serves as a negative). Returns the scored rows'
    summed loss over `denominator` (default: their count)."""
    rows = logits.shape[-2]
    targets = torch.arange(first_row, first_row + rows, device=logits.device).expand(logits.shape[:-1])
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    if valid is None:
        return losses.sum() / (losses.numel() if denominator is None else denominator)
    valid = valid.reshape(-1)
    scored = torch.where(valid, losses, torch.zeros_like(losses)).sum()
    return scored / (valid.sum().clamp_min(1) if denominator is None else denominator)


def info_nce(student: torch.Tensor, teacher: torch.Tensor, temperature: float, valid: torch.Tensor | None = None,
             first_row: int = 0, exclude: torch.Tensor | None = None, denominator=None) -> torch.Tensor:
    """InfoNCE of student rows [..., b, D] against teacher rows [..., G, D] (cosine / temperature): row r's positive
    is teacher row first_row + r, the other rows are its negatives (see `info_nce_of_logits`)."""
    return info_nce_of_logits(contrastive_logits(student, teacher, temperature), first_row, valid, exclude,
                              denominator)


@dataclass
class TeacherTargets:
    """The teacher's side of one micro-batch (no gradient), from `teacher_targets`."""

    final: torch.Tensor  # [b, M, S, D] final normed states (L_MIM)
    here: torch.Tensor | None = None  # [b, M, K, D] states after the contrastive layer at view m's positions (L_step)
    other: torch.Tensor | None = None  # [b, M, K, D] the same states of view (m+1) % M at the matching positions
    valid: torch.Tensor | None = None  # [b, M, K] bool: view m's position has a match in view (m+1) % M (L_view)


@dataclass
class NegativePool:
    """Every image a micro-batch's InfoNCE rows are scored against (their positives and their negatives): the
    teacher's features at the sampled positions, with the images' ids. `--negatives global`: the optimizer step's
    whole global batch, gathered from every process and micro-batch, in global image order (`global_pools`), so
    the loss does not depend on how the batch is split; `local`: the micro-batch alone (`local_pool`). The
    micro-batch's own images are rows first_row .. first_row + b."""

    image_ids: torch.Tensor  # [G] TokenBatch.indices: which image each row is
    here: torch.Tensor | None = None  # [G, M, K, D] TeacherTargets.here of every image
    other: torch.Tensor | None = None  # [G, M, K, D] TeacherTargets.other
    valid: torch.Tensor | None = None  # [G, M, K] TeacherTargets.valid
    first_row: int = 0
    shares: int = 1  # micro-batches (on all processes) scored against this pool; their mean loss is the pool's

    def exclusions(self, rows: int) -> torch.Tensor:
        """[rows, G]: True where a column holds the image of one of the micro-batch's rows again, other than that
        row's own column (a batch may hold an image twice): neither its positive nor a negative."""
        own = self.image_ids[self.first_row : self.first_row + rows]
        same = own[:, None] == self.image_ids[None, :]  # [rows, G]
        same[torch.arange(rows, device=same.device), torch.arange(self.first_row, self.first_row + rows)] = False
        return same


def step_loss(student_proj: torch.Tensor, pool: NegativePool, temperature: float) -> torch.Tensor:
    """L_step. student_proj [b, M, K, D]: the micro-batch's projected states at its sampled positions; pool.here
    [G, M, K, D]: the teacher's at the same positions, for every image of the pool. For each view m and ordered pair
    i != j: row (b, m, i)'s positive is the teacher's (b, m, j), its negatives the other images' (., m, j)."""
    rows, _, K, _ = student_proj.shape
    s = student_proj.permute(1, 2, 0, 3)[:, :, None]  # [M, K (i), 1, b, D]
    t = pool.here.permute(1, 2, 0, 3)[:, None]  # [M, 1, K (j), G, D]
    off_diagonal = ~torch.eye(K, dtype=torch.bool, device=student_proj.device)
    logits = contrastive_logits(s, t, temperature)[:, off_diagonal]  # [M, K(K-1), b, G]
    return info_nce_of_logits(logits, pool.first_row, exclude=pool.exclusions(rows))


def view_loss(student_proj: torch.Tensor, pool: NegativePool, temperature: float) -> torch.Tensor:
    """L_view. student_proj [b, M, K, D] at view m's positions; pool.other [G, M, K, D]: the teacher's features of
    view (m+1) % M at the matching positions, scored where pool.valid. The denominator is the pool's count of
    valid rows over its shares, so the mean over the micro-batches sharing a pool is the pool's mean."""
    rows = student_proj.shape[0]
    s = student_proj.permute(1, 2, 0, 3)  # [M, K, b, D]
    t = pool.other.permute(1, 2, 0, 3)  # [M, K, G, D]
    valid = pool.valid[pool.first_row : pool.first_row + rows].permute(1, 2, 0)  # [M, K, b]
    denominator = pool.valid.sum().clamp_min(1) / pool.shares
    return info_nce(s, t, temperature, valid, pool.first_row, pool.exclusions(rows), denominator)


# ----------------------------------------------------------------------------------------------------------
# The teacher's targets and the negatives


def matching_in_next_view(middle: torch.Tensor, positions: torch.Tensor, view_match: torch.Tensor,
                          cls_token_num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """middle [B, M, S, D], positions [B, M, K], view_match [B, M, T] -> (the states of view (m+1) % M at the
    positions matching view m's [B, M, K, D], valid [B, M, K] where a match exists)."""
    S = middle.shape[2]
    token_index = positions - cls_token_num  # [B, M, K] image-token index in view m
    matched = view_match.gather(2, token_index)  # [B, M, K] token index in view (m+1) % M
    # The last token of a grid is never an input position, so it has no hidden state: treat as no match.
    valid = (matched >= 0) & (matched < S - cls_token_num)
    other_positions = matched.clamp(0, S - 1 - cls_token_num) + cls_token_num
    other_view = torch.roll(middle, shifts=-1, dims=1)  # [B, M, S, D]: view (m+1) % M at slot m
    return at_positions(other_view, other_positions), valid


@torch.no_grad()
def teacher_targets(batch, teacher, star_settings: StarSettings, model_config, draws: StepDraws) -> TeacherTargets:
    """The teacher's pass over one micro-batch (plain causal attention, no LM head) and its features where the terms
    need them. draws: the micro-batch's rows of the step's draws."""
    tokens = batch.tokens  # [B, M, T]
    B, M, T = tokens.shape
    cls = model_config.cls_token_num
    S = cls + T - 1
    labels = conditioning_labels(batch.labels, draws, model_config.null_class).repeat_interleave(M)  # [B M]
    layer = star_settings.contrastive_layer if draws.positions is not None else None
    output = teacher(tokens.reshape(B * M, T)[:, :-1], labels, return_layers=(layer,) if layer else (),
                     return_final_hidden=True, head=False)
    final = output.final_hidden.reshape(B, M, S, -1)
    if not layer:  # no contrastive layer (0 or None): L_MIM only, as on the student's side
        return TeacherTargets(final)
    middle = output.hidden[layer].reshape(B, M, S, -1)
    here = at_positions(middle, draws.positions) if star_settings.use_step else None
    other, valid = None, None
    if star_settings.use_view and M > 1:
        other, valid = matching_in_next_view(middle, draws.positions, batch.view_match, cls)
    return TeacherTargets(final, here, other, valid)


def local_pool(targets: TeacherTargets, image_ids: torch.Tensor) -> NegativePool:
    """`--negatives local`: a micro-batch scored against its own images only."""
    return NegativePool(image_ids, targets.here, targets.other, targets.valid)


def global_pools(targets: list[TeacherTargets], image_ids: list[torch.Tensor], gather, world: int,
                 rank: int) -> list[NegativePool]:
    """`--negatives global`: one pool per micro-batch of this process, all holding the step's whole global batch.
    targets, image_ids: this process's micro-batches in order; gather: concatenates a dict of tensors over the
    processes in rank order (Accelerator.gather). The teacher features carry no gradient, so gathering them is
    enough: each process scores its own rows, and the mean over processes and micro-batches is the global loss."""
    micro_batches, rows = len(targets), len(image_ids[0])
    local = {"image_ids": torch.cat(image_ids)}  # [A b]
    for name in ("here", "other", "valid"):
        if getattr(targets[0], name) is not None:
            parts = torch.cat([getattr(part, name) for part in targets])  # [A b, ...]
            # float32 features and uint8 flags: every backend gathers those (gloo has no bool)
            local[name] = parts.to(torch.uint8) if parts.dtype == torch.bool else parts.float()
    gathered = gather(local)  # [W A b, ...], process-major

    def global_order(part: torch.Tensor) -> torch.Tensor:  # process-major -> the loader's micro-batch-major order
        rest = part.shape[1:]
        return part.reshape(world, micro_batches, rows, *rest).transpose(0, 1).reshape(-1, *rest)

    pool = {name: global_order(part) for name, part in gathered.items()}
    if "valid" in pool:
        pool["valid"] = pool["valid"].bool()
    return [NegativePool(**pool, first_row=first_global_row(micro, rank, world, rows), shares=world * micro_batches)
            for micro in range(micro_batches)]


# ----------------------------------------------------------------------------------------------------------
# One micro-batch


@dataclass
class Features:
    """What the student contributes to the self-guided terms, shaped [B, M, ...] (B images, M views)."""

    final: torch.Tensor  # [B, M, S, D] final normed states (L_MIM)
    projected: torch.Tensor | None = None  # [B, M, K, D] the projected middle states at the sampled positions


def star_losses(star_settings: StarSettings, student: Features, teacher: TeacherTargets, pool: NegativePool) -> dict:
    """L_MIM, L_step and L_view of one micro-batch: the student's features against the teacher's targets for its own
    images (L_MIM) and against the pool (the contrastive terms' positives and negatives)."""
    zero = student.final.new_zeros(())
    terms = {"loss_mim": zero, "loss_step": zero, "loss_view": zero}
    if star_settings.use_mim:
        terms["loss_mim"] = cosine_distance(student.final, teacher.final)
    if student.projected is None:
        return terms
    if star_settings.use_step:
        terms["loss_step"] = step_loss(student.projected, pool, star_settings.contrastive_temperature)
    if pool.other is not None:
        terms["loss_view"] = view_loss(student.projected, pool, star_settings.contrastive_temperature)
    return terms


def micro_batch_losses(batch, trainable, star_settings: StarSettings | None, model_config, draws: StepDraws,
                       teacher: TeacherTargets | None = None, pool: NegativePool | None = None,
                       weight_scale: float = 1.0) -> dict:
    """Every loss term of one micro-batch, and their total under "loss".

    batch: a TokenBatch (tokens [B, M, T], labels [B], view_match, indices); trainable: the StudentWithProjector the
    optimizer trains (wrapped by DDP/FSDP); star_settings None: plain LlamaGen; draws: the micro-batch's rows of the
    step's draws; teacher, pool: its teacher targets and negatives (ST-AR only). star_settings without teacher
    targets: a next-token step of an ST-AR run (--star-every), unmasked, the self-guided terms 0 (the projector still
    runs at the drawn positions, times 0, so DDP sees every parameter used). weight_scale: the factor on alpha, beta.
    """
    tokens = batch.tokens  # [B, M, T]
    B, M, T = tokens.shape
    cls = model_config.cls_token_num
    S = cls + T - 1
    flat_tokens = tokens.reshape(B * M, T)
    flat_labels = conditioning_labels(batch.labels, draws, model_config.null_class).repeat_interleave(M)  # [B M]
    self_guided = star_settings is not None and teacher is not None
    mask, positions, layer = None, None, None
    if self_guided and draws.mask_scores is not None:
        mask = mask_from_scores(draws.mask_scores.reshape(B * M, -1), S, star_settings.mask_ratio, cls)  # bool, once
    if star_settings is not None and draws.positions is not None:
        positions, layer = draws.positions.reshape(B * M, -1), star_settings.contrastive_layer  # [B M, K]
    # targets: the chunked head computes the next-token loss without materialising [N, S, V] logits
    output, projected = trainable(flat_tokens[:, :-1], flat_labels, attn_mask=mask, layer=layer, positions=positions,
                                  return_final_hidden=self_guided, targets=flat_tokens)
    terms = {"loss_ar": output.loss}
    if not self_guided:
        zero = terms["loss_ar"].new_zeros(())
        loss = terms["loss_ar"] if projected is None else terms["loss_ar"] + 0.0 * projected.sum()
        return {**terms, "loss_mim": zero, "loss_step": zero, "loss_view": zero, "loss": loss}
    student_features = Features(output.final_hidden.reshape(B, M, S, -1), projected=None if projected is None else
                                projected.reshape(B, M, -1, projected.shape[-1]))
    terms.update(star_losses(star_settings, student_features, teacher, pool))
    terms["loss"] = total_loss(star_settings, terms, weight_scale)
    return terms


def batch_losses(batch, trainable, teacher, star_settings: StarSettings | None, model_config,
                 generator: torch.Generator) -> dict:
    """Every term of one batch that is a whole optimizer step on one process (draws from `generator`, the batch's
    own images as negatives): what the trainer's step computes for one process without accumulation. For
    benchmarks and tests of a step's parts; trainable: the StudentWithProjector; teacher: the EMA teacher's forward
    (unused without ST-AR)."""
    draws = draw_step(batch.tokens.shape[0], batch.tokens.shape[1], model_config, star_settings, generator,
                      batch.tokens.device)
    if star_settings is None:
        return micro_batch_losses(batch, trainable, None, model_config, draws)
    targets = teacher_targets(batch, teacher, star_settings, model_config, draws)
    return micro_batch_losses(batch, trainable, star_settings, model_config, draws, targets,
                              local_pool(targets, batch.indices))


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
    """What the optimizer trains (`trainable` wherever it is held) as one module, so DDP/FSDP see a single forward:
    the student's pass (the bare GPT, `.student`), plus the projector on the contrastive layer's states at the sampled
    positions."""

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
