"""GPU telemetry through nvml (nvidia-ml-py): name, SM clock, power, memory. Never fails: on a
machine without NVIDIA GPUs every field is None."""
from __future__ import annotations


def gpu_telemetry(index: int = 0) -> dict:
    out = {"gpu": None, "sm_clock_mhz": None, "power_w": None, "mem_used_gib": None, "mem_total_gib": None}
    try:
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(h)
        out["gpu"] = name.decode() if isinstance(name, bytes) else name
        out["sm_clock_mhz"] = pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)
        out["power_w"] = round(pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0, 1)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        out["mem_used_gib"] = round(mem.used / 2**30, 2)
        out["mem_total_gib"] = round(mem.total / 2**30, 2)
    except Exception:
        pass
    return out
