"""The LM head and its next-token loss in one pass, without materialising the [N, vocab] logits.

Same value and gradients as `F.cross_entropy((hidden @ weight.T).float(), targets)`: the gradients are computed
chunk by chunk during the forward, so the float32 logits exist one chunk at a time.
"""
from __future__ import annotations

import torch

# Rows of logits per chunk in the fused head + loss: about 16 MiB of float32 logits at a time, small enough to
# stay in cache, large enough that each chunk's matmuls run at full speed.
HEAD_CHUNK_ELEMENTS = 1 << 22


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (hidden @ weight.T) against targets, without materialising the [N, V] logits.

    The gradients are computed chunk by chunk during the forward (softmax - one_hot is all the backward of
    cross-entropy needs), so the backward only scales them: the same three matmuls as the plain head, but the
    float32 logits live one chunk at a time instead of three full [N, V] tensors (logits, log-softmax, its grad).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, need_grads):
        rows = hidden.shape[0]  # hidden [N, D], weight [V, D], targets [N]
        chunk = max(1, HEAD_CHUNK_ELEMENTS // weight.shape[0])
        weight_c = weight.to(compute_dtype)
        loss_sum = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_grads else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grads else None
        for start in range(0, rows, chunk):
            part = hidden[start : start + chunk].to(compute_dtype)  # [n, D]
            target = targets[start : start + chunk]  # [n]
            logits = (part @ weight_c.t()).float()  # [n, V] float32, as LlamaGen's .float() logits
            target_logit = logits.gather(1, target[:, None]).squeeze(1)  # [n]
            row_max = logits.amax(dim=-1, keepdim=True)  # [n, 1]
            exps = logits.sub_(row_max).exp_()  # in place: one exp pass serves the loss and the gradient
            row_sum = exps.sum(dim=-1, keepdim=True)  # [n, 1]
            loss_sum += (row_sum.log() + row_max - target_logit[:, None]).sum()
            if need_grads:
                probs = exps.div_(row_sum)  # softmax
                probs[torch.arange(probs.shape[0], device=probs.device), target] -= 1.0  # d loss_sum / d logits
                probs = probs.mul_(1.0 / rows).to(compute_dtype)  # d mean loss / d logits
                grad_hidden[start : start + chunk] = (probs @ weight_c).to(hidden.dtype)
                if compute_dtype == torch.float32:
                    grad_weight.addmm_(probs.t(), part)  # [V, D], accumulated in place
                else:
                    grad_weight += (probs.t() @ part).float()
        if need_grads:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss_sum / rows

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss, None, None, None


def chunked_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`F.cross_entropy((hidden @ weight.T).float(), targets)` computed in row chunks (same value and grads).

    hidden [N, D] (final normed states), weight [V, D] (the LM head), targets [N]. Under autocast the matmuls
    run in the autocast dtype, as nn.Linear's would; the softmax is always float32.
    """
    device_type = hidden.device.type
    compute_dtype = hidden.dtype
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    need_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):
        return _ChunkedHeadCrossEntropy.apply(hidden, weight, targets, compute_dtype, need_grads)
