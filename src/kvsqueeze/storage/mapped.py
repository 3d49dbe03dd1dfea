"""Host memory that GPU kernels read and write in place (mapped, "zero-copy" memory).

On CUDA with unified virtual addressing (every 64-bit Linux system CUDA supports), page-locked host memory
allocated by `cudaHostAlloc` — what `torch.empty(..., pin_memory=True)` returns — is mapped into the device's
address space at the same address: a kernel may load from and store to it directly, each access crossing the
host link (PCIe; 55 GB/s measured host-to-device on the H200 machine) instead of HBM. NVIDIA CUDA C Programming
Guide, "Mapped Memory" and "Unified Virtual Address Space"; vLLM exposes pinned weights to kernels the same way
(its `get_cuda_view_from_cpu_tensor`).

`mapped_zeros` returns such memory as a *CUDA* tensor (an alias of a pinned CPU tensor, made through the CUDA
array interface, no copy): every torch operation, Triton kernel, `torch.compile`d graph and CUDA graph sees an
ordinary CUDA tensor and reads only the bytes it touches. The static decode step keeps the offloaded layers' keys
and values there (`StaticSlots(host_layers=...)`): a step's page attention reads the selected pages over the link,
the step's token is written over it, and nothing else moves — no copy engine, no page table on the host, no host
synchronisation, so the step stays capturable.

Off CUDA (the CPU, where the tests run the same code) host memory is the device's memory: a plain tensor.
"""

from __future__ import annotations

import torch


class _Mapped:
    """Carries a pinned tensor's address through `torch.as_tensor` (the CUDA array interface) and keeps the pinned
    tensor alive as long as the CUDA alias (torch holds this object until the alias's storage is freed)."""

    def __init__(self, host: torch.Tensor):
        self.host = host
        self.__cuda_array_interface__ = {"shape": (host.numel() * host.element_size(),), "typestr": "|u1",
                                         "data": (host.data_ptr(), False), "strides": None, "version": 3}


def map_host(host: torch.Tensor, device) -> torch.Tensor:
    """The CUDA tensor on `device` aliasing the pinned CPU tensor `host` (same bytes, same shape and dtype; `host`
    contiguous and pinned: `torch.empty(..., pin_memory=True)`). A write through either is seen by the other once
    the writing kernel finished. Raises ValueError for a tensor that is not pinned or not contiguous, RuntimeError
    when the memory cannot be mapped (no UVA)."""
    if not host.is_pinned() or not host.is_contiguous():
        raise ValueError("only a contiguous pinned CPU tensor can be mapped into a CUDA device's address space")
    device = torch.device(device)
    with torch.cuda.device(device):
        alias = torch.as_tensor(_Mapped(host), device=device)
    if alias.data_ptr() != host.data_ptr():  # pragma: no cover - a copy instead of an alias (no UVA)
        raise RuntimeError("pinned host memory could not be mapped into the CUDA device's address space (UVA)")
    return alias.view(host.dtype).view(host.shape)


def mapped_zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A zero-filled tensor of `shape` and `dtype` in host memory that kernels on `device` access in place.

    CUDA `device`: pinned host memory (`shape`'s bytes of it; none of the GPU's memory), returned as a contiguous
    tensor on `device` aliasing it (`map_host`). Other devices: a plain tensor on `device` (host memory is their
    memory). Raises RuntimeError when the pinned memory cannot be allocated or mapped."""
    device = torch.device(device)
    if device.type != "cuda" or not all(shape):
        return torch.zeros(shape, dtype=dtype, device=device)
    return map_host(torch.zeros(shape, dtype=dtype, pin_memory=True), device)
