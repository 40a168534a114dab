"""The engine: requests through one strategy. Each request's phase 1 (the strategy
encodes the context), then phase 2 (the query, then one token at a time), with every rank
in step and the query rank deciding each next token; alone (generate) or with others
decoding together, each joining as another leaves (generate_many). A decode step is the
decoder's (decoder.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import Tensor

from . import _C
from .attention.base import Strategy
from .attention.decode import decode_kernel_serves
from .attention.phase2 import query_attention
from .budget import JobMemory, cache_flags, requests_phrase
from .comm import Communicator
from .decoder import Decoder, decode_rows
from .launch.control import Dist
from .memory import peak_memory, reset_peak_memory
from .model import Transformer
from .request_plan import RequestPlan, RequestTooLarge, plan_request
from .settings import KVCacheSettings
from .slots import RunningRequest, Slot, arena_capacities, context_digest, kv_cache_slots, tail_capacities


# What a source of requests for generate_many yields for "none now, but do not stop asking".
LATER = object()


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
    """Runs requests with one strategy. Sized once, as `cache` says: every rank's KV arena
    holds the worst case of a request of up to its max_tokens tokens (context + query +
    generated), of which at most its max_tail come after the context. The query rank keeps
    its share of the context and the tail. With a batch > 1, up to `batch` requests decode
    together (generate_many), in as many arenas: cache.whole_requests of them hold a whole
    request, the others only a tail, for a request that reads a context another holds.

    The strategy runs among the ranks of `comm`, its place (`strategy.place`): the ranks of
    the job, or under tensor parallelism the ranks of every host that hold the same heads,
    where a rank's arena holds its own heads' K/V and its host's ranks decide each token
    alike. `dist` is the whole job's control plane."""

    def __init__(self, model: Transformer, strategy: Strategy, comm: Communicator, dist: Dist,
                 cache: KVCacheSettings, cuda_graph: bool = True) -> None:
        self.model, self.strategy, self.comm, self.dist = model, strategy, comm, dist
        self.place = strategy.place
        cfg, weight = model.config, model.embed.weight
        self.max_tokens = cache.tokens(cfg.max_position_embeddings)
        self.max_tail = cache.tail(self.max_tokens)
        self.batch = cache.batch
        self.cuda_graph = cuda_graph
        self.decoders: dict[int, Decoder] = {}  # by their rows
        self.capacities = arena_capacities(strategy, self.max_tokens, self.max_tail)
        self.tail_capacities = tail_capacities(strategy, self.max_tail)
        self.whole_requests = cache.whole_requests
        self.shares_contexts = cache.share_contexts
        kv_slots = kv_cache_slots(self.capacities, self.tail_capacities,
                                  KVCacheSettings(batch=self.batch, contexts=self.whole_requests))
        # Before any arena exists: arenas a rank has not the memory for end the job in one line.
        JobMemory(cfg, weight.dtype, self.place.world, kv_slots, self.max_tokens,
                  self.batch).refuse_unless_it_fits(dist, weight.device, model.shard.size)
        self.slots: list[Slot] = []
        self.unpark()

    def unpark(self) -> None:
        """Allocates the arenas (at the start, and after park)."""
        cfg, weight = self.model.config, self.model.embed.weight
        rank = self.place.rank
        try:
            self.slots = [Slot(_C.KVArena(cfg.num_layers, self.model.kv_heads, cfg.head_dim,
                                          (self.capacities if whole else self.tail_capacities)[rank], weight.dtype,
                                          weight.device), whole)
                          for whole in [True] * self.whole_requests + [False] * (self.batch - self.whole_requests)]
        except (RuntimeError, MemoryError) as exc:
            raise ValueError(f"the KV cache for {requests_phrase(self.max_tokens, self.batch)} could not be "
                             f"allocated ({cache_flags(self.batch)}): {str(exc).splitlines()[0]}") from None

    def park(self) -> None:
        """Frees the arenas, and what the decoders hold of them, until unpark: another engine
        of this rank (another group's) then has their memory. Contexts encoded are forgotten."""
        for decoder in self.decoders.values():
            decoder.release()
        self.slots = []

    @property
    def arena(self) -> _C.KVArena:
        """The arena of a request run alone (generate)."""
        return self.slots[0].arena

    @property
    def decoder(self) -> "Decoder | None":
        """The decode step of a request run alone, once it has decoded."""
        return self.decoders.get(1)

    def forget_contexts(self) -> None:
        """The next request encodes its context, whatever the arenas hold."""
        for slot in self.slots:
            slot.encoded = None

    def plan(self, context_len: int, query_len: int, max_new_tokens: int, shared_context: bool = False,
             question_tokens: int | None = None) -> RequestPlan:
        """The request's plan; RequestTooLarge, the same on every rank, if it cannot run.
        shared_context, question_tokens: what phase 1 may read of the query (plan_request)."""
        plan = plan_request(self.strategy, context_len, query_len, max_new_tokens, shared_context, question_tokens)
        if plan.total > self.max_tokens:
            raise RequestTooLarge(f"request needs {plan.total} tokens ({context_len} context + {query_len} "
                                  f"query + {max_new_tokens} new), the limit is {self.max_tokens}")
        if plan.tail > self.max_tail:
            raise RequestTooLarge(f"request has {query_len} query + {max_new_tokens} new tokens, the "
                                  f"engine takes at most {self.max_tail} after the context", "max_tail")
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
        plan = self._checked_plan(context_ids, query_ids, max_new_tokens, plan)
        slot = self.slots[0]
        device = self.model.embed.weight.device
        eos = set(self.model.config.eos_token_ids) if stop_at_eos else set()
        reset_peak_memory(device)
        sent_before = self.comm.bytes_sent

        self.dist.sync()
        start = time.perf_counter()
        # Only where it may be reused is a context recognised (by its ids, before they move).
        digest = self._digest(context_ids, query_ids, plan) if reuse_context else None
        phase1, reused = self._encode(slot, context_ids, query_ids, plan, digest, start)
        logits: list[Tensor] = []
        tokens = [self._query(slot, len(context_ids), query_ids, logits if keep_logits else None)]
        first = self._elapsed(start, "the query pass")
        if tokens[-1] not in eos and max_new_tokens > 1:
            decoder = self._decoder(1)
            slot.arena.start_decoding()
            decoder.start([slot.arena], [tokens[-1]], [len(context_ids) + len(query_ids)])
            while tokens[-1] not in eos and len(tokens) < max_new_tokens:
                decoder.step()
                tokens.append(decoder.tokens()[0])
                if keep_logits and self.place.is_query_rank:
                    logits.append(decoder.logits.clone())
            slot.arena.finish_decoding()
        total = self._elapsed(start)
        return Generation(tokens, self._metrics(phase1, first, total, len(tokens), reused, sent_before), logits)

    def generate_many(self, requests: Iterable[tuple[Tensor, Tensor, RequestPlan]], *,
                      stop_at_eos: bool = True, keep_logits: bool = False) -> Iterator[tuple[int, Generation]]:
        """Answers requests (context ids, query ids, plan), up to `batch` of them decoding
        together: one forward pass per step for all, each row attending its own request's
        K/V, and one gather_merge for all rows. A request joins as soon as a slot is free
        (its context encoded, or copied from a slot that holds it, and its query run between
        two steps) and leaves when it is done. Yields (its index in `requests`, its
        generation) as each finishes. `requests` may yield LATER while some decode: no request
        now, ask again after the next step. Every rank must pass the same requests; each
        answer is the one the request gets alone. keep_logits: as for generate. On GPUs each
        set of requests that decodes together has its step captured in a CUDA graph."""
        device = self.model.embed.weight.device
        eos = set(self.model.config.eos_token_ids) if stop_at_eos else set()
        reset_peak_memory(device)
        pending, taken = iter(requests), 0
        free, running = list(reversed(self.slots)), []
        exhausted, waiting = False, None
        while True:
            while free and not exhausted:
                item = waiting or next(pending, None)
                waiting = None
                if item is None:
                    exhausted = True
                    break
                if item is LATER:
                    break  # none now: the next step's free slots ask again
                context_ids, query_ids, plan = item
                run = self._admit(taken, context_ids, query_ids, plan, free, eos, keep_logits)
                if run is None:  # no slot it can take before another request is done
                    if not running:
                        raise RuntimeError("a request found no slot with none running")
                    waiting = item
                    break
                taken += 1
                if run.done:
                    self._release(run.slot, free)
                    yield run.index, self._finished(run)
                else:
                    run.slot.arena.start_decoding()
                    running.append(run)
            if not running:
                if exhausted:
                    return
                continue
            self._step_together(running, keep_logits)
            for run in [r for r in running if r.done]:
                running.remove(run)
                run.slot.arena.finish_decoding()
                self._release(run.slot, free)
                yield run.index, self._finished(run)

    def _checked_plan(self, context_ids: Tensor, query_ids: Tensor, max_new_tokens: int,
                      plan: RequestPlan | None) -> RequestPlan:
        if plan is None:
            plan = self.plan(len(context_ids), len(query_ids), max_new_tokens)
        asked = (len(context_ids), len(query_ids), max_new_tokens)
        if (plan.context_len, plan.query_len, plan.max_new_tokens) != asked:
            raise ValueError("the plan is another request's")
        return plan

    @staticmethod
    def _question(query_ids: Tensor, plan: RequestPlan) -> Tensor | None:
        """The query's tokens that phase 1 reads, if any (the question)."""
        return query_ids[:plan.phase1_query_tokens] if plan.phase1_query_tokens else None

    def _digest(self, context_ids: Tensor, query_ids: Tensor, plan: RequestPlan) -> str:
        """What names the K/V phase 1 leaves: the context's, or the context's for this
        question where it was encoded knowing it."""
        return context_digest(context_ids, self._question(query_ids, plan))

    def _encode(self, slot: Slot, context_ids: Tensor, query_ids: Tensor, plan: RequestPlan, digest: str | None,
                start: float) -> tuple[float, bool]:
        """Phase 1 of the context into the slot's arena, unless the slot holds it already
        (digest: the context's, where it may be reused), or another slot does and its K/V is
        copied: (seconds, whether reused)."""
        candidates = [slot, *(s for s in self.slots if s is not slot)]  # the slot itself first
        holder = next((s for s in candidates
                       if digest is not None and s.holds(digest) and not (s is slot and s.arena.decoding)), None)
        if holder is slot:
            slot.arena.truncate(slot.encoded[1])  # back to the context: the last answer's K/V goes
            return 0.0, True
        slot.encoded = None
        slot.arena.clear()
        if holder is not None:
            holder.copy_context_to(slot)
            return self._elapsed(start, "a copy of the context's K/V"), True
        device = self.model.embed.weight.device
        self.strategy.encode_context(self.model, context_ids.to(device), plan.layout, slot.arena,
                                     self._question(query_ids, plan))
        slot.encoded = (digest, slot.arena.length(0)) if digest is not None else None
        return self._elapsed(start, "phase 1"), False

    def _query(self, slot: Slot, context_len: int, query_ids: Tensor, keep: list[Tensor] | None) -> int:
        """The query's tokens in one pass over the slot's arena (after the context it reads,
        if any): the first generated token."""
        device = self.model.embed.weight.device
        attend = query_attention(slot.arena, self.comm, self.place.is_query_rank, slot.prefix)
        positions = torch.arange(context_len, context_len + len(query_ids), device=device)
        return self._next_token(self.model(query_ids.to(device), positions, attend), keep)

    def _admit(self, index: int, context_ids: Tensor, query_ids: Tensor, plan: RequestPlan,
               free: list[Slot], eos: set[int], keep_logits: bool) -> RunningRequest | None:
        """A request's phase 1 and query in a free slot (_place); None where none serves it
        until another request is done."""
        plan = self._checked_plan(context_ids, query_ids, plan.max_new_tokens, plan)
        digest = self._digest(context_ids, query_ids, plan)
        placed = self._place(digest, free)
        if placed is None:
            return None
        slot, holder = placed
        free.remove(slot)
        sent_before = self.comm.bytes_sent
        self.dist.sync()
        start = time.perf_counter()
        if holder is not None:
            slot.read(holder)
            phase1, reused = 0.0, True
        else:
            phase1, reused = self._encode(slot, context_ids, query_ids, plan, digest, start)
        logits: list[Tensor] = []
        token = self._query(slot, len(context_ids), query_ids, logits if keep_logits else None)
        return RunningRequest(index, slot, [token], len(context_ids) + len(query_ids), plan.max_new_tokens, eos,
                              start, self._elapsed(start, "the query pass"), phase1, reused, sent_before, logits)

    def _place(self, digest: str, free: list[Slot]) -> tuple[Slot, Slot | None] | None:
        """The free slot a request of this context takes, and the slot whose context it
        reads (None: its own): a free slot that holds the context; else, where a busy one
        holds it, a free slot that reads it there (a tail's slot first), unless contexts are
        not shared; else a free whole slot that no request reads, to encode it in (or copy
        it into, _encode). None: none now."""
        own = next((s for s in free if s.whole and s.holds(digest)), None)
        if own is not None:
            return own, None
        holder = next((s for s in self.slots if s.holds(digest)), None)
        if holder is not None and self.shares_contexts:
            reader = next((s for s in free if not s.whole), None) or \
                next((s for s in reversed(free) if s.readers == 0), None)
            return None if reader is None else (reader, holder)
        whole = [s for s in free if s.whole and s.readers == 0]
        return (whole[-1], None) if whole else None

    @staticmethod
    def _release(slot: Slot, free: list[Slot]) -> None:
        """A slot whose request is done: free, and no longer reading another's context."""
        slot.done_reading()
        free.append(slot)

    def _step_together(self, running: list[RunningRequest], keep_logits: bool) -> None:
        """One decode step of every running request: a token each, in one forward pass."""
        decoder = self._decoder(len(running))
        decoder.start([run.slot.arena for run in running], [run.tokens[-1] for run in running],
                      [run.position for run in running], [run.slot.prefix for run in running])
        decoder.step()
        for row, (run, token) in enumerate(zip(running, decoder.tokens())):
            run.tokens.append(token)
            run.position += 1
            if keep_logits and self.place.is_query_rank:
                run.logits.append(decoder.logits[row:row + 1].clone())

    def _finished(self, run: RunningRequest) -> Generation:
        total = self._elapsed(run.start)
        return Generation(run.tokens, self._metrics(run.phase1, run.first, total, len(run.tokens), run.reused,
                                                    run.sent_before), run.logits)

    def _metrics(self, phase1: float, first: float, total: float, tokens: int, reused: bool,
                 sent_before: int) -> Metrics:
        """Every rank's figures of a request that has ended (on every rank at once)."""
        local = (phase1, peak_memory(self.model.embed.weight.device), self.comm.bytes_sent - sent_before)
        self.dist.sync()
        every = self.dist.allgather(local)
        return Metrics(
            phase1_s=max(p for p, _, _ in every),
            phase1_per_rank_s=[p for p, _, _ in every],
            ttft_s=first,
            tpot_s=(total - first) / (tokens - 1) if tokens > 1 else None,
            peak_mem_bytes=[m for _, m, _ in every],
            bytes_sent=[b for _, _, b in every],
            context_reused=reused,
        )

    def _decoder(self, requests: int) -> "Decoder":
        """The decode step for this many requests at once: made (and, on a GPU, captured)
        the first time its number of rows is needed, kept for the engine's life."""
        cfg, weight = self.model.config, self.model.embed.weight
        padded = decode_kernel_serves(self.model.heads, self.model.kv_heads, cfg.head_dim, weight.dtype, weight.device)
        rows = decode_rows(requests, self.batch, padded)
        if rows not in self.decoders:
            self.decoders[rows] = Decoder(self.model, rows, self.capacities[self.place.rank], self.comm, self.place,
                                           self.cuda_graph)
        return self.decoders[rows]

    def _next_token(self, hidden: Tensor, keep: list[Tensor] | None) -> int:
        """Greedy choice on the query rank (every rank of the query host, from the same
        logits), broadcast so that ranks can never diverge."""
        token = torch.zeros(1, dtype=torch.int64, device=hidden.device)
        if self.place.is_query_rank:
            logits = self.model.logits(hidden if keep is not None else hidden[-1:])
            if keep is not None:
                keep.append(logits)
            token[0] = logits[-1].argmax()
        self.comm.broadcast(token, root=self.place.query_rank)
        self.comm.synchronize("the query pass")
        return int(token.item())

    def _elapsed(self, start: float, what: str = "the request's work") -> float:
        """Seconds since start, once the device work so far (`what`) is done."""
        self.comm.synchronize(what)
        if self.model.embed.weight.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start
