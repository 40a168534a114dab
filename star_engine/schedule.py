"""The schedule of one request: phase 1 (the strategy encodes the context), then phase 2
(the query, then one token at a time), with every rank in step and the query rank
deciding each next token.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import _C
from .attention import Strategy
from .attention.decode import decode_kernel_serves
from .attention.phase2 import query_attention, token_attention
from .comm import Communicator
from .costs import kv_bytes_per_token
from .launch import Dist, JobError
from .memory import available_memory, peak_memory, reset_peak_memory
from .model import Transformer
from .plan import RequestPlan, RequestTooLarge, plan_request


@dataclass
class Metrics:
    phase1_s: float  # slowest rank's context encoding
    phase1_per_rank_s: list[float]  # each rank's, its waits on others included
    ttft_s: float  # request start to first token decided
    tpot_s: float | None  # mean time per output token after the first
    peak_mem_bytes: list[int]  # per rank: GPU memory allocated, or resident memory on CPU
    bytes_sent: list[int]  # per rank: payload put on the wire
    context_reused: bool = False  # answered from the K/V of the context encoded before (phase1_s 0)


@dataclass
class Generation:
    tokens: list[int]  # generated ids, the stopping EOS included
    metrics: Metrics
    # Query rank with keep_logits: logits [tokens, vocab] of each forward pass (the
    # query's tokens, then one per generated token). Empty elsewhere.
    logits: list[Tensor] = field(default_factory=list)


class Engine:
    """Runs requests with one strategy. Sized once: every rank's KV arena holds the
    worst case of a request of up to `max_tokens` tokens (context + query + generated), of
    which at most `max_tail` (default: all) come after the context. The query rank keeps
    its share of the context and the tail."""

    def __init__(self, model: Transformer, strategy: Strategy, comm: Communicator, dist: Dist,
                 max_tokens: int, cuda_graph: bool = True, max_tail: int | None = None) -> None:
        self.model, self.strategy, self.comm, self.dist = model, strategy, comm, dist
        self.max_tokens = max_tokens
        self.max_tail = max_tokens if max_tail is None else min(max_tail, max_tokens)
        self.cuda_graph = cuda_graph
        self.decoder: _Decoder | None = None
        self.encoded: tuple[str, int] | None = None  # the context in the arena: digest, local length
        # A shorter context leaves more room for the tail, never more slots on the query
        # rank than max_tokens, whatever the split.
        max_context = max_tokens - self.max_tail
        query_share = strategy.context_capacity(dist.query_rank, max_context) if max_context else 0
        self.capacities = [min(max_tokens, query_share + self.max_tail) if r == dist.query_rank
                           else strategy.context_capacity(r, max_tokens) for r in range(dist.world)]
        cfg, weight = model.config, model.embed.weight
        self._check_memory(kv_bytes_per_token(cfg, weight.element_size()))
        try:
            self.arena = _C.KVArena(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                    self.capacities[dist.rank], weight.dtype, weight.device)
        except (RuntimeError, MemoryError) as exc:
            raise ValueError(f"the KV cache for requests of {max_tokens} tokens could not be allocated "
                             f"(--max-tokens): {str(exc).splitlines()[0]}") from None

    def _check_memory(self, bytes_per_slot: int) -> None:
        """Refuses, the same on every rank, an arena that a rank has no memory for."""
        available = self.dist.allgather(available_memory(self.model.embed.weight.device))
        for rank, (slots, free) in enumerate(zip(self.capacities, available)):
            if free is not None and slots * bytes_per_slot > free:
                raise JobError(f"a KV cache for requests of {self.max_tokens} tokens needs "
                               f"{slots * bytes_per_slot / 2**30:.1f} GiB on rank {rank}, which has "
                               f"{free / 2**30:.1f} GiB free: a smaller --max-tokens, or more ranks")

    def plan(self, context_len: int, query_len: int, max_new_tokens: int) -> RequestPlan:
        """The request's plan; RequestTooLarge, the same on every rank, if it cannot run."""
        plan = plan_request(self.strategy, context_len, query_len, max_new_tokens)
        if plan.total > self.max_tokens:
            raise RequestTooLarge(f"request needs {plan.total} tokens ({context_len} context + {query_len} "
                                  f"query + {max_new_tokens} new), the limit is {self.max_tokens}")
        if plan.tail > self.max_tail:
            raise RequestTooLarge(f"request has {query_len} query + {max_new_tokens} new tokens, the "
                                  f"engine takes at most {self.max_tail} after the context")
        for rank, (need, capacity) in enumerate(zip(plan.kv_slots, self.capacities)):
            if need > capacity:
                raise RequestTooLarge(f"rank {rank} needs {need} KV slots, its arena holds {capacity}")
        return plan

    def generate(self, context_ids: Tensor, query_ids: Tensor, max_new_tokens: int, *,
                 plan: RequestPlan | None = None, reuse_context: bool = False, keep_logits: bool = False,
                 stop_at_eos: bool = True) -> Generation:
        """Answers one request: phase 1, the query, then one token at a time. `plan`: its
        plan, where the caller has made it already (by self.plan). reuse_context: where the
        context is the one the arena holds from the request before (the same token ids),
        skip phase 1 and answer from its K/V; phase 1 does not depend on the query, so the
        answer is the one the request gets alone."""
        if plan is None:
            plan = self.plan(len(context_ids), len(query_ids), max_new_tokens)
        if (plan.context_len, plan.query_len, plan.max_new_tokens) != (len(context_ids), len(query_ids), max_new_tokens):
            raise ValueError("the plan is another request's")
        # Only where it may be reused is a context recognised (by its ids, before they move).
        digest = hashlib.sha256(context_ids.cpu().numpy().tobytes()).hexdigest() if reuse_context else None
        reused = (digest is not None and self.encoded is not None and self.encoded[0] == digest
                  and not self.arena.decoding)
        device = self.model.embed.weight.device
        context_ids, query_ids = context_ids.to(device), query_ids.to(device)
        eos = set(self.model.config.eos_token_ids) if stop_at_eos else set()
        reset_peak_memory(device)
        sent_before = self.comm.bytes_sent

        self.dist.sync()
        start = time.perf_counter()
        if reused:
            self.arena.truncate(self.encoded[1])  # back to the context: the last answer's K/V goes
            phase1 = 0.0
        else:
            self.encoded = None
            self.arena.clear()
            self.strategy.encode_context(self.model, context_ids, plan.layout, self.arena)
            phase1 = self._elapsed(start)
            self.encoded = (digest, self.arena.length(0)) if digest is not None else None

        # The query: all its tokens in one pass, then one token at a time.
        attend = query_attention(self.arena, self.comm, self.dist.is_query_rank)
        position = len(context_ids) + len(query_ids)
        hidden = self.model(query_ids, torch.arange(len(context_ids), position, device=device), attend)
        logits: list[Tensor] = []
        tokens = [self._next_token(hidden, logits if keep_logits else None)]
        first = self._elapsed(start)
        if tokens[-1] not in eos and max_new_tokens > 1:
            decoder = self._decoder()
            self.arena.start_decoding()
            decoder.start(tokens[-1], position)
            while tokens[-1] not in eos and len(tokens) < max_new_tokens:
                decoder.step()
                tokens.append(decoder.token())
                if keep_logits and self.dist.is_query_rank:
                    logits.append(decoder.logits.clone())
            self.arena.finish_decoding()
        total = self._elapsed(start)

        local = (phase1, peak_memory(device), self.comm.bytes_sent - sent_before)
        self.dist.sync()
        every = self.dist.allgather(local)
        metrics = Metrics(
            phase1_s=max(p for p, _, _ in every),
            phase1_per_rank_s=[p for p, _, _ in every],
            ttft_s=first,
            tpot_s=(total - first) / (len(tokens) - 1) if len(tokens) > 1 else None,
            peak_mem_bytes=[m for _, m, _ in every],
            bytes_sent=[b for _, _, b in every],
            context_reused=reused,
        )
        return Generation(tokens, metrics, logits)

    def _decoder(self) -> "_Decoder":
        if self.decoder is None:
            self.decoder = _Decoder(self.model, self.arena, self.comm, self.dist, self.cuda_graph)
        return self.decoder

    def _next_token(self, hidden: Tensor, keep: list[Tensor] | None) -> int:
        """Greedy choice on the query rank, broadcast so that ranks can never diverge."""
        token = torch.zeros(1, dtype=torch.int64, device=hidden.device)
        if self.dist.is_query_rank:
            logits = self.model.logits(hidden if keep is not None else hidden[-1:])
            if keep is not None:
                keep.append(logits)
            token[0] = logits[-1].argmax()
        self.comm.broadcast(token, root=self.dist.query_rank)
        self.comm.synchronize()
        return int(token.item())

    def _elapsed(self, start: float) -> float:
        """Seconds since start, once the device work so far is done."""
        self.comm.synchronize()
        if self.model.embed.weight.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


class _Decoder:
    """One decode step with shapes that never change: the token and its position live in
    device tensors that the step itself advances, and the KV length in the arena's (the
    query rank counts each new token's slot there). On a GPU whose shapes the decode kernel
    serves, the step (all layers, the collectives and the merges, the choice of the next
    token and its broadcast) is captured once in a CUDA graph and replayed for every later
    token and request."""

    def __init__(self, model: Transformer, arena: _C.KVArena, comm: Communicator, dist: Dist,
                 cuda_graph: bool) -> None:
        self.model, self.arena, self.comm, self.dist = model, arena, comm, dist
        cfg, weight = model.config, model.embed.weight
        self.token_ids = torch.zeros(1, dtype=torch.int64, device=weight.device)
        self.position = torch.zeros(1, dtype=torch.int64, device=weight.device)
        self.logits = torch.zeros(1, cfg.vocab_size, dtype=torch.float32, device=weight.device)
        self.attend = token_attention(arena, comm, dist.is_query_rank)
        self.use_graph = cuda_graph and decode_kernel_serves(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                                             weight.dtype, weight.device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def start(self, token: int, position: int) -> None:
        """The first token to feed and its position (the arena is decoding already)."""
        self.token_ids.fill_(token)
        self.position.fill_(position)

    def step(self) -> None:
        if not self.use_graph:
            self._step()
        elif self.graph is None:
            self._step()  # a real step, which also warms up what the capture records
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records the next step; runs nothing
                self._step()
        else:
            self.graph.replay()

    def token(self) -> int:
        self.comm.synchronize()
        return int(self.token_ids.item())

    def _step(self) -> None:
        if self.dist.is_query_rank:
            self.arena.add_token()  # the slot of the token fed now, which every layer writes
        hidden = self.model(self.token_ids, self.position, self.attend)
        if self.dist.is_query_rank:
            self.logits.copy_(self.model.logits(hidden))
            self.token_ids.copy_(self.logits[0].argmax())
        self.comm.broadcast(self.token_ids, root=self.dist.query_rank)
        self.position += 1
