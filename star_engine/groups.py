"""Auto scale-out: each request on as many hosts as its context needs.

The job's hosts form aligned groups of 1, 2, 4, ... hosts, and one of all of them
(dispatch.py names them); a rank belongs to one group of each size (or none of a size that
leaves its host over). Every group's communicators are made once, at the start: the
group's ranks (its control plane), and among them the ranks that hold the same heads on
each host, between which the strategy runs (NCCL, or MPI on CPUs; the peer-memory gather
where a group shares a node). A request runs on one group: alone on one host it is exact
(dense); on several, the job's strategy, whose blocks then hold at most --max-block tokens.
How many hosts a request gets depends only on the request and the flags, so that its answer
is the one it gets run alone on a group of that size, whatever else runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .costs import model_weights
from .dispatch import Group, group_sizes
from .launch.control import JobError
from .request_plan import RequestTooLarge

if TYPE_CHECKING:
    import torch

    from .comm import Communicator
    from .config import ModelConfig
    from .engine import Engine
    from .prediction import Prediction
    from .request_plan import RequestPlan
    from .settings import ScaleOutSettings
    from .hosts import Hosts
    from .launch.control import Dist

# The Star Attention paper's practice (Acharya et al. 2024, section 4): blocks of 32K tokens
# for long contexts, 16K for a 70B model; here 16K from 30B parameters.
MAX_BLOCK_TOKENS, LARGE_MODEL_MAX_BLOCK_TOKENS, LARGE_MODEL_PARAMETERS = 32 << 10, 16 << 10, 30e9


# Where a smaller group's KV cache would hold requests of fewer tokens than this, it takes none.
MIN_GROUP_TOKENS = 1024


def default_max_block(config: ModelConfig) -> int:
    """--max-block's default for a model of this shape."""
    return LARGE_MODEL_MAX_BLOCK_TOKENS if model_weights(config) >= LARGE_MODEL_PARAMETERS else MAX_BLOCK_TOKENS


def hosts_by_rule(context_len: int, max_block: int, hosts: int) -> int:
    """The fewest hosts whose blocks hold at most max_block tokens of the context each,
    rounded up to a group size, at most all of them."""
    needed = -(-context_len // max_block)
    return next(size for size in group_sizes(hosts) if size >= needed or size == hosts)


def level_max_tokens(size: int, max_block: int, job_max_tokens: int) -> int:
    """The longest request an engine of groups of `size` hosts (fewer than all) is sized
    for: contexts of up to size x max_block tokens, and a query and answer of up to a
    quarter block; a request beyond goes to a larger group. At most the job's."""
    return min(job_max_tokens, size * max_block + max_block // 4)


@dataclass
class HostGroup:
    """A group this rank belongs to: its ranks (dist) and the communicator among the ranks
    of its hosts that hold the same heads as this rank (the strategy's)."""
    group: Group
    dist: Dist
    comm: Communicator

    @property
    def leader(self) -> bool:
        """This rank speaks for the group to rank 0 (its first rank)."""
        return self.dist.rank == 0


class HostGroups:
    """This rank's group of each size, with their communicators, made on every rank at once.
    The group of all hosts is the job's own (its dist and communicator)."""

    def __init__(self, dist: Dist, hosts: Hosts, comm: Communicator, device: torch.device,
                 sizes: list[int]) -> None:
        from .comm import make_communicator
        from .memory import available_memory

        self.count, self.tp = hosts.count, hosts.tp
        self.by_size: dict[int, HostGroup] = {}
        free_before, start = available_memory(device), time.perf_counter()
        for size in sorted(sizes):
            group = Group(size, hosts.host // size)
            member = group.index < self.count // size
            if size == self.count:
                self.by_size[size] = HostGroup(group, dist, comm)
                continue
            # Every rank takes part in each split, the ranks of hosts left over with no color.
            ranks = dist.group(group.index if member else None, dist.rank)
            # With --tp 1 a group's ranks are its strategy's peers.
            peers = ranks if hosts.tp == 1 else dist.group(group.index * hosts.tp + hosts.tp_rank if member else None,
                                                           dist.rank)
            if member:
                try:
                    self.by_size[size] = HostGroup(group, ranks, make_communicator(peers, device))
                except RuntimeError as exc:
                    raise JobError(f"the communicators of the groups of {size} hosts could not be made: "
                                   f"{str(exc).splitlines()[0]}") from None
        dist.sync()
        self.setup_s = time.perf_counter() - start
        free_after = available_memory(device)
        taken = free_before - free_after if free_before is not None and free_after is not None else 0
        self.setup_bytes = max(dist.allgather(max(taken, 0))) if device.type == "cuda" else 0


class RequestSizing:
    """On rank 0: the group size and plan of each request, from the request and the flags
    alone. `engines`: an engine of each group size in use (rank 0 is in a group of each)."""

    def __init__(self, engines: dict[int, Engine], hosts: int, settings: ScaleOutSettings, max_block: int,
                 predicted: Callable[[int, int, int, int], Prediction] | None = None) -> None:
        """predicted(hosts, context, query, new tokens): the planner's prediction of a request."""
        self.engines, self.hosts, self.settings, self.max_block = engines, hosts, settings, max_block
        self.predicted = predicted

    def cost(self, hosts: int, plan: RequestPlan) -> float:
        """The request's predicted seconds on its group (phase 1, the query, its tokens), which
        the hand-out balances groups of a size by; its tokens where nothing predicts."""
        if self.predicted is None:
            return float(plan.total)
        p = self.predicted(hosts, plan.context_len, plan.query_len, plan.max_new_tokens)
        return p.ttft_s + (plan.max_new_tokens - 1) * p.tpot_s

    def plan(self, context_len: int, query_len: int, max_new_tokens: int,
             shared_context: bool = False, question_tokens: int | None = None) -> tuple[int, RequestPlan]:
        """(hosts, plan): shared_context and question_tokens say what phase 1 may read of the
        query (Engine.plan); with auto, the fewest hosts by the rule (or predicted to meet the
        time-to-first-token target), raised to the first group size whose engine holds the
        request; RequestTooLarge where none does."""
        if self.settings.hosts_per_request != "auto":
            size = self.settings.fixed or self.hosts
            return size, self.engines[size].plan(context_len, query_len, max_new_tokens, shared_context,
                                                     question_tokens)
        if self.settings.ttft_target_s is not None:
            least = next((size for size in sorted(self.engines) if size == self.hosts or self.predicted(
                size, context_len, query_len, max_new_tokens).ttft_s <= self.settings.ttft_target_s), self.hosts)
        else:
            least = hosts_by_rule(context_len, self.max_block, self.hosts)
        refusal = None
        for size in sorted(s for s in self.engines if s >= least):
            try:
                return size, self.engines[size].plan(context_len, query_len, max_new_tokens, shared_context,
                                                     question_tokens)
            except RequestTooLarge as exc:
                refusal = exc
        raise refusal
