"""One immutable config for every MiMo-V2 checkpoint spelling.

Reads `config.json` as published on the hub (`mimo_v2`, `hybrid_layer_pattern`, ...) and as
saved by transformers (`mimo_v2_flash`, `layer_types`, ...), with or without a nested
`text_config`. Everything the engine does not implement is rejected with the key named.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

ARCHITECTURES = ("MiMoV2ForCausalLM", "MiMoV2FlashForCausalLM")  # new name first; old is an alias

# Keys that only the hub spelling writes; any of them marks a config as hub-spelled.
_HUB_ONLY_KEYS = (
    "hybrid_layer_pattern",
    "moe_layer_freq",
    "swa_num_key_value_heads",
    "swa_num_attention_heads",
    "swa_head_dim",
    "swa_v_head_dim",
    "swa_rope_theta",
    "sliding_window_size",
    "layernorm_epsilon",
    "add_swa_attention_sink_bias",
    "add_full_attention_sink_bias",
)


class ConfigError(ValueError):
    """A config value the engine cannot honour; the message names the key."""


# Backends a model can be built for: JAX's names, with "cuda"/"rocm" folded into "gpu".
PLATFORMS = ("cpu", "gpu", "tpu")
MOE_STRATEGIES = ("auto", "replicated", "all_to_all")
W8A8_MODES = ("off", "prefill", "always")


def platform_of(backend: str) -> str:
    """A JAX platform or backend name ("cuda", "rocm", "gpu", "tpu", "cpu") -> one of PLATFORMS."""
    name = "gpu" if backend in ("cuda", "rocm") else backend
    if name not in PLATFORMS:
        raise ValueError(f"platform {backend!r}: expected one of {PLATFORMS} (or 'cuda'/'rocm')")
    return name


# XLA:GPU's default command buffer types plus while loops and conditionals (RunOptions.decode_graphs)
GPU_DECODE_COMMAND_BUFFERS = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a built model computes, fixed when it is built (vary with `dataclasses.replace`, then build a new
    view over the same weights: `LanguageModel.with_options`).

    `platform` is the target the kernels are chosen for (the host's only by default, so a TPU program can be
    compiled on a CPU or GPU host). `moe_impl` None picks by platform: the Pallas kernel on GPU,
    `jax.lax.ragged_dot` elsewhere (names: `mimo_jax.model.moe.EXPERT_IMPLS`). `attention_impl`: see
    `mimo_jax.model.attention.ATTENTION_IMPLS`. `paged_impl` None picks by platform how paged full layers attend
    for decode rows: the Pallas kernel on GPU, XLA elsewhere (names: `mimo_jax.model.attention.PAGED_IMPLS`).
    `ring_impl` likewise for decode rows over the SWA layers' rings (`mimo_jax.model.attention.RING_IMPLS`): None
    picks the Pallas kernel on GPU (it matched XLA at Flash shapes on an H100, `bench/check_ring_kernel.py`, and
    decoded 1-6% faster), XLA elsewhere.
    `moe_strategy` / `capacity_factor`: the expert-parallel dispatch on a mesh (`mimo_jax.model.moe.STRATEGIES`;
    None never drops a token).
    `w8a8`: where block-FP8 weights meet activations quantized to fp8 per (token, 128 columns) instead of
    widened or dequantized weights: "off"; "prefill" (experts at prefill sizes; dense projections stay on XLA's
    dequantized GEMM, which the dense w8a8 kernel does not beat yet); "always" (experts and dense projections in
    every pass: the numerics' bound, for checks). On GPU the Pallas fp8 tensor-core kernels run it; elsewhere XLA
    rounds the activations the same way. None: "off" (opt-in until the kernels' GPU check passes).
    `decode_graphs`: on GPU, XLA records the engine's decode round - its `while_loop` and conditionals included -
    into command buffers (CUDA graphs), so a round runs without a host sync per iteration and its launch returns at
    once (the host's work overlaps the device's); no effect on other platforms. None: on (an H100 decoded the
    same greedy tokens, `bench/check_decode_graphs.py`, 8-16% faster; and a constrained request beside others
    then costs them ~1%, not ~16%: bench/RESULTS.md). False: XLA's default command buffers.
    """

    platform: str = "cpu"
    moe_impl: str | None = None
    attention_impl: str = "xla"
    paged_impl: str | None = None
    ring_impl: str | None = None
    moe_strategy: str = "auto"
    capacity_factor: float | None = None
    w8a8: str | None = None
    decode_graphs: bool | None = None

    def __post_init__(self):
        object.__setattr__(self, "platform", platform_of(self.platform))
        if self.w8a8 is not None and self.w8a8 not in W8A8_MODES:
            raise ValueError(f"unknown w8a8 mode {self.w8a8!r}; choose from {W8A8_MODES} (or None)")
        if self.moe_strategy not in MOE_STRATEGIES:
            raise ValueError(f"unknown MoE strategy {self.moe_strategy!r}; choose from {MOE_STRATEGIES}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor={self.capacity_factor}: must be > 0 (or None for no dropping)")

    @classmethod
    def for_platform(cls, platform: str, **fields: Any) -> RunOptions:
        return cls(platform=platform, **fields)

    @property
    def expert_impl(self) -> str:
        """The MoE implementation a model built with these options runs."""
        return self.moe_impl or ("pallas_gpu" if self.platform == "gpu" else "ragged")

    @property
    def w8a8_mode(self) -> str:
        """Where a model built with these options runs fp8 weights on fp8-quantized activations (W8A8_MODES)."""
        return self.w8a8 or "off"

    @property
    def decode_compiler_options(self) -> dict[str, str] | None:
        """XLA compile options of the engine's decode rounds (None: the platform's defaults)."""
        on = self.decode_graphs is not False and self.platform == "gpu"
        return {"xla_gpu_enable_command_buffer": GPU_DECODE_COMMAND_BUFFERS} if on else None

    @property
    def paged_attention_impl(self) -> str:
        """How a model built with these options attends over paged full layers for decode rows."""
        return self.paged_impl or ("pallas_gpu" if self.platform == "gpu" else "xla")

    @property
    def ring_attention_impl(self) -> str:
        """How a model built with these options attends over the SWA layers' rings for decode rows."""
        return self.ring_impl or ("pallas_gpu" if self.platform == "gpu" else "xla")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Shape and kind of one decoder layer's attention and MLP."""

    sliding: bool  # sliding-window attention (else full causal)
    num_heads: int
    num_kv_heads: int
    head_dim: int  # q and k
    v_head_dim: int
    rope_theta: float
    rotary_dim: int  # leading dims of each q/k head that get RoPE
    window_keys: int | None  # keys a query sees, itself included; None = unbounded
    has_sink: bool
    moe: bool  # routed experts (else dense SwiGLU)


@dataclasses.dataclass(frozen=True)
class MiMoConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_layers: int
    # per-layer kinds
    sliding: tuple[bool, ...]
    moe: tuple[bool, ...]
    # full-attention head shape
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    # sliding-window head shape
    swa_num_heads: int
    swa_num_kv_heads: int
    swa_head_dim: int
    swa_v_head_dim: int
    window_keys: int  # keys a SWA query sees, itself included (transformers' `sliding_window`)
    rope_theta: float
    swa_rope_theta: float
    partial_rotary_factor: float
    full_sink: bool
    swa_sink: bool
    value_scale: float
    rms_norm_eps: float
    # MoE
    num_experts: int
    experts_per_token: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    tie_word_embeddings: bool = False
    context_len: int = 131072
    num_mtp_layers: int = 0
    # MTP layers read the target's hidden state after the final norm (as SGLang's default worker, vLLM and
    # sglang-jax feed the released checkpoints); True: before it, for checkpoints trained that way.
    mtp_hidden_before_norm: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    fused_qkv: bool = False  # checkpoint stores `qkv_proj` instead of q/k/v
    quantization: dict | None = dataclasses.field(default=None, compare=False, hash=False)
    architecture: str = "MiMoV2ForCausalLM"

    # ------------------------------------------------------------------ derived
    def layer(self, i: int) -> LayerSpec:
        sliding = self.sliding[i]
        if sliding:
            heads, kv, hd, vd = self.swa_num_heads, self.swa_num_kv_heads, self.swa_head_dim, self.swa_v_head_dim
        else:
            heads, kv, hd, vd = self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim
        return LayerSpec(
            sliding=sliding,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=hd,
            v_head_dim=vd,
            rope_theta=self.swa_rope_theta if sliding else self.rope_theta,
            rotary_dim=int(hd * self.partial_rotary_factor),
            window_keys=self.window_keys if sliding else None,
            has_sink=self.swa_sink if sliding else self.full_sink,
            moe=self.moe[i],
        )

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        return tuple(self.layer(i) for i in range(self.num_layers))

    def mtp_layer(self) -> LayerSpec:
        """MTP blocks: SWA attention with sinks and a dense SwiGLU."""
        spec = dataclasses.replace(self.layer(0), moe=False)
        return dataclasses.replace(
            spec,
            sliding=True,
            num_heads=self.swa_num_heads,
            num_kv_heads=self.swa_num_kv_heads,
            head_dim=self.swa_head_dim,
            v_head_dim=self.swa_v_head_dim,
            rope_theta=self.swa_rope_theta,
            rotary_dim=int(self.swa_head_dim * self.partial_rotary_factor),
            window_keys=self.window_keys,
            has_sink=self.swa_sink,
        )

    def first_layers(self, n: int) -> MiMoConfig:
        """The first `n` layers of this model, in its real full/SWA and dense/MoE pattern."""
        if not 1 <= n <= self.num_layers:
            raise ConfigError(f"layers={n}: expected 1..{self.num_layers}")
        return dataclasses.replace(self, num_layers=n, sliding=self.sliding[:n], moe=self.moe[:n])

    def replace(self, **changes: Any) -> MiMoConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MiMoConfig:
        return _parse(raw)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> MiMoConfig:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                raw = json.load(f)
        except FileNotFoundError as e:
            raise ConfigError(f"no config.json at {path}") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        try:
            return _parse(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def _number(
    key: str, value: Any, *, low: float = 0.0, high: float = math.inf, closed: bool = False, integer: bool = False
) -> Any:
    """`value` if it is a finite number (an int with `integer`) in (low, high] ([low, high] when `closed`), else a
    ConfigError naming the key and the value."""
    kind = "integer" if integer else "number"
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if ok and not (math.isfinite(value) and (low <= value if closed else low < value) and value <= high):
        ok = False
    if not ok:
        if high < math.inf:
            want = f"a {kind} in {'[' if closed else '('}{low:g}, {high:g}]"
        elif closed:
            want = f"an {kind} >= {low:g}" if integer else f"a {kind} >= {low:g}"
        else:
            want = f"a positive {kind}" if low == 0 else f"a {kind} > {low:g}"
        raise ConfigError(f"{key}={value!r}: expected {want}")
    return value if integer else float(value)


def _parse(raw: dict[str, Any]) -> MiMoConfig:
    if not isinstance(raw, dict):
        raise ConfigError("config must be a JSON object")
    top = raw
    c = dict(raw.get("text_config") or raw)
    # Keys commonly kept only at the top of multimodal configs.
    for key in ("architectures", "quantization_config", "eos_token_id", "tie_word_embeddings"):
        if key not in c and key in top:
            c[key] = top[key]

    archs = c.get("architectures") or ["MiMoV2ForCausalLM"]
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"architectures={archs!r}: expected one of {list(ARCHITECTURES)}")
    model_type = c.get("model_type", "mimo_v2")
    if model_type not in ("mimo_v2", "mimo_v2_flash"):
        raise ConfigError(f"model_type={model_type!r}: expected 'mimo_v2' or 'mimo_v2_flash'")

    hub = any(k in c for k in _HUB_ONLY_KEYS)

    def req(key: str) -> Any:
        if key not in c or c[key] is None:
            raise ConfigError(f"missing required key {key!r}")
        return c[key]

    def positive_int(key: str, value: Any = None) -> int:
        return _number(key, req(key) if value is None else value, integer=True)

    num_layers = positive_int("num_hidden_layers")
    hidden = positive_int("hidden_size")
    heads = positive_int("num_attention_heads")
    kv = positive_int("num_key_value_heads")
    head_dim = positive_int("head_dim", c.get("head_dim") or hidden // heads)
    v_head_dim = positive_int("v_head_dim", c.get("v_head_dim") or head_dim)

    # --- unsupported features -------------------------------------------------
    def reject_unless(key: str, ok: Any, allowed: str) -> None:
        if key in c and c[key] is not None and not ok(c[key]):
            raise ConfigError(f"{key}={c[key]!r} is not supported (supported: {allowed})")

    reject_unless("scoring_func", lambda v: v == "sigmoid", "'sigmoid'")
    # The router (`mimo_jax.model.moe.route`) is noaux_tc: sigmoid scores, the correction bias for the choice,
    # grouped top-k. "greedy" (top-k of the raw scores) and "group_limited_greedy" would pick other experts.
    reject_unless("topk_method", lambda v: v == "noaux_tc", "'noaux_tc'")
    reject_unless("n_shared_experts", lambda v: v == 0, "null or 0")
    reject_unless("hidden_act", lambda v: v == "silu", "'silu'")
    reject_unless("attention_bias", lambda v: v is False, "false")
    reject_unless("hybrid_block_size", lambda v: False, "null")
    reject_unless(
        "rope_scaling",
        lambda v: isinstance(v, dict) and v.get("rope_type", v.get("type", "default")) == "default",
        "null or rope_type 'default'",
    )
    reject_unless("attention_projection_layout", lambda v: v in ("fused_qkv", "separate", "split_qkv"), "'fused_qkv'")

    # --- layer patterns ---------------------------------------------------------
    def pattern(key: str, mapping: dict[Any, bool]) -> tuple[bool, ...] | None:
        if key not in c or c[key] is None:
            return None
        values = c[key]
        if not isinstance(values, list) or len(values) != num_layers:
            n = len(values) if isinstance(values, list) else type(values).__name__
            raise ConfigError(f"{key} has {n} entries but num_hidden_layers={num_layers}")
        out = []
        for i, v in enumerate(values):
            if v not in mapping or isinstance(v, bool):
                raise ConfigError(f"{key}[{i}]={v!r}: expected one of {sorted(mapping, key=str)}")
            out.append(mapping[v])
        return tuple(out)

    sliding = pattern("hybrid_layer_pattern", {0: False, 1: True})
    if sliding is None:
        sliding = pattern("layer_types", {"full_attention": False, "sliding_attention": True})
    if sliding is None:
        sliding = tuple(not (i == 0 or (i + 1) % 6 == 0) for i in range(num_layers))
    moe = pattern("moe_layer_freq", {0: False, 1: True})
    if moe is None:
        moe = pattern("mlp_layer_types", {"dense": False, "sparse": True})
    if moe is None:
        moe = tuple(i != 0 for i in range(num_layers))

    # --- attention shapes, window, rope, sinks (spelling-dependent) ------------
    if hub:
        swa_heads = positive_int("swa_num_attention_heads", c.get("swa_num_attention_heads") or heads)
        swa_kv = positive_int("swa_num_key_value_heads", c.get("swa_num_key_value_heads") or kv)
        swa_head_dim = positive_int("swa_head_dim", c.get("swa_head_dim") or head_dim)
        swa_v_head_dim = positive_int("swa_v_head_dim", c.get("swa_v_head_dim") or v_head_dim)
        # Hub: `sliding_window_size: W` = the query plus W earlier tokens.
        w_key = "sliding_window_size" if c.get("sliding_window_size") is not None else "sliding_window"
        window_keys = positive_int(w_key) + 1
        eps_key = "layernorm_epsilon" if "layernorm_epsilon" in c else "rms_norm_eps"
        eps = _number(eps_key, c.get(eps_key, 1e-5), closed=True)
        rope_theta = _number("rope_theta", req("rope_theta"))
        swa_rope_theta = _number("swa_rope_theta", c.get("swa_rope_theta", rope_theta))
        prf = _number("partial_rotary_factor", c.get("partial_rotary_factor", 1.0), high=1.0)
        full_sink = bool(c.get("add_full_attention_sink_bias", False))
        swa_sink = bool(c.get("add_swa_attention_sink_bias", True))
    else:
        swa_heads, swa_kv = heads, 2 * kv
        swa_head_dim, swa_v_head_dim = head_dim, v_head_dim
        # transformers: `sliding_window: S` keys including the query itself.
        window_keys = positive_int("sliding_window", c.get("sliding_window") or 129)
        eps = _number("rms_norm_eps", c.get("rms_norm_eps", 1e-5), closed=True)
        rope = c.get("rope_parameters")
        if rope is None:
            rope = {
                "full_attention": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.334},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.334},
            }
        if not isinstance(rope, dict) or not {"full_attention", "sliding_attention"} <= set(rope):
            raise ConfigError(f"rope_parameters={rope!r}: expected entries 'full_attention' and 'sliding_attention'")
        for kind, params in rope.items():
            if not isinstance(params, dict):
                raise ConfigError(f"rope_parameters.{kind}={params!r}: expected an object")
            if params.get("rope_type", "default") != "default":
                raise ConfigError(f"rope_parameters.{kind}.rope_type={params.get('rope_type')!r} is not supported")
        full, swa = rope["full_attention"], rope["sliding_attention"]
        rope_theta = _number("rope_parameters.full_attention.rope_theta", full.get("rope_theta"))
        swa_rope_theta = _number("rope_parameters.sliding_attention.rope_theta", swa.get("rope_theta"))
        prf_key = "rope_parameters.{}.partial_rotary_factor"
        prf = _number(prf_key.format("full_attention"), full.get("partial_rotary_factor", 0.334), high=1.0)
        if _number(prf_key.format("sliding_attention"), swa.get("partial_rotary_factor", 0.334), high=1.0) != prf:
            raise ConfigError("rope_parameters: different partial_rotary_factor per layer type is not supported")
        full_sink, swa_sink = False, True

    for key, h, k in (("num_attention_heads", heads, kv), ("swa_num_attention_heads", swa_heads, swa_kv)):
        if h % k:
            raise ConfigError(f"{key}={h} is not a multiple of its key/value head count {k}")
    for key, hd in (("head_dim", head_dim), ("swa_head_dim", swa_head_dim)):
        if int(hd * prf) % 2:
            raise ConfigError(f"{key}={hd} with partial_rotary_factor={prf} gives an odd rotary dimension")

    # --- MoE ----------------------------------------------------------------------
    any_moe = any(moe)
    num_experts = topk = moe_inter = 0
    n_group = positive_int("n_group", c.get("n_group") or 1)
    topk_group = positive_int("topk_group", c.get("topk_group") or 1)
    if any_moe:
        spelled = c.get("n_routed_experts") is None and c.get("num_local_experts") is not None
        experts_key = "num_local_experts" if spelled else "n_routed_experts"
        num_experts = positive_int(experts_key, c.get(experts_key) or None)
        topk = positive_int("num_experts_per_tok", c.get("num_experts_per_tok") or None)
        moe_inter = positive_int("moe_intermediate_size")
        if topk > num_experts:
            raise ConfigError(f"num_experts_per_tok={topk} exceeds n_routed_experts={num_experts}")
        if num_experts % n_group:
            raise ConfigError(f"n_routed_experts={num_experts} is not divisible by n_group={n_group}")
        if not 1 <= topk_group <= n_group:
            raise ConfigError(f"topk_group={topk_group}: expected 1 <= topk_group <= n_group={n_group}")
        if n_group > 1 and num_experts // n_group < 2:
            raise ConfigError(f"n_group={n_group}: each group needs at least 2 experts")
        if topk > topk_group * (num_experts // n_group):
            raise ConfigError(f"num_experts_per_tok={topk} exceeds the experts in topk_group={topk_group} groups")

    def optional(key: str, default: Any, **bounds: Any) -> Any:
        return default if c.get(key) is None else _number(key, c[key], **bounds)

    scaling = optional("routed_scaling_factor", 1.0)
    value_scale = optional("attention_value_scale", 1.0)
    context_key = "context_len" if c.get("context_len") is not None else "max_position_embeddings"
    context_len = optional(context_key, 131072, integer=True)
    mtp_key = "num_nextn_predict_layers" if "num_nextn_predict_layers" in c else "mtp_num_layers"
    num_mtp_layers = optional(mtp_key, 0 if mtp_key in c else 3, closed=True, integer=True)
    vocab = positive_int("vocab_size")
    eos = c.get("eos_token_id")
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in eos_ids):
        raise ConfigError(f"eos_token_id={eos!r}: expected token ids in [0, vocab_size={vocab})")
    fused = c.get("attention_projection_layout") == "fused_qkv"
    before_norm = c.get("mtp_hidden_before_norm", False)
    if not isinstance(before_norm, bool):
        raise ConfigError(f"mtp_hidden_before_norm={before_norm!r}: expected true or false")

    return MiMoConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=positive_int("intermediate_size"),
        moe_intermediate_size=moe_inter,
        num_layers=num_layers,
        sliding=sliding,
        moe=moe,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        v_head_dim=v_head_dim,
        swa_num_heads=swa_heads,
        swa_num_kv_heads=swa_kv,
        swa_head_dim=swa_head_dim,
        swa_v_head_dim=swa_v_head_dim,
        window_keys=window_keys,
        rope_theta=rope_theta,
        swa_rope_theta=swa_rope_theta,
        partial_rotary_factor=prf,
        full_sink=full_sink,
        swa_sink=swa_sink,
        value_scale=value_scale,
        rms_norm_eps=eps,
        num_experts=num_experts,
        experts_per_token=topk,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=bool(c.get("norm_topk_prob", True)),
        routed_scaling_factor=scaling,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        context_len=context_len,
        num_mtp_layers=num_mtp_layers,
        mtp_hidden_before_norm=before_norm,
        eos_token_ids=eos_ids,
        bos_token_id=c.get("bos_token_id"),
        pad_token_id=c.get("pad_token_id"),
        fused_qkv=fused,
        quantization=c.get("quantization_config"),
        architecture=arch,
    )
