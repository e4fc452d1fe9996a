"""Developer tools, each a command: `python -m mimo_jax.tools.bench` (engine benchmark), `.aot` (compile for a TPU
slice), `.plan` (memory planner), `.convert` (Orbax checkpoint), and `profiling` (device-time summaries)."""
