"""Hosts: groups of `--tp` consecutive ranks of one node that together hold one copy of the
model (tensor parallelism), as a "host" holds one in the Star Attention paper.

Inside a host the model is split the usual way (Megatron-LM, Shoeybi et al. 2019): each
rank holds its own attention heads and KV heads (a KV head is replicated where there are
fewer KV heads than ranks), the rows of q/k/v and gate/up that make them, and the matching
columns of the o and down projections, whose products the host sums with one all-reduce
each; the embedding and the output head are split by vocabulary. Across hosts the
strategies (star, ring, dense) run as they do across ranks with --tp 1: the ranks that hold
the same heads on every host form one group, and gather_merge runs there, each rank
exchanging only its own heads. `--tp 1` is one rank per host.
"""

from __future__ import annotations

from .config import ModelConfig
from .launch.control import Dist, JobError, Place
from .shard import Shard


def host_problem(tp: int, world: int, node_of: tuple[int, ...]) -> str | None:
    """Why `world` ranks cannot form hosts of `tp` consecutive ranks on one node each, or None."""
    if world % tp:
        return f"--tp {tp} does not divide the {world} ranks of the job into hosts"
    for host in range(world // tp):
        nodes = {node_of[r] for r in range(host * tp, (host + 1) * tp)}
        if len(nodes) > 1:
            return (f"host {host} (ranks {host * tp}-{host * tp + tp - 1}) spans {len(nodes)} nodes: the ranks of a "
                    f"host must share a node; launch a multiple of {tp} ranks per node, in order")
    return None


class Hosts:
    """This rank's host and the two groups it communicates in: the ranks of its host
    (tensor parallelism) and the ranks of every host that hold the same heads (the
    strategy's peers, among which this rank is number `host`)."""

    def __init__(self, dist: Dist, tp: int = 1) -> None:
        problem = host_problem(tp, dist.world, dist.node_of)
        if problem:
            raise JobError(problem)
        self.tp, self.count = tp, dist.world // tp
        self.host, self.tp_rank = divmod(dist.rank, tp)
        self.place = Place(self.host, self.count)  # the strategy's place: hosts are its ranks
        self.peers = dist if tp == 1 else dist.group(color=self.tp_rank, key=self.host)
        self.members = None if tp == 1 else dist.group(color=self.host, key=self.tp_rank)

    def shard(self, config: ModelConfig) -> Shard:
        try:
            return Shard.of(config, self.tp_rank, self.tp)
        except ValueError as exc:
            raise JobError(str(exc)) from None
