"""The house: no import circle among the package's modules (function-level imports included, as
grimp and import-linter see them), rooms of bounded size, and no private API of a library in src."""

import ast
import re

import grimp
import pytest

from fruits.core.config import PROJECT_ROOT

SOURCE = PROJECT_ROOT / "src" / "fruits"
MODULE_LINES, FUNCTION_LINES = 400, 60


def cycles(graph) -> list[list[str]]:
    """The import circles of the graph (Tarjan's strongly connected components of more than one module)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(module):
        index[module] = low[module] = counter[0]
        counter[0] += 1
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


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
