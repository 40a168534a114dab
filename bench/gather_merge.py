"""gather_merge latency per layer, eager and inside a CUDA graph, by both paths: one NCCL
all-gather of the packed (o, lse) plus the merge kernel, and (ranks on one node) the one
kernel that writes into the other GPUs' memory and merges; beside
torch.distributed.all_gather_into_tensor of the same bytes.

  mpirun -np N python bench/gather_merge.py [--between-us 170]    (one rank per GPU)

Payload of one decode step's layer for the llama-3.1-8b shape: o [32 heads, 128] bf16
and lse [32] float32 per rank. --between-us puts that much GPU work (a busy-wait kernel)
before each gather_merge, as a decode step's layer does (about 170 us for llama-3.1-8b on
an H200), and subtracts it again: the collective as the engine issues it, not back to
back. Results name the CPUs each rank may run on: NCCL's network transport needs a CPU
thread to move every message.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as torch_dist

from star_engine.comm import NcclCommunicator
from star_engine.launch.devices import select_device
from star_engine.launch.launcher import init_distributed
from star_engine.measure.text_table import text_table
from star_engine.measure.timing import graph_replay_s, median_s

from results_io import save

LAYERS = 32  # calls per captured graph: one decode step of llama-3.1-8b


def per_call_us(fn, device: torch.device, calls: int) -> float:
    """Median time of `calls` back-to-back calls (one fn()), divided by calls."""
    return median_s(fn, device, repeats=30) * 1e6 / calls


def busy_cycles_per_us(device: torch.device) -> float:
    """Clock cycles of torch.cuda._sleep per microsecond on this GPU."""
    cycles = 10_000_000
    return cycles / (median_s(lambda: torch.cuda._sleep(cycles), device, repeats=5) * 1e6)


def eager_and_graph_us(call, o: torch.Tensor, lse: torch.Tensor, between_us: float,
                       cycles_per_us: float) -> tuple[float, float]:
    """Per call: LAYERS calls issued one after another, each after between_us of GPU work,
    then the same captured in a graph; the GPU work is subtracted."""
    cycles = int(between_us * cycles_per_us)

    def layers() -> None:
        for _ in range(LAYERS):
            if cycles:
                torch.cuda._sleep(cycles)
            call(o, lse)

    return (per_call_us(layers, o.device, LAYERS) - between_us,
            graph_replay_s(layers, o.device) * 1e6 / LAYERS - between_us)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--between-us", type=float, default=0.0,
                        help="GPU work before each gather_merge, as a layer's (default: 0, back to back)")
    args = parser.parse_args()
    dist = init_distributed()
    device = select_device("cuda", dist)
    nccl = NcclCommunicator(dist, device, peer_gather=True)
    o = torch.randn(args.heads, 1, args.head_dim, device=device, dtype=torch.bfloat16)
    lse = torch.randn(args.heads, 1, device=device)

    paths = {"NCCL all-gather + merge kernel": nccl.nccl.gather_merge}
    if nccl.peer is not None:
        paths["peer memory, one kernel"] = nccl.peer.gather_merge
    cycles_per_us = busy_cycles_per_us(device) if args.between_us else 0.0
    timings = {path: eager_and_graph_us(call, o, lse, args.between_us, cycles_per_us)
               for path, call in paths.items()}

    # torch.distributed over NCCL, the same bytes per rank.
    port = dist.bcast(_free_port() if dist.rank == 0 else None, root=0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("nccl", rank=dist.rank, world_size=dist.world, device_id=device)
    packed = torch.empty(o.nbytes + lse.nbytes, dtype=torch.uint8, device=device)
    gathered = torch.empty(dist.world * packed.numel(), dtype=torch.uint8, device=device)

    def torch_layers() -> None:
        for _ in range(LAYERS):
            torch_dist.all_gather_into_tensor(gathered, packed)

    reference = per_call_us(torch_layers, device, LAYERS)
    torch_dist.destroy_process_group()

    rows = []
    for path, (eager, in_graph) in timings.items():
        rows += [{"ranks": dist.world, "bytes_per_rank": packed.numel(), "what": f"gather_merge, {path}, eager",
                  "us_per_layer": eager},
                 {"ranks": dist.world, "bytes_per_rank": packed.numel(),
                  "what": f"gather_merge, {path}, in CUDA graph", "us_per_layer": in_graph}]
    rows.append({"ranks": dist.world, "bytes_per_rank": packed.numel(),
                 "what": "torch.distributed all_gather_into_tensor", "us_per_layer": reference})
    every = dist.allgather([r["us_per_layer"] for r in rows])
    for i, row in enumerate(rows):
        row["us_per_layer"] = max(values[i] for values in every)  # the slowest rank's
    cpus = dist.allgather(len(os.sched_getaffinity(0)))  # each rank's; environment() has rank 0's
    if dist.rank == 0:
        print(text_table(rows, ["ranks", "bytes_per_rank", "what", "us_per_layer"]))
        print(f"CPUs each rank may run on: {cpus}")
        # A tuned run, or one through NCCL's sockets (two nodes emulated), is kept beside the default.
        protocol = os.environ.get("NCCL_PROTO")
        sockets = os.environ.get("NCCL_P2P_DISABLE") == "1" and os.environ.get("NCCL_SHM_DISABLE") == "1"
        name = (f"gather_merge_{dist.world}ranks" + (f"_{protocol}" if protocol else "") + ("_socket" if sockets else "")
                + (f"_between{args.between_us:g}us" if args.between_us else ""))
        print("saved", save(name, rows, between_us=args.between_us, cpus_per_rank=cpus))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
