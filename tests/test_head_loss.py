"""The GPT's fused head and next-token loss: the same values and gradients as full logits and cross-entropy,
in fp32 and under bf16 autocast, without materialising the logits."""
import pytest
import torch
import torch.nn.functional as F
from reference import next_token_loss
from test_training_step import tiny_model

import star.gpt.head_loss as head_loss
from star.gpt.head_loss import chunked_head_loss


def test_chunked_head_loss_equals_full_cross_entropy_in_value_and_gradients(monkeypatch):
    monkeypatch.setattr(head_loss, "HEAD_CHUNK_ELEMENTS", 7 * 50)  # 7 rows per chunk: uneven last chunk
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    expected = F.cross_entropy((hidden @ weight.t()).float(), targets)
    (expected * 3).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss = chunked_head_loss(hidden, weight, targets)
    (loss * 3).backward()  # the upstream gradient scales the saved gradients
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(hidden.grad, grads[0])
    torch.testing.assert_close(weight.grad, grads[1])
    with torch.no_grad():  # no gradient work at all when none is needed
        torch.testing.assert_close(chunked_head_loss(hidden, weight, targets), expected.detach())


def test_chunked_head_loss_under_bf16_autocast_follows_the_plain_head(monkeypatch):
    monkeypatch.setattr(head_loss, "HEAD_CHUNK_ELEMENTS", 7 * 50)
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    results = []
    for head in (lambda: F.cross_entropy((hidden @ weight.t()).float(), targets),
                 lambda: chunked_head_loss(hidden, weight, targets)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = head()
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
        hidden.grad = weight.grad = None
    for plain, chunked in zip(*results):  # both round the matmuls to bf16; the rest is float32
        torch.testing.assert_close(chunked, plain, rtol=0.02, atol=0.02 * plain.abs().max().item())


def test_forward_with_targets_matches_logits_loss_and_head_can_be_skipped():
    model = tiny_model()
    tokens, labels = torch.randint(0, 50, (3, 16)), torch.tensor([0, 2, 5])
    model.eval()
    reference = model(tokens[:, :-1], labels, return_final_hidden=True)
    ref_loss = next_token_loss(reference.logits, tokens)
    ref_loss.backward()
    ref_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    fused = model(tokens[:, :-1], labels, targets=tokens)
    assert fused.logits is None, "the [B, S, V] logits must not be materialised"
    torch.testing.assert_close(fused.loss, ref_loss)
    fused.loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], msg=name)
    headless = model(tokens[:, :-1], labels, return_layers=(1,), return_final_hidden=True, head=False)
    assert headless.logits is None and headless.loss is None
    torch.testing.assert_close(headless.final_hidden, reference.final_hidden)
    with pytest.raises(ValueError, match="targets hold 15 tokens"):
        model(tokens[:, :-1], labels, targets=tokens[:, :-1])
