"""Energy and CO2 estimates from resource samples (``enable_emission_metrics``)."""

from __future__ import annotations

import pytest

from simvue.resources.emissions import EmissionEstimate, cores, gpu_watts


def test_power_over_the_interval_between_a_nodes_samples_gives_energy_and_co2():
    estimate = EmissionEstimate(cpu_watts_per_core=10.0, co2_grams_per_kwh=500.0)
    sample = {"resources/rank0/cpu.usage.percentage": 150.0, "resources/rank1/cpu.usage.percentage": 50.0,
              "resources/node/a/cpu.usage.percentage": 99.0, "resources/node/a/gpu0.power": 180.0,
              "resources/node/a/gpu1.power": 20.0, "resources/node/a/gpu0.temperature": 60.0}
    assert cores(sample) == 2.0 and gpu_watts(sample) == 200.0
    assert estimate.add("a", 0.0, sample) is None  # the first sample of a node: no interval yet
    points = estimate.add("a", 36.0, sample)  # 220 W for 36 s = 2.2 Wh
    assert points["sustainability.energy_consumed.delta"] == pytest.approx(0.0022)
    assert points["sustainability.emissions.delta"] == pytest.approx(0.0022 * 0.5)
    assert estimate.add("b", 10.0, sample) is None  # another node has its own interval
    points = estimate.add("a", 72.0, {"resources/cpu.usage.percentage": 100.0, "resources/rank0/cpu.usage.percentage": 100.0})
    # The plain single-process figure already holds its workers: it alone counts.
    assert points["sustainability.energy_consumed.delta"] == pytest.approx(10 * 36 / 3.6e6)
    assert points["sustainability.energy_consumed.total"] == pytest.approx(0.0022 + 10 * 36 / 3.6e6)
    assert points["sustainability.emissions.total"] == pytest.approx(points["sustainability.energy_consumed.total"] * 0.5)
    assert estimate.add("a", 72.0, sample) is None  # no time passed
