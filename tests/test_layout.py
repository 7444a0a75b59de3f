"""The package's layout holds: imports run only downward through the layers, every
sub-package says what it owns, and docs/architecture.md names only modules that exist
(and every module there is)."""

import ast
import re
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "dist_lm"
# Bottom to top. A module may import its own layer and the layers below it. The
# top-level modules other than cli are the ground every sub-package stands on.
LAYERS = [
    {"dist_lm.errors", "dist_lm.hashing", "dist_lm.presets", "dist_lm.config",
     "dist_lm.model"},
    {"dist_lm.runtime"},
    {"dist_lm.data"},
    {"dist_lm.training"},
    {"dist_lm.tools"},
    {"dist_lm.cli", "dist_lm.gluon_flags", "dist_lm.__init__"},
]
SUBPACKAGES = ["runtime", "data", "training", "tools"]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def layer_of(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{module} is in no layer of this test: add it to LAYERS")


def imports_of(path: Path, text: str = None):
    """Every dist_lm module that the module at path imports (at the top or inside
    functions), resolved; text: the module's source (default: the file's)."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    source = path.read_text() if text is None else text
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                stem = package[:len(package) - node.level + 1]
                base = ".".join(stem + ([base] if base else []))
            # `from pkg import mod` names a module; `from mod import name` the module.
            names = [f"{base}.{a.name}" if (REPO / (base + "." + a.name).replace(".", "/"))
                     .with_suffix(".py").exists() else base for a in node.names]
        else:
            continue
        for name in names:
            if name == "dist_lm" or name.startswith("dist_lm."):
                yield node.lineno, name


def test_every_import_runs_down_the_layers():
    upward = []
    for path in modules():
        mine = layer_of(module_name(path))
        for line, target in imports_of(path):
            if target != "dist_lm" and layer_of(target) > mine:
                upward.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_the_layer_test_sees_an_upward_import():
    """The check above can fail: an import of training from data is caught, at the top
    of a module and inside a function alike."""
    path = PACKAGE / "data" / "corpus.py"
    text = "from ..training import train\n\n\ndef f():\n    from ..training.train import fit\n"
    found = [target for _, target in imports_of(path, text)]
    assert found == ["dist_lm.training.train"] * 2
    assert all(layer_of(t) > layer_of(module_name(path)) for t in found)


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_every_subpackage_says_what_it_owns_and_may_import(name):
    init = PACKAGE / name / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and "may import" in doc, f"{init}: a docstring saying what it may import"
    for module in sorted((PACKAGE / name).glob("*.py")):
        if module.stem != "__init__":
            assert f"`{module.stem}`" in doc, f"{init}'s docstring does not name {module.stem}"


def test_the_architecture_page_names_every_module_and_only_modules_that_exist():
    page = (REPO / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"dist_lm/[\w/]+\.py", page))
    missing = sorted(n for n in named if not (REPO / n).is_file())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"
    for path in modules():
        if path.name == "__init__.py":
            continue
        stem = path.stem
        assert re.search(rf"\b{stem}\b", page), \
            f"docs/architecture.md does not mention {path.relative_to(REPO)}"
