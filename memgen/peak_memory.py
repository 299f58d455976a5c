"""Peak memory since a reset: on CUDA the peak allocated by torch, on the CPU the process's peak resident
set (Linux resets it on request; elsewhere it is the peak since the process started). Used by the
benchmarks (per implementation) and by training logs (per logging interval)."""

from __future__ import annotations

import torch


def reset_peak_memory(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mib(device: torch.device | str) -> float | None:
    """MiB at the peak since the last reset, or None where the platform does not tell."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return None
