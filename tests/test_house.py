"""The house keeps its shape: layers import only downwards, engine files stay
small, and the CLI starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ddetr_cli"

# From the bottom up; a module may import only from its own layer or the ones before it.
# runtime (CUDA-graph and onnxruntime runners) needs models/checkpoints/data; export needs
# models, data and runtime (its self-check runs the OnnxRunner) and nothing of the engine.
LAYERS = [
    "errors", "_C", "ops", "models", "checkpoints", "data", "viz", "runtime", "export",
    "engine.parts", "engine.recipes", "engine.config", "engine.report", "engine.runs", "engine.loops",
    "engine.run_train", "engine.run_eval", "engine.run_predict", "engine",
    "bench", "cli", "__main__", "",
]


def _layer(module: str) -> int:
    """Index in LAYERS of the most specific prefix of ``module`` (dotted, under ddetr_cli)."""
    best = len(LAYERS) - 1
    best_len = -1
    for i, name in enumerate(LAYERS):
        if (module == name or module.startswith(name + ".") or name == "") and len(name) > best_len:
            best, best_len = i, len(name)
    return best


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _submodule_or_package(base: list[str], name: str) -> str:
    """``from <base> import name``: the submodule when there is one, else the package ('' = the root)."""
    here = PKG.joinpath(*base, name)
    return ".".join([*base, name]) if here.is_dir() or here.with_suffix(".py").is_file() else ".".join(base)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, ddetr_cli-relative module) of every import outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path).split(".") if path.name == "__init__.py" else _module_name(path).split(".")[:-1]
    out: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package[: len(package) - (child.level - 1)] if child.level > 1 else list(package)
                    target = ".".join(p for p in [*base, *(child.module.split(".") if child.module else [])] if p)
                    names = [target] if child.module else [_submodule_or_package(base, a.name) for a in child.names]
                    out.extend((child.lineno, n) for n in names)
                elif child.module and child.module.startswith("ddetr_cli"):
                    out.append((child.lineno, child.module.removeprefix("ddetr_cli").lstrip(".")))
            elif isinstance(child, ast.Import):
                out.extend((child.lineno, a.name.removeprefix("ddetr_cli").lstrip("."))
                           for a in child.names if a.name.startswith("ddetr_cli"))  # fmt: skip
            visit(child)

    visit(tree)
    return out


def test_no_module_imports_upward():
    upward = []
    for path in sorted(PKG.rglob("*.py")):
        me = _module_name(path)
        for line, target in _imports(path):
            if target and _layer(target) > _layer(me) and not target.startswith(me + "."):
                upward.append(f"{path.relative_to(PKG.parent)}:{line}: {me} imports {target}")
    assert not upward, "\n".join(upward)


def test_the_layer_checker_sees_an_upward_import(tmp_path):
    assert _layer("engine.loops.train") > _layer("engine.runs.checkpoint") > _layer("data.sources")
    assert _layer("cli.errors") > _layer("engine") > _layer("engine.run_predict") > _layer("models")


def test_engine_files_stay_small():
    big = [f"{p.relative_to(PKG)}: {n}" for p in (PKG / "engine").rglob("*.py")
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > 330]  # fmt: skip
    assert not big, big


@pytest.mark.parametrize("code", [
    "import ddetr_cli.cli.main",
    "from click.testing import CliRunner; from ddetr_cli.cli.main import cli; "
    "assert CliRunner().invoke(cli, ['predict', '--help']).exit_code == 0",
])
def test_cli_starts_without_torch_or_scipy(code):
    check = f"{code}; import sys; heavy = sorted(m for m in ('torch', 'scipy') if m in sys.modules); print(heavy)"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
