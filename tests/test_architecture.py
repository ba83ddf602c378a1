"""The house: no import circle among the package's modules (function-level imports included, as
grimp and import-linter see them), rooms of bounded size, and no private API of a library in src."""

import ast
import re
from pathlib import Path

import grimp
import pytest

from fruits.core.config import PROJECT_ROOT

SOURCE = PROJECT_ROOT / "src" / "fruits"
MODULE_LINES, FUNCTION_LINES = 400, 60


def cycles(graph) -> list[list[str]]:
    """The import circles of the graph: its strongly connected components of more than one module (networkx)."""
    import networkx

    imports = networkx.DiGraph()
    imports.add_nodes_from(graph.modules)
    imports.add_edges_from((module, imported) for module in graph.modules
                           for imported in graph.find_modules_directly_imported_by(module))
    return sorted(sorted(component) for component in networkx.strongly_connected_components(imports) if len(component) > 1)


def test_no_import_circle_among_the_package_modules():
    assert cycles(grimp.build_graph("fruits")) == []


def test_the_circle_finder_finds_a_circle():
    graph = grimp.ImportGraph()
    for module in ("a", "b", "c", "d"):
        graph.add_module(module)
    graph.add_import(importer="a", imported="b")
    graph.add_import(importer="b", imported="c")
    graph.add_import(importer="c", imported="a")
    graph.add_import(importer="c", imported="d")
    assert cycles(graph) == [["a", "b", "c"]]


SOURCES = sorted(SOURCE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(SOURCE)) for p in SOURCES])
def test_rooms_and_functions_stay_small(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MODULE_LINES, f"{path.name} has over {MODULE_LINES} lines: split it by concern"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name} is {length} lines"


# Spark's Py4J internals (_jvm, _jsc, _jdf, _gateway) break under Spark Connect: public APIs only.
PRIVATE_APIS = re.compile(r"_strip_protocol|_get_node|path_importer_cache|to_arrow_schema|FRUITS_TEST_|"
                          r"\._jvm\b|\._jsc\b|\._jdf\b|\._gateway\b")


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(SOURCE)) for p in SOURCES])
def test_no_private_library_api_nor_test_switch_in_src(path):
    hits = [line for line in path.read_text().splitlines() if PRIVATE_APIS.search(line)]
    assert not hits, f"{path.name}: {hits}"


def test_no_test_module_imports_another_nor_conftest_nor_a_benchmark():
    """Shared helpers live in tests/helpers/, fixtures in conftest.py (pytest gives them): a test module
    stands alone."""
    tests = Path(__file__).parent
    modules = {p.stem for p in tests.glob("*.py")} | {p.stem for p in (PROJECT_ROOT / "benchmarks").glob("*.py")}
    pattern = re.compile(r"^\s*(?:from|import)\s+(?:tests\.)?(\w+)", re.M)
    offending = {p.name: sorted(set(pattern.findall(p.read_text())) & modules) for p in tests.glob("*.py")}
    assert not {name: found for name, found in offending.items() if found}


def test_dvc_is_driven_one_way_its_python_api():
    """src drives DVC through dvc.repo.Repo only (exp apply needs its allow_missing, which the CLI lacks):
    no `dvc` command line is run from the package."""
    command = re.compile(r"""\[\s*["']dvc["']\s*,\s*["'][a-z]|["']-m["']\s*,\s*["']dvc["']""")  # ["dvc", "gc" …], -m dvc
    hits = {str(p.relative_to(SOURCE)): [line.strip() for line in p.read_text().splitlines() if command.search(line)]
            for p in SOURCES}
    assert not {name: lines for name, lines in hits.items() if lines}
    users = {str(p.relative_to(SOURCE)) for p in SOURCES if "from dvc.repo import Repo" in p.read_text()}
    assert users == {"cloud/bucket.py", "cloud/purge.py", "tooling/experiments.py"}, users
