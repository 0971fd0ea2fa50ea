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


# implementation elsewhere, re-exported
PACKAGES = ["mlem_jax", "mlem_jax.calibrate", "mlem_jax.diffusion", "mlem_jax.compare", "mlem_jax.parallel"]
PUBLIC_MODULES = ["mlem_jax.plotting", "mlem_jax.timing"] + [
    f"mlem_jax.diffusion.{m}" for m in ("classifier", "data", "family", "folder", "images", "metrics",
                                        "parameterization", "sampling", "sde", "train", "objective", "checkpoint",
                                        "unet", "guidance", "mixture", "ladder", "testbed")]


def _undocumented(where, attr, obj):
    doc = (obj.__doc__ or "").strip()
    return [f"{where}.{attr}"] if not doc or doc.startswith(f"{attr}(") else []


def test_every_public_function_and_class_has_a_docstring():
    """Public: a package's `__all__`, or defined in a public module without a leading
    underscore. A NamedTuple's generated "Name(field, ...)" does not count."""
    import importlib
    import inspect

    missing = []
    for name in PACKAGES:
        package = importlib.import_module(name)
        for attr in package.__all__:
            obj = getattr(package, attr)  # every name of __all__ resolves (lazy ones included)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                missing += _undocumented(name, attr, obj)
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if getattr(obj, "__module__", "") == name:  # defined here, not imported
                missing += _undocumented(name, attr, obj)
    assert not missing, missing


def test_the_diffusion_package_loads_orbax_tfds_and_matplotlib_only_when_used():
    """`mlem_jax.diffusion` exports eagerly (one way to export); its heavy optional parts
    stay inside the functions that use them."""
    import subprocess
    import sys

    heavy = ("orbax", "tensorflow_datasets", "tensorflow", "matplotlib")
    code = (f"import sys, mlem_jax.diffusion as d; d.UNet, d.train_family, d.load_dataset; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])


def test_time_calls_makes_one_first_call_then_the_repeats():
    from mlem_jax.timing import time_calls

    calls = []

    def fn(x):
        calls.append(x)
        return x + 1

    t = time_calls(fn, 1.0, repeats=3, statistic="min")
    assert len(calls) == 4 and t.output == 2.0 and t.first_seconds >= 0 and t.seconds >= 0
    with pytest.raises(ValueError, match="statistic: expected 'median' or 'min'"):
        time_calls(fn, 1.0, statistic="mean")


def test_time_pair_interleaves_the_two_sides_and_keeps_the_best_of_each():
    import time

    from mlem_jax.timing import time_pair

    calls = []

    def side(name, seconds):
        def fn():
            calls.append(name)
            time.sleep(seconds)
            return 0.0
        return fn

    t_a, t_b = time_pair(side("a", 0.01), side("b", 0.03), repeats=3)
    assert calls == ["a", "b"] * 4  # one untimed call of each, then 3 rounds of a then b
    assert 0.01 <= t_a and 0.03 <= t_b  # a sleep lasts at least its seconds


def test_every_core_function_with_three_or_more_parameters_says_what_each_is():
    """The generated API pages show an `Args:` section for every public function of `mlem_jax`,
    `mlem_jax.calibrate`, `mlem_jax.compare`, `mlem_jax.parallel` and `mlem_jax.diffusion` that
    takes three or more parameters, naming each of them."""
    import importlib
    import inspect

    missing = []
    for package, name in [(p, n) for p in ("mlem_jax", "mlem_jax.calibrate", "mlem_jax.compare",
                                           "mlem_jax.parallel", "mlem_jax.diffusion")
                          for n in importlib.import_module(p).__all__]:
        obj = getattr(importlib.import_module(package), name)
        if inspect.isfunction(obj):
            params = [p for p in inspect.signature(obj).parameters.values()
                      if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            doc = obj.__doc__ or ""
            args = doc.split("Args:", 1)[1] if "Args:" in doc else ""
            if len(params) >= 3 and not all(f"\n      {p.name}:" in args for p in params):
                missing.append(name)
    assert not missing, missing
