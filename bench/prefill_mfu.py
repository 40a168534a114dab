"""Phase 1 on one GPU: model FLOP/s of Star Attention's context encoding against the
measured bf16 matrix-multiply rate.

  python bench/prefill_mfu.py [--blocks 8K,16K,32K,64K,128K] [--model llama-3.1-8b]

One rank encodes a context of two blocks with anchor = block, as a rank does: block 0
alone (causal), then block 1 after the anchor (its b queries see the a anchor keys and,
causally, its own). Model FLOPs: 2 x (weights of the layers) per token for the
projections and MLPs, and 4 x heads x head_dim per (query, key) pair that the mask lets
through for the attention, per layer (the masked half of a causal square is not counted,
as the kernels skip it). Random weights, bf16.
"""

from __future__ import annotations

import argparse
import time

import torch

from results_io import save, table
from star_engine.attention import StarAttention
from star_engine.attention.backends import BACKENDS, backend_for, set_backend
from star_engine.benchmark import median_s
from star_engine.flags import parse_tokens
from star_engine.checkpoint import load_model
from star_engine.comm import make_communicator
from star_engine.launch import init_distributed, select_device
from star_engine.schedule import Engine


def matmul_rate(device: torch.device, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / median_s(lambda: a @ b, repeats=20)


def phase1_flops(model, block: int, anchor: int) -> float:
    cfg = model.config
    layer_weights = sum(p.numel() for name, p in model.layers.named_parameters() if "norm" not in name)
    linear = 2 * layer_weights * 2 * block
    pairs = block * (block + 1) / 2 + block * anchor + block * (block + 1) / 2
    return linear + 4 * cfg.num_heads * cfg.head_dim * pairs * cfg.num_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", default="8K,16K,32K,64K,128K")
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--attn-backend", choices=BACKENDS, default="auto")
    args = parser.parse_args()
    dist = init_distributed()
    device = select_device("cuda", dist)
    set_backend(args.attn_backend)
    model = load_model(args.model, torch.bfloat16, device)
    comm = make_communicator(dist, device)
    peak = matmul_rate(device)
    print(f"bf16 matmul 8192^3: {peak / 1e12:.0f} TFLOP/s; attention kernels: {backend_for(device, torch.bfloat16)}",
          flush=True)
    rows = []
    for i, block in enumerate(map(parse_tokens, args.blocks.split(","))):
        strategy = StarAttention(dist, comm, block_size=block, anchor_tokens=block)
        engine = Engine(model, strategy, comm, dist, 2 * block)
        ids = torch.randint(0, model.config.vocab_size, (2 * block,), device=device)
        layout = strategy.layout(len(ids))
        runs = 2 if i == 0 else 1  # the first size once more, untimed: kernel loading and tuning
        for _ in range(runs):
            engine.arena.clear()
            torch.cuda.synchronize()
            start = time.perf_counter()
            strategy.encode_context(model, ids, layout, engine.arena)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        flops = phase1_flops(model, block, block)
        rows.append({"block": block, "context": 2 * block, "seconds": seconds, "TFLOPs": flops / 1e12,
                     "TFLOP_per_s": flops / seconds / 1e12, "fraction_of_matmul": flops / seconds / peak,
                     "peak_mem_GiB": torch.cuda.max_memory_allocated(device) / 2**30})
        print(table(rows[-1:], list(rows[-1])), flush=True)
        del engine
        torch.cuda.empty_cache()
    print(table(rows, list(rows[0])))
    print("saved", save("prefill_mfu", rows, model=args.model, matmul_TFLOP_per_s=peak / 1e12,
                        attention_backend=backend_for(device, torch.bfloat16)))


if __name__ == "__main__":
    main()
