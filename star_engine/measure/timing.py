"""How long a call takes on a device: the median of repeated runs, a CUDA graph's replay,
and the copy bandwidth that rooflines and the planner divide bytes by. Every measurement
of speed times its calls here, so that bench, calibration and the scripts of bench/ count
alike."""

from __future__ import annotations

import time
from typing import Callable

import torch


def median_s(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median seconds of fn() over `repeats` runs, after `warmup` untimed ones (kernels
    loaded, heuristics chosen, memory allocated). On a GPU timed by CUDA events: the GPU's
    time, without the host's wait for it, which would count in a call of microseconds."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2]


def graph_replay_s(fn: Callable[[], object], device: torch.device, repeats: int = 30) -> float:
    """Median seconds of one replay of fn() captured in a CUDA graph: the GPU's time, without
    the host's launch cost. fn runs once first, on a side stream, as capture requires."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_s(graph.replay, device, repeats=repeats)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read plus written per second by a copy within the device's memory, of 4 GiB on
    a GPU and 64 MiB elsewhere (far past the caches)."""
    nbytes = (4 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * src.nbytes / median_s(lambda: dst.copy_(src), device, repeats=30)
