"""NVIDIA GPUs through NVML (``pynvml``, from the ``nvidia-ml-py`` package; extra ``simvue[gpu]``).

Opened once per sampler, on the sampler's thread (``nvmlInit`` takes ~10 ms).  No package, no
driver or no device means no GPUs and no error.  Nothing here spawns ``nvidia-smi``.  A query
a device does not support (power on some boards, for example) is dropped for that device
after its first failure instead of failing every sample.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable
from typing import Any

MB = 1 << 20


@dataclasses.dataclass
class Device:
    index: int
    name: str
    uuid: str
    memory_total_mb: float
    handle: Any
    unsupported: set[str] = dataclasses.field(default_factory=set)


class Gpus:
    """The node's GPUs as NVML reports them."""

    def __init__(self, nvml: Any, devices: list[Device], driver: str | None) -> None:
        self._nvml = nvml
        self.devices = devices
        self.driver = driver

    @classmethod
    def open(cls, module: str = "pynvml") -> Gpus | None:
        """The node's GPUs, or None when NVML or a GPU is not there."""
        try:
            nvml = importlib.import_module(module)
            nvml.nvmlInit()
        except Exception:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, ...: no GPUs
            return None
        try:
            devices = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                devices.append(
                    Device(
                        index=index,
                        name=_text(nvml.nvmlDeviceGetName(handle)),
                        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                        memory_total_mb=nvml.nvmlDeviceGetMemoryInfo(handle).total / MB,
                        handle=handle,
                    )
                )
            try:
                driver: str | None = _text(nvml.nvmlSystemGetDriverVersion())
            except Exception:  # noqa: BLE001
                driver = None
        except Exception:  # noqa: BLE001
            _shutdown(nvml)
            return None
        if not devices:
            _shutdown(nvml)
            return None
        return cls(nvml, devices, driver)

    def facts(self) -> list[dict[str, Any]]:
        """What the run's metadata records about each device."""
        return [
            {"index": d.index, "name": d.name, "uuid": d.uuid, "memory_total_mb": round(d.memory_total_mb, 1), "driver": self.driver}
            for d in self.devices
        ]

    def selected(self, visible: Iterable[str | None], in_use: Iterable[int]) -> list[Device]:
        """The devices a node's processes may use.

        ``visible`` holds each process's ``CUDA_VISIBLE_DEVICES`` (None: unset).  If any is
        unset, every device counts; otherwise the union of the indices and UUIDs named, plus
        the devices ``in_use`` (those NVML shows one of the processes on).
        """
        chosen: set[int] = set(in_use)
        for value in visible:
            if value is None:
                return list(self.devices)
            for item in value.split(","):
                item = item.strip()
                for device in self.devices:
                    if item == str(device.index) or (item and device.uuid.startswith(item)):
                        chosen.add(device.index)
        return [d for d in self.devices if d.index in chosen]

    def device_values(self, device: Device) -> dict[str, float]:
        """One device's utilisation (%), memory used (MB) and percentage, power (W) and
        temperature (C); the keys of the queries it supports."""
        nvml, handle, values = self._nvml, device.handle, {}
        if "utilisation" not in device.unsupported:
            try:
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                values["utilisation.percentage"] = float(rates.gpu)
                values["memory.utilisation.percentage"] = float(rates.memory)
            except Exception:  # noqa: BLE001
                device.unsupported.add("utilisation")
        if "memory" not in device.unsupported:
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                values["memory.usage"] = memory.used / MB
                values["memory.percentage"] = 100.0 * memory.used / memory.total if memory.total else 0.0
            except Exception:  # noqa: BLE001
                device.unsupported.add("memory")
        if "power" not in device.unsupported:
            try:
                values["power"] = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
            except Exception:  # noqa: BLE001
                device.unsupported.add("power")
        if "temperature" not in device.unsupported:
            try:
                values["temperature"] = float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            except Exception:  # noqa: BLE001
                device.unsupported.add("temperature")
        return values

    def processes(self) -> dict[int, dict[int, float]]:
        """``{pid: {device index: memory used in MB}}`` for every process NVML lists on a
        device (compute and graphics; a process in both lists of a device is counted once,
        with the larger figure; memory 0 where NVML cannot say)."""
        found: dict[int, dict[int, float]] = {}
        for device in self.devices:
            listed = []
            for query in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
                try:
                    listed.extend(getattr(self._nvml, query)(device.handle))
                except Exception:  # noqa: BLE001
                    continue
            for info in listed:
                used = getattr(info, "usedGpuMemory", None)
                per_device = found.setdefault(int(info.pid), {})
                per_device[device.index] = max(per_device.get(device.index, 0.0), used / MB if used else 0.0)
        return found

    def close(self) -> None:
        _shutdown(self._nvml)


def _shutdown(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception:  # noqa: BLE001
        pass


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
