"""A Spark application for the standalone cluster test: each task says which user it runs as and what
opening a file of the driver's side gives. spark-submit cluster_probe.py <file> <answer.json>"""

import json
import sys

from pyspark.sql import SparkSession


def main(target: str, answer: str) -> None:
    spark = SparkSession.builder.appName("fruits-probe").getOrCreate()

    def probe(_):
        import os
        import pwd

        try:
            with open(target, "rb") as stream:
                seen = f"read {len(stream.read(16))} bytes"
        except OSError as err:
            seen = f"{type(err).__name__}: {err.strerror}"
        return [{"user": pwd.getpwuid(os.getuid()).pw_name, "open": seen,
                 "folder": sorted(os.listdir(os.path.dirname(target))) if os.path.isdir(os.path.dirname(target)) else None}]

    found = spark.sparkContext.parallelize(range(4), 4).mapPartitions(probe).collect()
    with open(answer, "w") as out:
        json.dump(found, out)
    spark.stop()


if __name__ == "__main__":
    main(*sys.argv[1:])
