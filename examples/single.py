"""One process: random numbers and their running averages (the Simvue tutorial's script)."""

import random
import statistics
import time

from simvue import Run

if __name__ == "__main__":
    steps = 10
    with Run() as run:
        run.config(suppress_errors=False)
        run.init(
            name=f"random-numbers-{int(time.time())}",
            description="Monitoring of the generation of random integers between 0 and 10.",
            tags=["random-numbers", "WIP"],
            folder="/rand_nums",
        )
        run.set_folder_details(
            "/rand_nums",
            metadata={"environment": "testing"},
            tags=["random-numbers"],
            description="Stores all runs which monitor the function to create random integers between 0 and 10.",
        )
        numbers = []
        for count in range(steps):
            number = random.randint(0, 10)
            numbers.append(number)
            run.log_metrics(
                {
                    "random_number": number,
                    "averages.mean": statistics.fmean(numbers),
                    "averages.median": statistics.median(numbers),
                    "averages.mode": statistics.mode(numbers),
                },
                step=count,
            )
            time.sleep(0.05)
        run.log_event(f"generated {steps} numbers")
        print(run.name)
