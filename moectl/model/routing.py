"""Routing, measured and balanced: the router every MoE layer uses, the expert load of each step, the
auxiliary load-balancing loss and the auxiliary-loss-free router bias.

Why all of it sits in the router module (`mlp.gate`): every strategy's MoE block asks that module for
its routing — transformers' Qwen3MoeSparseMoeBlock under single, ddp, fsdp, tp and mixed,
`ExpertParallelMoE` under ep (through `route`), plugins alike — so one module sees every layer's
router logits and top-k choice under every layout, and the bias changes the choice everywhere at once.
`install_routers` swaps each layer's transformers router for `Router` when the model is built; the
parameter keeps its name (`mlp.gate.weight`), so checkpoints and HF keys do not change.

Definitions (the README states them too):

- Expert load: how many token copies (token, chosen expert) each expert received in a step, per layer,
  summed over micro-batches and data-parallel ranks. `load_imbalance` = max over layers of
  max / mean expert load (1.0 is perfect balance).
- Auxiliary loss: transformers' `load_balancing_loss_func` (Switch / Qwen3: E · Σ_e f_e · P_e over the
  router logits of all layers) computed per *sequence* and averaged over the sequences of the global
  batch. Why per sequence: the loss is a product of two batch averages, so computing it per micro-batch
  or per rank would change the gradient with the layout; a mean over sequences is linear in the
  sequences, so accumulation and any data-parallel split give the gradient of the whole batch, as the
  LM loss does (its sum is divided by the global sequence count, not the local one).
- Router bias (DeepSeek-V3's auxiliary-loss-free balancing): a per-expert bias added to the routing
  probabilities for the top-k *choice* only (the weights that scale the expert outputs stay the
  unbiased probabilities), moved after each step by +rate for experts below the mean load and −rate
  above it, from the step's global counts, so every rank holds the same bias.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from moectl.config import ModelConfig, TrainConfig

#: the router bias's key per layer in router_bias.safetensors (DeepSeek-V3's HF name for it)
BIAS_KEY = "model.layers.{layer}.mlp.gate.e_score_correction_bias"
BIAS_BUFFER = "e_score_correction_bias"


class Router(Qwen3MoeTopKRouter):
    """transformers' Qwen3-MoE router (same math, bit for bit, while no bias is set), which can also add
    a bias to the top-k choice and report each forward's routing to a `RoutingRecorder`.

    Under autocast (train.precision=mixed) its logits are computed in fp32, as Megatron's
    `moe_router_dtype=fp32` does: the top-k choice is discrete, and bf16 logits flip near-ties that fp32
    resolves, which moves a whole token's gradient between experts (on the tiny preset at lr 1e-5 with
    AdamW this alone took a rarely chosen expert's update 1.1e-2 away from an all-fp32 run, against
    8e-3 for the worst tensor otherwise). The GEMM is H × E per token, 0.01 % of Qwen3-30B-A3B's.
    """

    def __init__(self, config):
        super().__init__(config)
        self.recorder: RoutingRecorder | None = None
        self.uses_bias = False
        #: this forward's (per-sequence expert counts, per-sequence summed probabilities or None)
        self.records: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        device_type = hidden_states.device.type
        if torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                router_logits = F.linear(hidden_states.float(), self.weight.float())
        else:  # fp32 or bf16 throughout: transformers' own line
            router_logits = F.linear(hidden_states, self.weight)
        router_probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
        if self.uses_bias:
            bias = getattr(self, BIAS_BUFFER)
            _, router_indices = torch.topk(router_probs + bias, self.top_k, dim=-1)
            router_top_value = router_probs.gather(-1, router_indices)
        else:
            router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            router_top_value = router_top_value / router_top_value.sum(dim=-1, keepdim=True)
        router_scores = router_top_value.to(router_logits.dtype)
        recorder = self.recorder
        if recorder is not None and recorder.recording:
            self.records.append(recorder.summarize(router_probs, router_indices))
        return router_logits, router_scores, router_indices


def install_routers(model: nn.Module) -> None:
    """Replace every layer's transformers router by `Router`, keeping its weight parameter."""
    for module in model.modules():
        gate = getattr(module, "gate", None)
        if isinstance(gate, Qwen3MoeTopKRouter) and not isinstance(gate, Router):
            with torch.device(gate.weight.device):
                router = Router(model.config)
            router.weight = gate.weight
            module.gate = router


class RoutingRecorder:
    """Which routing the routers of a model keep, and how it becomes expert load and auxiliary loss.

    Why each router keeps its own records (and this object only the settings): compiled decoder layers
    share one compiled graph, and state that differs between layers at call time (a shared list's
    length, a layer index) would be a guard that recompiles the graph for every layer. At each
    router's call its own list is empty, the same for every layer.
    """

    def __init__(
        self, routers: list[Router], num_experts: int, tokens_per_sequence: int, with_aux_loss: bool
    ):
        self.routers = routers
        self.num_experts = num_experts
        self.tokens_per_sequence = tokens_per_sequence
        self.with_aux_loss = with_aux_loss
        self.recording = False
        for router in routers:
            router.recorder = self

    def summarize(
        self, probs: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One layer's routing as [sequences, experts] token-copy counts and, for the auxiliary loss,
        summed probabilities. Counts come from a scatter-add on the device (exact in fp32 for any
        micro-batch): no host sync per layer."""
        num_sequences = indices.shape[0] // self.tokens_per_sequence
        choices = indices.reshape(num_sequences, -1)
        counts = torch.zeros(num_sequences, self.num_experts, dtype=torch.float32, device=indices.device)
        counts.scatter_add_(1, choices, torch.ones_like(choices, dtype=torch.float32))
        prob_sums = None
        if self.with_aux_loss:
            prob_sums = probs.reshape(num_sequences, self.tokens_per_sequence, -1).sum(1)
        return counts, prob_sums

    def take(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The last forward's expert load [layers, experts] and its auxiliary loss summed over its
        sequences (None when off); clears the routers' records."""
        records = []
        for layer, router in enumerate(self.routers):
            if len(router.records) != 1:
                found = len(router.records)
                for other in self.routers:
                    other.records.clear()
                raise RuntimeError(
                    f"the router of MoE layer {layer} recorded {found} routings in one forward, not 1; a "
                    "strategy's MoE block must route each token once through the layer's `mlp.gate`"
                )
            records.append(router.records.pop())
        counts = torch.stack([counts for counts, _ in records])  # [layers, sequences, experts]
        aux_sum = self.aux_loss_sum(records) if self.with_aux_loss else None
        return counts.sum(1), aux_sum

    def aux_loss_sum(self, records: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """Σ over sequences of E · Σ_e f_e · P_e, with f_e and P_e over the sequence's rows of all layers
        (transformers' load_balancing_loss_func, one sequence at a time)."""
        rows = len(records) * self.tokens_per_sequence
        tokens_per_expert = torch.stack([counts for counts, _ in records]).sum(0) / rows  # [sequences, E]
        prob_per_expert = torch.stack([prob_sums for _, prob_sums in records]).sum(0) / rows
        return self.num_experts * (tokens_per_expert * prob_per_expert).sum()


def auxiliary_loss(
    router_logits: list[torch.Tensor], num_experts: int, top_k: int, tokens_per_sequence: int
) -> torch.Tensor:
    """The auxiliary loss as `Routing` defines it, for router logits of all layers ([tokens, experts]
    each, sequences back to back): transformers' load_balancing_loss_func per sequence, averaged."""
    recorder = RoutingRecorder([], num_experts, tokens_per_sequence, with_aux_loss=True)
    records = []
    for logits in router_logits:
        probs = F.softmax(logits, dtype=torch.float, dim=-1)
        records.append(recorder.summarize(probs, torch.topk(probs, top_k, dim=-1).indices))
    return recorder.aux_loss_sum(records) / (router_logits[0].shape[0] // tokens_per_sequence)


@dataclass
class StepRouting:
    """What one optimizer step's routing measured, over the global batch (the same on every rank)."""

    aux_loss: float | None  # mean over the global batch's sequences
    load: torch.Tensor | None  # [layers, experts] token copies, float64 on the device
    imbalance_per_layer: list[float]

    @property
    def load_imbalance(self) -> float | None:
        return max(self.imbalance_per_layer) if self.imbalance_per_layer else None


class Routing:
    """The loop's handle on every router of the model: records the routing of forward passes, adds
    the auxiliary loss, reduces each step's expert load and moves the router bias."""

    def __init__(self, model: nn.Module, model_config: ModelConfig, train: TrainConfig, device: torch.device):
        self.routers = [module for module in model.modules() if isinstance(module, Router)]
        self.num_experts = model_config.num_experts
        self.aux_loss_coef = train.aux_loss_coef
        self.bias_rate = train.router_bias_update
        self.global_sequences = train.global_batch
        self.tracks_load = train.expert_load_stats or self.aux_loss_coef > 0 or self.bias_rate > 0
        self.recorder = None
        if self.tracks_load and len(self.routers) != model_config.num_layers:
            raise RuntimeError(
                f"found {len(self.routers)} moectl routers for {model_config.num_layers} MoE layers; the "
                "model must be built with moectl.model.build.build_meta_model"
            )
        if self.tracks_load:
            self.recorder = RoutingRecorder(
                self.routers, self.num_experts, train.seq_len, with_aux_loss=self.aux_loss_coef > 0
            )
        for router in self.routers:
            if self.bias_rate > 0:
                bias = torch.zeros(self.num_experts, dtype=torch.float32, device=device)
                router.register_buffer(BIAS_BUFFER, bias, persistent=False)  # not an HF key
                router.uses_bias = True
        layers = model_config.num_layers
        self.step_load = torch.zeros(layers, self.num_experts, dtype=torch.float64, device=device)
        #: token copies per expert over all completed steps of the run
        self.total_load = torch.zeros_like(self.step_load)

    @property
    def uses_bias(self) -> bool:
        return self.bias_rate > 0

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record the routers during a forward pass only: a recomputation in the backward
        (activation checkpointing) must not count twice."""
        if self.recorder is None:
            yield
            return
        self.recorder.recording = True
        try:
            yield
        finally:
            self.recorder.recording = False

    def take_forward(self) -> torch.Tensor | None:
        """After a micro-batch's forward: add its expert load to the step's; return its auxiliary
        loss summed over its sequences (None when the loss is off)."""
        if self.recorder is None:
            return None
        load, aux_sum = self.recorder.take()
        self.step_load += load
        return aux_sum

    def aux_loss_term(self, aux_sum: torch.Tensor) -> torch.Tensor:
        """The auxiliary loss's share of this micro-batch in the training loss (global normalisation)."""
        return aux_sum * (self.aux_loss_coef / self.global_sequences)

    def reduce_step(
        self, loss_sum: torch.Tensor, aux_sum: torch.Tensor | None, group: dist.ProcessGroup | None
    ) -> tuple[float, StepRouting]:
        """Sum the step's token loss, auxiliary loss and expert load over the data-parallel ranks in one
        all-reduce; returns the loss sum and the step's routing figures (the same on every rank)."""
        scalars = [loss_sum.detach().double().reshape(1)]
        if aux_sum is not None:
            scalars.append(aux_sum.detach().double().reshape(1))
        load_part = [self.step_load.reshape(-1)] if self.tracks_load else []
        totals = torch.cat(scalars + load_part)
        if dist.is_initialized():
            dist.all_reduce(totals, group=group)
        head, load = totals[: len(scalars)], None
        if self.tracks_load:
            load = totals[len(scalars) :].view_as(self.step_load)
            self.step_load.zero_()
            head = torch.cat([head, load.amax(-1) / load.mean(-1)])
        host = head.tolist()  # one transfer for the loss, the auxiliary loss and every layer's imbalance
        loss_total = host[0]
        aux_loss = host[1] / self.global_sequences if aux_sum is not None else None
        imbalance = host[len(scalars) :]
        return loss_total, StepRouting(aux_loss, load, imbalance)

    def finish_step(self, step: StepRouting) -> None:
        """After an optimizer step that was taken: count its load and move the router bias."""
        if step.load is None:
            return
        self.total_load += step.load
        if self.uses_bias:
            mean = step.load.mean(-1, keepdim=True)
            moves = (self.bias_rate * torch.sign(mean - step.load)).float()
            torch._foreach_add_(self.biases(), list(moves.unbind(0)))

    def biases(self) -> list[torch.Tensor]:
        return [getattr(router, BIAS_BUFFER) for router in self.routers] if self.uses_bias else []

    # ---- state kept in checkpoints and written at the end ------------------------------------
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Replicated tensors for the checkpoint (the same on every rank)."""
        state = {}
        if self.tracks_load:
            state["expert_load"] = self.total_load
        if self.uses_bias:
            state["router_bias"] = torch.stack(self.biases())
        return state

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take back what `checkpoint_state` gave, filled from a checkpoint."""
        if "expert_load" in state and self.tracks_load:
            self.total_load.copy_(state["expert_load"])
        if "router_bias" in state and self.uses_bias:
            for bias, saved in zip(self.biases(), state["router_bias"], strict=True):
                bias.copy_(saved)

    def bias_tensors(self) -> dict[str, torch.Tensor]:
        """router_bias.safetensors: one [experts] tensor per layer, on the CPU."""
        return {BIAS_KEY.format(layer=i): bias.detach().cpu() for i, bias in enumerate(self.biases())}
