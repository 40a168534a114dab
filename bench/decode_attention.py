"""Decode attention kernel: bytes of K/V read per second, against a device-to-device copy.

  python bench/decode_attention.py [--lengths 4096,32768,...]

One query token of the llama-3.1-8b shape (32 heads, 8 KV heads, head_dim 128, bf16) and
of the SmolLM2 shape (9 / 3 heads, head_dim 64) over local KV caches of growing length.
A kernel that reads each K and V row once moves 2 * length * kv_heads * head_dim * 2 bytes.
The calls are timed inside a CUDA graph, as a decode step runs them: the time is the
GPU's, without the host's launch cost.
"""

from __future__ import annotations

import argparse

import torch

from star_engine import ops
from star_engine.measure.text_table import text_table
from star_engine.measure.timing import copy_bandwidth, graph_replay_s

from results_io import save

SHAPES = {"llama-3.1-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}


def per_call_ms(caches: list[torch.Tensor], q: torch.Tensor, length: torch.Tensor, splits: int) -> float:
    """One call over each cache, captured in one CUDA graph; the replay's median over calls."""
    counters = ops.decode_counters(1, caches[0].shape[1], q.device)

    def calls() -> None:
        for cache in caches:
            ops.decode_attention(q, cache[0], cache[1], length, splits, counters)

    return graph_replay_s(calls, q.device) * 1e3 / len(caches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="4096,32768,65536,131072,524288,1048576")
    args = parser.parse_args()
    copy = copy_bandwidth(torch.device("cuda"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name, (heads, kv_heads, dim) in SHAPES.items():
        for length in map(int, args.lengths.split(",")):
            # Several caches, so that consecutive calls do not hit in L2.
            caches = [torch.randn(2, kv_heads, length, dim, device="cuda", dtype=torch.bfloat16)
                      for _ in range(max(2, (256 << 20) // (2 * kv_heads * length * dim * 2) + 1))]
            q = torch.randn(heads, dim, device="cuda", dtype=torch.bfloat16)
            n = torch.tensor([length], dtype=torch.int32, device="cuda")
            splits = ops.decode_splits(length, kv_heads, sms)
            ms = per_call_ms(caches, q, n, splits)
            kv_bytes = 2 * kv_heads * length * dim * 2
            bandwidth = kv_bytes / (ms / 1e3)
            rows.append({"shape": name, "length": length, "splits": splits, "time_us": ms * 1e3,
                         "kv_bytes": kv_bytes, "read_GBps": bandwidth / 1e9,
                         "fraction_of_copy": bandwidth / copy})
            del caches
    print(f"device-to-device copy: {copy / 1e9:.0f} GB/s (read + write)")
    print(text_table(rows, ["shape", "length", "splits", "time_us", "read_GBps", "fraction_of_copy"]))
    print("saved", save("decode_attention", rows, copy_GBps=copy / 1e9))


if __name__ == "__main__":
    main()
