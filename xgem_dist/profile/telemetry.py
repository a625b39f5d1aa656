"""GPU and host telemetry sampled in a background thread: NVML (pynvml from nvidia-ml-py) for utilisation,
memory, power, temperature, SM clock and throttle reasons; /proc for host CPU and RAM. Without NVML
(no driver, no GPU) the GPU fields say why; nothing raises."""

from __future__ import annotations

import os
import threading
import time


def _host_cpu_times() -> tuple[float, float]:
    with open("/proc/stat") as f:
        values = [float(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _host_ram_gb() -> tuple[float, float]:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: float(line.split()[1]) for line in f}
    return (info["MemTotal"] - info["MemAvailable"]) / 2**20, info["MemTotal"] / 2**20


class TelemetrySampler:
    def __init__(self, interval_s: float = 1.0, device_index: int | None = None):
        self.interval_s = interval_s
        self.device_index = int(os.environ.get("LOCAL_RANK", 0)) if device_index is None else device_index
        self.samples: list[dict] = []
        self.nvml_error: str | None = None
        self._handle = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.device_index)
            self.device_name = pynvml.nvmlDeviceGetName(self._handle)
        except Exception as e:  # ImportError, NVMLError_LibraryNotFound, NVMLError_InvalidArgument, ...
            self.nvml_error = f"NVML unavailable: {type(e).__name__}: {e}"
            self.device_name = None

    def sample(self) -> dict:
        busy, total = _host_cpu_times()
        used, ram = _host_ram_gb()
        row: dict = {"time": time.time(), "host_ram_used_gb": used, "host_ram_total_gb": ram}
        if self._last_cpu is not None:
            d_busy, d_total = busy - self._last_cpu[0], total - self._last_cpu[1]
            row["host_cpu_percent"] = 100.0 * d_busy / d_total if d_total else 0.0
        self._last_cpu = (busy, total)
        if self._handle is None:
            row["gpu"] = self.nvml_error
            return row
        nvml, h = self._nvml, self._handle
        util = nvml.nvmlDeviceGetUtilizationRates(h)
        mem = nvml.nvmlDeviceGetMemoryInfo(h)
        reasons = nvml.nvmlDeviceGetCurrentClocksThrottleReasons(h)
        names = {getattr(nvml, n): n.removeprefix("nvmlClocksThrottleReason") for n in dir(nvml)
                 if n.startswith("nvmlClocksThrottleReason") and n not in ("nvmlClocksThrottleReasonAll",
                                                                            "nvmlClocksThrottleReasonNone")}
        row.update({
            "gpu_util_percent": util.gpu, "gpu_mem_util_percent": util.memory,
            "gpu_mem_used_gb": mem.used / 2**30, "gpu_mem_total_gb": mem.total / 2**30,
            "gpu_power_w": nvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "gpu_temp_c": nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
            "gpu_sm_clock_mhz": nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
            "gpu_throttle": sorted(name for bit, name in names.items() if isinstance(bit, int) and reasons & bit),
        })
        return row

    _last_cpu: tuple[float, float] | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(self.sample())

    def start(self) -> "TelemetrySampler":
        self.samples.append(self.sample())
        self._thread = threading.Thread(target=self._run, name="xgem-telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[dict]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.samples
