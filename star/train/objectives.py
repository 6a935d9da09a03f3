"""ST-AR's self-guided objectives (docs/st-ar.md): attention-mask MIM against an EMA teacher, and the
inter-step / inter-view InfoNCE losses on middle-layer features through a student-only projector.

Sequence layout: position 0 is the class, position s >= 1 holds image token s - 1 as input. Contrastive
positions are drawn among s = 1 .. S - 1 (the class position carries no image content).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from star.cli import check, setting


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


def key_mask_bias(batch: int, seq_len: int, ratio: float, generator: torch.Generator | None = None,
                  device=None, dtype=torch.float32, cls_token_num: int = 1) -> torch.Tensor:
    """`key_mask` as an additive float mask [B, 1, S, S] (0 = attend, -inf = hidden), same draw; for callers
    that add further biases. The trainer uses the boolean `key_mask`."""
    visible = key_mask(batch, seq_len, ratio, generator, device, cls_token_num)
    return torch.zeros(visible.shape, device=device, dtype=dtype).masked_fill(~visible, float("-inf"))


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


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


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


AUTO = "auto"
PAPER_TEACHER_DECAY = 0.9999
# The paper's EMA horizon 1 / (1 - 0.9999) = 10k steps over its ~250k-step runs (1.28M images x 50 epochs / 256):
# a horizon of 4% of the run. `--teacher-decay auto` keeps that ratio for any run length.
PAPER_HORIZON_FRACTION = 0.04


class TeacherDecay:
    """The type of --teacher-decay: a float in [0, 1], or 'auto' (calling it parses a flag or a library value)."""

    def __new__(cls, value: float | str) -> float | str:  # type: ignore[misc]
        if isinstance(value, str) and value.strip().lower() == AUTO:
            return AUTO
        return float(value)


def resolve_teacher_decay(decay: float | str, total_steps: int) -> float:
    """The EMA decay a run uses: a given number as is; 'auto' = 1 - 1 / (0.04 x total_steps), clamped to
    [0, 0.9999]: 0.9999 at the paper's 250k steps, 0.975 at 1k, 0.875 at 200 (the teacher follows the
    student within 4% of the run instead of staying at its random initialisation)."""
    if decay != AUTO:
        return float(decay)
    return min(PAPER_TEACHER_DECAY, max(0.0, 1.0 - 1.0 / (PAPER_HORIZON_FRACTION * max(total_steps, 1))))


@dataclass
class StarSettings:
    """ST-AR's self-guided losses (docs/st-ar.md). Flags of train/run.py; checked here for every caller."""

    mim_weight: float = setting(1.0, help="alpha, the weight of L_MIM")
    contrastive_weight: float = setting(0.5, help="beta, the weight of (L_step + L_view) / 2")
    mask_ratio: float = setting(0.25, help="fraction of image key positions hidden from every query for L_MIM, "
                                           "in [0, 1)")
    contrastive_layer: int = setting(0, help="block whose output feeds L_step / L_view; 0: the middle one")
    num_positions: int = setting(4, help="K sampled positions per sequence for the contrastive terms (>= 2 with "
                                         "L_step)")
    contrastive_temperature: float = setting(0.2, help="InfoNCE temperature of L_step and L_view (> 0)")
    teacher_decay: TeacherDecay = setting(PAPER_TEACHER_DECAY, metavar="DECAY",
                                          help="EMA decay of the teacher, in [0, 1], or 'auto': keep the paper's "
                                               "ratio of EMA horizon (1 / (1 - decay)) to run length, 4%%")
    use_mim: bool = setting(True, flag="mim", help="L_MIM, the masked-attention feature loss")
    use_step: bool = setting(True, flag="step", help="L_step, the inter-step contrastive loss")
    use_view: bool = setting(True, flag="view", help="L_view, the inter-view contrastive loss")

    def __post_init__(self) -> None:
        try:
            self.teacher_decay = TeacherDecay(self.teacher_decay)
        except (TypeError, ValueError):
            raise ValueError(f"--teacher-decay {self.teacher_decay!r}: give a number in [0, 1] or 'auto'") from None
        check(self.teacher_decay == AUTO or 0.0 <= self.teacher_decay <= 1.0,
              f"--teacher-decay {self.teacher_decay}: must be in [0, 1] or 'auto'")
        check(0.0 <= self.mask_ratio < 1.0, f"--mask-ratio {self.mask_ratio}: must be in [0, 1) (1 would hide every "
                                            "image key)")
        check(self.contrastive_temperature > 0 and math.isfinite(self.contrastive_temperature),
              f"--contrastive-temperature {self.contrastive_temperature}: must be a finite number > 0")
        check(self.mim_weight >= 0 and math.isfinite(self.mim_weight), f"--mim-weight {self.mim_weight}: must be >= 0")
        check(self.contrastive_weight >= 0 and math.isfinite(self.contrastive_weight),
              f"--contrastive-weight {self.contrastive_weight}: must be >= 0")
        check(self.contrastive_layer >= 0, f"--contrastive-layer {self.contrastive_layer}: must be >= 0 (0: middle)")
        check(self.num_positions >= (2 if self.use_step else 1),
              f"--num-positions {self.num_positions}: must be >= 1, and >= 2 with L_step (it contrasts pairs of "
              "positions; or pass --no-step)")

    @property
    def any(self) -> bool:
        return self.use_mim or self.use_step or self.use_view


def make_teacher(student: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(student).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 sharded this module (its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(parameter, DTensor) for parameter in module.parameters())


def shard_teacher_like(teacher: nn.Module, student: nn.Module, mp_policy=None) -> nn.Module:
    """FSDP2: shard the teacher as the student is sharded, in place. `fully_shard` splits every parameter on dim 0
    over the mesh, so with the student's mesh rank r holds the same rows of each teacher parameter as of the
    student's, and `update_teacher` works shard by shard without a gather. The teacher's FSDP units mirror the
    student's (each sharded submodule, by name, then the root); they decide when a forward gathers parameters,
    not which rows a rank holds. mp_policy: the student's MixedPrecisionPolicy (same compute dtype)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    meshes = {parameter.device_mesh for parameter in student.parameters() if isinstance(parameter, DTensor)}
    if len(meshes) != 1:
        raise ValueError(f"shard_teacher_like: the student's parameters must be FSDP2-sharded over one mesh, "
                         f"found {len(meshes)} meshes")
    options = {"mesh": meshes.pop(), "mp_policy": mp_policy or MixedPrecisionPolicy()}
    # reshard_after_forward everywhere, the root included: the teacher has no backward to reshard it, and a unit
    # left gathered holds plain full parameters (more memory, and no shards for update_teacher).
    options = {**options, "reshard_after_forward": True}
    units = [name for name, module in student.named_modules() if name and isinstance(module, FSDPModule)]
    for name in reversed(units):  # children before their parents, as fully_shard requires
        fully_shard(teacher.get_submodule(name), **options)
    fully_shard(teacher, **options)  # the root holds what no unit took (embeddings, final norm, head)
    return teacher


def _local_shards(teacher: nn.Module, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The teacher's and the student's parameters as local tensors (a DTensor's own shard: no communication),
    after checking that both hold the same parameters, sharded the same way."""
    from torch.distributed.tensor import DTensor

    teacher_named, student_named = list(teacher.named_parameters()), list(student.named_parameters())
    if [name for name, _ in teacher_named] != [name for name, _ in student_named]:
        raise ValueError("update_teacher: the teacher and the student hold different parameters")
    teacher_local, student_local = [], []
    for (name, t), (_, s) in zip(teacher_named, student_named):
        if isinstance(t, DTensor) != isinstance(s, DTensor) or (isinstance(t, DTensor) and (
                t.placements != s.placements or t.device_mesh != s.device_mesh or t.shape != s.shape)):
            raise ValueError(f"update_teacher: {name} is sharded differently in the teacher and the student; "
                             "shard the teacher with shard_teacher_like")
        teacher_local.append(t.to_local() if isinstance(t, DTensor) else t)
        student_local.append(s.detach().to_local() if isinstance(s, DTensor) else s.detach())
    return teacher_local, student_local


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher = decay * teacher + (1 - decay) * student, parameter by parameter; under FSDP2 each rank updates its
    own shard of the teacher from its own shard of the student (the same rows: see shard_teacher_like)."""
    teacher_params, student_params = _local_shards(teacher, student)
    torch._foreach_lerp_(teacher_params, [p.to(teacher_params[0].dtype) for p in student_params], 1.0 - decay)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's full state dict on the CPU, for safetensors loadable without FSDP. Sharded (FSDP2): a
    collective, every rank must call it; the shards are gathered one tensor at a time and only rank 0 keeps them
    (the other ranks get {}). Unsharded: the plain state dict."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def sample_positions(batch: int, seq_len: int, count: int, generator: torch.Generator | None, device,
                     cls_token_num: int = 1) -> torch.Tensor:
    """K distinct image positions per row: [batch, K] in cls .. S - 1."""
    scores = torch.rand(batch, seq_len - cls_token_num, generator=generator, device=device)
    return scores.topk(count, dim=1).indices + cls_token_num


def gather_positions(features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """features [N, S, D], positions [N, K] -> [N, K, D]."""
    return features.gather(1, positions[..., None].expand(-1, -1, features.shape[-1]))


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


class StudentWithProjector(nn.Module):
    """The trainable part as one module, so DDP/FSDP see a single forward: the GPT pass, plus the projector on
    the contrastive layer's states at the sampled positions."""

    def __init__(self, student: nn.Module, projector: nn.Module | None):
        super().__init__()
        self.student = student
        self.projector = projector

    def forward(self, tokens, labels, attn_bias=None, layer: int | None = None, positions=None,
                return_final_hidden: bool = False, targets=None):
        """targets: the full token sequence [N, T]; the next-token loss is then computed inside the model's
        forward by the chunked head (output.loss, no logits), so DDP/FSDP/compile see it as part of the pass."""
        output = self.student(tokens, labels, attn_bias=attn_bias, return_layers=(layer,) if layer else (),
                              return_final_hidden=return_final_hidden, targets=targets)
        projected = None
        if self.projector is not None and layer:
            projected = self.projector(gather_positions(output.hidden[layer], positions))  # [N, K, D]
        return output, projected


def star_losses(settings: StarSettings, student_final: torch.Tensor, student_proj: torch.Tensor | None,
                positions: torch.Tensor | None, teacher_final: torch.Tensor, teacher_mid: torch.Tensor | None,
                view_match: torch.Tensor, cls_token_num: int = 1) -> dict:
    """The self-guided terms for one batch.

    student_final, teacher_final: [B, M, S, D] final normed states; student_proj: [B, M, K, D] projected student
    states after the contrastive layer at `positions` [B * M, K]; teacher_mid: [B, M, S, D] teacher states after
    that layer; view_match [B, M, T]: token of view (m+1) % M matching token t of view m, or -1.
    """
    B, M, S, D = student_final.shape
    zero = student_final.new_zeros(())
    terms = {"loss_mim": zero, "loss_step": zero, "loss_view": zero}
    if settings.use_mim:
        terms["loss_mim"] = cosine_distance(student_final, teacher_final)
    if student_proj is None:
        return terms
    teacher_here = gather_positions(teacher_mid.reshape(B * M, S, D), positions).reshape(B, M, -1, D)
    if settings.use_step:
        terms["loss_step"] = step_loss(student_proj, teacher_here, settings.contrastive_temperature)
    if settings.use_view and M > 1:
        token_index = positions.reshape(B, M, -1) - cls_token_num  # [B, M, K] image-token index in view m
        matched = view_match.gather(2, token_index)  # [B, M, K] token index in view (m+1) % M
        # The last token of a grid is never an input position, so it has no hidden state: treat as no match.
        valid = (matched >= 0) & (matched < S - cls_token_num)
        other_positions = matched.clamp(0, S - 1 - cls_token_num) + cls_token_num
        other_view = torch.roll(teacher_mid, shifts=-1, dims=1)  # [B, M, S, D]: view (m+1) % M at slot m
        teacher_other = gather_positions(other_view.reshape(B * M, S, D), other_positions.reshape(B * M, -1))
        terms["loss_view"] = view_loss(student_proj, teacher_other.reshape(B, M, -1, D), valid, settings.contrastive_temperature)
    return terms


def total_loss(settings: StarSettings, terms: dict) -> torch.Tensor:
    contrastive = (terms["loss_step"] + terms["loss_view"]) / 2
    return terms["loss_ar"] + settings.mim_weight * terms["loss_mim"] + settings.contrastive_weight * contrastive


class NonFiniteGuard:
    """Watches the loss terms for NaN/inf without a host-device sync per step.

    `record` runs every step and only queues device ops (a running flag per term, the first bad step and its
    values); `failure` reads the flags (one sync, plus one collective when `reduce_sum` is given) and is called
    at log steps and before every checkpoint, so a checkpoint is never written after a non-finite loss.
    """

    def __init__(self, names: tuple[str, ...], device):
        self.names = names
        self.bad = torch.zeros(len(names), dtype=torch.bool, device=device)  # [terms] ever non-finite
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)  # step of the first bad value
        self.first_values = torch.zeros(len(names), device=device)  # [terms] values at that step

    def record(self, values: torch.Tensor, step: int) -> None:
        """values: [terms] float32 loss values of `step` (1-based), in the order of `names`."""
        bad_now = ~torch.isfinite(values)  # [terms]
        first = bad_now.any() & (self.first_step < 0)
        self.first_step = torch.where(first, torch.full_like(self.first_step, step), self.first_step)
        self.first_values = torch.where(first, values, self.first_values)
        self.bad |= bad_now

    def first_failure(self, reduce_sum=None) -> tuple[int | None, dict[str, float]] | None:
        """None while every value so far was finite (on every process when `reduce_sum` sums a tensor across
        processes); else (first bad step seen here, {bad term: its value}), or (None, {}) when only another
        process saw one."""
        flags = self.bad.float()
        if reduce_sum is not None:
            flags = reduce_sum(flags)  # collective: every process calls this at the same steps
        if not bool((flags > 0).any()):
            return None
        if not bool(self.bad.any()):
            return None, {}
        values = dict(zip(self.names, self.first_values.tolist()))
        return int(self.first_step), {name: value for name, value in values.items() if not math.isfinite(value)}

    def failure(self, reduce_sum=None) -> str | None:
        """None while every value so far was finite (on every process when `reduce_sum` sums a tensor across
        processes); otherwise 'step N: term, term = [values]' for the first bad step seen here."""
        flags = self.bad.float()
        if reduce_sum is not None:
            flags = reduce_sum(flags)  # collective: every process calls failure() at the same steps
        if not bool((flags > 0).any()):
            return None
        if not bool(self.bad.any()):
            return "(another process)"
        step = int(self.first_step)
        values = self.first_values.tolist()
        culprits = [name for name, value in zip(self.names, values) if not math.isfinite(value)]
        return f"step {step}: {', '.join(culprits)} = {[values[self.names.index(c)] for c in culprits]}"
