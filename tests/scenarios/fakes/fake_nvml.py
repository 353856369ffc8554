"""A fake ``pynvml`` for tests on machines without an NVIDIA GPU.

Only the part of pynvml's API that ``simvue.resources.gpu`` uses is here.  The devices come
from the JSON file named by ``FAKE_NVML_CONFIG``, read by every ``nvmlInit()``::

    {
      "driver": "550.1",
      "devices": [
        {"name": "Fake H100", "uuid": "GPU-aaaa", "total_mb": 81920, "used_mb": 1024,
         "util": 37, "mem_util": 12, "power_mw": 123000, "temp": 51,
         "unsupported": ["power"],
         "processes": [{"pid": 1234, "used_mb": 512},
                       {"pid": "parent", "used_mb": null, "kind": "graphics"}]}
      ]
    }

* ``unsupported`` names queries that raise ``NVMLError`` (as NVML's NOT_SUPPORTED does):
  ``utilisation``, ``memory``, ``power``, ``temperature``, ``compute_processes``,
  ``graphics_processes``; ``"driver"`` at the top level fails ``nvmlSystemGetDriverVersion``.
* a process's ``pid`` is an int, or ``"parent"``: ``os.getppid()`` of the process that loaded
  this module.  simvue's sampler runs in a child of the run's process, so ``"parent"`` is the
  run's process itself, whose pid a test cannot know before it starts.
* ``used_mb`` null gives ``usedGpuMemory`` None (NVML under some containers); ``kind`` is
  ``compute`` (the default) or ``graphics``.
* without ``FAKE_NVML_CONFIG`` (or with a file that cannot be read) ``nvmlInit`` raises
  ``NVMLError``, like a machine with no driver.

``CALLS`` counts the calls of each function by name, for tests that check a query is not
retried.
"""

from __future__ import annotations

import collections
import json
import os
from types import SimpleNamespace
from typing import Any

CONFIG_ENV = "FAKE_NVML_CONFIG"
MB = 1 << 20

NVML_TEMPERATURE_GPU = 0

CALLS: collections.Counter[str] = collections.Counter()

_state: dict[str, Any] = {"config": None, "initialised": 0}


class NVMLError(Exception):
    """pynvml's base exception."""

    def __init__(self, value: str = "Unknown Error") -> None:
        super().__init__(value)
        self.value = value


class NVMLError_Uninitialized(NVMLError):  # noqa: N801 - pynvml's spelling
    pass


class NVMLError_NotSupported(NVMLError):  # noqa: N801
    pass


class _Handle:
    def __init__(self, index: int, spec: dict[str, Any]) -> None:
        self.index = index
        self.spec = spec

    def __repr__(self) -> str:
        return f"<fake nvml device {self.index}>"


def _count(name: str) -> None:
    CALLS[name] += 1


def _config() -> dict[str, Any]:
    if not _state["initialised"] or _state["config"] is None:
        raise NVMLError_Uninitialized("Uninitialized")
    return _state["config"]


def _check(handle: _Handle, query: str) -> dict[str, Any]:
    _config()
    if not isinstance(handle, _Handle):
        raise NVMLError("Invalid Argument")
    if query in handle.spec.get("unsupported", ()):
        raise NVMLError_NotSupported("Not Supported")
    return handle.spec


def nvmlInit() -> None:
    _count("nvmlInit")
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise NVMLError("NVML Shared Library Not Found")
    try:
        with open(path) as file:
            config = json.load(file)
    except (OSError, ValueError) as exc:
        raise NVMLError(f"Driver Not Loaded ({exc})") from None
    _state["config"] = config
    _state["initialised"] += 1


def nvmlShutdown() -> None:
    _count("nvmlShutdown")
    _config()
    _state["initialised"] -= 1


def nvmlSystemGetDriverVersion() -> str:
    _count("nvmlSystemGetDriverVersion")
    config = _config()
    if "driver" in config.get("unsupported", ()):
        raise NVMLError_NotSupported("Not Supported")
    return str(config.get("driver", "0.0"))


def nvmlDeviceGetCount() -> int:
    _count("nvmlDeviceGetCount")
    return len(_config().get("devices", []))


def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
    _count("nvmlDeviceGetHandleByIndex")
    devices = _config().get("devices", [])
    if not 0 <= index < len(devices):
        raise NVMLError("Invalid Argument")
    return _Handle(index, devices[index])


def nvmlDeviceGetName(handle: _Handle) -> str:
    _count("nvmlDeviceGetName")
    return str(_check(handle, "name").get("name", f"Fake GPU {handle.index}"))


def nvmlDeviceGetUUID(handle: _Handle) -> str:
    _count("nvmlDeviceGetUUID")
    return str(_check(handle, "uuid").get("uuid", f"GPU-fake-{handle.index:04d}"))


def nvmlDeviceGetMemoryInfo(handle: _Handle) -> SimpleNamespace:
    _count("nvmlDeviceGetMemoryInfo")
    spec = _check(handle, "memory")
    total = int(spec.get("total_mb", 16384) * MB)
    used = int(spec.get("used_mb", 0) * MB)
    return SimpleNamespace(total=total, used=used, free=total - used)


def nvmlDeviceGetUtilizationRates(handle: _Handle) -> SimpleNamespace:
    _count("nvmlDeviceGetUtilizationRates")
    spec = _check(handle, "utilisation")
    return SimpleNamespace(gpu=int(spec.get("util", 0)), memory=int(spec.get("mem_util", 0)))


def nvmlDeviceGetPowerUsage(handle: _Handle) -> int:
    _count("nvmlDeviceGetPowerUsage")
    return int(_check(handle, "power").get("power_mw", 0))


def nvmlDeviceGetTemperature(handle: _Handle, sensor: int) -> int:
    _count("nvmlDeviceGetTemperature")
    spec = _check(handle, "temperature")
    if sensor != NVML_TEMPERATURE_GPU:
        raise NVMLError("Invalid Argument")
    return int(spec.get("temp", 0))


def _processes(handle: _Handle, kind: str) -> list[SimpleNamespace]:
    spec = _check(handle, f"{kind}_processes")
    found = []
    for process in spec.get("processes", []):
        if process.get("kind", "compute") != kind:
            continue
        pid = process["pid"]
        pid = os.getppid() if pid == "parent" else int(pid)
        used = process.get("used_mb")
        found.append(SimpleNamespace(pid=pid, usedGpuMemory=None if used is None else int(used * MB)))
    return found


def nvmlDeviceGetComputeRunningProcesses(handle: _Handle) -> list[SimpleNamespace]:
    _count("nvmlDeviceGetComputeRunningProcesses")
    return _processes(handle, "compute")


def nvmlDeviceGetGraphicsRunningProcesses(handle: _Handle) -> list[SimpleNamespace]:
    _count("nvmlDeviceGetGraphicsRunningProcesses")
    return _processes(handle, "graphics")
