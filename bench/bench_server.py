"""Load benchmark of `python -m mimo_jax.serve` beside offline `mimo_jax.generate` at the same batch size.

For each concurrency N: start a server with --max-batch N, let N clients each stream
`--requests-per-client` completions back to back (token-id prompts of --prompt-len, exactly
--output-len tokens: ignore_eos), and measure output tok/s, time to first token (p50/p99) and
inter-token latency (p50/p99, a chunk of k tokens after a gap g counts k latencies of g/k).
Then offline: `generate` on the same model with max_batch N over the same N x requests prompts
(after a warm-up call). Server and offline each run in their own process; on a CPU
(--together) the two alternate run by run so both see the same machine load, on an accelerator
one process holds it at a time. Each is timed --repeats times and the best run counts.

    python bench/bench_server.py                                   # the demo model on CPU
    python bench/bench_server.py --model DIR --concurrency 1,8,32,64 --dtype bfloat16
    python bench/bench_server.py --model flash-slice-4 --random-weights --tokenizer mimo_jax/demo_model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from mimo_jax.model.moe import EXPERT_IMPLS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(10, vocab, size=length)] for _ in range(count)]


def _vocab(args) -> int:
    from mimo_jax.config import MiMoConfig

    if args.random_weights:
        from mimo_jax.weights.random import bench_config

        return min(bench_config(args.model).vocab_size, _tokenizer_vocab(args.tokenizer))
    return _tokenizer_vocab(args.tokenizer or args.model) or MiMoConfig.from_json(args.model).vocab_size


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc): on a shared CPU it varies less than wall time."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tokenizer_vocab(directory: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(directory, "tokenizer.json")).get_vocab_size(with_added_tokens=True)


# ------------------------------------------------------------------------------------ offline
def offline(args) -> None:
    """Child process `--offline N`: build the engine, compile, then time one `generate` per stdin line."""
    import jax

    import mimo_jax

    options = mimo_jax.RunOptions.for_platform(jax.default_backend(), moe_impl=args.moe_impl)
    if args.random_weights:
        import jax.numpy as jnp

        from mimo_jax.weights.random import bench_config, random_model

        lm = mimo_jax.LanguageModel(random_model(bench_config(args.model), jnp.dtype(args.dtype), options))
    else:
        lm = mimo_jax.load_model(args.model, dtype=args.dtype, options=options)
    n = args.offline
    prompts = _prompts(_vocab(args), n * args.requests_per_client, args.prompt_len, seed=n)
    engine = mimo_jax.Engine(
        lm,
        max_batch=n,
        max_context=args.prompt_len + args.output_len + 1,
        prefill_chunk=args.prefill_chunk,
        max_round_tokens=min(args.output_len, 64),  # generate()'s own choice
        max_stop_ids=1,
    )
    run = lambda batch: mimo_jax.generate(lm, batch, engine=engine, max_new_tokens=args.output_len, ignore_eos=True)
    run(prompts[:n])  # compile
    print("ready", flush=True)
    for _ in sys.stdin:  # one timed run per line
        cpu0, t0 = _cpu_seconds(os.getpid()), time.perf_counter()
        results = run(prompts)
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds(os.getpid()) - cpu0
        tokens = sum(len(r.token_ids) for r in results)
        row = {"batch": n, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}
        print(json.dumps({**row, "cpu_ms_per_token": 1e3 * cpu / tokens}), flush=True)


class Offline:
    """The offline child process: `measure()` asks it for one timed run."""

    def __init__(self, args, n: int):
        child = [*sys.argv[1:], "--model", args.model, "--offline", str(n)]
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._read()

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"offline child exited with {self.proc.wait()}")
        return line.strip()

    def measure(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self._read())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(120)


# ------------------------------------------------------------------------------------ server load
async def _client(http, prompts, args, samples) -> None:
    for prompt in prompts:
        body = {
            "prompt": prompt,
            "max_tokens": args.output_len,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        start = time.perf_counter()
        last, done, first = start, 0, None
        gaps = []
        async with http.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                usage = json.loads(line[6:]).get("usage") or {}
                count = usage.get("completion_tokens", done)
                if count > done:
                    now = time.perf_counter()
                    if first is None:
                        first = now - start
                    else:
                        gaps.extend([(now - last) / (count - done)] * (count - done))
                    last, done = now, count
        samples.append({"ttft": first, "itl": gaps, "tokens": done, "seconds": time.perf_counter() - start})


async def _load(url: str, prompts: list[list[int]], n: int, args) -> dict:
    import httpx

    samples: list[dict] = []
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:
        per_client = [prompts[i::n] for i in range(n)]
        t0 = time.perf_counter()
        await asyncio.gather(*(_client(http, p, args, samples) for p in per_client))
        seconds = time.perf_counter() - t0
    tokens = sum(s["tokens"] for s in samples)
    ttft = np.array([s["ttft"] for s in samples])
    itl = np.array([g for s in samples for g in s["itl"]]) if any(s["itl"] for s in samples) else np.zeros(1)
    return {
        "concurrency": n,
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)),
        "ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99)),
        "itl_p50_ms": 1e3 * float(np.percentile(itl, 50)),
        "itl_p99_ms": 1e3 * float(np.percentile(itl, 99)),
    }


class Server:
    """`python -m mimo_jax.serve --max-batch N` as a child process (context manager)."""

    def __init__(self, args, n: int):
        self.args, self.n = args, n

    def __enter__(self) -> Server:
        import httpx

        args, n = self.args, self.n
        port = _free_port()
        cmd = [
            sys.executable, "-m", "mimo_jax.serve", "--model", args.model, "--port", str(port), "--dtype", args.dtype,
            "--max-batch", str(n), "--max-context", str(args.prompt_len + args.output_len + 1),
            "--prefill-chunk", str(args.prefill_chunk), "--round-tokens", str(args.round_tokens),
            "--max-waiting", str(max(256, n * args.requests_per_client)), "--max-logprobs", "0",
            "--log-level", "warning",
        ]  # fmt: skip
        if args.tokenizer:
            cmd += ["--tokenizer", args.tokenizer]
        if args.random_weights:
            cmd += ["--random-weights"]
        if args.moe_impl:
            cmd += ["--moe-impl", args.moe_impl]
        if args.no_overlap:
            cmd += ["--no-overlap"]
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr)
        self.url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.startup_s = time.perf_counter() - t0
        self.prompts = _prompts(_vocab(args), n * args.requests_per_client, args.prompt_len, seed=n)
        asyncio.run(_load(self.url, self.prompts[:n], n, args))  # warm: first requests, connection pool
        return self

    def measure(self) -> dict:
        cpu0 = _cpu_seconds(self.proc.pid)
        row = asyncio.run(_load(self.url, self.prompts, self.n, self.args))
        return {**row, "cpu_ms_per_token": 1e3 * (_cpu_seconds(self.proc.pid) - cpu0) / row["tokens"]}

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def measure(args, n: int) -> tuple[dict, dict]:
    """Best offline run and best server run at concurrency n."""
    best = lambda runs: max(runs, key=lambda r: r["tok_s"])
    off = Offline(args, n)
    if args.together:  # CPU: alternate the two so both see the same machine load
        with Server(args, n) as server:
            pairs = [(off.measure(), server.measure()) for _ in range(args.repeats)]
            startup = server.startup_s
        off.close()
        offline_runs, server_runs = zip(*pairs, strict=True)
    else:  # an accelerator holds one process's memory at a time
        offline_runs = [off.measure() for _ in range(args.repeats)]
        off.close()
        with Server(args, n) as server:
            server_runs = [server.measure() for _ in range(args.repeats)]
            startup = server.startup_s
    return best(offline_runs), {**best(server_runs), "startup_s": startup}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory, or a config (flash-slice-N) with --random-weights")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--moe-impl", choices=sorted(EXPERT_IMPLS))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--round-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best counts")
    p.add_argument(
        "--together",
        action="store_true",
        help="CPU: keep the server up while offline runs and alternate the measurements (not on one GPU)",
    )
    p.add_argument("--no-overlap", action="store_true", help="serve with --no-overlap (host work not overlapped)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--offline", type=int, help=argparse.SUPPRESS)  # child mode: offline generate at this batch
    args = p.parse_args()
    if args.model is None:
        from mimo_jax.weights.demo import demo_model_dir

        args.model = str(demo_model_dir())
    if args.offline:
        offline(args)
        return 0

    rows = []
    for n in (int(x) for x in args.concurrency.split(",")):
        off, srv = measure(args, n)
        row = {
            **srv,
            "offline_tok_s": off["tok_s"],
            "ratio": srv["tok_s"] / off["tok_s"],
            "offline_cpu_ms_per_token": off["cpu_ms_per_token"],
        }
        rows.append(row)
        print(
            f"N={n:3d}  server {row['tok_s']:9.1f} tok/s  offline {row['offline_tok_s']:9.1f} tok/s  "
            f"ratio {row['ratio']:.2f}  TTFT p50/p99 {row['ttft_p50_ms']:.0f}/{row['ttft_p99_ms']:.0f} ms  "
            f"ITL p50/p99 {row['itl_p50_ms']:.1f}/{row['itl_p99_ms']:.1f} ms  "
            f"CPU ms/token server {row['cpu_ms_per_token']:.2f} offline {row['offline_cpu_ms_per_token']:.2f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
