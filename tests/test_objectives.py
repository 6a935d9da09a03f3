"""ST-AR's terms on hand-computed cases: the mask, InfoNCE, L_step / L_view pairings, the EMA, view matching."""
import math

import numpy as np
import torch
import torch.nn.functional as F
from reference import key_mask_bias

from star.train.objectives import (
    info_nce,
    make_teacher,
    step_loss,
    update_teacher,
    view_loss,
)
from star.train.token_loader import geometric_match


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
    assert torch.allclose(step_loss(student, teacher, 0.2), expected, atol=1e-6)
    valid = torch.ones(B, M, K, dtype=torch.bool)
    expected_view = torch.stack([info_nce(student[:, m, k], teacher[:, m, k], 0.2) for m in range(M) for k in range(K)]).mean()
    assert torch.allclose(view_loss(student, teacher, valid, 0.2), expected_view, atol=1e-6)


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
