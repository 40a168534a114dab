"""The plan of one request: its strategy's layout of the context and what each rank must
hold for it. Made once per request; the engine's check, its arenas' sizing, bench's memory
estimate and the schedule itself all read it."""

from __future__ import annotations

from dataclasses import dataclass

from .attention import ContextLayout, Strategy
from .costs import kv_bytes_per_token
from .config import ModelConfig

# Phase-1 activations per token a rank runs through a layer, in hidden-sized vectors: the
# hidden states, q, k, v, the attention output and the MLP's chunked intermediates (measured
# about 4.5 on H200s; 8 leaves room for the allocator), plus a fixed workspace for the
# attention kernels and the logits.
ACTIVATION_VECTORS_PER_TOKEN = 8
WORKSPACE_BYTES = 4 << 30


class RequestTooLarge(ValueError):
    """The request needs more tokens than the engine was sized for; nothing was computed."""


@dataclass(frozen=True)
class RequestPlan:
    layout: ContextLayout
    query_len: int
    max_new_tokens: int
    query_rank: int

    @property
    def context_len(self) -> int:
        return self.layout.context_len

    @property
    def tail(self) -> int:
        """Tokens after the context, all stored on the query rank: the query and the new tokens."""
        return self.query_len + self.max_new_tokens

    @property
    def total(self) -> int:
        return self.context_len + self.tail

    @property
    def kv_slots(self) -> tuple[int, ...]:
        """By rank: KV slots the request fills (the query rank also stores the tail)."""
        return tuple(kept + (self.tail if rank == self.query_rank else 0)
                     for rank, kept in enumerate(self.layout.kept))

    def memory_bytes(self, config: ModelConfig, element_size: int) -> tuple[int, ...]:
        """By rank: an estimate of the memory the request needs besides the weights: its KV
        slots, and phase 1's activations."""
        kv = kv_bytes_per_token(config, element_size)
        activations = ACTIVATION_VECTORS_PER_TOKEN * config.hidden_size * element_size
        return tuple(slots * kv + encoded * activations + WORKSPACE_BYTES
                     for slots, encoded in zip(self.kv_slots, self.layout.encoded))


def plan_request(strategy: Strategy, context_len: int, query_len: int, max_new_tokens: int) -> RequestPlan:
    if query_len < 1 or max_new_tokens < 1:
        raise ValueError("a request needs at least one query token and max_new_tokens >= 1")
    return RequestPlan(strategy.layout(context_len), query_len, max_new_tokens, strategy.dist.query_rank)
