"""Decode attention over a context that several rows share: read once, against a copy per row.

  python bench/shared_context_attention.py [--lengths 32768,131072] [--readers 2,4,8,16,32]

R rows (requests) that ask about one context of L tokens, each with a tail of its own (its
query and tokens, 64 keys here), one layer, bf16, the Llama-3.1-8B shape (32 heads over 8
KV heads of 128: 4 query heads a kv head, so R x 4 query rows of the kernel's matrix) and
the SmolLM2 shape (9 / 3 heads of 64). "shared": the context held once, read once a step
for all R rows by the shared-context kernel, then merged with each row's tail (what
`DecodeRows.attend` launches). "copies": each row over its own copy of the context (the
decode kernel's one-arena-per-row path). Bytes: the K/V a call must read at least (the
context once plus the tails, or every copy), against a device-to-device copy's bytes per
second; FLOP/s: the products' 4 x R x heads x L x head_dim. Timed inside a CUDA graph, as a
decode step runs them.
"""

from __future__ import annotations

import argparse

import torch

from star_engine import _C
from star_engine.attention.decode import DecodeRows
from star_engine.measure.text_table import text_table
from star_engine.measure.timing import copy_bandwidth, graph_replay_s

from results_io import save

SHAPES = {"llama-3.1-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}
TAIL = 64
DEVICE = torch.device("cuda")


def arena(kv_heads: int, dim: int, length: int, capacity: int) -> _C.KVArena:
    """One layer of `length` random keys and values, ready to decode."""
    cache = _C.KVArena(1, kv_heads, dim, capacity, torch.bfloat16, DEVICE)
    keys = torch.randn(kv_heads, length, dim, device=DEVICE, dtype=torch.bfloat16)
    cache.append(0, keys, torch.randn_like(keys))
    cache.start_decoding()
    return cache


def call_us(rows: DecodeRows, q: torch.Tensor) -> float:
    return graph_replay_s(lambda: rows.attend(0, q), DEVICE) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--readers", default="2,4,8,16,32")
    parser.add_argument("--copies-up-to-gib", type=float, default=24.0,
                        help="skip the copies where they would take more GPU memory than this")
    parser.add_argument("--name", default="shared_context_attention")
    args = parser.parse_args()
    copy = copy_bandwidth(DEVICE)
    results = []
    for shape, (heads, kv_heads, dim) in SHAPES.items():
        token_bytes = 2 * kv_heads * dim * 2  # K and V of one token, one layer
        for length in map(int, args.lengths.split(",")):
            context = arena(kv_heads, dim, length, length)
            for readers in map(int, args.readers.split(",")):
                # q as the model makes it: each row's heads side by side, D apart
                q = torch.randn(readers, heads, dim, device=DEVICE, dtype=torch.bfloat16).transpose(0, 1)
                flops = 4 * readers * heads * (length + TAIL) * dim
                row = {"shape": shape, "length": length, "readers": readers,
                       "query_rows": readers * heads // kv_heads}
                tails = [arena(kv_heads, dim, TAIL, TAIL) for _ in range(readers)]
                rows = DecodeRows(readers, 1, heads, kv_heads, dim, length, torch.bfloat16, DEVICE)
                rows.hold(tails, [(context, length)] * readers)
                us = call_us(rows, q)
                read = (length + readers * TAIL) * token_bytes
                row.update(shared_us=us, shared_GBps=read / us / 1e3, shared_of_copy=read / us * 1e6 / copy,
                           shared_TFLOPs=flops / us / 1e6)
                del rows, tails
                if readers * length * token_bytes <= args.copies_up_to_gib * 2**30:
                    copies = [arena(kv_heads, dim, length + TAIL, length + TAIL) for _ in range(readers)]
                    rows = DecodeRows(readers, 1, heads, kv_heads, dim, length + TAIL, torch.bfloat16, DEVICE)
                    rows.hold(copies)
                    us = call_us(rows, q)
                    read = readers * (length + TAIL) * token_bytes
                    row.update(copies_us=us, copies_GBps=read / us / 1e3, copies_of_copy=read / us * 1e6 / copy,
                               shared_speedup=us / row["shared_us"])
                    del rows, copies
                results.append(row)
                print(text_table([row], list(row)), flush=True)
            del context
            torch.cuda.empty_cache()
    print(f"device-to-device copy: {copy / 1e9:.0f} GB/s (read + write)")
    columns = ["shape", "length", "readers", "query_rows", "shared_us", "shared_GBps", "shared_of_copy",
               "shared_TFLOPs", "copies_us", "copies_of_copy", "shared_speedup"]
    print(text_table(results, columns))
    print("saved", save(args.name, results, copy_GBps=copy / 1e9, tail_tokens=TAIL))


if __name__ == "__main__":
    main()
