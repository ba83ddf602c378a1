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
