"""Every Python block in README.md and docs/*.md runs as written."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    pytest.param(code, id=f"{page.name}:{i}")
    for page in PAGES
    if page.exists()
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
]


@pytest.mark.parametrize("code", BLOCKS)
def test_block_runs(code):
    exec(compile(code, "<doc>", "exec"), {})


PUBLIC_MODULES = ["mlem_jax", "mlem_jax.calibrate", "mlem_jax.sharding", "mlem_jax.equal_error"] + [
    f"mlem_jax.diffusion.{m}" for m in ("classifier", "coupled", "data", "family", "images", "metrics",
                                        "parameterization", "sampling", "sde", "train", "unet")]


def test_every_public_function_and_class_has_a_docstring():
    """Public: defined in a public module (or re-exported by `mlem_jax`) without a leading
    underscore. A NamedTuple's generated "Name(field, ...)" does not count."""
    import importlib
    import inspect

    missing = []
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            home = getattr(obj, "__module__", "")
            if not home.startswith("mlem_jax") or (home != name and name != "mlem_jax"):
                continue  # imported from elsewhere: checked where it is defined
            doc = (obj.__doc__ or "").strip()
            if not doc or doc.startswith(f"{attr}("):
                missing.append(f"{name}.{attr}")
    assert not missing, missing
