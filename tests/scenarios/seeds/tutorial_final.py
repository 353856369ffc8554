"""The Simvue tutorial's final tracking script (from the Simvue documentation), with the same calls in the same
order.  Adapted only in scale: iterations and the pause per iteration come from the
environment so the test runs in seconds, and the alert frequency is a fraction of a minute."""

import json
import logging
import os
import pathlib
import random
import time

import numpy

from simvue import Handler, Run

if __name__ == "__main__":
    iterations = int(os.environ.get("TUTORIAL_ITERATIONS", 300))
    pause = float(os.environ.get("TUTORIAL_PAUSE", 1.0))
    frequency = float(os.environ.get("TUTORIAL_ALERT_MINUTES", 1))
    with Run() as run:
        run.config(suppress_errors=False, resources_metrics_interval=10)
        run.init(
            name=os.environ.get("TUTORIAL_NAME", "random-numbers-%d" % time.time()),
            description="Monitoring of the generation of random integers between 0 and 10.",
            tags=["random-numbers", "v1"],
            folder="/rand_nums",
            metadata={"number_of_iterations": iterations, "result_converged": False},
        )
        logger = logging.getLogger(__name__)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(Handler(run))
        run.save(os.path.abspath(__file__), "code")
        run.set_folder_details(
            "/rand_nums",
            metadata={"environment": "testing"},
            tags=["random-numbers"],
            description="Stores all runs which monitor the function to create random integers between 0 and 10.",
        )
        run.add_alert(
            name="mean_outside_acceptable_range", source="metrics", frequency=frequency,
            rule="is outside range", range_low=4, range_high=6, metric="averages.mean", window=2,
        )
        run.add_alert(name="zero_division_error", source="events", frequency=frequency, pattern="Division by Zero Error")

        all_numbers = numpy.array([], dtype=numpy.int64)
        percentage_changes_in_mean = numpy.array([], dtype=numpy.float64)
        run.log_event("Random Number Generation Started!")
        mean = 0
        for count in range(0, iterations):
            random_number = random.randint(0, 10)
            all_numbers = numpy.append(all_numbers, random_number)
            previous_mean = mean
            mean = float(numpy.average(all_numbers))
            median = int(numpy.median(all_numbers))
            mode = int(numpy.bincount(all_numbers).argmax())
            percentage_change = 0 if mean == 0 else ((mean - previous_mean) / mean) * 100
            percentage_changes_in_mean = numpy.append(percentage_changes_in_mean, percentage_change)
            logger.debug(f"Mean has changed by {percentage_change} in iteration {count}.")
            run.log_metrics({"random_number": random_number}, step=count)
            run.log_metrics({"averages.mean": mean, "averages.median": median, "averages.mode": mode}, step=count)
            try:
                new_stat = mean / abs(median - mode)
                run.log_metrics({"new_stat": new_stat}, step=count)
            except ZeroDivisionError:
                run.log_event(f"Division by Zero Error encountered in calculation of new_stat on iteration {count}")
            time.sleep(pause)
        run.log_event("Random Number Generation Completed!")

        averages_out = {"mean": mean, "median": median, "mode": mode}
        out_path = os.path.join(pathlib.Path(__file__).parent, "averages_out.json")
        with open(out_path, "w") as out_file:
            json.dump(averages_out, out_file)
        run.save(out_path, "output")
        run.save(all_numbers, "output", name="all_random_numbers")
        run.save(percentage_changes_in_mean, "output", name="percentage_changes_in_mean")
        run.update_metadata({"mean": mean})
        if 4.9 < mean < 5.1:
            run.update_metadata({"result_converged": True})
        run.update_tags(["completed"])
        print("NAME", run.name)
