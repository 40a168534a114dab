"""Memory of this rank: the peak of a request (GPU memory allocated, or the process's
resident memory on a CPU), and what it could still allocate (which budget.py weighs)."""

from __future__ import annotations

import torch


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the peak resident set size (VmHWM) to the current one
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak is the process's since its start


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = _proc_kib("/proc/self/status", "VmHWM:")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_memory(device: torch.device) -> int | None:
    """Bytes this rank could still allocate: the GPU's free memory and what PyTorch holds
    cached unused, or on a CPU the machine's available memory (Linux); None where unknown."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    return _proc_kib("/proc/meminfo", "MemAvailable:")


def _proc_kib(path: str, field: str) -> int | None:
    """A field of a Linux /proc file given in kB, in bytes; None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
