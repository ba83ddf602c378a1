"""Code excerpts in the docs stay identical to the source.

A block in a Markdown file written as

    <!-- excerpt: src/fruits/featurize.py::build_udf -->
    ```python
    ...
    ```

holds the exact source of that function or class. `python docs/excerpts.py` rewrites every block from
the source (`make docs`); tests/test_docs.py fails when one has drifted.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- excerpt: (?P<path>[^:]+)::(?P<name>[\w.]+) -->\n```python\n)(?P<code>.*?)(```)", re.S)


def excerpt(path: str, name: str) -> str:
    """The source of the top-level function or class `name` in `path`."""
    source = (ROOT / path).read_text()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            return "\n".join(source.splitlines()[start - 1 : node.end_lineno]) + "\n"
    raise KeyError(f"{path} has no top-level function or class {name}")


def blocks(markdown: str):
    for match in BLOCK.finditer(markdown):
        yield match.group("path"), match.group("name"), match.group("code")


def sync(doc: Path) -> bool:
    """Rewrite the excerpts of doc from the source; True if anything changed."""
    text = doc.read_text()
    synced = BLOCK.sub(lambda m: m.group(1) + excerpt(m.group("path"), m.group("name")) + m.group(5), text)
    if synced != text:
        doc.write_text(synced)
    return synced != text


if __name__ == "__main__":
    for path in sys.argv[1:] or sorted(str(p) for p in (ROOT / "docs").glob("*.md")):
        if sync(Path(path)):
            print(f"updated {path}")
