"""The ``--device`` flag, checked once for every command."""

from __future__ import annotations

import os

import torch

from reliableswap.errors import UserError


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → CUDA when available, else the CPU; otherwise the torch device named, checked: a
    malformed name or a CUDA device this torch cannot use is a ``ValueError`` naming the flag."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available to this torch ({torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise UserError(f"--device {device}: only cpu and cuda devices are supported")
    return dev


def available_memory(device: torch.device) -> int:
    """Bytes free on ``device``: CUDA's free memory, or the host's MemAvailable (Linux)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_batch_memory(batch: int, bytes_per_item: float, device: torch.device, flag: str = "--batch",
                       share: float = 0.6) -> None:
    """Refuse (``ValueError`` naming the flag) a batch whose estimated memory exceeds ``share`` of
    what ``device`` has free, saying which batch would fit."""
    need, free = batch * bytes_per_item, available_memory(device)
    if need > share * free:
        fits = max(1, int(share * free // bytes_per_item))
        raise UserError(f"{flag} {batch} needs about {need / 2**30:.1f} GiB on {device} ({bytes_per_item / 2**20:.0f} MiB "
                         f"an item) but {free / 2**30:.1f} GiB is free: use {flag} {fits} or less")
