"""Measuring a device for the planner (`plan --calibrate`): the engine's own phase 1 at a few
block sizes (fitted to a linear and an attention rate), memory bandwidth, the link between
ranks, gather_merge, and what a query pass and a decode step cost beyond those."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from .. import _C
from ..attention.spec import StrategySpec
from ..attention.star import StarAttention, block_work
from ..comm import Communicator
from ..costs import Calibration, attention_flops_per_pair, fit_rates, linear_flops_per_token
from ..engine import Engine
from ..launch.control import Dist, Place
from ..model import Transformer
from ..settings import KVCacheSettings
from ..prediction import predict
from .timing import copy_bandwidth, median_s


def measure(model: Transformer, name: str, comm: Communicator, dist: Dist, say: Callable[[str], None]) -> Calibration:
    """Every rank takes part; rank 0's measurements (the others wait where they are not
    needed, so that ranks sharing a machine do not slow each other). The link between ranks
    of a node where a node has two; on several nodes the network between them and
    gather_merge across them, else gather_merge within the node."""
    weight = model.embed.weight
    device, cuda = weight.device, weight.is_cuda
    base = 4096 if cuda else 128  # block sizes: base x 1, 2, 4, 8
    rates = _phase1_rates(model, [base * m for m in (1, 2, 4, 8)], say) if dist.rank == 0 else None
    dist.sync()
    copy = copy_bandwidth(device) if dist.rank == 0 else None
    nbytes = (64 << 20) if cuda else (8 << 20)
    link = _pair_bandwidth(comm, dist, device, nbytes, _partner(dist, across_nodes=False))
    network = _pair_bandwidth(comm, dist, device, nbytes, _partner(dist, across_nodes=True))
    gather = _gather_merge_s(comm, model, dist) if dist.world > 1 else None
    gather, network_gather = (None, gather) if dist.nodes > 1 else (gather, None)
    linear_rate, attention_rate = dist.bcast(rates, root=0)
    partial = Calibration(
        device=torch.cuda.get_device_name(device) if cuda else "cpu", linear_flops_per_s=linear_rate,
        attention_flops_per_s=attention_rate, copy_bandwidth_Bps=dist.bcast(copy, root=0),
        link_bandwidth_Bps=link, gather_merge_s_per_layer=gather, network_bandwidth_Bps=network,
        network_gather_merge_s_per_layer=network_gather,
        memory_bytes=torch.cuda.get_device_properties(device).total_memory if cuda else None,
        source="")
    say(f"  linear {linear_rate / 1e12:.3g} TFLOP/s, attention {attention_rate / 1e12:.3g} TFLOP/s, copy "
        f"{partial.copy_bandwidth_Bps / 1e9:.3g} GB/s"
        + (f", link {link / 1e9:.3g} GB/s" if link else "") + (f", network {network / 1e9:.3g} GB/s" if network else "")
        + (f", gather_merge {(gather or network_gather) * 1e6:.1f} us/layer" if dist.world > 1 else ""))
    query, decode = _overheads(model, comm, dist, partial, context=4 * base)
    nodes = f" ({dist.nodes} nodes)" if dist.nodes > 1 else ""
    return replace(partial, query_overhead_s=query, decode_overhead_s=decode,
                   source=f"plan --calibrate on {dist.world} rank(s){nodes} of {partial.device} with {name}, "
                          f"{model.embed.weight.dtype}")


def _phase1_rates(model: Transformer, blocks: list[int], say: Callable[[str], None]) -> tuple[float, float]:
    """Phase 1 of two blocks (block 0 alone, block 1 after an anchor of a block) on this
    rank alone, at each size; the two rates that explain the times."""
    cfg, weight = model.config, model.embed.weight
    linear, attention, seconds = [], [], []
    for block in blocks:
        star = StarAttention(Place(0, 1), None, blocks=2, anchor_mode="recompute")
        ids = torch.randint(0, cfg.vocab_size, (2 * block,), device=weight.device)
        layout = star.layout(2 * block)
        arena = _C.KVArena(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 2 * block, weight.dtype, weight.device)

        def encode() -> None:
            arena.clear()
            star.encode_context(model, ids, layout, arena)

        seconds.append(median_s(encode, weight.device, repeats=3, warmup=1))
        linear.append(2 * block * linear_flops_per_token(cfg))
        attention.append((block_work(block, 0, 0.0) + block_work(block, block, 0.0)) * attention_flops_per_pair(cfg))
        say(f"  phase 1, two blocks of {block}: {seconds[-1]:.3f} s")
        del arena
    return fit_rates(linear, attention, seconds)


def _partner(dist: Dist, across_nodes: bool) -> int | None:
    """This rank's partner in pairs that each measure one link: neighbouring ranks of a node,
    or the same-numbered ranks of nodes 0 and 1, 2 and 3, ...; None for a rank left over."""
    by_node = [[r for r in range(dist.world) if dist.node_of[r] == n] for n in range(dist.nodes)]
    node = dist.node_of[dist.rank]
    index = by_node[node].index(dist.rank)
    if across_nodes:
        other = node ^ 1
        return by_node[other][index] if other < dist.nodes and index < len(by_node[other]) else None
    return by_node[node][index ^ 1] if (index ^ 1) < len(by_node[node]) else None


def _pair_bandwidth(comm: Communicator, dist: Dist, device: torch.device, nbytes: int,
                    partner: int | None) -> float | None:
    """Bytes per second each way between partners sending to each other at once, as ring
    attention's neighbours do; the slowest pair's, or None where no rank has a partner."""
    seconds = None
    if partner is not None:
        send = torch.empty(nbytes, dtype=torch.uint8, device=device)
        recv = torch.empty_like(send)

        def step() -> None:
            comm.send_recv(send, partner, recv, partner)
            comm.synchronize()

        seconds = median_s(step, device, repeats=5, warmup=1)
    rates = [nbytes / s for s in dist.allgather(seconds) if s is not None]
    return min(rates) if rates else None


def _gather_merge_s(comm: Communicator, model: Transformer, dist: Dist) -> float:
    """One decode token's gather_merge, the slowest rank's; on GPUs replayed from a CUDA
    graph as in a decode step."""
    cfg, weight = model.config, model.embed.weight
    if weight.is_cuda:
        from .speed import gather_merge_latency

        seconds = gather_merge_latency(comm, cfg.num_heads, cfg.head_dim, weight.dtype, weight.device, cfg.num_layers)
    else:
        o = torch.randn(cfg.num_heads, 1, cfg.head_dim, dtype=weight.dtype)
        lse = torch.randn(cfg.num_heads, 1)
        seconds = median_s(lambda: [comm.gather_merge(o, lse) for _ in range(cfg.num_layers)],
                           weight.device, repeats=9, warmup=1) / cfg.num_layers
    return max(dist.allgather(seconds))


def _overheads(model: Transformer, comm: Communicator, dist: Dist, rates: Calibration,
               context: int) -> tuple[float, float]:
    """What a query pass and a decode step take beyond what the rates predict: measured
    on a short request with star over every rank."""
    cfg, weight = model.config, model.embed.weight
    query_tokens, new_tokens = 64, 17
    engine = Engine(model, StrategySpec().build(comm.place, comm, cfg, None), comm, dist,
                    KVCacheSettings(context + query_tokens + new_tokens))
    ids = torch.randint(0, cfg.vocab_size, (context + query_tokens,), generator=torch.Generator().manual_seed(0))
    runs = [engine.generate(ids[:context], ids[context:], new_tokens, stop_at_eos=False) for _ in range(3)]
    metrics = sorted((run.metrics for run in runs[1:]), key=lambda m: m.ttft_s)[0]  # the first warms up
    want = predict(cfg, StrategySpec(), dist.world, context, query_tokens, new_tokens, rates,
                   weight.element_size(), gpus_per_node=dist.local_world if dist.nodes > 1 else None)
    query = max(0.0, (metrics.ttft_s - metrics.phase1_s) - (want.ttft_s - want.phase1_s))
    decode = max(0.0, metrics.tpot_s - want.tpot_s)
    return query, decode
