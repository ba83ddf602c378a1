"""The featurize stage with a fault injected from outside its code: a Python worker dies (os._exit)
in the first attempt of partition CRASH_PARTITION, after its first Arrow batch. Run as a script
(`python tests/helpers/crashing_featurize.py --params FILE`): it wraps the stage's Arrow function on the
driver, and Spark ships the wrapper by value (it lives in __main__), so production code holds no hook."""

from __future__ import annotations

import os
import sys

from fruits.stages import featurize

CRASH_PARTITION = 1


def crash_once(featurize_images):
    """featurize_images, but its worker exits in CRASH_PARTITION's first attempt after one batch."""

    def crashing(batches):
        from pyspark import TaskContext

        task = TaskContext.get()
        doomed = task.partitionId() == CRASH_PARTITION and task.attemptNumber() == 0
        for number, batch in enumerate(featurize_images(batches)):
            if doomed and number == 1:
                os._exit(70)
            yield batch

    return crashing


def main(argv: list[str]) -> None:
    build_udf = featurize.build_udf
    featurize.build_udf = lambda *args, **kwargs: crash_once(build_udf(*args, **kwargs))
    featurize.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
