"""Memory held by a cache (`CacheStats`), counted from the tensors really held."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class CacheStats:
    """Memory held by a cache, against what a full (uncompressed) cache would hold."""

    kv_bytes: int  # keys + values really stored
    total_bytes: int  # every tensor the cache holds (kv + positions + method state)
    full_kv_bytes: int  # keys + values a DynamicCache would hold for the same tokens
    tokens_seen: int
    tokens_stored: list[int] = field(default_factory=list)  # per layer
    shared_kv_bytes: int = 0  # of kv_bytes: tensors shared by several layers (MiniCache, xKV), counted once
    host_kv_bytes: int = 0  # the part of kv_bytes held in host memory (offloaded layers' host tier)
    host_tier: str = "host memory"  # where that part is: "host memory", or "memory-mapped files on disk"
    frame_kv_bytes: int | None = None  # of the device's part: offloaded layers' page frames (copies of host pages,
    #   in the model's dtype also over a quantized host tier); 0: not allocated yet (the eager store allocates them
    #   at the first decoding step); None: this cache has none

    @property
    def device_kv_bytes(self) -> int:
        """Keys + values held on the compute device (`kv_bytes` less the offloaded host tier)."""
        return self.kv_bytes - self.host_kv_bytes

    @property
    def kept_fraction(self) -> float:
        """Fraction of the full cache's KV bytes that is held (1 / the compression factor; a method's
        `compression_ratio` is the fraction removed)."""
        return self.kv_bytes / self.full_kv_bytes if self.full_kv_bytes else 1.0

    def line(self) -> str:
        mib = 1024**2
        parts = [f"KV memory: {self.kv_bytes / mib:.2f} MiB kept of {self.full_kv_bytes / mib:.2f} MiB full "
                 f"({100 * self.kept_fraction:.1f}%, {_factor(self.kept_fraction)})",
                 f"all cache tensors {self.total_bytes / mib:.2f} MiB", f"{self.tokens_seen} tokens seen"]
        if self.host_kv_bytes:
            frames = "" if self.frame_kv_bytes is None else \
                " (page frames not allocated yet: no decoding step)" if self.frame_kv_bytes == 0 else \
                f" ({self.frame_kv_bytes / mib:.2f} MiB of it page frames: copies of pages the host tier also holds)"
            parts.append(f"offloaded: {self.device_kv_bytes / mib:.2f} MiB of KV on the device{frames}, "
                         f"{self.host_kv_bytes / mib:.2f} MiB in {self.host_tier}")
        if self.shared_kv_bytes:
            parts.append(f"{self.shared_kv_bytes / mib:.2f} MiB of it shared across layers, counted once")
        return "; ".join(parts)


def _factor(kept: float) -> str:
    """"4.00x smaller" for a kept fraction of 0.25; "1.01x larger" when more than the full cache is held (an
    offloaded cache's device frames on top of its host copy); "the full cache's size" within 0.5% of it (a
    selector keeps every token: "1.00x smaller" read oddly, fresh-user report, fourteenth session)."""
    if abs(kept - 1.0) < 0.005:
        return "the full cache's size"
    if kept > 1.0:
        return f"{kept:.2f}x larger"
    return f"{1 / max(kept, 1e-9):.2f}x smaller"
