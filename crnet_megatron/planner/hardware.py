"""GPU and interconnect parameters of the step-time model, each with its source.

Peaks are dense BF16 tensor-core FLOP/s without sparsity (Megatron-LM's MFU denominator; NVIDIA
A100/H100/H200 datasheets). Bandwidths are per GPU and per direction: NVLink 3 = 600 GB/s and
NVLink 4 = 900 GB/s total bidirectional (datasheets), InfiniBand one HDR (200 Gb/s) or NDR
(400 Gb/s) NIC per GPU as in DGX A100 / DGX H100. ``link_efficiency`` is the share of that a
large NCCL collective reaches (nccl-tests bus bandwidth on DGX systems is about 80% of the
link). The kernel efficiencies are what a large cuBLAS BF16 GEMM and FlashAttention
(forward + backward) reach, from NVIDIA's and the FlashAttention-2 paper's published numbers
(A100: ~250/312 TFLOP/s GEMM, ~60% attention; H100: ~740/989 GEMM, ~45% attention with the
cuDNN/FA2 kernels of Megatron-Core's TE path). Latencies are NCCL's small-message times.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict


@dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float          # dense BF16
    memory_gib: float           # usable HBM
    hbm_tb_s: float             # HBM bandwidth
    nvlink_gb_s: float          # per direction, per GPU
    ib_gb_s: float              # per direction, per GPU (one NIC per GPU)
    gemm_efficiency: float      # large GEMM FLOP/s / peak
    attention_efficiency: float  # flash attention FLOP/s / peak
    link_efficiency: float = 0.8
    nvlink_latency_us: float = 10.0
    ib_latency_us: float = 20.0
    gpus_per_node: int = 8

    def with_(self, **kw) -> "GPU":
        return replace(self, **kw)


GPUS: Dict[str, GPU] = {
    "a100-80gb": GPU("a100-80gb", 312.0, 80.0, 2.039, 300.0, 25.0, 0.80, 0.60),
    "h100-80gb": GPU("h100-80gb", 989.0, 80.0, 3.35, 450.0, 50.0, 0.75, 0.45),
    "h200-141gb": GPU("h200-141gb", 989.0, 141.0, 4.8, 450.0, 50.0, 0.75, 0.45),
    # B200: datasheet peak, HBM and NVLink 5 (1.8 TB/s total); kernel efficiencies as H100's
    # until measured
    "b200-180gb": GPU("b200-180gb", 2250.0, 180.0, 8.0, 900.0, 50.0, 0.75, 0.45),
}


def peak_tflops_of(device_name: str):
    """The dense BF16 peak of a device by its CUDA name (``NVIDIA H100 80GB HBM3``), or None."""
    name = device_name.lower()
    for key, gpu in GPUS.items():
        if key.split("-")[0] in name:
            return gpu.peak_tflops
    return None


def get_gpu(name: str) -> GPU:
    if name not in GPUS:
        raise ValueError(f"--gpu {name!r} is not known; one of {sorted(GPUS)}")
    return GPUS[name]
