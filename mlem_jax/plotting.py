"""The one way mlem-jax gets matplotlib: the Agg backend (files, no display), imported on
first use because matplotlib is an optional dependency (`pip install mlem-jax[plot]`)."""

from __future__ import annotations


def pyplot(required: bool = True):
    """`matplotlib.pyplot` on the Agg backend; without matplotlib, an ImportError that says
    how to install it, or None with `required=False` (callers then skip their plot)."""
    try:
        import matplotlib
    except ImportError as e:
        if not required:
            return None
        raise ImportError("matplotlib: needed for this plot; install it with pip install 'mlem-jax[plot]'.") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
