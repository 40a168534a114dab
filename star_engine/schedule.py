"""The schedule of one request: phase 1 (the strategy encodes the context), then phase 2
(the query, then one token at a time), with every rank in step and the query rank
deciding each next token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import _C
from .attention import Strategy
from .attention.sequence_global import sequence_global_attention
from .comm import Communicator
from .launch import Dist
from .model import Transformer


class RequestTooLarge(ValueError):
    """The request needs more tokens than the engine was sized for; nothing was computed."""


@dataclass
class Metrics:
    phase1_s: float  # slowest rank's context encoding
    ttft_s: float  # request start to first token decided
    tpot_s: float | None  # mean time per output token after the first
    peak_mem_bytes: list[int]  # per rank: GPU memory allocated, or resident memory on CPU
    bytes_sent: list[int]  # per rank: payload put on the wire


@dataclass
class Generation:
    tokens: list[int]  # generated ids, the stopping EOS included
    metrics: Metrics
    # Query rank with keep_logits: logits [tokens, vocab] of each forward pass (the
    # query's tokens, then one per generated token). Empty elsewhere.
    logits: list[Tensor] = field(default_factory=list)


class Engine:
    """Runs requests with one strategy. Sized once: every rank's KV arena holds the
    worst case of a request of up to `max_tokens` tokens (context + query + generated)."""

    def __init__(self, model: Transformer, strategy: Strategy, comm: Communicator, dist: Dist,
                 max_tokens: int) -> None:
        self.model, self.strategy, self.comm, self.dist = model, strategy, comm, dist
        self.max_tokens = max_tokens
        # The query rank's context, query and generated tokens together stay within max_tokens.
        self.capacities = [max_tokens if r == dist.query_rank else strategy.context_capacity(r, max_tokens)
                           for r in range(dist.world)]
        cfg, weight = model.config, model.embed.weight
        self.arena = _C.KVArena(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                self.capacities[dist.rank], weight.dtype, weight.device)

    def check_fits(self, context_len: int, query_len: int, max_new_tokens: int) -> None:
        """Raises RequestTooLarge, the same on every rank, if the request cannot be run."""
        total = context_len + query_len + max_new_tokens
        if total > self.max_tokens:
            raise RequestTooLarge(f"request needs {total} tokens ({context_len} context + {query_len} "
                                  f"query + {max_new_tokens} new), the limit is {self.max_tokens}")
        needs = self.strategy.context_split(context_len)
        needs[self.dist.query_rank] += query_len + max_new_tokens
        for rank, (need, capacity) in enumerate(zip(needs, self.capacities)):
            if need > capacity:
                raise RequestTooLarge(f"rank {rank} needs {need} KV slots, its arena holds {capacity}")

    def generate(self, context_ids: Tensor, query_ids: Tensor, max_new_tokens: int,
                 keep_logits: bool = False) -> Generation:
        if len(query_ids) == 0 or max_new_tokens < 1:
            raise ValueError("a request needs at least one query token and max_new_tokens >= 1")
        self.check_fits(len(context_ids), len(query_ids), max_new_tokens)
        device = self.model.embed.weight.device
        context_ids, query_ids = context_ids.to(device), query_ids.to(device)
        eos = set(self.model.config.eos_token_ids)
        self.arena.clear()
        _reset_peak_memory(device)
        sent_before = self.comm.bytes_sent

        self.dist.sync()
        start = time.perf_counter()
        self.strategy.encode_context(self.model, context_ids, self.arena)
        phase1 = self._elapsed(start)

        attend = sequence_global_attention(self.arena, self.comm, self.dist.is_query_rank)
        position, ids, tokens, logits = len(context_ids), query_ids, [], []
        while True:
            hidden = self.model(ids, torch.arange(position, position + len(ids), device=device), attend)
            position += len(ids)
            token = self._next_token(hidden, logits if keep_logits else None)
            tokens.append(token)
            if len(tokens) == 1:
                first = self._elapsed(start)
            if token in eos or len(tokens) == max_new_tokens:
                break
            ids = torch.tensor([token], device=device)
        total = self._elapsed(start)

        local = (phase1, _peak_memory(device), self.comm.bytes_sent - sent_before)
        self.dist.sync()
        every = self.dist.mpi.allgather(local)
        metrics = Metrics(
            phase1_s=max(p for p, _, _ in every),
            ttft_s=first,
            tpot_s=(total - first) / (len(tokens) - 1) if len(tokens) > 1 else None,
            peak_mem_bytes=[m for _, m, _ in every],
            bytes_sent=[b for _, _, b in every],
        )
        return Generation(tokens, metrics, logits)

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


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the peak resident set size (VmHWM) to the current one
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak is the process's since its start


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
