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


def test_make_help_lists_every_target_in_exactly_one_group():
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    targets = re.findall(r"^([a-z0-9-]+):", makefile, re.M)
    groups = {name: value.split() for name, value in re.findall(r"^([A-Z]+) := ([a-z0-9 -]+)$", makefile, re.M)}
    assert set(groups) == {"PIPELINE", "APP", "CLOUD", "BENCHMARKS", "DEVELOPMENT"}
    grouped = [target for members in groups.values() for target in members]
    assert sorted(grouped) == sorted(targets)  # each target once, none left out, none that does not exist
    shown = re.sub(r"\x1b\[[0-9;]*m", "", subprocess.run(["make", "-s", "help"], cwd=PROJECT_ROOT, capture_output=True,
                                                         text=True, check=True).stdout)
    headings = [line for line in shown.splitlines() if line and not line.startswith(" ")]
    assert [h.split(" ")[0] for h in headings] == ["Pipeline", "App", "Cloud", "Benchmarks", "Development"]
    assert shown.index("  demo ") < shown.index("Cloud") < shown.index("  cluster ") < shown.index("Benchmarks")
