"""A multiprocessing pool: every worker logs into the parent's run (as worker<k>/...)."""

import math
import multiprocessing
import os

from simvue import Run


def simulate(args):
    run, task = args
    energy = 0.0
    for step in range(100):
        energy += math.sin(task + step / 10.0) ** 2
        run.log_metrics({"energy": energy, "task": task}, step=task * 100 + step)
    run.log_event(f"task {task} done in pid {os.getpid()}")
    return energy


if __name__ == "__main__":
    with Run() as run:
        run.init(folder="/examples/pool", tags=["pool"], metadata={"tasks": 8})
        with multiprocessing.Pool(4) as pool:
            energies = pool.map(simulate, [(run, task) for task in range(8)])
        run.log_metrics({"total_energy": sum(energies)})
        print(run.name)
