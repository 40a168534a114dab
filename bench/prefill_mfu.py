"""Phase 1 on one GPU, or one host of --tp GPUs: model FLOP/s of Star Attention's context
encoding against the measured bf16 matrix-multiply rate of a GPU.

  python bench/prefill_mfu.py [--blocks 8K,16K,32K,64K,128K] [--model llama-3.1-8b]
  mpirun -np 2 python bench/prefill_mfu.py --model llama-3.1-70b --tp 2

One rank (or host) encodes a context of two blocks with anchor = block, as a rank does:
block 0 alone (causal), then block 1 after the anchor (its b queries see the a anchor keys
and, causally, its own). Under --tp each GPU does its shard's FLOPs (its heads, its part
of the MLP), which are what is counted against its rate. Model FLOPs: 2 x (weights of the layers) per token for the
projections and MLPs, and 4 x heads x head_dim per (query, key) pair that the mask lets
through for the attention, per layer (the masked half of a causal square is not counted,
as the kernels skip it). Random weights, bf16.
"""

from __future__ import annotations

import argparse
import time

import torch

from star_engine.attention.backends import backend_for, set_backend
from star_engine.attention.star import StarAttention
from star_engine.checkpoint import load_config, load_model
from star_engine.comm import make_communicator, make_host_group
from star_engine.engine import Engine
from star_engine.flags import parse_tokens
from star_engine.hosts import Hosts
from star_engine.launch.devices import select_device
from star_engine.launch.launcher import init_distributed
from star_engine.measure.text_table import text_table
from star_engine.measure.timing import median_s
from star_engine.names import ATTENTION_BACKENDS
from star_engine.settings import KVCacheSettings

from results_io import save


def matmul_rate(device: torch.device, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / median_s(lambda: a @ b, device, repeats=20)


def phase1_flops(model, block: int, anchor: int) -> float:
    """This rank's: its layers' weights (its shard of them) and its heads."""
    cfg = model.config
    layer_weights = sum(p.numel() for name, p in model.layers.named_parameters() if "norm" not in name)
    linear = 2 * layer_weights * 2 * block
    pairs = block * (block + 1) / 2 + block * anchor + block * (block + 1) / 2
    return linear + 4 * model.heads * cfg.head_dim * pairs * cfg.num_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", default="8K,16K,32K,64K,128K")
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--attn-backend", choices=ATTENTION_BACKENDS, default="auto")
    parser.add_argument("--tp", type=int, default=1, help="GPUs of the host that splits the model (one host)")
    args = parser.parse_args()
    dist = init_distributed()
    if dist.world != args.tp:
        raise SystemExit(f"run one host: {args.tp} rank(s) for --tp {args.tp}, not {dist.world}")
    device = select_device("cuda", dist)
    set_backend(args.attn_backend)
    hosts = Hosts(dist, args.tp)
    host = make_host_group(hosts.members, device) if hosts.members is not None else None
    model = load_model(args.model, torch.bfloat16, device, shard=hosts.shard(load_config(args.model)), host=host)
    comm = make_communicator(hosts.peers, device)
    peak = min(dist.allgather(matmul_rate(device)))
    say = print if dist.rank == 0 else (lambda *a, **k: None)
    say(f"bf16 matmul 8192^3: {peak / 1e12:.0f} TFLOP/s; attention kernels: {backend_for(device, torch.bfloat16)}",
        flush=True)
    rows = []
    for i, block in enumerate(map(parse_tokens, args.blocks.split(","))):
        strategy = StarAttention(hosts.place, comm, block_size=block, anchor_tokens=block)
        engine = Engine(model, strategy, comm, dist, KVCacheSettings(2 * block))
        ids = torch.randint(0, model.config.vocab_size, (2 * block,), generator=torch.Generator().manual_seed(i)).to(device)
        layout = strategy.layout(len(ids))
        runs = 2 if i == 0 else 1  # the first size once more, untimed: kernel loading and tuning
        for _ in range(runs):
            engine.arena.clear()
            dist.sync()
            torch.cuda.synchronize()
            start = time.perf_counter()
            strategy.encode_context(model, ids, layout, engine.arena)
            torch.cuda.synchronize()
            seconds = max(dist.allgather(time.perf_counter() - start))
        flops = phase1_flops(model, block, block)
        rows.append({"block": block, "context": 2 * block, "seconds": seconds, "TFLOPs": flops / 1e12,
                     "TFLOP_per_s": flops / seconds / 1e12, "fraction_of_matmul": flops / seconds / peak,
                     "peak_mem_GiB": torch.cuda.max_memory_allocated(device) / 2**30})
        say(text_table(rows[-1:], list(rows[-1])), flush=True)
        del engine
        torch.cuda.empty_cache()
    say(text_table(rows, list(rows[0])))
    if dist.rank == 0:
        name = "prefill_mfu" if args.tp == 1 else f"prefill_mfu_{args.model}_tp{args.tp}"
        print("saved", save(name, rows, model=args.model, tp=args.tp, matmul_TFLOP_per_s=peak / 1e12,
                            attention_backend=backend_for(device, torch.bfloat16)))


if __name__ == "__main__":
    main()
