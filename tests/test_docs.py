import sys

import pytest

from fruits.core.config import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "docs"))
import excerpts  # noqa: E402

DOCS = sorted((PROJECT_ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_code_excerpts_are_identical_to_the_source(doc):
    found = list(excerpts.blocks(doc.read_text()))
    for path, name, code in found:
        assert code == excerpts.excerpt(path, name), f"{doc.name}: {path}::{name} drifted: run `make docs`"


def test_a_missing_function_is_reported():
    with pytest.raises(KeyError, match="no top-level function or class nope"):
        excerpts.excerpt("src/fruits/stages/pca.py", "nope")


def architecture_map() -> set[str]:
    """The modules the README's map names: `name.py` lines under `  <folder>/` lines of its src/fruits block."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    block = readme[readme.index("src/fruits/\n"):]
    block = block[: block.index("```")]
    modules, folder = set(), None
    for line in block.splitlines()[1:]:
        indent, first = len(line) - len(line.lstrip()), (line.split() or [""])[0]
        if indent == 2 and first.endswith("/"):
            folder = first
        elif indent == 0:
            folder = None
        elif folder and indent == 4 and first.endswith(".py"):
            modules.add(folder + first)
    return modules


def test_the_readme_map_names_every_module_of_the_package_and_nothing_else():
    package = PROJECT_ROOT / "src" / "fruits"
    actual = {path.relative_to(package).as_posix() for path in package.rglob("*.py") if path.name != "__init__.py"}
    named = architecture_map()
    assert not actual - named, f"modules missing from the README's map: {sorted(actual - named)}"
    assert not named - actual, f"the README's map names modules that do not exist: {sorted(named - actual)}"


def test_the_readme_stays_a_five_minute_read():
    assert len((PROJECT_ROOT / "README.md").read_text().splitlines()) < 250
