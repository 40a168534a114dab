"""Where the time of one decode step goes: GPU kernel time per output token by kind
(matrix products, decode attention with the merge of its splits, the collective,
gather_merge's merge of the ranks, the fused norm/RoPE/SiLU kernels, the rest), from the
PyTorch profiler, beside the step's roofline.

  [mpirun -np N] python bench/decode_step.py [--model llama-3.1-8b] [--context 32K]

Where gather_merge goes through NCCL (STAR_ENGINE_PEER_GATHER=0, or ranks on several nodes)
the result is saved as decode_step_<N>ranks_nccl_gather.json.

Star over the ranks launched, CUDA-graph decode. The profile of a request with 1 new
token is subtracted from one with 1 + TOKENS, so that phase 1 and the query pass cancel.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from star_engine.attention.star import StarAttention
from star_engine.checkpoint import load_model
from star_engine.comm import make_communicator
from star_engine.engine import Engine
from star_engine.flags import parse_tokens
from star_engine.launch.devices import select_device
from star_engine.launch.launcher import init_distributed
from star_engine.measure.speed import decode_weight_bytes
from star_engine.measure.text_table import text_table
from star_engine.measure.timing import copy_bandwidth
from star_engine.settings import KVCacheSettings

from results_io import save

TOKENS = 64
KINDS = (("collective", ("nccl",)), ("merge of the ranks", ("lse_merge",)),
         ("peer gather + merge of the ranks", ("peer_gather",)), ("decode attention", ("decode_kernel",)),
         ("norm, rope, silu", ("rms_norm", "rope_kernel", "silu_mul")),
         ("matrix products", ("gemm", "gemv", "nvjet", "cutlass", "splitk", "sm90_xmma")))


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, keys in KINDS if any(k in name for k in keys)), "other kernels")


def kernel_time(engine: Engine, ids: torch.Tensor, query: int, new: int) -> tuple[dict[str, float], dict[str, int]]:
    """Microseconds and launches of GPU kernels by kind, over one request."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.generate(ids[:-query], ids[-query:], new, stop_at_eos=False)
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    counts: dict[str, int] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kind = kind_of(event.name)
            times[kind] = times.get(kind, 0.0) + event.time_range.elapsed_us()
            counts[kind] = counts.get(kind, 0) + 1
    return times, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--context", default="32K")
    args = parser.parse_args()
    dist = init_distributed()
    device = select_device("cuda", dist)
    model = load_model(args.model, torch.bfloat16, device)
    comm = make_communicator(dist, device)
    context, query = parse_tokens(args.context), 64
    engine = Engine(model, StarAttention(dist, comm), comm, dist,
                    KVCacheSettings(context + query + TOKENS + 1, max_tail=query + TOKENS + 1))
    ids = torch.randint(0, model.config.vocab_size, (context + query,), generator=torch.Generator().manual_seed(0))
    engine.generate(ids[:-query], ids[-query:], 4, stop_at_eos=False)  # captures the decode graph
    base, base_n = kernel_time(engine, ids, query, 1)
    full, full_n = kernel_time(engine, ids, query, 1 + TOKENS)
    gen = engine.generate(ids[:-query], ids[-query:], 1 + TOKENS, stop_at_eos=False)
    cfg = model.config
    kv_bytes = (-(-context // dist.world) + query + TOKENS // 2) * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    bandwidth = copy_bandwidth(device)
    rows = [{"kind": kind, "us_per_token": (full.get(kind, 0.0) - base.get(kind, 0.0)) / TOKENS,
             "launches_per_token": (full_n.get(kind, 0) - base_n.get(kind, 0)) / TOKENS}
            for kind in [k for k, _ in KINDS] + ["other kernels"]]
    rows.append({"kind": "all kernels", "us_per_token": sum(r["us_per_token"] for r in rows),
                 "launches_per_token": sum(r["launches_per_token"] for r in rows)})
    rows.append({"kind": "measured time per output token", "us_per_token": gen.metrics.tpot_s * 1e6})
    rows.append({"kind": "roofline: weights + local K/V at copy bandwidth",
                 "us_per_token": (decode_weight_bytes(model) + kv_bytes) / bandwidth * 1e6})
    if dist.rank == 0:
        print(text_table(rows, ["kind", "us_per_token", "launches_per_token"]))
        nccl_gather = dist.world > 1 and getattr(comm, "peer", None) is None  # not the default path
        name = f"decode_step_{dist.world}ranks" + ("_nccl_gather" if nccl_gather else "")
        print("saved", save(name, rows, model=args.model, context=context,
                            copy_GBps=bandwidth / 1e9))


if __name__ == "__main__":
    main()
