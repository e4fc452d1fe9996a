"""Load throughput: disk -> device memory (GB/s) for a synthetic FP8 checkpoint, beside the raw read rate.

    python bench/bench_load.py --gb 8 --dir /tmp/mimo_bench          # on a GPU host
    python bench/bench_load.py --gb 0.3                              # CPU smoke run

Writes a release-layout FP8 checkpoint (fused qkv, many files with index) of about `--gb` GB
(random float8 values, unit scales), evicts it from the page cache (posix_fadvise DONTNEED),
reads every file once with parallel preads (the limit), evicts again, then times
`load_model(dir, weights="fp8")` until every array is ready on the device. Target: the load
reaches at least 70% of the raw rate.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def synthetic_config(target_bytes: float) -> dict:
    """A MiMo-shaped config whose FP8 checkpoint is about `target_bytes` (experts dominate, as in the releases)."""
    hidden, inter, experts = 2048, 1024, 32
    per_moe_layer = 3 * experts * hidden * inter
    layers = max(2, 1 + round(target_bytes / per_moe_layer))
    return {
        "architectures": ["MiMoV2ForCausalLM"],
        "model_type": "mimo_v2",
        "vocab_size": 32768,
        "hidden_size": hidden,
        "intermediate_size": 4096,
        "moe_intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 192,
        "v_head_dim": 128,
        "hybrid_layer_pattern": [0 if i % 6 == 0 else 1 for i in range(layers)],
        "moe_layer_freq": [0] + [1] * (layers - 1),
        "swa_num_attention_heads": 16,
        "swa_num_key_value_heads": 8,
        "swa_head_dim": 192,
        "swa_v_head_dim": 128,
        "sliding_window_size": 128,
        "rope_theta": 5e6,
        "swa_rope_theta": 1e4,
        "partial_rotary_factor": 0.334,
        "n_routed_experts": experts,
        "num_experts_per_tok": 4,
        "layernorm_epsilon": 1e-5,
        "attention_projection_layout": "fused_qkv",
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        },
    }


def write_checkpoint(directory: str, config: dict, file_bytes: int = 1 << 30) -> int:
    """Random FP8 tensors straight from the tensor table (no quantization pass); returns bytes written."""
    import ml_dtypes

    from mimo_jax.config import MiMoConfig
    from mimo_jax.tools.plan import release_tensors
    from mimo_jax.weights.safetensors_io import save_file

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    dtypes = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
    files, current, size = [], {}, 0
    for t in release_tensors(MiMoConfig.from_dict(config)):
        if t.dtype == "float8_e4m3fn":  # bytes below 0x7E: finite e4m3 values
            arr = rng.integers(0, 0x7E, t.shape, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
        elif t.name.endswith("weight_scale_inv"):
            arr = np.full(t.shape, 1e-2, np.float32)
        else:
            arr = (rng.standard_normal(t.shape, dtype=np.float32) * 0.02).astype(dtypes[t.dtype])
        if current and size + arr.nbytes > file_bytes:
            files.append(current)
            current, size = {}, 0
        current[t.name] = arr
        size += arr.nbytes
    files.append(current)
    weight_map, total = {}, 0
    for i, group in enumerate(files):
        name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(group, os.path.join(directory, name))
        weight_map.update(dict.fromkeys(group, name))
        total += sum(a.nbytes for a in group.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return total


def files_of(directory: str) -> list[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors"))


def evict(directory: str) -> None:
    """Drop the files from the page cache so the next read comes from the disk."""
    for path in files_of(directory):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(directory: str, workers: int, chunk: int = 64 << 20) -> tuple[int, float]:
    """Read every byte once with `workers` threads of large preads: (bytes, seconds)."""
    jobs = []
    for path in files_of(directory):
        size = os.path.getsize(path)
        jobs += [(path, off, min(chunk, size - off)) for off in range(0, size, chunk)]

    def read(job):
        path, off, n = job
        buf = bytearray(n)
        fd = os.open(path, os.O_RDONLY)
        try:
            view, pos = memoryview(buf), off
            while len(view):
                k = os.preadv(fd, [view], pos)
                view, pos = view[k:], pos + k
        finally:
            os.close(fd)
        return n

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        total = sum(pool.map(read, jobs))
    return total, time.perf_counter() - start


def timed_load(directory: str, weights: str) -> float:
    import jax

    import mimo_jax

    start = time.perf_counter()
    lm = mimo_jax.load_model(directory, dtype="bfloat16", weights=weights)
    jax.block_until_ready(jax.tree.leaves(lm.params))
    seconds = time.perf_counter() - start
    del lm
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=0.3, help="checkpoint size to generate (GB)")
    ap.add_argument("--dir", default="/tmp/mimo_bench_load", help="where to write the checkpoint")
    ap.add_argument("--workers", type=int, default=8, help="threads for the raw read")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    ap.add_argument("--bf16", action="store_true", help="also time weights='bf16' (dequantized on the device)")
    args = ap.parse_args()

    import jax

    if os.path.exists(args.dir):
        shutil.rmtree(args.dir)
    config = synthetic_config(args.gb * 1e9)
    t0 = time.perf_counter()
    nbytes = write_checkpoint(args.dir, config)
    print(f"wrote {nbytes / 1e9:.2f} GB in {len(files_of(args.dir))} files ({time.perf_counter() - t0:.0f} s)")
    print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}")
    timed_load(args.dir, "fp8")  # compile/warm the runtime once
    modes = ["fp8"] + (["bf16"] if args.bf16 else [])
    for r in range(args.repeats):
        evict(args.dir)
        total, raw_s = raw_read(args.dir, args.workers)
        raw = total / raw_s / 1e9
        for mode in modes:
            evict(args.dir)
            load_s = timed_load(args.dir, mode)
            rate = total / load_s / 1e9
            print(
                f"run {r}: raw read {raw:.2f} GB/s ({raw_s:.2f} s) | load weights={mode} {rate:.2f} GB/s "
                f"({load_s:.2f} s) = {100 * rate / raw:.0f}% of raw"
            )
    if not args.keep:
        shutil.rmtree(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
