"""Array metrics on a grid, from every rank: a 2-d temperature field per step.

    python examples/grid_sim.py                 # one process
    mpiexec -n 4 python examples/grid_sim.py    # every rank's field, as rank<k>/temperature

The calls are the Simvue client's own (``assign_metric_to_grid``, ``log_metrics`` with a
``numpy`` array).  ``GRID_SIM_REDUCE=1`` also stores the element-wise mean and max over the
ranks (``temperature.mean``, ``temperature.max``), beside each rank's field.
"""

import os

import numpy

from simvue import Run

if __name__ == "__main__":
    steps = int(os.environ.get("GRID_SIM_STEPS", 20))
    reduce = {"temperature": ["mean", "max", "namespace"]} if os.environ.get("GRID_SIM_REDUCE") else None
    with Run() as run:
        rank = run.rank
        run.init(name=os.environ.get("GRID_SIM_NAME"), folder="/examples/grids", reduce=reduce)
        x, y = numpy.linspace(0, 1, 40), numpy.linspace(0, 0.5, 20)
        run.assign_metric_to_grid(
            metric_name="temperature", grid_name="plate", axes_ticks=[x, y], axes_labels=["x", "y"]
        )
        xx, yy = numpy.meshgrid(x, y)  # shape (20, 40): a row runs along x
        for step in range(steps):
            field = numpy.exp(-step / 10) * numpy.sin(numpy.pi * xx) * numpy.cos(numpy.pi * yy) + rank
            run.log_metrics({"temperature": field, "peak": float(field.max())}, step=step)
        if rank == 0:
            print(run.name)
