"""Energy and CO2 estimates of a run, from its resource samples (``enable_emission_metrics``).

Each node's sample gives the power the run drew since that node's previous sample:

* CPU: the summed CPU of the run's processes there, in cores (``cpu.usage.percentage``
  / 100), times ``cpu_watts_per_core``.  The plain single-process figure already includes
  the process's children (pool workers); otherwise each process's own figure is summed.
* GPU: the measured power of each device the run uses (``gpu<i>.power``, NVML).

Energy is that power over the time between the two samples; CO2 is the energy times
``co2_grams_per_kwh`` (by default 475 g/kWh, a world average of electricity generation).
Both are estimates, as good as these two figures: set them for your machine and grid.
The series are the ones Simvue clients write: ``sustainability.energy_consumed.delta`` and
``.total`` (kWh), ``sustainability.emissions.delta`` and ``.total`` (kg CO2e).
"""

from __future__ import annotations

from collections.abc import Mapping

from .procs import PREFIX

_PLAIN_CPU = f"{PREFIX}/cpu.usage.percentage"
_NODE = f"{PREFIX}/node/"


class EmissionEstimate:
    """Running totals over every node's samples; pure (samples in, points out)."""

    def __init__(self, cpu_watts_per_core: float, co2_grams_per_kwh: float) -> None:
        self.cpu_watts_per_core = cpu_watts_per_core
        self.co2_grams_per_kwh = co2_grams_per_kwh
        self.energy_kwh = 0.0
        self.co2_kg = 0.0
        self._previous: dict[str, float] = {}  # host -> time of its previous sample

    def add(self, host: str, t: float, values: Mapping[str, float]) -> dict[str, float] | None:
        """The points one sample of ``host`` at ``t`` (seconds) adds; None for a node's
        first sample, which has no interval yet."""
        previous = self._previous.get(host)
        self._previous[host] = t
        if previous is None or t <= previous:
            return None
        watts = cores(values) * self.cpu_watts_per_core + gpu_watts(values)
        energy_kwh = watts * (t - previous) / 3.6e6
        co2_kg = energy_kwh * self.co2_grams_per_kwh / 1000.0
        self.energy_kwh += energy_kwh
        self.co2_kg += co2_kg
        return {
            "sustainability.energy_consumed.delta": energy_kwh,
            "sustainability.energy_consumed.total": self.energy_kwh,
            "sustainability.emissions.delta": co2_kg,
            "sustainability.emissions.total": self.co2_kg,
        }


def cores(values: Mapping[str, float]) -> float:
    """The run's CPU use in one sample, in cores."""
    if _PLAIN_CPU in values:
        return values[_PLAIN_CPU] / 100.0
    return sum(
        value for name, value in values.items()
        if name.endswith("/cpu.usage.percentage") and not name.startswith(_NODE)
    ) / 100.0


def gpu_watts(values: Mapping[str, float]) -> float:
    return sum(value for name, value in values.items() if name.startswith(_NODE) and name.endswith(".power"))
