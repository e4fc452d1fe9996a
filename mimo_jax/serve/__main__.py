"""`python -m mimo_jax.serve`: an OpenAI-compatible HTTP server for a MiMo-V2 checkpoint.

With no arguments it serves the embedded demo model on 127.0.0.1:8000. Startup loads the
weights, logs the memory plan, compiles every shape it will run (warm-up), and only then logs
the ready line and answers requests. SIGTERM or SIGINT drains (see `mimo_jax.serve.lifecycle`).

Multi-host: start the same command on every process (with --coordinator-address/--num-processes/
--process-id, or the MIMO_* environment of `mimo_jax.sharding.initialize_distributed`). Process 0
listens and schedules; the others apply its broadcast round plans to their share of the model.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import uvicorn

from mimo_jax.config import RunOptions
from mimo_jax.engine.driver import BroadcastChannel, Driver
from mimo_jax.engine.host import Engine, kv_cache_pages
from mimo_jax.engine.state import DEFAULT_PAGE_SIZE
from mimo_jax.grammar import COMPACT_JSON_WHITESPACE, PRETTY_JSON_WHITESPACE, GrammarFactory
from mimo_jax.lm import LanguageModel, load_model
from mimo_jax.model.moe import EXPERT_IMPLS
from mimo_jax.serve.app import create_app, host_name
from mimo_jax.serve.lifecycle import DrainingServer
from mimo_jax.serve.metrics import Metrics
from mimo_jax.serve.scheduler import Scheduler
from mimo_jax.serve.server import SPEC_DECODE_METRICS_LEVELS, Limits, Server
from mimo_jax.sharding import add_distributed_arguments, initialize_distributed, make_mesh, parse_mesh_arg
from mimo_jax.text import ChatTemplate, Tokenizer
from mimo_jax.weights.demo import demo_model_dir
from mimo_jax.weights.random import bench_config, random_model

log = logging.getLogger("mimo_jax.serve")


def _size(num_bytes: float) -> str:
    for unit, scale in (("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{int(num_bytes)} B"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mimo_jax.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory, HF safetensors or Orbax (default: the embedded demo model)")
    p.add_argument("--tokenizer", help="directory with tokenizer.json / tokenizer_config.json (default: --model)")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="benchmarks: --model names a config (flash-slice-N or a config.json) and the weights are random "
        "(needs --tokenizer; ids outside its vocabulary decode to nothing)",
    )
    p.add_argument("--served-model-name", help="the model id clients send (default: the directory name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--allowed-hosts",
        help="comma-separated host names the Host header may give, '*' for any (default: the bound host, plus "
        "localhost, 127.0.0.1 and [::1] when bound to loopback; any when bound to 0.0.0.0 or ::)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("MIMO_API_KEY") or None,
        help="every route but /health and /metrics needs 'Authorization: Bearer KEY' (default: $MIMO_API_KEY; "
        "none: no authentication)",
    )
    p.add_argument("--protect-metrics", action="store_true", help="/metrics needs the API key too")
    p.add_argument(
        "--allowed-origins",
        help="comma-separated browser origins allowed by CORS (e.g. http://localhost:3000), '*' for any "
        "(default: no CORS headers, so browsers keep other origins' pages from reading answers)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/SIGINT, seconds queued and running requests get to finish before they are cancelled "
        "(new requests get 503 meanwhile)",
    )
    p.add_argument(
        "--per-request-spec-decode-metrics",
        default="none",
        choices=SPEC_DECODE_METRICS_LEVELS,
        help="with --speculative-steps: MTP acceptance of each one-sequence request in the response's "
        "metrics.speculative_decoding, as vLLM's flag of that name (detailed: also per step)",
    )
    p.add_argument("--mesh", help="device mesh, e.g. tensor=4,expert=2 (default: one device, no mesh)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="activation/weight dtype")
    p.add_argument("--weights", choices=["bf16", "fp8"], help="how FP8 checkpoints are kept (the importer's modes)")
    p.add_argument(
        "--moe-impl",
        choices=sorted(EXPERT_IMPLS),
        help="expert implementation (default: the Pallas kernel on GPU, ragged_dot elsewhere)",
    )
    p.add_argument(
        "--paged-impl",
        choices=["xla", "pallas_gpu"],
        help="decode attention over the paged full-attention layers (default: the Pallas kernel on GPU, XLA elsewhere)",
    )
    p.add_argument(
        "--ring-impl",
        choices=["xla", "pallas_gpu"],
        help="decode attention over the sliding-window layers' rings (default: the Pallas kernel on one GPU, XLA "
        "elsewhere)",
    )
    p.add_argument(
        "--decode-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GPU: record each decode round, its while loop included, into CUDA graphs (no host sync per token;"
        " default on, --no-decode-graphs for XLA's default command buffers)",
    )
    p.add_argument("--max-batch", type=int, default=32, help="engine slots: sequences decoded together")
    p.add_argument(
        "--max-context",
        type=int,
        help="tokens per sequence, prompt + output (default: the model's context); reserves nothing per slot",
    )
    p.add_argument(
        "--kv-cache-memory",
        type=float,
        help="GB for the full-attention layers' KV pages, all devices together (default: --memory-fraction of "
        "the accelerator's memory left after the weights; on CPU, room for --max-batch sequences of "
        "min(--max-context, 8192) tokens)",
    )
    p.add_argument(
        "--memory-fraction",
        type=float,
        default=0.9,
        help="share of each accelerator's memory the server may fill, weights included, when sizing the KV pages",
    )
    p.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE, help="tokens per KV page")
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "fp8_e4m3"],
        help="full-attention KV pages in the model's dtype (auto) or FP8 e4m3 with a scale per token and head",
    )
    p.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="do not reuse the KV pages (and ring snapshots) of earlier prompts' prefixes",
    )
    p.add_argument(
        "--prefill-chunk", type=int, default=512, help="largest prefill chunk (compiled in power-of-2 sizes)"
    )
    p.add_argument("--prefill-tokens", type=int, help="prompt tokens prefilled per round (default: one chunk)")
    p.add_argument("--round-tokens", type=int, default=8, help="decode steps per round (between admissions)")
    p.add_argument("--speculative-steps", type=int, default=0, help="MTP draft tokens per step (0: off)")
    p.add_argument(
        "--no-overlap",
        action="store_true",
        help="read each round's tokens before launching the next (default: the host's work overlaps the device's)",
    )
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests before answering 429")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take (0: none)")
    p.add_argument("--max-logprobs", type=int, default=20, help="largest top_logprobs a request may ask for")
    p.add_argument("--max-stop-token-ids", type=int, default=8, help="stop token ids per request besides EOS")
    p.add_argument(
        "--json-whitespace",
        default="compact",
        help="whitespace constrained JSON may have between tokens: compact (an optional space), pretty (one line "
        "break and indentation) or a regex (default: compact; a schema's x-guidance options win)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")

    add_distributed_arguments(p)
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("max_batch", "prefill_chunk", "round_tokens", "max_waiting", "page_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_context is not None and args.max_context < 2:
        p.error("--max-context must be at least 2")
    if args.speculative_steps < 0 or args.max_logprobs < 0 or args.max_stop_token_ids < 0:
        p.error("--speculative-steps, --max-logprobs and --max-stop-token-ids must be >= 0")
    if args.kv_cache_memory is not None and args.kv_cache_memory <= 0:
        p.error("--kv-cache-memory must be > 0 (GB)")
    if not 0 < args.memory_fraction <= 1:
        p.error("--memory-fraction must lie in (0, 1]")
    if not 0 <= args.port < 65536:
        p.error(f"--port {args.port}: expected 0..65535")
    if args.drain_timeout < 0:
        p.error("--drain-timeout must be >= 0")
    if args.protect_metrics and not args.api_key:
        p.error("--protect-metrics needs --api-key (or MIMO_API_KEY)")
    if args.api_key is not None and not args.api_key.strip():
        p.error("--api-key is empty")


def allowed_origins(args: argparse.Namespace) -> list[str] | None:
    """CORS origins (None: CORS off)."""
    if args.allowed_origins is None:
        return None
    return [o.strip() for o in args.allowed_origins.split(",") if o.strip()]


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})


def allowed_hosts(args: argparse.Namespace) -> frozenset[str] | None:
    """Host header names the server answers (None: any), and a warning when it is reachable from the network
    without an API key."""

    host = args.host.strip()
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    unspecified = host == "" or (address is not None and address.is_unspecified)
    loopback = host.lower() == "localhost" or (address is not None and address.is_loopback)
    if not loopback and not args.api_key:
        log.warning(
            "serving on %s: reachable from the network without authentication (no --api-key); "
            "give one, bind to 127.0.0.1 or put an authenticating proxy in front",
            host or "all interfaces",
        )
    if args.allowed_hosts is not None:
        names = [n.strip() for n in args.allowed_hosts.split(",") if n.strip()]
        return None if "*" in names else frozenset(host_name(n) for n in names)
    if unspecified:
        return None
    return frozenset({host_name(host)} | (LOOPBACK_NAMES if loopback else set()))


def _tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def _log_memory_plan(lm, engine, max_context: int) -> None:
    params = _tree_bytes(lm.params)
    pages = _tree_bytes(engine.cache.pools)
    rings = _tree_bytes(engine.cache.rings)
    snapshots = _tree_bytes(engine.snapshots)
    state = _tree_bytes(engine.state)
    pages_per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(engine.cache.pools))
    tokens = engine.pages.num_pages * engine.page_size
    devices = jax.devices()
    log.info(
        "memory plan: weights %s; KV pages %s, %s per device (%d pages of %d tokens in %d page shard(s) = %d tokens, "
        "%.1f sequences of %d; prefix cache %s); SWA/MTP rings %s (%d slots); ring snapshots %s; slot state %s; "
        "total %s over %d %s device(s)",
        _size(params),
        _size(pages),
        _size(pages_per_device),
        engine.pages.num_pages,
        engine.page_size,
        engine.pages.num_shards,
        tokens,
        tokens / max_context,
        max_context,
        "on" if engine.pages.prefix_cache else "off",
        _size(rings),
        engine.max_batch,
        _size(snapshots),
        _size(state),
        _size(params + pages + rings + snapshots + state),
        len(devices),
        devices[0].platform,
    )
    local = jax.local_devices()[0]
    try:
        stats = local.memory_stats()
    except Exception:  # not every backend reports memory
        stats = None
    if stats and "bytes_limit" in stats:
        log.info("%s: %s in use of %s", local, _size(stats.get("bytes_in_use", 0)), _size(stats["bytes_limit"]))


def _load(args: argparse.Namespace):
    """Model, tokenizer and chat template as the flags ask."""

    if args.model:
        directory, default_name = args.model, os.path.basename(os.path.normpath(args.model))
    else:
        directory, default_name = str(demo_model_dir()), "mimo-demo"
    mesh = None
    if args.mesh:
        mesh = make_mesh(**parse_mesh_arg(args.mesh))
    kwargs = {}
    if args.weights:
        kwargs["weights"] = args.weights
    if args.speculative_steps:
        kwargs["mtp"] = args.speculative_steps  # the MTP layers the drafts need

    platform = (mesh.devices.flat if mesh is not None else jax.devices())[0].platform
    options = RunOptions.for_platform(
        platform,
        moe_impl=args.moe_impl,
        paged_impl=args.paged_impl,
        ring_impl=args.ring_impl,
        decode_graphs=args.decode_graphs,
    )
    t0 = time.perf_counter()
    if args.random_weights:
        if not args.model or not args.tokenizer:
            raise SystemExit("--random-weights needs --model (flash-slice-N or a config.json) and --tokenizer DIR")
        model = random_model(bench_config(args.model), jnp.dtype(args.dtype), options, mesh)
        lm = LanguageModel(model, mesh=mesh, source=f"random:{args.model}")
    else:
        lm = load_model(directory, dtype=args.dtype, mesh=mesh, options=options, **kwargs)
    log.info("loaded %s (%s) in %.1f s", lm.source, args.dtype, time.perf_counter() - t0)
    tok_dir = args.tokenizer or directory
    tokenizer = Tokenizer(tok_dir)
    if tokenizer.vocab_size > lm.config.vocab_size:
        raise SystemExit(
            f"the tokenizer in {tok_dir} has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size={lm.config.vocab_size}"
        )
    template = ChatTemplate.from_dir(tok_dir)
    if template is None:
        log.warning("%s has no chat template: /v1/chat/completions will answer 400", tok_dir)
    generation = {}
    gen_path = os.path.join(directory, "generation_config.json")
    if os.path.exists(gen_path):
        with open(gen_path) as f:
            raw = json.load(f)
        generation = {k: raw[k] for k in ("temperature", "top_p", "top_k") if isinstance(raw.get(k), int | float)}
    return lm, tokenizer, template, args.served_model_name or default_name, directory, generation


def _grammar(args: argparse.Namespace, tokenizer, vocab_size: int, eos: tuple[int, ...]):
    """The engine's ConstraintFactory (llguidance over this tokenizer), or None where llguidance cannot read
    the tokenizer (then structured-output requests answer 400)."""

    named = {"compact": COMPACT_JSON_WHITESPACE, "pretty": PRETTY_JSON_WHITESPACE}
    whitespace = named.get(args.json_whitespace, args.json_whitespace)
    try:
        factory = GrammarFactory(tokenizer, vocab_size, eos, json_whitespace=whitespace)
    except Exception as e:  # any tokenizer llguidance cannot load
        log.warning("constrained decoding is off: llguidance cannot use this tokenizer (%s)", e)
        return None
    try:
        factory.validate({"json_object": True})
    except ValueError as e:
        raise SystemExit(f"--json-whitespace {args.json_whitespace!r}: {e}") from None
    return factory


def _engine(args: argparse.Namespace, lm, max_context: int, num_eos: int, grammar=None):
    num_pages = kv_cache_pages(
        lm,
        args.kv_cache_memory,
        args.memory_fraction,
        args.max_batch,
        min(max_context, 8192),
        args.page_size,
        args.kv_cache_dtype,
    )
    kwargs = dict(
        max_batch=args.max_batch,
        max_context=max_context,
        prefill_chunk=min(args.prefill_chunk, max_context),
        max_round_tokens=args.round_tokens,
        max_stop_ids=num_eos + args.max_stop_token_ids,
        max_top_logprobs=args.max_logprobs,
        num_pages=num_pages,
        page_size=args.page_size,
        prefix_cache=not args.no_prefix_cache,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    if args.speculative_steps:
        kwargs["speculative_steps"] = args.speculative_steps
    if grammar is not None:
        kwargs["constraint_factory"] = grammar
    return Engine(lm, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )

    # gloo: cross-process collectives for the CPU backend too (plans are broadcast through it on CPU hosts).
    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id, cpu_collectives="gloo")
    leader = jax.process_index() == 0
    multihost = jax.process_count() > 1

    lm, tokenizer, template, model_name, directory, generation = _load(args)
    eos = tuple(sorted(set(lm.config.eos_token_ids) | set(tokenizer.eos_token_ids)))
    max_context = min(args.max_context or lm.config.context_len, lm.config.context_len)
    if args.max_context and args.max_context > max_context:
        log.warning(
            "--max-context %d is past the model's context of %d tokens; using %d",
            args.max_context,
            max_context,
            max_context,
        )
    grammar = _grammar(args, tokenizer, lm.config.vocab_size, eos)
    engine = _engine(args, lm, max_context, len(eos), grammar)
    _log_memory_plan(lm, engine, max_context)
    metrics = Metrics(model_name, args.max_batch, max_context, speculative_steps=args.speculative_steps)
    channel = BroadcastChannel() if multihost else None
    scheduler = Scheduler(
        engine,
        metrics,
        dispatch=lambda batch: None,  # replaced by the app once its event loop runs
        max_waiting=args.max_waiting,
        round_tokens=args.round_tokens,
        prefill_tokens=args.prefill_tokens,
        channel=channel if leader else None,
    )
    engine.overlap = not args.no_overlap  # every process alike: followers run the same steps; warm-up as served
    t0 = time.perf_counter()
    scheduler.warmup()
    log.info(
        "warm-up: compiled prefill chunks %s, admit, decode%s and cancel in %.1f s",
        engine.buckets,
        " (greedy and sampled speculative loops)" if args.speculative_steps else "",
        time.perf_counter() - t0,
    )
    if not leader:
        log.info("process %d of %d: following process 0's round plans", jax.process_index(), jax.process_count())
        Driver(engine, channel).follow()
        log.info("process 0 shut down; leaving")
        jax.distributed.shutdown()  # a barrier: the coordinator (process 0) stays up until everyone is here
        return 0

    server = Server(
        scheduler,
        tokenizer,
        template,
        metrics,
        model_name=model_name,
        eos_token_ids=eos,
        limits=Limits(
            max_context=max_context,
            max_top_logprobs=args.max_logprobs,
            max_stop_ids=len(eos) + args.max_stop_token_ids,
            request_timeout=args.request_timeout or None,
        ),
        sampling_defaults=generation,
        grammar=grammar,
        spec_decode_metrics=args.per_request_spec_decode_metrics,
    )

    def ready() -> None:
        log.info(
            "ready: serving '%s' on http://%s:%d (max batch %d, context %d)",
            model_name,
            args.host,
            args.port,
            args.max_batch,
            max_context,
        )

    # Multi-host: leave through the distributed barrier once the followers got the shutdown plan
    # (a signal that comes before uvicorn listens is re-raised after the app's shutdown).
    on_shutdown = jax.distributed.shutdown if multihost else None
    app = create_app(
        server,
        on_shutdown=on_shutdown,
        allowed_hosts=allowed_hosts(args),
        api_key=args.api_key,
        protect_metrics=args.protect_metrics,
        allowed_origins=allowed_origins(args),
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=5,  # after the drain: connections still writing their last bytes
    )
    metrics.count_compilations()  # from here on a compilation is one the warm-up missed
    DrainingServer(config, scheduler, args.drain_timeout, on_ready=ready).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
