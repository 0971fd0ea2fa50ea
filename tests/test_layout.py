"""The package's layers and their arrows (docs/architecture.md), read from every import
statement of every module, function-level imports included:

    core (mlem_jax/_*.py, mlem_jax/__init__.py)
      <- timing, plotting (infrastructure), parallel, calibrate
      <- diffusion (also parallel and the infrastructure)
      <- compare (calibrate, diffusion)
      <- cli (everything)

An import against an arrow fails here with the module and line that made it."""

import ast
import pathlib

import mlem_jax

ROOT = pathlib.Path(mlem_jax.__file__).parent
INFRA = {"timing", "plotting"}
ALLOWED = {  # layer -> the layers it may import (itself always)
    "core": set(),
    "infra": {"core"},
    "parallel": {"core", "infra"},
    "calibrate": {"core", "infra"},
    "diffusion": {"core", "infra", "parallel"},
    "compare": {"core", "infra", "parallel", "calibrate", "diffusion"},
    "cli": {"core", "infra", "parallel", "calibrate", "diffusion", "compare"},
}


def layer_of(dotted: str) -> str:
    parts = dotted.split(".")[1:]
    if not parts or parts[0].startswith("_"):
        return "core"
    return "infra" if parts[0] in INFRA else parts[0]


def imports_of(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlem_jax"):
            if node.module == "mlem_jax":  # from mlem_jax import x: x may be a subpackage
                for alias in node.names:
                    yield node.lineno, "mlem_jax." + alias.name if alias.name in ALLOWED or alias.name in INFRA \
                        else "mlem_jax"
            else:
                yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mlem_jax"):
                    yield node.lineno, alias.name


def test_every_import_follows_the_arrows():
    wrong = []
    modules = sorted(ROOT.rglob("*.py"))
    assert len(modules) > 40
    for path in modules:
        rel = path.relative_to(ROOT.parent).with_suffix("")
        dotted = ".".join(rel.parts).removesuffix(".__init__")
        if dotted == "mlem_jax":
            here = "core"
        else:
            here = layer_of(dotted)
        assert here in ALLOWED, f"{dotted}: a module outside the known layers ({sorted(ALLOWED)})"
        for line, target in imports_of(path):
            there = layer_of(target)
            if there != here and there not in ALLOWED[here]:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line}: {here} imports {target} ({there})")
    assert not wrong, "\n".join(wrong)


def test_the_core_imports_no_flax_or_optax():
    """`import mlem_jax` stays light: the core needs jax, numpy and diffrax only."""
    import subprocess
    import sys

    code = ("import sys, mlem_jax; bad = [m for m in ('flax', 'optax', 'orbax', 'matplotlib', 'tensorflow') "
            "if m in sys.modules]; print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import mlem_jax pulled in {out}"
