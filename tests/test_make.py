import re
import subprocess

from fruits.core.config import PROJECT_ROOT


def test_every_target_is_documented_in_make_help():
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    targets = re.findall(r"^([a-z0-9-]+):", makefile, re.M)
    undocumented = [t for t in targets if not re.search(rf"^{t}:.*## \S", makefile, re.M)]
    assert not undocumented
    shown = subprocess.run(["make", "-s", "help"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout
    shown = re.sub(r"\x1b\[[0-9;]*m", "", shown)  # bold names
    for target in ("demo", "test", "bench", "help", "bucket", "cluster", "cluster-status", "cluster-down",
                   "cluster-plan", *targets):
        assert re.search(rf"\b{target}\b", shown), target
