"""An MPI job: every rank logs into one run.

    mpiexec -n 4 python examples/mpi_sim.py

Each rank's ``loss`` is kept as ``rank<k>/loss``; ``residual`` is reduced across ranks into
``residual.mean`` and ``residual.max`` (plus ``residual.count``).
"""

import math
import os
import time

from simvue import Run

if __name__ == "__main__":
    steps = int(os.environ.get("MPI_SIM_STEPS", 200))
    with Run() as run:
        rank = run.rank  # under mpiexec, srun or torchrun alike
        run.init(
            name=os.environ.get("MPI_SIM_NAME"),
            folder="/examples/mpi",
            tags=["mpi"],
            metadata={"steps": steps},
            reduce={"residual": ["mean", "max"]},
        )
        for step in range(steps):
            loss = math.exp(-step / 50.0) * (1 + 0.1 * rank)
            run.log_metrics({"loss": loss, "residual": loss * (rank + 1)}, step=step)
            time.sleep(0.001)
        run.log_event(f"rank {rank} finished")
        if rank == 0:
            print(run.name)
