"""The memory budget of a rank, and the one decision whether a job fits in it.

A rank holds its share of the weights, its KV cache (its engine's arenas) and, while a
request runs, phase 1's transients (request_plan.py estimates them). It must have free what
is still to be allocated, and headroom. The session asks before any weight is built, the
engine before it allocates its arenas, bench before each request and the planner for each
prediction; what does not fit is refused with one message, the same on every rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import ModelConfig
from .costs import kv_bytes_per_token, rank_weights
from .launch.control import JobError
from .memory import available_memory
from .shard import Shard, split_problem

if TYPE_CHECKING:
    import torch

    from .launch.control import Dist
    from .request_plan import RequestPlan

# Beyond what it holds, a rank keeps 10% of what the work adds to the weights (the
# allocator's fragmentation, and the error of the phase-1 estimate: up to 6% of a measured
# peak, more than 10% of the transients alone) and 1 GiB (kernels' workspace, what no
# estimate counts). The weights are exact.
HEADROOM_FACTOR, HEADROOM_BYTES = 1.1, 1 << 30
# The --tp values a refusal looks for one that fits among.
TP_CHOICES = (2, 4, 8, 16)


@dataclass(frozen=True)
class RankBudget:
    """What the busiest rank of a job holds, in bytes: its weights, its KV cache and, where a
    request is known, the transients of its phase 1 (an estimate)."""

    weights: int
    kv_cache: int = 0
    transients: float = 0.0

    @property
    def peak(self) -> int:
        """The estimated peak memory: all of it."""
        return round(self.weights + self.kv_cache + self.transients)

    @property
    def needed(self) -> int:
        """The free memory the rank must have for it: the peak and the headroom."""
        return round(self.weights + HEADROOM_FACTOR * (self.kv_cache + self.transients) + HEADROOM_BYTES)


def rank_budget(config: ModelConfig, element_size: int, tp: int = 1, kv_slots: int = 0) -> RankBudget:
    """The busiest rank of a host of `tp` (its first, shard.py): its weights, and KV arenas of
    kv_slots slots in all."""
    return RankBudget(rank_weights(config, tp) * element_size, kv_slots * _kv_bytes_per_slot(config, element_size, tp))


def request_budget(plan: RequestPlan, config: ModelConfig, element_size: int, tp: int = 1) -> RankBudget:
    """The busiest rank's for one request alone: the weights, and the request's KV slots and
    phase 1's transients on the rank where those two are the most."""
    per_slot = _kv_bytes_per_slot(config, element_size, tp)
    kv_cache, transients = max(zip((slots * per_slot for slots in plan.kv_slots),
                                   plan.transient_bytes(config, element_size)), key=sum)
    return RankBudget(rank_weights(config, tp) * element_size, kv_cache, transients)


def _kv_bytes_per_slot(config: ModelConfig, element_size: int, tp: int) -> int:
    """A token's K/V on a rank of a host of `tp`: of its KV heads."""
    return kv_bytes_per_token(config, element_size, len(Shard.of(config, 0, tp).kv_heads))


def least_free_memory(dist: Dist, device: torch.device) -> int | None:
    """The least memory any rank of the job could still allocate; None where no rank knows."""
    free = [f for f in dist.allgather(available_memory(device)) if f is not None]
    return min(free) if free else None


def fits(budget: RankBudget, free: int | None, weights_in_place: bool = False) -> bool:
    """Whether a rank with `free` bytes free (None: unknown) has room for the budget: for all
    of it, or beside its weights where they are in place already."""
    return free is None or budget.needed - (budget.weights if weights_in_place else 0) <= free


@dataclass(frozen=True)
class JobMemory:
    """What the busiest rank of a job holds, whatever its --tp: the weights of `config` in
    `dtype` and KV arenas of kv_slots slots in all (a count --tp does not change: it splits
    heads, not tokens), sized for `batch` requests of up to max_tokens tokens each, the
    strategy running among `hosts` hosts. kv_slots 0: the KV cache is not counted."""

    config: ModelConfig
    dtype: torch.dtype
    hosts: int
    kv_slots: int = 0
    max_tokens: int = 0
    batch: int = 1

    def at(self, tp: int) -> RankBudget:
        return rank_budget(self.config, self.dtype.itemsize, tp, self.kv_slots)

    def refuse_unless_it_fits(self, dist: Dist, device: torch.device, tp: int, model: str | None = None) -> None:
        """Refuses, the same on every rank, a job whose busiest rank has not the memory: a
        JobError saying what it needs and what to change (--max-tokens, --batch, --tp, more
        ranks). model: as --model names it, where its weights are still to be built; None
        where they are in place (an engine's), and only the KV cache is to come."""
        free = least_free_memory(dist, device)
        budget = self.at(tp)
        if fits(budget, free, weights_in_place=model is None):
            return
        whole = free + (budget.weights if model is None else 0)  # a rank's, with nothing of the job in it
        fitting = next((n for n in TP_CHOICES if n > tp and not split_problem(self.config, n)
                        and fits(self.at(n), whole)), None)
        advice = (f"--tp {fitting} (with {fitting * self.hosts} ranks) would fit" if fitting else
                  f"no --tp up to {TP_CHOICES[-1]} would fit with {self.hosts} host{'s' * (self.hosts != 1)}")
        every = "every rank" if tp == 1 else f"every rank of a host of {tp}"
        if model is not None and budget.weights + HEADROOM_BYTES > whole:
            raise JobError(f"{model} in {str(self.dtype).removeprefix('torch.')} takes {_gib(budget.weights)} GiB "
                           f"of weights on {every}, and a rank's {device.type} has {_gib(whole)} GiB free: {advice}, "
                           "or a device with more memory, a smaller --dtype or model")
        raise JobError(f"a KV cache for {requests_phrase(self.max_tokens, self.batch)} needs {_gib(budget.kv_cache)} "
                       f"GiB on {every} ({_gib(budget.needed - budget.weights)} GiB with its headroom), which has "
                       f"{_gib(whole - budget.weights)} GiB free beside the weights: a smaller "
                       f"{cache_flags(self.batch)}, more ranks, or {advice}")


def requests_phrase(max_tokens: int, batch: int) -> str:
    """What a KV cache is sized for, as messages say it."""
    return f"requests of {max_tokens} tokens" + (f", {batch} at once" if batch > 1 else "")


def cache_flags(batch: int) -> str:
    """The flags that size a KV cache."""
    return "--max-tokens" + (" or --batch" if batch > 1 else "")


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f}"
