"""ST-AR's terms on hand-computed cases: the mask, InfoNCE, L_step / L_view pairings, the EMA, view matching."""
import math

import numpy as np
import torch
import torch.nn.functional as F
from reference import key_mask_bias

from star.train.objectives import (
    NegativePool,
    TeacherTargets,
    global_pools,
    info_nce,
    local_pool,
    make_teacher,
    step_loss,
    update_teacher,
    view_loss,
)
from star.train.token_loader import EpochBatchSampler, first_global_row, geometric_match


def test_mask_keeps_class_column_and_diagonal_and_hides_the_ratio():
    generator = torch.Generator().manual_seed(0)
    bias = key_mask_bias(6, 17, 0.25, generator)  # [6, 1, 17, 17]
    blocked = torch.isinf(bias[:, 0])
    assert not blocked[:, :, 0].any(), "the class column must stay visible"
    assert not torch.diagonal(blocked, dim1=1, dim2=2).any(), "a query always sees itself"
    assert (~blocked).sum(-1).min() >= 1, "no attention row may be empty"
    assert torch.triu(torch.ones(17, 17, dtype=torch.bool), 1).logical_and(~blocked).sum() == 0, "causal"
    # round(0.25 * 16) = 4 hidden key columns per sequence, seen as hidden from the last row (minus its own column)
    hidden_columns = blocked[:, -1, :-1]  # the last row sees every earlier key unless it is masked
    assert torch.all(hidden_columns.sum(-1) <= 4) and torch.all(hidden_columns.sum(-1) >= 3)
    assert len({tuple(row.tolist()) for row in hidden_columns}) > 1, "masks are sampled per sequence"
    # Shared by every query: a masked column is hidden from all later rows (its own row keeps the diagonal).
    for b in range(6):
        for c in hidden_columns[b].nonzero().flatten().tolist():
            assert blocked[b, c + 1 :, c].all()
        # A column that is not masked is visible from every row at or after it.
        for c in (~hidden_columns[b]).nonzero().flatten().tolist():
            assert not blocked[b, c:, c].any()


def test_info_nce_matches_hand_computation():
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    teacher = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]])
    tau = 0.5
    s = student / student.norm(dim=1, keepdim=True)
    t = teacher / teacher.norm(dim=1, keepdim=True)
    expected = 0.0
    for b in range(3):
        scores = [float(s[b] @ t[c]) / tau for c in range(3)]
        expected += -(scores[b] - math.log(sum(math.exp(x) for x in scores)))
    expected /= 3
    assert abs(info_nce(student, teacher, tau).item() - expected) < 1e-6
    # Invalid rows are not scored (but still act as negatives).
    valid = torch.tensor([True, False, True])
    scores = (s @ t.T) / tau
    row_losses = -F.log_softmax(scores, 1).diagonal()
    assert abs(info_nce(student, teacher, tau, valid).item() - (row_losses[0] + row_losses[2]).item() / 2) < 1e-6


def test_step_and_view_losses_pick_the_right_positives():
    torch.manual_seed(0)
    B, M, K, D = 5, 2, 3, 8
    teacher = torch.randn(B, M, K, D)
    # A student equal to the teacher at position j for every i scores the step loss perfectly only with the
    # right positives: compare with an explicit loop.
    student = torch.randn(B, M, K, D)
    expected = torch.stack([info_nce(student[:, m, i], teacher[:, m, j], 0.2)
                            for m in range(M) for i in range(K) for j in range(K) if i != j]).mean()
    valid = torch.ones(B, M, K, dtype=torch.bool)
    pool = NegativePool(torch.arange(B), here=teacher, other=teacher, valid=valid)
    assert torch.allclose(step_loss(student, pool, 0.2), expected, atol=1e-6)
    expected_view = torch.stack([info_nce(student[:, m, k], teacher[:, m, k], 0.2) for m in range(M) for k in range(K)]).mean()
    assert torch.allclose(view_loss(student, pool, 0.2), expected_view, atol=1e-6)


def test_an_image_twice_in_a_batch_is_not_its_own_negative():
    torch.manual_seed(1)
    B, M, K, D = 5, 2, 3, 8
    teacher, student = torch.randn(B, M, K, D), torch.randn(B, M, K, D)
    teacher[3] = teacher[1]  # rows 1 and 3 are one image (same view, same positions)
    ids = torch.tensor([10, 11, 12, 11, 13])
    valid = torch.ones(B, M, K, dtype=torch.bool)
    pool = NegativePool(ids, here=teacher, other=teacher, valid=valid)

    def expected(s, t):
        losses = []
        logits = F.normalize(s, dim=-1) @ F.normalize(t, dim=-1).T / 0.2
        for b in range(B):
            kept = [c for c in range(B) if c == b or ids[c] != ids[b]]
            losses.append(-F.log_softmax(logits[b, kept], 0)[kept.index(b)])
        return torch.stack(losses).mean()

    step = torch.stack([expected(student[:, m, i], teacher[:, m, j])
                        for m in range(M) for i in range(K) for j in range(K) if i != j]).mean()
    view = torch.stack([expected(student[:, m, k], teacher[:, m, k]) for m in range(M) for k in range(K)]).mean()
    assert torch.allclose(step_loss(student, pool, 0.2), step, atol=1e-6)
    assert torch.allclose(view_loss(student, pool, 0.2), view, atol=1e-6)
    unmarked = NegativePool(torch.arange(B), here=teacher, other=teacher, valid=valid)
    assert step_loss(student, unmarked, 0.2) > step + 0.01, "without ids the copy would be a (hard) negative"


def _shard_gather(locals_by_rank: dict, rank: int):
    """Accelerator.gather for process `rank` of len(locals_by_rank), the other processes' inputs known."""
    def gather(local: dict) -> dict:
        parts = [local if r == rank else locals_by_rank[r] for r in range(len(locals_by_rank))]
        return {name: torch.cat([part[name] for part in parts]) for name in local}
    return gather


def test_global_pools_give_the_whole_batch_loss_for_any_split():
    """2 processes x 2 micro-batches score their rows against the gathered global batch: the mean of the 4 shards'
    L_step and L_view (with unequal valid counts) is the one-process loss of the whole batch, and with a
    duplicated image across processes it is still masked."""
    torch.manual_seed(2)
    world, micro_batches, rows, M, K, D = 2, 2, 3, 2, 3, 8
    G = world * micro_batches * rows
    student = torch.randn(G, M, K, D)
    whole = TeacherTargets(torch.zeros(G, M, 4, D), torch.randn(G, M, K, D), torch.randn(G, M, K, D),
                           torch.rand(G, M, K) > 0.4)
    ids = torch.arange(G)
    ids[first_global_row(1, 1, world, rows)] = ids[0]  # one image on both processes
    whole.here[first_global_row(1, 1, world, rows)] = whole.here[0]
    reference = local_pool(whole, ids)
    expected = (step_loss(student, reference, 0.2), view_loss(student, reference, 0.2))

    def shard(rank: int, micro: int):
        start = first_global_row(micro, rank, world, rows)
        part = slice(start, start + rows)
        return TeacherTargets(whole.final[part], whole.here[part], whole.other[part], whole.valid[part]), ids[part]

    locals_by_rank = {}

    def capture(rank: int):  # records what process `rank` hands to the all_gather
        def gather(local: dict) -> dict:
            locals_by_rank[rank] = local
            return {name: torch.cat([part] * world) for name, part in local.items()}
        return gather

    for rank in range(world):
        parts = [shard(rank, micro) for micro in range(micro_batches)]
        global_pools([p[0] for p in parts], [p[1] for p in parts], capture(rank), world, rank)
    losses = []
    for rank in range(world):
        parts = [shard(rank, micro) for micro in range(micro_batches)]
        pools = global_pools([p[0] for p in parts], [p[1] for p in parts], _shard_gather(locals_by_rank, rank),
                             world, rank)
        for micro, pool in enumerate(pools):
            assert pool.shares == 4 and pool.here.shape[0] == G
            start = first_global_row(micro, rank, world, rows)
            mine = student[start : start + rows]
            losses.append(torch.stack([step_loss(mine, pool, 0.2), view_loss(mine, pool, 0.2)]))
    torch.testing.assert_close(torch.stack(losses).mean(0), torch.stack(expected), atol=1e-6, rtol=0)
    local = [step_loss(student[first_global_row(m, r, world, rows):][:rows], local_pool(*shard(r, m)), 0.2)
             for r in range(world) for m in range(micro_batches)]
    assert torch.stack(local).mean() < expected[0] - 0.3, "a micro-batch alone gives fewer, easier negatives"


def test_first_global_row_is_the_samplers_layout_and_steps_never_span_epochs():
    """2 processes x 2 micro-batches x 3 images read, step by step, the one-process batches of 12, across epoch
    boundaries (30 images: 2 whole steps an epoch, 6 left out), and first_global_row says where each slice sits."""
    world, rows, micro_batches = 2, 3, 2
    samplers = [iter(EpochBatchSampler(30, rows * world * micro_batches, rank, world, seed=4,
                                       micro_batches=micro_batches))
                for rank in range(world)]
    one_process = iter(EpochBatchSampler(30, rows * world * micro_batches, 0, 1, seed=4))
    for _ in range(5):  # steps, over three epochs
        step_batches = [[next(s) for s in samplers] for _ in range(micro_batches)]  # [micro][rank]
        whole = next(one_process)
        assert len(set(whole)) == 12
        for micro in range(micro_batches):
            for rank in range(world):
                start = first_global_row(micro, rank, world, rows)
                assert step_batches[micro][rank] == whole[start : start + rows]


def test_geometry_mirrored_pair_maps_column_c_to_w_minus_1_minus_c():
    box = (10.0, 20.0, 74.0, 84.0)
    match = geometric_match(box, False, box, True, (4, 4)).reshape(4, 4)
    rows, cols = np.divmod(match, 4)
    assert np.array_equal(rows, np.arange(4)[:, None].repeat(4, 1))
    assert np.array_equal(cols, (3 - np.arange(4))[None, :].repeat(4, 0))


def test_geometry_shifted_crop_maps_by_the_shift_and_drops_outside_positions():
    # View b is view a shifted right by one token (16 px of 64 px at grid 4): a's column c is b's column c - 1.
    a, b = (0.0, 0.0, 64.0, 64.0), (16.0, 0.0, 80.0, 64.0)
    match = geometric_match(a, False, b, False, (4, 4)).reshape(4, 4)
    assert np.all(match[:, 0] == -1), "column 0 of a lies outside b"
    assert np.array_equal(match[:, 1:] % 4, np.tile(np.arange(3), (4, 1)))
    assert np.array_equal(match[:, 1:] // 4, np.arange(4)[:, None].repeat(3, 1))
    identity = geometric_match(a, True, a, True, (4, 4))
    assert np.array_equal(identity, np.arange(16)), "two identical mirrored views match index to index"


def test_teacher_gets_no_gradient_and_moves_by_ema():
    student = torch.nn.Linear(3, 2)
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    before = teacher.weight.detach().clone()
    out = student(torch.randn(4, 3)).sum() + teacher(torch.randn(4, 3)).sum()
    out.backward()
    assert teacher.weight.grad is None and student.weight.grad is not None
    with torch.no_grad():
        student.weight.add_(1.0)
    update_teacher(teacher, student, decay=0.9)
    assert torch.allclose(teacher.weight, 0.9 * before + 0.1 * student.weight.detach(), atol=1e-6)
