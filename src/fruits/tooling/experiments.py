"""`make exp-apply EXP=<name>`: `dvc exp apply`, for a repository that holds two pipelines.

`dvc exp apply` checks out the outputs of every pipeline of the repository: dvc.yaml (the local sample)
and emr/dvc.yaml (the cluster). A pipeline never run in this workspace (the EMR one on a laptop, the
local one on a machine that only drives the cluster) has outputs with no hash yet; DVC applies the
experiment, then reports those as failed checkouts and exits 255 without recording the apply. DVC's own
queue prepares its temporary workspaces with `allow_missing=True` for that reason; this applies with it
too. DVC still warns about every output it could not create, and with this flag that includes recorded
outputs missing from the cache (fetch them with `dvc pull`): they are warnings here, not an error.
"""

from __future__ import annotations

import argparse
import sys


def apply(experiment: str, root: str | None = None) -> None:
    """Apply an experiment (a name, a queued entry or a commit) to the workspace at `root`."""
    from dvc.repo import Repo

    with Repo(root) as repo:
        repo.experiments.apply(experiment, allow_missing=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fruits.tooling.experiments", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", help="an experiment's name (dvc exp show), a queued entry or a commit")
    args = parser.parse_args(argv)
    from dvc.exceptions import DvcException

    try:
        apply(args.experiment)
    except DvcException as exc:
        print(f"make exp-apply EXP={args.experiment}: {exc}", file=sys.stderr)
        return 2
    print(f"Experiment {args.experiment!r} applied to the workspace: its params, dvc.lock and the outputs it recorded.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
