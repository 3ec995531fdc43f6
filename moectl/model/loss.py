"""The training loss: summed next-token cross-entropy in fp32, either from the model's logits or fused with
the lm_head chunk by chunk over the tokens, so that the [tokens, vocab] logits never exist whole.

Why chunked: Qwen3's vocabulary has 151,936 words. The logits of one micro-batch and their gradient take
2 · 2 bytes · tokens · vocab in bf16 (4.6 GiB per 8,192 tokens) at the end of the forward, where every
layer's activations are alive too: memory that a larger micro-batch could use instead. The chunked head
computes, for each chunk of tokens, its logits (one GEMM), its loss and the gradient of its logits (one
fused pass when compiled), and right away the gradients of the hidden states and of the head's weight
(two GEMMs): the three GEMMs the unchunked head runs, with only one chunk's logits alive at a time.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from moectl.data.packing import IGNORE_INDEX
from moectl.model.precision import compute_dtype

#: (logits [c, V], targets [c], grad_scale) -> (summed loss in fp32, d(grad_scale · loss)/d logits)
ChunkLossFn = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
#: (model, micro-batch (moectl.data.packing.Batch), grad_scale) -> summed token loss of the micro-batch
TokenLoss = Callable[[nn.Module, Any, float], torch.Tensor]


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the targets (labels IGNORE_INDEX count nothing), computed in fp32 (a bf16 log-softmax over 151,936 words loses
    digits). Compiled (train.compile), the upcast and log-softmax fuse into a few kernels that keep
    no fp32 copy of the logits (BENCHMARKS.md, "Changes, predicted and measured")."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")


def chunk_loss_and_grad(
    logits: torch.Tensor, targets: torch.Tensor, grad_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of one chunk (fp32) and its gradient grad_scale · (softmax − one-hot), in the
    logits' dtype: what the unchunked loss's backward hands the lm_head, computed in the same fp32."""
    logits32 = logits.float()
    log_normalizer = torch.logsumexp(logits32, dim=-1, keepdim=True)
    target_index = targets.unsqueeze(1)
    loss = (log_normalizer - logits32.gather(1, target_index)).sum()
    # In place after the first fp32 temporary: eager keeps two [c, V] fp32 buffers, compiled none.
    grad = torch.sub(logits32, log_normalizer).exp_()
    grad.scatter_add_(1, target_index, torch.full_like(log_normalizer, -1.0))
    return loss, grad.mul_(grad_scale).to(logits.dtype)


def fused_chunk_loss_and_grad(
    logits: torch.Tensor, targets: torch.Tensor, grad_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`chunk_loss_and_grad` written for torch.compile: the one-hot as a comparison with the vocabulary
    index, so the gradient is one fused pass (read the logits, write the gradient) with no fp32 buffer;
    run eagerly it would hold several [c, V] fp32 temporaries."""
    logits32 = logits.float()
    log_normalizer = torch.logsumexp(logits32, dim=-1, keepdim=True)
    target_index = targets.unsqueeze(1)
    loss = (log_normalizer - logits32.gather(1, target_index)).sum()
    probs = torch.exp(logits32 - log_normalizer)
    is_target = torch.arange(logits.shape[1], device=logits.device) == target_index
    return loss, (torch.where(is_target, probs - 1.0, probs) * grad_scale).to(logits.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ cross-entropy(hidden @ weightᵀ, targets), chunk by chunk, with both gradients made in forward.

    Why gradients in forward: recomputing each chunk's logits in backward would run the largest GEMM of
    the model a fourth time; the gradients the forward leaves ([tokens, hidden] and [vocab, hidden]) are
    small next to the logits. They are made for d(loss)/d(loss) = grad_scale, the factor the loop
    multiplies the summed loss by before backward, so backward only rescales them by
    grad_output / grad_scale (exactly 1 in the loop: multiplying by it changes no bit). The head's weight
    gradient is accumulated chunk by chunk in the weight's dtype (bf16: by the GEMM, fp32 inside, one
    rounding per chunk; an fp32 master weight under train.precision=mixed: in fp32), as gradients
    already accumulate across micro-batches.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens: int, grad_scale: float, loss_fn: ChunkLossFn):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        # fp32 master weights (train.precision=mixed): the GEMMs take the weight in the hidden states'
        # compute dtype, and its gradient adds up in fp32 over the chunks.
        compute_weight = weight.to(hidden.dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = hidden[start : start + chunk_tokens]
            logits = rows @ compute_weight.t()
            chunk_loss, grad_logits = loss_fn(logits, targets[start : start + chunk_tokens], grad_scale)
            del logits
            loss += chunk_loss
            if grad_hidden is not None:
                torch.mm(grad_logits, compute_weight, out=grad_hidden[start : start + chunk_tokens])
            if grad_weight is None:
                continue
            if grad_weight.dtype == rows.dtype:
                grad_weight.addmm_(grad_logits.t(), rows)
            else:
                grad_weight += grad_logits.t() @ rows
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.grad_scale = grad_scale
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        ratio = grad_loss / ctx.grad_scale
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(ratio)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(ratio)
        return grad_hidden, grad_weight, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int,
    grad_scale: float = 1.0,
    loss_fn: ChunkLossFn = chunk_loss_and_grad,
) -> torch.Tensor:
    """Σ over tokens of cross-entropy(hidden @ weightᵀ), hidden [..., H], weight [V, H], targets [...].

    Equal to `token_loss_sum(F.linear(hidden, weight), targets)` in value and gradients; the gradients
    are exact for a backward that starts with d(loss) = grad_scale and correct (rescaled) for any other.
    DTensor operands (a head sharded by a parallel wrapper) take the unchunked path.
    """
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if isinstance(hidden, DTensor) or isinstance(weight, DTensor):  # (autocast casts the unchunked path)
        return token_loss_sum(F.linear(flat_hidden, weight).unsqueeze(0), flat_targets)
    if not torch.is_grad_enabled():
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, flat_hidden.shape[0], chunk_tokens):
            logits = flat_hidden[start : start + chunk_tokens] @ weight.t()
            loss += token_loss_sum(logits.unsqueeze(0), flat_targets[start : start + chunk_tokens])
        return loss
    # The GEMMs below run in place or into given outputs, which autocast leaves alone: cast here.
    flat_hidden = flat_hidden.to(compute_dtype(flat_hidden))
    return _ChunkedLinearCrossEntropy.apply(
        flat_hidden, weight, flat_targets, chunk_tokens, grad_scale, loss_fn
    )


def _chunked_loss_forward(
    self, input_ids: torch.Tensor, targets: torch.Tensor, grad_scale: float, masked: bool = False, **kwargs
):
    """The causal LM's forward when the loss is chunked: decoder, then the fused head + loss.

    Why inside the root module's forward (and not a call to lm_head after it): FSDP2 gathers the root's
    parameters (embedding, final norm, lm_head) around this forward, and DDP prepares its gradient hooks
    in its own forward; both see a plain module call this way. With `masked` targets (packed documents,
    chat data) only the target tokens' hidden states reach the head: the others would cost logits for
    nothing (most of a chat row).
    """
    hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state
    if masked and not isinstance(hidden, DTensor):
        keep = targets.reshape(-1) != IGNORE_INDEX
        hidden, targets = hidden.reshape(-1, hidden.shape[-1])[keep], targets.reshape(-1)[keep]
    return chunked_linear_cross_entropy(
        hidden, self.lm_head.weight, targets, self.loss_chunk_tokens, grad_scale, self.chunk_loss_fn
    )


def build_token_loss(model: nn.Module, chunk_tokens: int, compiled: bool) -> TokenLoss:
    """The loss the loop calls per micro-batch: (model, batch, grad_scale) -> summed token loss.

    chunk_tokens > 0 switches the (meta-device, not yet parallelised) causal LM's forward to the chunked
    head and loss; 0 keeps the model's own logits and `token_loss_sum`. Compiled, the per-chunk loss and
    gradient (or the whole loss) run as fused kernels.
    """
    if chunk_tokens <= 0:
        loss_sum = torch.compile(token_loss_sum) if compiled else token_loss_sum

        def logits_loss(model: nn.Module, batch: Any, grad_scale: float) -> torch.Tensor:
            logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
            return loss_sum(logits, batch.labels)

        return logits_loss

    model.loss_chunk_tokens = chunk_tokens
    model.chunk_loss_fn = torch.compile(fused_chunk_loss_and_grad) if compiled else chunk_loss_and_grad
    model.forward = types.MethodType(_chunked_loss_forward, model)

    def chunked_loss(model: nn.Module, batch: Any, grad_scale: float) -> torch.Tensor:
        return model(
            input_ids=batch.input_ids,
            targets=batch.labels,
            grad_scale=grad_scale,
            masked=batch.masked,
            position_ids=batch.position_ids,
            use_cache=False,
        )

    return chunked_loss
