"""EMR step entry point (spark-submit runs it on the primary node, with fruits.zip on --py-files):

    run_stage.py <stage> <run URI>

<run URI> holds params.yaml and the stage's small inputs (weights, provenance, metrics) under their
paths; the stage runs with that config, then its small outputs (metrics, reports, the PCA projection)
are copied back under <run URI>/outputs/ for the client to fetch. The same command runs locally with a
local folder as <run URI>.
"""

import os
import sys
import tempfile


def main(argv: list[str]) -> None:
    stage, run_uri = argv
    from fruits.cloud import steps

    os.chdir(tempfile.mkdtemp(prefix=f"fruits-{stage}-"))
    steps.run_on_cluster(stage, run_uri)


if __name__ == "__main__":
    main(sys.argv[1:])
