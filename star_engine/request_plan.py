"""The plan of one request: its strategy's layout of the context and what each rank must
hold for it. Made once per request; the engine's check, its arenas' sizing, the memory
budget's estimate (budget.py) and the engine's loop all read it."""

from __future__ import annotations

from dataclasses import dataclass

from .attention.base import ContextLayout, Strategy
from .config import ModelConfig
from .costs import kv_bytes_per_token


@dataclass(frozen=True)
class Phase1Memory:
    """A request's peak memory besides the weights and its KV slots, as phase 1 reaches it:
    per token a rank runs through a layer, hidden-sized vectors for the hidden states, q, k,
    v, the attention output and the MLP's chunked intermediates; per token whose K/V it takes
    from another rank in a layer (star's anchor, ring's chunks), the buffers and the
    attention over them; and a fixed workspace."""

    encoded_vectors_per_token: float
    received_vectors_per_token: float
    workspace_bytes: float

    def bytes(self, vector_bytes: int, encoded: int, received: int) -> float:
        return (vector_bytes * (self.encoded_vectors_per_token * encoded + self.received_vectors_per_token * received)
                + self.workspace_bytes)


# Fitted to the 38 per-rank peaks of 19 measurements on two H200s (llama-3.1-8b, bfloat16,
# star uniform and balanced and ring, 32K-512K; bench/results/plan_against_bench_h200.json),
# which it predicts within 6%; judged on peaks it was not fitted to in
# bench/results/plan_memory_out_of_sample_h200.json.
PHASE1_MEMORY = Phase1Memory(encoded_vectors_per_token=4.5, received_vectors_per_token=3.5, workspace_bytes=1 << 29)


class RequestTooLarge(ValueError):
    """The request needs more tokens than the engine was sized for; nothing was computed.
    `limit`: which bound it passes, "max_tokens" (the whole request) or "max_tail" (the
    tokens after its context)."""

    def __init__(self, message: str, limit: str = "max_tokens") -> None:
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True)
class RequestPlan:
    layout: ContextLayout
    query_len: int
    max_new_tokens: int
    query_rank: int
    phase1_query_tokens: int = 0  # the first query tokens (the question) phase 1 encodes the context knowing

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

    def memory_bytes(self, config: ModelConfig, element_size: int, kv_heads: int | None = None,
                     phase1: Phase1Memory = PHASE1_MEMORY) -> tuple[int, ...]:
        """By rank: the estimated peak memory of the request besides the weights: its KV
        slots (of `kv_heads`, a rank's under tensor parallelism), and phase 1's transients."""
        kv = kv_bytes_per_token(config, element_size, kv_heads)
        return tuple(round(slots * kv + transients)
                     for slots, transients in zip(self.kv_slots, self.transient_bytes(config, element_size, phase1)))

    def transient_bytes(self, config: ModelConfig, element_size: int,
                        phase1: Phase1Memory = PHASE1_MEMORY) -> tuple[float, ...]:
        """By rank: phase 1's activations, received K/V and workspace, as `phase1` estimates them."""
        vector = config.hidden_size * element_size
        return tuple(phase1.bytes(vector, encoded, received)
                     for encoded, received in zip(self.layout.encoded, self.layout.received))


def plan_request(strategy: Strategy, context_len: int, query_len: int, max_new_tokens: int,
                 shared_context: bool = False, question_tokens: int | None = None) -> RequestPlan:
    """For a strategy that reads the query in phase 1: question_tokens, how many of the
    query's first tokens are the question (not the chat template's tail or the start of the
    answer that follow it; default: all), which phase 1 then reads; shared_context: other
    requests ask about the same context, which is then encoded once for all of them, without
    any one's question."""
    if query_len < 1 or max_new_tokens < 1:
        raise ValueError("a request needs at least one query token and max_new_tokens >= 1")
    question = query_len if question_tokens is None else min(question_tokens, query_len)
    return RequestPlan(strategy.layout(context_len), query_len, max_new_tokens, strategy.place.query_rank,
                       phase1_query_tokens=question if strategy.reads_query and not shared_context else 0)
