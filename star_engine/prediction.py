"""What a request will cost before it runs: phase 1, time to first token, time per output
token and memory per rank, for a strategy on a number of GPUs, from the model's shape and
a device's measured rates (costs.Calibration).

Phase 1 on a rank is its attention pairs and tokens at the measured rates; the slowest rank
sets the time. Star adds the anchor's broadcast (its K/V every layer, over the link); ring
overlaps each step's attention with passing the next K/V block, and a step takes the longer
of the two. The query pass reads the weights once and attends the query's tokens; a decode
step reads the weights and the busiest rank's K/V once, plus one gather_merge per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .attention.ring import RingLayout
from .attention.spec import StrategySpec
from .attention.star import StarLayout, anchored_block_shape, block_work
from .budget import request_budget
from .config import ModelConfig
from .costs import Calibration, attention_flops_per_pair, decode_weights, kv_bytes_per_token, linear_flops_per_token
from .launch.control import Place
from .request_plan import plan_request


@dataclass
class Prediction:
    label: str
    gpus: int
    context: int
    phase1_s: float
    ttft_s: float
    tpot_s: float
    memory_bytes: int  # the busiest rank's estimated peak: weights, KV cache, phase-1 activations, workspace
    memory_needed_bytes: int  # what that rank must have for the request to run: the estimate and headroom
    phase1_per_rank_s: list[float] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # costs the calibration has no rate for
    decode_kv_s: float = 0.0  # of tpot_s, reading this request's K/V: what a batch's step pays per request


def predict(config: ModelConfig, spec: StrategySpec, gpus: int, context: int, query_tokens: int,
            new_tokens: int, calibration: Calibration, element_size: int = 2,
            gpus_per_node: int | None = None) -> Prediction:
    """`gpus` ranks, one per GPU; beyond gpus_per_node the ranks span nodes, and the link
    and gather_merge are the calibration's network ones."""
    strategy = spec.build(Place(0, gpus), None, config, calibration)
    across_nodes = gpus_per_node is not None and gpus > gpus_per_node
    link_rate = calibration.network_bandwidth_Bps if across_nodes else calibration.link_bandwidth_Bps
    gather_s = (calibration.network_gather_merge_s_per_layer if across_nodes
                else calibration.gather_merge_s_per_layer)
    plan = plan_request(strategy, context, query_tokens, new_tokens)
    token_s = linear_flops_per_token(config) / calibration.linear_flops_per_s
    pair_s = attention_flops_per_pair(config) / calibration.attention_flops_per_s
    kv_token = kv_bytes_per_token(config, element_size)
    left_out: list[str] = []

    def over_link(nbytes: float) -> float:
        if link_rate is None:
            if "link" not in left_out:
                left_out.append("network" if across_nodes else "link")
            return 0.0
        return nbytes / link_rate

    layout = plan.layout
    if isinstance(layout, StarLayout):
        per_rank, encoded_windows, longest = [0.0] * gpus, [0] * gpus, 0
        anchor = layout.anchor_size
        for b, ((start, end), owner) in enumerate(zip(layout.blocks, layout.owners)):
            # Block 0 alone; every other block after the anchor and its window.
            window = start - layout.window(b)[0] if b else 0
            longest = max(longest, window)
            if not layout.window_passed:
                encoded_windows[owner] += window
            tokens, keys = anchored_block_shape(end - start, anchor, window, layout.window_passed) if b \
                else (end - start, 0)
            per_rank[owner] += block_work(tokens, keys, 0.0) * pair_s + tokens * token_s
        for rank, (kept, encoded) in enumerate(zip(layout.kept, layout.encoded)):
            if encoded > kept + encoded_windows[rank]:  # the anchor, recomputed
                per_rank[rank] += block_work(anchor, 0, 0.0) * pair_s + anchor * token_s
        broadcast = len(layout.blocks) > 1 and spec.anchor_mode == "broadcast"
        passing = layout.window_passed and longest > 0
        phase1 = max(per_rank) + (over_link(anchor * kv_token) if broadcast and gpus > 1 else 0.0) \
            + (over_link(longest * kv_token) if passing and gpus > 1 else 0.0)
    elif isinstance(layout, RingLayout):
        per_rank = []
        for spans in layout.spans:
            tokens = sum(end - start for start, end in spans)
            # Causal pairs of this rank's queries over all earlier keys, in zigzag chunks.
            pairs = sum((end - start) * start + (end - start) * (end - start + 1) / 2 for start, end in spans)
            # W steps, each over one rank's K/V (about an equal share of the pairs), each but
            # the last while that K/V goes on to the next rank, every layer.
            step = pairs / gpus * pair_s
            passing = over_link(tokens * kv_token) if gpus > 1 else 0.0
            per_rank.append(tokens * token_s + (gpus - 1) * max(step, passing) + step)
        phase1 = max(per_rank)
    else:
        per_rank = [(context * (context + 1) / 2) * pair_s + context * token_s if r == gpus - 1 else 0.0
                    for r in range(gpus)]
        phase1 = max(per_rank)

    weights = decode_weights(config) * element_size
    if calibration.copy_bandwidth_Bps is None:
        left_out.append("memory bandwidth")
        read_s = 0.0
    else:
        read_s = 1 / calibration.copy_bandwidth_Bps
    gather = (gather_s or 0.0) * config.num_layers if gpus > 1 else 0.0
    if gpus > 1 and gather_s is None:
        left_out.append("gather_merge")
    held = max(plan.layout.kept)
    query = (weights * read_s + query_tokens * token_s + query_tokens * (held + query_tokens / 2) * pair_s
             + gather + (calibration.query_overhead_s or 0.0))
    # A decode step half way through the generation, on the rank with the most K/V.
    slots = [kept + (query_tokens + new_tokens // 2 if r == gpus - 1 else 0) for r, kept in enumerate(layout.kept)]
    kv_read = max(slots) * kv_token * read_s
    tpot = weights * read_s + kv_read + gather + (calibration.decode_overhead_s or 0.0)
    budget = request_budget(plan, config, element_size)
    return Prediction(spec.label, gpus, context, phase1, phase1 + query, tpot, budget.peak, budget.needed, per_rank,
                      left_out, kv_read)


def recommend(predictions: list[Prediction], memory_bytes: float | None, ttft_target_s: float | None) -> str:
    """One line of advice for one context: the fewest GPUs whose time to first token meets
    the target (the fastest of those), or else the fastest; only what fits in memory."""
    context = predictions[0].context
    fitting = [p for p in predictions if memory_bytes is None or p.memory_needed_bytes <= memory_bytes]
    if not fitting:
        least = min(predictions, key=lambda p: p.memory_needed_bytes)
        return (f"{context} tokens: nothing fits in {memory_bytes / 2**30:.0f} GiB per GPU; the least is "
                f"{least.label} on {least.gpus} GPUs, which needs {least.memory_needed_bytes / 2**30:.0f} GiB "
                f"per rank")
    if ttft_target_s is not None:
        meeting = [p for p in fitting if p.ttft_s <= ttft_target_s]
        if not meeting:
            best = min(fitting, key=lambda p: p.ttft_s)
            return (f"{context} tokens: no layout reaches {ttft_target_s:g} s to the first token; the fastest is "
                    f"{_said(best)}")
        fewest = min(p.gpus for p in meeting)
        best = min((p for p in meeting if p.gpus == fewest), key=lambda p: p.ttft_s)
        return f"{context} tokens: fewest GPUs for {ttft_target_s:g} s to the first token: {_said(best)}"
    return f"{context} tokens: fastest that fits: {_said(min(fitting, key=lambda p: p.ttft_s))}"


def _said(p: Prediction) -> str:
    return (f"{p.label} on {p.gpus} GPU{'s' if p.gpus > 1 else ''}: first token {p.ttft_s:.2f} s "
            f"(phase 1 {p.phase1_s:.2f} s), {p.tpot_s * 1e3:.1f} ms per token, {p.memory_bytes / 2**30:.1f} GiB "
            f"per rank")
