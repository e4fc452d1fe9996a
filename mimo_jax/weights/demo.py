"""Where the embedded demo model lives (the default of `python -m mimo_jax.generate`)."""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL = Path(__file__).resolve().parent.parent / "demo_model"  # mimo_jax/demo_model


def demo_model_dir() -> Path:
    """The demo checkpoint directory; a clear error while it has not been added to the package."""
    if not (DEMO_MODEL / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded demo model is missing (no config.json in {DEMO_MODEL}); "
            "pass --model DIR with a checkpoint directory"
        )
    return DEMO_MODEL
