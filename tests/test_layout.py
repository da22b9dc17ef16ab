"""docs/layout.md's layers are the code's: no module imports from its own layer or one above, every Python file of
the toolkit has a layer, and only documents.py imports LangChain."""
import ast
import re

from tests.conftest import ROOT


def layers() -> dict[str, int]:
    """Module path -> layer, read from the table of docs/layout.md ('bench/*' stands for every benchmark)."""
    table = (ROOT / "docs" / "layout.md").read_text().split("## The layers", 1)[1]
    found = {}
    for number, cell in re.findall(r"^\| (\d+) \| ([^|]+) \|", table, re.M):
        for path in re.findall(r"`([^`]+)`", cell):
            found[path] = int(number)
    return found


def toolkit_files() -> list[str]:
    paths = [p for p in ROOT.glob("*.py")] + list((ROOT / "finetune").glob("*.py")) + list((ROOT / "bench").glob("*.py"))
    return sorted(str(p.relative_to(ROOT)) for p in paths if p.name != "__init__.py")


def layer_of(path: str, table: dict[str, int]):
    return table.get(path, table.get("bench/*") if path.startswith("bench/") else None)


def imported_files(path: str) -> set[str]:
    """The project files a module imports, at its top or inside a function."""
    tree = ast.parse((ROOT / path).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    found = {resolve(name, path) for name in names}
    return {target for target in found if target and target != path}


def resolve(name: str, importer: str):
    """The project file a module name stands for (a benchmark also finds its sibling benchmarks), or None."""
    relative = name.replace(".", "/") + ".py"
    places = [relative] + ([f"bench/{relative}"] if importer.startswith("bench/") else [])
    return next((p for p in places if (ROOT / p).is_file() and not p.endswith("__init__.py")), None)


def test_every_toolkit_file_has_a_layer():
    table = layers()
    assert table, "docs/layout.md lost its table of layers"
    missing = [path for path in toolkit_files() if layer_of(path, table) is None]
    assert not missing, f"put these in a layer of docs/layout.md: {missing}"
    stale = [path for path in table if "*" not in path and not (ROOT / path).is_file()]
    assert not stale, f"docs/layout.md names files that do not exist: {stale}"


def test_no_module_imports_from_its_own_layer_or_above():
    table = layers()
    wrong = []
    for path in toolkit_files():
        for target in imported_files(path):
            mine, theirs = layer_of(path, table), layer_of(target, table)
            if target.startswith("tests/"):        # only a benchmark may use the tests' scripted server
                if not path.startswith("bench/"):
                    wrong.append(f"{path} imports {target}, a test helper")
            elif theirs >= mine and not (path.startswith("bench/") and target.startswith("bench/")):
                wrong.append(f"{path} (layer {mine}) imports {target} (layer {theirs})")
    assert not wrong, "\n".join(wrong)


def test_only_documents_imports_langchain():
    importers = []
    for path in toolkit_files():
        if path.startswith("bench/"):
            continue       # bench/generation.py and bench/retrieval.py compare with LangChain on purpose
        tree = ast.parse((ROOT / path).read_text())
        for node in ast.walk(tree):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(m.startswith("langchain") for m in modules):
                importers.append(path)
    assert sorted(set(importers)) == ["documents.py"]


def test_the_layer_check_sees_a_violation(tmp_path, monkeypatch):
    """The check is not vacuous: a text helper that imported the retriever would be reported."""
    source = (ROOT / "text.py").read_text() + "\nfrom retrieval import build_retriever\n"
    fake_root = tmp_path
    (fake_root / "text.py").write_text(source)
    (fake_root / "retrieval.py").write_text("")
    monkeypatch.setattr("tests.test_layout.ROOT", fake_root)
    assert imported_files("text.py") == {"retrieval.py"}


def test_no_function_is_longer_than_sixty_lines():
    """A function that reads top to bottom fits on a screen: the longer ones were split by job."""
    long = []
    for path in toolkit_files():
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path}: {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
