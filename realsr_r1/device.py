"""Which device to run on, and at which precision.

Precision follows the hardware: bf16 autocast where the CPU has bf16 matrix/dot-product units
(AMX-BF16 or AVX512-BF16; there oneDNN runs bf16 convolutions about twice as fast as fp32, at a
fidelity cost far below what anyone can see), fp32 on CPUs without them (bf16 would be emulated
and slower). On CUDA: bf16 where supported (no overflow risk), else fp16.

This torch offers no bf16 capability query: `torch.backends.cpu.get_cpu_capability()` only names
the vector ISA ("AVX512"), and `torch.ops.mkldnn._is_mkldnn_bf16_supported()` is also true on
AVX512 CPUs that would emulate bf16. So we read the CPU flags from /proc/cpuinfo (Linux/x86);
elsewhere CPUs get fp32.

`ONEDNN_MAX_CPU_ISA` (oneDNN's cap on the instructions its kernels use; PyTorch's and OpenVINO's CPU
plugins both honour it) is respected: capped below AVX512_CORE_BF16, the CPU counts as having no bf16
units, as the kernels then have none. Setting `ONEDNN_MAX_CPU_ISA=AVX2` (and
`ATEN_CPU_CAPABILITY=avx2` for PyTorch's own kernels) is how the benchmarks stand in for an AVX2-only CPU.

torch is imported where it is needed, not with this module: the lite profile on OpenVINO runs
without it (importing it is half of its start-up), and `device_type` answers "auto" without torch
on machines with no GPU driver at all.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
ISA_CAP_ENV = "ONEDNN_MAX_CPU_ISA"
# Caps (oneDNN's names, dnnl_cpu_isa_t) whose kernels have no bf16 dot products; larger ones keep them.
ISA_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")
PRECISION_NAMES = ("fp32", "bf16", "fp16")
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")  # NVIDIA, ROCm, WSL


def __getattr__(name: str):
    if name == "PRECISIONS":  # {name: torch dtype}, built on first use so that importing stays light
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def gpu_possible() -> bool:
    """False on Linux machines without any GPU driver's device node: there torch.cuda.is_available()
    cannot be True, so 'auto' means the CPU without asking torch. Elsewhere, True (ask torch)."""
    return not sys.platform.startswith("linux") or any(os.path.exists(p) for p in GPU_DEVICE_NODES)


def device_type(name: str = "auto") -> str:
    """'cpu', 'cuda' or 'mps' for a --device value, importing torch only when it has to be asked."""
    name = (name or "auto").strip().lower()
    if name == "cpu" or (name == "auto" and not gpu_possible()):
        return "cpu"
    return resolve_device(name).type


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' → cuda when available, else cpu. Asking for a device that is not there is an error."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available "
                             f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested but MPS is not available; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device type {dev.type!r} is not supported (use auto, cpu, cuda or cuda:N)")
    return dev


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags (x86 'flags' line of /proc/cpuinfo); empty where unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


SPEED_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")  # what decides CPU speed here, for reports


def isa_cap() -> str | None:
    """The instruction-set cap set in ONEDNN_MAX_CPU_ISA ("AVX2", ...), or None (no cap: "ALL" or unset)."""
    cap = os.environ.get(ISA_CAP_ENV, "").strip().upper()
    return cap if cap and cap != "ALL" else None


def bf16_capped() -> bool:
    """True where ONEDNN_MAX_CPU_ISA keeps the kernels below bf16 units the CPU may have."""
    return isa_cap() in ISA_CAPS_WITHOUT_BF16


def cpu_description(cpuinfo: str | None = None) -> str:
    """"AMD EPYC (2 cores; avx2 avx512_bf16 avx512f)": what benchmarks print beside their timings,
    with the ISA cap where one is set ("...; kernels capped at AVX2 by ONEDNN_MAX_CPU_ISA")."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), "CPU")
    flags = sorted(f for f in SPEED_FLAGS if f in cpu_flags(cpuinfo))
    cap = f"; kernels capped at {isa_cap()} by {ISA_CAP_ENV}" if isa_cap() else ""
    return f"{model} ({os.cpu_count()} cores; {' '.join(flags) or 'no AVX2'}{cap})"


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    import torch

    return (torch.backends.mkldnn.is_available() and not bf16_capped()
            and any(f in cpu_flags(cpuinfo) for f in BF16_CPU_FLAGS))


def choose_precision(device: torch.device | str, force_fp32: bool = False) -> str:
    """'fp32', 'bf16' or 'fp16' for inference on `device`."""
    import torch

    device = torch.device(device)
    if force_fp32:
        return "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


# What "auto" means for the weights of a model loaded on a device (the VLM, the diffusion upscaler):
# on CUDA the first precision the GPU supports; elsewhere fp32 (bf16 weights on CPU only pay off
# through autocast, which the Real-ESRGAN restorer does itself via `choose_precision`).
AUTO_WEIGHT_PRECISION = {"cuda": ("bf16", "fp16"), "cpu": ("fp32",), "mps": ("fp32",)}


def _supported(device: torch.device, precision: str) -> bool:
    import torch

    if device.type == "cuda" and precision == "bf16":
        return torch.cuda.is_bf16_supported()
    return True


def weight_dtype(device: torch.device | str, precision: str | torch.dtype | None = "auto") -> torch.dtype:
    """The torch dtype to load a model's weights in on `device`: 'auto' from AUTO_WEIGHT_PRECISION,
    else the named precision, checked as `check_precision` does. The one place 'auto' is decided."""
    import torch

    if isinstance(precision, torch.dtype):
        return precision
    device = torch.device(device)
    precision = (precision or "auto").strip().lower()
    precision = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(precision, precision)
    if precision == "auto":
        choices = AUTO_WEIGHT_PRECISION.get(device.type, ("fp32",))
        precision = next((p for p in choices if _supported(device, p)), "fp32")
    return __getattr__("PRECISIONS")[check_precision(device, precision)]


def check_precision(device: torch.device, precision: str) -> str:
    """Resolve 'auto' and refuse combinations that would be slow or unsupported."""
    import torch

    if precision == "auto":
        return choose_precision(device)
    if precision not in PRECISION_NAMES:
        raise ValueError(f"unknown precision {precision!r} (use auto, fp32, bf16 or fp16)")
    if device.type == "cpu" and precision == "fp16":
        raise ValueError("fp16 is not supported on CPU; use bf16 or fp32")
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{torch.cuda.get_device_name(device)} does not support bf16; use fp16 or fp32")
    return precision
