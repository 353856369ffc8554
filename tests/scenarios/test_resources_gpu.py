"""GPU resource sampling (simvue.resources.gpu) against a fake NVML, and against the real one
where a GPU exists.

The fake (tests/fakes/fake_nvml.py) has pynvml's API; its devices come from the JSON file
named by FAKE_NVML_CONFIG.  A run's sampler process loads it when SIMVUE_NVML_MODULE names it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from simvue.resources.gpu import MB, Gpus
from simvue.resources.sampler import NodeSampler, Proc

from conftest import read_run, run_script

pytestmark = pytest.mark.timeout(60)

FAKES = Path(__file__).resolve().parent / "fakes"
if str(FAKES) not in sys.path:
    sys.path.insert(0, str(FAKES))

import fake_nvml  # noqa: E402 - needs the path above

THREE_DEVICES = {
    "driver": "550.1",
    "devices": [
        {"name": "Fake H100", "uuid": "GPU-aaaa-0000", "total_mb": 81920, "used_mb": 1024, "util": 37, "mem_util": 12,
         "power_mw": 123000, "temp": 51, "unsupported": ["power"]},
        {"name": "Fake H100", "uuid": "GPU-bbbb-1111", "total_mb": 81920, "used_mb": 40960, "util": 90, "mem_util": 50,
         "power_mw": 350500, "temp": 70},
        {"name": "Fake A100", "uuid": "GPU-cccc-2222", "total_mb": 40960, "used_mb": 0, "util": 0, "mem_util": 0,
         "power_mw": 60000, "temp": 30},
    ],
}


@pytest.fixture
def fake_config(tmp_path, monkeypatch):
    """write(config) -> path: writes the fake's JSON and points FAKE_NVML_CONFIG at it."""
    path = tmp_path / "fake_nvml.json"

    def write(config: dict) -> Path:
        path.write_text(json.dumps(config))
        monkeypatch.setenv(fake_nvml.CONFIG_ENV, str(path))
        return path

    fake_nvml.CALLS.clear()
    return write


@pytest.fixture
def open_gpus(fake_config):
    """open(config) -> Gpus over the fake (closed after the test)."""
    opened: list[Gpus] = []

    def open_(config: dict) -> Gpus:
        fake_config(config)
        gpus = Gpus.open("fake_nvml")
        assert gpus is not None
        opened.append(gpus)
        return gpus

    yield open_
    for gpus in opened:
        gpus.close()


def with_processes(config: dict, processes: dict[int, list[dict]]) -> dict:
    """``config`` with ``processes[device index]`` listed on those devices."""
    config = json.loads(json.dumps(config))
    for index, listed in processes.items():
        config["devices"][index]["processes"] = listed
    return config


@pytest.fixture
def sleeper():
    """A real process that just sleeps (a process NVML can list), killed afterwards."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


# -- Gpus against the fake -----------------------------------------------------------------------


def test_open_reads_devices_and_facts(open_gpus):
    gpus = open_gpus(THREE_DEVICES)
    assert [d.index for d in gpus.devices] == [0, 1, 2]
    assert gpus.driver == "550.1"
    assert gpus.facts() == [
        {"index": 0, "name": "Fake H100", "uuid": "GPU-aaaa-0000", "memory_total_mb": 81920.0, "driver": "550.1"},
        {"index": 1, "name": "Fake H100", "uuid": "GPU-bbbb-1111", "memory_total_mb": 81920.0, "driver": "550.1"},
        {"index": 2, "name": "Fake A100", "uuid": "GPU-cccc-2222", "memory_total_mb": 40960.0, "driver": "550.1"},
    ]


def test_open_without_driver_version(open_gpus):
    gpus = open_gpus({**THREE_DEVICES, "unsupported": ["driver"]})
    assert len(gpus.devices) == 3
    assert gpus.driver is None
    assert all(fact["driver"] is None for fact in gpus.facts())


def test_open_returns_none_without_config(monkeypatch):
    monkeypatch.delenv(fake_nvml.CONFIG_ENV, raising=False)
    assert Gpus.open("fake_nvml") is None


def test_open_returns_none_for_missing_module():
    assert Gpus.open("simvue_no_such_nvml_module") is None


def test_open_returns_none_without_devices(fake_config):
    fake_config({"driver": "550.1", "devices": []})
    assert Gpus.open("fake_nvml") is None
    assert fake_nvml.CALLS["nvmlShutdown"] == 1  # NVML is let go again


def test_open_returns_none_when_device_query_fails(fake_config):
    fake_config({"devices": [{"name": "broken", "unsupported": ["memory"]}]})
    assert Gpus.open("fake_nvml") is None
    assert fake_nvml.CALLS["nvmlShutdown"] == 1


def test_close_shuts_nvml_down(open_gpus):
    gpus = open_gpus(THREE_DEVICES)
    gpus.close()
    assert fake_nvml.CALLS["nvmlShutdown"] == 1


@pytest.mark.parametrize(
    ("visible", "in_use", "expected"),
    [
        ([None], [], [0, 1, 2]),  # CUDA_VISIBLE_DEVICES unset: every device
        (["0", None], [], [0, 1, 2]),  # one process with it unset is enough
        (["1"], [], [1]),
        (["2,0"], [], [0, 2]),
        (["0", "2"], [], [0, 2]),  # the union over the processes
        (["GPU-bbbb"], [], [1]),  # a UUID prefix
        (["GPU-cccc-2222"], [], [2]),  # a whole UUID
        ([" 1 , GPU-aaaa "], [], [0, 1]),  # spaces around items
        (["1"], [2], [1, 2]),  # a device a process is on, though not listed
        ([""], [], []),  # set but empty: no device
        (["7"], [], []),  # an index the node does not have
        ([], [0], [0]),
    ],
)
def test_selected(open_gpus, visible, in_use, expected):
    gpus = open_gpus(THREE_DEVICES)
    assert [d.index for d in gpus.selected(visible, in_use)] == expected


def test_device_values(open_gpus):
    gpus = open_gpus(THREE_DEVICES)
    assert gpus.device_values(gpus.devices[1]) == {
        "utilisation.percentage": 90.0,
        "memory.utilisation.percentage": 50.0,
        "memory.usage": 40960.0,
        "memory.percentage": 50.0,
        "power": 350.5,
        "temperature": 70.0,
    }


def test_unsupported_query_is_dropped_after_first_failure(open_gpus):
    gpus = open_gpus(THREE_DEVICES)
    device = gpus.devices[0]  # power unsupported
    for _ in range(4):
        values = gpus.device_values(device)
        assert "power" not in values
        assert values["temperature"] == 51.0
        assert values["memory.usage"] == 1024.0
        assert values["memory.percentage"] == pytest.approx(1.25)
    assert fake_nvml.CALLS["nvmlDeviceGetPowerUsage"] == 1  # tried once, never again
    assert fake_nvml.CALLS["nvmlDeviceGetTemperature"] == 4
    assert device.unsupported == {"power"}
    # the other devices still report power
    assert gpus.device_values(gpus.devices[2])["power"] == 60.0
    assert fake_nvml.CALLS["nvmlDeviceGetPowerUsage"] == 2


def test_every_query_unsupported(open_gpus):
    config = json.loads(json.dumps(THREE_DEVICES))
    config["devices"][2]["unsupported"] = ["utilisation", "power", "temperature"]
    gpus = open_gpus(config)
    device = gpus.devices[2]
    assert gpus.device_values(device) == {"memory.usage": 0.0, "memory.percentage": 0.0}
    assert gpus.device_values(device) == {"memory.usage": 0.0, "memory.percentage": 0.0}
    assert fake_nvml.CALLS["nvmlDeviceGetUtilizationRates"] == 1


def test_processes_counts_a_process_in_both_lists_once(open_gpus):
    gpus = open_gpus(with_processes(THREE_DEVICES, {
        0: [{"pid": 1111, "used_mb": 512}, {"pid": 1111, "used_mb": 256, "kind": "graphics"},
            {"pid": 2222, "used_mb": None}],
        2: [{"pid": 1111, "used_mb": 100, "kind": "graphics"}, {"pid": 3333, "used_mb": 1.5}],
    }))
    assert gpus.processes() == {
        1111: {0: 512.0, 2: 100.0},  # compute and graphics: the larger, not the sum
        2222: {0: 0.0},  # memory NVML cannot tell
        3333: {2: 1.5},
    }


def test_processes_survive_an_unsupported_list(open_gpus):
    gpus = open_gpus(with_processes(THREE_DEVICES, {
        1: [{"pid": 1111, "used_mb": 512}, {"pid": 1111, "used_mb": 256, "kind": "graphics"}],
    }))
    gpus.devices[1].handle.spec["unsupported"] = ["graphics_processes"]
    assert gpus.processes() == {1111: {1: 512.0}}


# -- NodeSampler with the fake -------------------------------------------------------------------


def test_node_sampler_gpu_series(open_gpus, sleeper):
    gpus = open_gpus(with_processes(THREE_DEVICES, {
        1: [{"pid": sleeper.pid, "used_mb": 300}, {"pid": sleeper.pid, "used_mb": 20, "kind": "graphics"},
            {"pid": 1, "used_mb": 999}],  # not a process of the run
    }))
    sampler = NodeSampler("node a/1", gpus=gpus)
    sampler.set_processes([Proc("rank0", sleeper.pid, "0")])
    values = sampler.sample()
    node = "resources/node/node_a_1/"
    # device 0 is listed in CUDA_VISIBLE_DEVICES, device 1 has the rank on it, device 2 neither
    assert values[node + "gpu0.utilisation.percentage"] == 37.0
    assert values[node + "gpu0.memory.usage"] == 1024.0
    assert values[node + "gpu0.memory.percentage"] == pytest.approx(1.25)
    assert values[node + "gpu0.temperature"] == 51.0
    assert node + "gpu0.power" not in values  # unsupported on device 0
    assert values[node + "gpu1.utilisation.percentage"] == 90.0
    assert values[node + "gpu1.memory.usage"] == 40960.0
    assert values[node + "gpu1.memory.percentage"] == 50.0
    assert values[node + "gpu1.power"] == 350.5
    assert values[node + "gpu1.temperature"] == 70.0
    assert not [name for name in values if "gpu2" in name]
    assert values["resources/rank0/gpu.memory.usage"] == 300.0  # compute and graphics on one device: once
    assert sampler.gpu_map() == {"rank0": [1]}
    # not the plain run: no plain names
    assert not [name for name in values if name.startswith("resources/gpu.")]
    assert "resources/gpu.memory.usage" not in values


def test_node_sampler_process_without_gpu(open_gpus, sleeper):
    gpus = open_gpus(with_processes(THREE_DEVICES, {0: [{"pid": 1, "used_mb": 5}]}))
    sampler = NodeSampler("n", gpus=gpus)
    sampler.set_processes([Proc("rank3", sleeper.pid, "GPU-cccc")])
    values = sampler.sample()
    assert "resources/rank3/gpu.memory.usage" not in values
    assert "resources/rank3/memory.usage" in values
    assert sampler.gpu_map() == {}
    assert sorted(name for name in values if ".gpu" in name or "/gpu" in name) == [
        f"resources/node/n/gpu2.{key}"
        for key in sorted(["memory.percentage", "memory.usage", "memory.utilisation.percentage", "power",
                           "temperature", "utilisation.percentage"])
    ]


def test_node_sampler_plain_process(open_gpus, sleeper):
    """The plain run's process: its tree's GPU memory and the Simvue 2.x per-device names."""
    me = os.getpid()
    # sleeper is a child of this process: its GPU memory counts for the plain process's tree
    gpus = open_gpus(with_processes(THREE_DEVICES, {
        0: [{"pid": me, "used_mb": 512}],
        2: [{"pid": sleeper.pid, "used_mb": 64}],
    }))
    sampler = NodeSampler("h", plain_pid=me, gpus=gpus)
    sampler.set_processes([Proc("main", me, None)])
    values = sampler.sample()
    assert values["resources/gpu.memory.usage"] == 576.0
    assert values["resources/gpu.utilisation.percent.0"] == 37.0
    assert values["resources/gpu.utilisation.memory.0"] == pytest.approx(1.25)
    assert values["resources/gpu.utilisation.percent.2"] == 0.0
    assert values["resources/gpu.utilisation.memory.2"] == 0.0
    assert "resources/gpu.utilisation.percent.1" not in values  # nothing of ours on device 1
    assert "resources/main/gpu.memory.usage" not in values
    assert sampler.gpu_map() == {"main": [0, 2]}
    # CUDA_VISIBLE_DEVICES unset: all devices on the node
    assert {f"resources/node/h/gpu{i}.temperature" for i in range(3)} <= values.keys()


def test_node_sampler_gpu_map_follows_nvml(fake_config, sleeper):
    config = with_processes(THREE_DEVICES, {1: [{"pid": sleeper.pid, "used_mb": 10}]})
    path = fake_config(config)
    gpus = Gpus.open("fake_nvml")
    assert gpus is not None
    try:
        sampler = NodeSampler("h", gpus=gpus)
        sampler.set_processes([Proc("worker0", sleeper.pid, "1")])
        sampler.sample()
        assert sampler.gpu_map() == {"worker0": [1]}
        # the process leaves the GPU: the fake reads its config at nvmlInit, so change the spec
        gpus.devices[1].handle.spec["processes"] = []
        values = sampler.sample()
        assert sampler.gpu_map() == {}
        assert "resources/worker0/gpu.memory.usage" not in values
        assert "resources/node/h/gpu1.utilisation.percentage" in values  # still listed by CUDA_VISIBLE_DEVICES
        assert path.exists()
    finally:
        gpus.close()


def test_node_sampler_without_gpus(sleeper):
    sampler = NodeSampler("h", gpus=None)
    sampler.set_processes([Proc("rank0", sleeper.pid, "0")])
    values = sampler.sample()
    assert values and not [name for name in values if "gpu" in name]
    assert sampler.gpu_map() == {}


# -- a real run with the fake NVML in its sampler process ----------------------------------------

RUN_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from simvue import Run
    with Run() as run:
        run.config(resources_metrics_interval=1)
        run.init(name=sys.argv[1])
        run.log_metrics({"x": 1.0})
        time.sleep(float(sys.argv[2]))
    """
)


def series(run: dict, name: str) -> list[float]:
    return [point[-1] for point in run["metrics"].get(name, [])]


def test_run_records_fake_gpus(store_dir, fake_config):
    config = with_processes(THREE_DEVICES, {
        # "parent": the sampler's parent, the run's own process
        0: [{"pid": "parent", "used_mb": 512}, {"pid": "parent", "used_mb": 256, "kind": "graphics"}],
        1: [{"pid": 1, "used_mb": 999}],  # someone else's process on device 1
    })
    path = fake_config(config)
    env = {
        "SIMVUE_NVML_MODULE": "fake_nvml",
        "FAKE_NVML_CONFIG": str(path),
        "PYTHONPATH": os.pathsep.join(filter(None, (str(FAKES), os.environ.get("PYTHONPATH")))),
        "CUDA_VISIBLE_DEVICES": "GPU-cccc",  # device 2 by UUID; device 0 because the run is on it
    }
    started = time.monotonic()
    result = run_script(RUN_SCRIPT, "gpu-run", "1.3", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "simvue:" not in result.stderr, result.stderr
    assert time.monotonic() - started < 30
    run = read_run(store_dir, "gpu-run")
    assert run["status"] == "completed"
    simvue_metadata = run["metadata"]["simvue"]
    (node,) = simvue_metadata["hosts"]
    assert simvue_metadata["hosts"][node]["gpus"] == [
        {"index": 0, "name": "Fake H100", "uuid": "GPU-aaaa-0000", "memory_total_mb": 81920.0, "driver": "550.1"},
        {"index": 1, "name": "Fake H100", "uuid": "GPU-bbbb-1111", "memory_total_mb": 81920.0, "driver": "550.1"},
        {"index": 2, "name": "Fake A100", "uuid": "GPU-cccc-2222", "memory_total_mb": 40960.0, "driver": "550.1"},
    ]
    (label,) = simvue_metadata["processes"]
    assert simvue_metadata["gpu_processes"] == {label: [0]}
    assert label == "main"

    prefix = f"resources/node/{node}/"
    samples = series(run, prefix + "gpu0.utilisation.percentage")
    assert len(samples) >= 2 and set(samples) == {37.0}
    assert set(series(run, prefix + "gpu0.memory.usage")) == {1024.0}
    percentages = series(run, prefix + "gpu0.memory.percentage")
    assert percentages and percentages == pytest.approx([1.25] * len(percentages))
    assert set(series(run, prefix + "gpu0.temperature")) == {51.0}
    assert prefix + "gpu0.power" not in run["metrics"]  # unsupported on device 0
    assert set(series(run, prefix + "gpu2.power")) == {60.0}
    assert set(series(run, prefix + "gpu2.utilisation.percentage")) == {0.0}
    assert not [name for name in run["metrics"] if name.startswith(prefix + "gpu1.")]  # not ours

    assert set(series(run, "resources/gpu.memory.usage")) == {512.0}
    assert set(series(run, "resources/gpu.utilisation.percent.0")) == {37.0}
    percentages = series(run, "resources/gpu.utilisation.memory.0")
    assert percentages and percentages == pytest.approx([1.25] * len(percentages))
    assert "resources/gpu.utilisation.percent.2" not in run["metrics"]  # the run is not on device 2
    assert "resources/gpu.utilisation.percent.1" not in run["metrics"]
    # the samples line up with the other resource series
    assert len(series(run, "resources/gpu.memory.usage")) == len(series(run, "resources/memory.usage"))


def test_run_with_fake_nvml_but_no_driver(store_dir, monkeypatch):
    monkeypatch.delenv(fake_nvml.CONFIG_ENV, raising=False)
    env = {
        "SIMVUE_NVML_MODULE": "fake_nvml",
        "PYTHONPATH": os.pathsep.join(filter(None, (str(FAKES), os.environ.get("PYTHONPATH")))),
    }
    _assert_run_without_gpus(store_dir, "no-driver", env)


def _assert_run_without_gpus(store_dir, name: str, env: dict | None = None) -> None:
    """A run sampled without usable GPUs: resource series, but none about GPUs, and no error."""
    result = run_script(RUN_SCRIPT, name, "0.2", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "simvue:" not in result.stderr, result.stderr
    run = read_run(store_dir, name)
    assert "resources/memory.usage" in run["metrics"]
    assert not [metric for metric in run["metrics"] if "gpu" in metric]
    (host,) = run["metadata"]["simvue"]["hosts"].values()
    assert host["gpus"] == []
    assert "gpu_processes" not in run["metadata"]["simvue"]


# -- the real pynvml -----------------------------------------------------------------------------


def _real_gpus() -> Gpus | None:
    pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed")
    return Gpus.open("pynvml")


def test_pynvml_without_driver(store_dir, monkeypatch):
    gpus = _real_gpus()
    if gpus is not None:
        gpus.close()
        pytest.skip("this machine has an NVIDIA driver and GPU")
    monkeypatch.delenv("SIMVUE_NVML_MODULE", raising=False)
    _assert_run_without_gpus(store_dir, "pynvml-no-driver")


GPU_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from simvue import Run
    held = None
    try:
        import torch
        held = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda:0")
        torch.cuda.synchronize()
    except Exception:
        try:
            import cupy
            with cupy.cuda.Device(0):
                held = cupy.empty(256 * 2**20, dtype=cupy.uint8)
        except Exception:
            pass
    print("allocated" if held is not None else "not-allocated", flush=True)
    with Run() as run:
        run.config(resources_metrics_interval=1)
        run.init(name=sys.argv[1])
        time.sleep(1.5)
    """
)


def test_real_gpu(store_dir, monkeypatch):
    gpus = _real_gpus()
    if gpus is None:
        pytest.skip("no NVIDIA GPU here (pynvml cannot open NVML or sees no device)")
    try:
        facts = gpus.facts()
        values = gpus.device_values(gpus.devices[0])
    finally:
        gpus.close()
    assert facts[0]["index"] == 0 and facts[0]["memory_total_mb"] > 0 and facts[0]["uuid"]
    assert 0 <= values["memory.usage"] <= facts[0]["memory_total_mb"]

    monkeypatch.delenv("SIMVUE_NVML_MODULE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    result = run_script(GPU_SCRIPT, "real-gpu", timeout=90)
    assert result.returncode == 0, result.stderr
    assert "simvue:" not in result.stderr, result.stderr
    run = read_run(store_dir, "real-gpu")
    (node,) = run["metadata"]["simvue"]["hosts"]
    host = run["metadata"]["simvue"]["hosts"][node]
    assert [g["uuid"] for g in host["gpus"]] == [f["uuid"] for f in facts]
    total = host["gpus"][0]["memory_total_mb"]
    prefix = f"resources/node/{node}/gpu0."
    util = series(run, prefix + "utilisation.percentage")
    used = series(run, prefix + "memory.usage")
    assert util and all(0 <= u <= 100 for u in util)
    assert used and all(0 <= u <= total for u in used)
    assert all(0 <= p <= 100 for p in series(run, prefix + "memory.percentage"))
    for temperature in series(run, prefix + "temperature"):
        assert 0 < temperature < 120
    for power in series(run, prefix + "power"):
        assert 0 < power < 2000
    if "allocated" in result.stdout.split():
        assert max(used) >= 256  # at least what the script holds
        # NVML lists the process in most setups (not in some containers)
        per_process = series(run, "resources/gpu.memory.usage")
        if per_process:
            assert max(per_process) >= 256
            assert run["metadata"]["simvue"]["gpu_processes"] == {"main": [0]}
