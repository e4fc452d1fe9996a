"""Request checks (`Server`: model name, prompt, max tokens, stops, logprobs, sampling options; `Limits`)
and turning a validated chat or completions request into a `Job` (`chat_job`, `completion_job`)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from mimo_jax.serve import protocol as P
from mimo_jax.serve.jobs import ChoiceOutput, Job
from mimo_jax.serve.metrics import Metrics
from mimo_jax.serve.parsers import THINK_END, THINK_START, ReasoningParser, ToolCallParser
from mimo_jax.serve.scheduler import Scheduler
from mimo_jax.text import ChatTemplate, ChatTemplateError, Tokenizer, nested_deeper_than

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclasses.dataclass
class Limits:
    max_context: int
    max_top_logprobs: int
    max_stop_ids: int
    request_timeout: float | None


class Server:
    """What the routes need: tokenizer, chat template, scheduler, metrics, limits."""

    def __init__(
        self,
        scheduler: Scheduler,
        tokenizer: Tokenizer,
        template: ChatTemplate | None,
        metrics: Metrics,
        *,
        model_name: str,
        eos_token_ids: tuple[int, ...],
        limits: Limits,
        sampling_defaults: dict[str, float] | None = None,
        grammar: Any = None,
    ):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.template = template
        self.metrics = metrics
        self.model_name = model_name
        self.eos_token_ids = tuple(eos_token_ids)
        self.limits = limits
        # The engine's ConstraintFactory (mimo_jax.grammar.GrammarFactory); None: no constrained decoding.
        self.grammar = grammar
        # Defaults for omitted parameters (the checkpoint's generation_config.json; else OpenAI's).
        self.defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, **(sampling_defaults or {})}
        self.created = P.now()
        # `<think>` splitting needs both markers as tokens of this vocabulary.
        self.reasoning = tokenizer.token_id(THINK_START) is not None and tokenizer.token_id(THINK_END) is not None

    # ------------------------------------------------------------------ request checks
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise P.APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    def check_sequences(self, count: int) -> None:
        if count > self.scheduler.max_waiting:
            raise P.invalid(
                f"this request asks for {count} sequences (prompts x n); the server queues at most "
                f"{self.scheduler.max_waiting}",
                "n",
            )

    def check_prompt_text(self, text: str, what: str) -> None:
        """Before tokenizing: refuse a text that no tokenization fits in the context (see `max_token_chars`)."""
        per_token, ctx = self.tokenizer.max_token_chars, self.limits.max_context
        if per_token is not None and len(text) >= ctx * per_token:
            raise P.invalid(
                f"This model's maximum context length is {ctx} tokens. However, your {what} has {len(text)} "
                f"characters, more than {ctx} tokens can hold. Please reduce the length of the input.",
                "messages" if what == "messages" else "prompt",
                "context_length_exceeded",
            )

    def check_prompt(self, prompt_ids: list[int], what: str) -> None:
        n, ctx = len(prompt_ids), self.limits.max_context
        if n == 0:
            raise P.invalid(f"the {what} is empty after tokenization", "messages" if what == "messages" else "prompt")
        if n >= ctx:
            raise P.invalid(
                f"This model's maximum context length is {ctx} tokens. However, your {what} resulted in {n} tokens "
                "(no room left to generate). Please reduce the length of the input.",
                "messages" if what == "messages" else "prompt",
                "context_length_exceeded",
            )
        vocab = self.scheduler.engine.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise P.invalid(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt", "invalid_value")

    def max_new_tokens(
        self, requested: int | None, param: str, prompt_len: int, default: int | None, minimum: int = 1
    ) -> int:
        """`minimum` 0: the request may only prefill (a completion that echoes or scores its prompt)."""
        ctx = self.limits.max_context
        room = ctx - prompt_len
        if requested is None:
            return room if default is None else min(default, room)
        if requested < minimum:
            raise P.invalid(f"'{param}' must be at least {minimum}, got {requested}", param, "invalid_value")
        if requested > room:
            raise P.invalid(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the input, {requested} in the completion). "
                f"Please reduce the input or '{param}'.",
                param,
                "context_length_exceeded",
            )
        return requested

    def stop_ids(self, req: P.SamplingFields) -> tuple[int, ...]:
        vocab = self.scheduler.engine.config.vocab_size
        user = req.stop_ids()
        for t in user:
            if t >= vocab:
                raise P.invalid(f"stop token id {t} is outside the vocabulary [0, {vocab})", "stop", "invalid_value")
        ids = tuple(sorted(set(user) | (set() if req.ignore_eos else set(self.eos_token_ids))))
        if len(ids) > self.limits.max_stop_ids:
            raise P.invalid(
                f"{len(user)} stop token ids given; this server takes at most "
                f"{self.limits.max_stop_ids - len(self.eos_token_ids)} besides the model's EOS",
                "stop",
                "invalid_value",
            )
        return ids

    def check_logprobs(self, top: int | None, param: str) -> None:
        if top is not None and top > self.limits.max_top_logprobs:
            raise P.invalid(
                f"'{param}'={top} exceeds this server's limit of {self.limits.max_top_logprobs} "
                "(start it with a larger --max-logprobs)",
                param,
                "invalid_value",
            )

    def check_prompt_logprobs(self, req: P.SamplingFields) -> None:
        if req.prompt_logprobs is None:
            return
        if req.stream:  # as vLLM
            message = "'prompt_logprobs' is not available with stream=true"
            raise P.invalid(message, "prompt_logprobs", "unsupported_value")
        self.check_logprobs(req.prompt_logprobs, "prompt_logprobs")

    def sampling_options(
        self,
        req: P.SamplingFields,
        max_new: int,
        stop_ids: tuple[int, ...],
        logprobs,
        seed,
        prompt_logprobs: int | None = None,
        constraint: dict | None = None,
    ):
        from mimo_jax.engine.sampling import SamplingOptions

        pick = lambda value, name: self.defaults[name] if value is None else value
        return SamplingOptions(
            temperature=pick(req.temperature, "temperature"),
            top_p=pick(req.top_p, "top_p"),
            top_k=max(pick(req.top_k, "top_k"), 0),
            min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            seed=seed,
            max_new_tokens=max_new,
            stop_token_ids=stop_ids,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            constraint=constraint,
        )

    def constraint(self, spec: tuple[dict, str] | None, thinking: str | None) -> dict | None:
        """The checked constraint spec for `SamplingOptions.constraint` (None: unconstrained).

        `spec` is (spec, the request parameter it came from); a grammar that does not compile is a 400
        naming that parameter.
        """
        if spec is None:
            return None
        spec, param = spec
        if self.grammar is None:
            raise P.invalid(
                f"'{param}' needs constrained decoding, which this server does not have "
                "(its engine takes no constraints, or llguidance cannot read this tokenizer)",
                param,
                "unsupported_value",
            )
        if getattr(self.scheduler.engine, "speculative_steps", 0):
            raise P.invalid(
                f"'{param}' needs constrained decoding, which the engine does not do with speculative decoding "
                "(this server runs with --speculative-steps)",
                param,
                "unsupported_value",
            )
        if thinking is not None:
            spec = {**spec, "thinking": thinking}
        try:
            self.grammar.validate(spec)
        except ValueError as e:
            raise P.invalid(f"invalid value for '{param}': {e}", param, "invalid_value") from None
        return spec

    def token_bytes(self, token_id: int) -> list[int]:
        return list(self.tokenizer.token_bytes(token_id))


# ---------------------------------------------------------------------------- chat
MAX_ARGUMENTS_DEPTH = 100  # nesting levels (objects, arrays) of a tool call's arguments in the conversation


def _template_messages(req: P.ChatCompletionRequest) -> list[dict]:
    messages = []
    for k, m in enumerate(req.messages):
        d = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            d["content"] = "\n".join(part.text for part in m.content)
        for j, call in enumerate(d.get("tool_calls") or []):
            param = f"messages[{k}].tool_calls[{j}].function.arguments"
            too_deep = P.invalid(
                f"tool call arguments are nested deeper than {MAX_ARGUMENTS_DEPTH} levels", param, "invalid_value"
            )
            args = call["function"].get("arguments")
            if isinstance(args, str):  # templates read arguments as a mapping (as vLLM passes them)
                try:
                    args = json.loads(args) if args.strip() else {}
                except ValueError:
                    raise P.invalid("tool call arguments must be a JSON object", param, "invalid_value") from None
                except RecursionError:  # json.loads gives up on deep nesting by itself (cleanly)
                    raise too_deep from None
                call["function"]["arguments"] = args
            # Before anything recursive (the template's copy and rendering) walks them.
            if nested_deeper_than(args, MAX_ARGUMENTS_DEPTH):
                raise too_deep
        messages.append(d)
    return messages


def chat_job(server: Server, req: P.ChatCompletionRequest) -> tuple[Job, str]:
    if server.template is None:
        raise P.invalid("this model has no chat template; use /v1/completions", "messages")
    if req.functions is not None and req.tools is not None:
        raise P.invalid("give 'tools' or the legacy 'functions', not both", "functions")
    if req.function_call is not None and req.tool_choice is not None:
        raise P.invalid("give 'tool_choice' or the legacy 'function_call', not both", "function_call")
    tool_list = req.tool_list()
    tool_choice = req.tool_choice_value()
    choice_param = "function_call" if req.function_call is not None else "tool_choice"
    forced = tool_choice == "required" or isinstance(tool_choice, P.NamedToolChoice)
    if forced and not tool_list:
        raise P.invalid(f"{choice_param} 'required' or a named function needs tools", choice_param)
    if isinstance(tool_choice, P.NamedToolChoice):
        name = tool_choice.function.name
        if name not in [t.function.name for t in tool_list]:
            raise P.invalid(f"{choice_param} names '{name}', which is not among the tools", choice_param)
    use_tools = bool(tool_list) and tool_choice != "none"
    tools = [t.model_dump(exclude_none=True) for t in tool_list] if use_tools else None
    kwargs = dict(req.chat_template_kwargs or {})
    if req.thinking is not None and "enable_thinking" not in kwargs:
        kwargs["enable_thinking"] = req.thinking.type == "enabled"
    reserved = {"messages", "tools", "documents", "add_generation_prompt"} & set(kwargs)
    if reserved:
        raise P.invalid(f"chat_template_kwargs may not set {sorted(reserved)}", "chat_template_kwargs")
    try:
        # Special-token text in the messages and tools is plain text; control tokens come only from the template.
        prompt, prompt_ids = server.template.render_ids(
            server.tokenizer,
            _template_messages(req),
            tools,
            add_generation_prompt=True,
            template_kwargs=kwargs,
            check_text=lambda text: server.check_prompt_text(text, "messages"),  # before tokenizing
        )
    except ChatTemplateError as e:
        raise P.invalid(str(e), "messages", "invalid_value") from None
    server.check_prompt(prompt_ids, "messages")
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_new = server.max_new_tokens(requested, param, len(prompt_ids), None)
    top = (req.top_logprobs or 0) if req.logprobs else None
    server.check_logprobs(top, "top_logprobs")
    server.check_prompt_logprobs(req)
    stop_ids = server.stop_ids(req)
    # The prompt may already open the thinking block (the template wrote `<think>`).
    in_reasoning = server.reasoning and prompt.rfind(THINK_START) > prompt.rfind(THINK_END)
    spec = _output_spec(req)
    if forced:
        if spec is not None:
            raise P.invalid(
                f"structured output cannot be combined with {choice_param} 'required' or a named function", spec[1]
            )
        call = {"tools": tools}
        if isinstance(tool_choice, P.NamedToolChoice):
            call["name"] = tool_choice.function.name
        else:
            call["required"], call["parallel"] = True, req.parallel_tool_calls is not False
        strict = any(t.function.strict for t in tool_list)
        spec = ({"tool_call": call, "strict": strict}, "functions" if req.functions is not None else "tools")
    constraint = server.constraint(spec, _thinking_mode(server, prompt, in_reasoning))
    choices, options = [], []
    for i in range(req.n):
        choices.append(
            ChoiceOutput(
                i,
                server.tokenizer,
                req.stop_strings(),
                stop_ids,
                req.skip_special_tokens,
                ReasoningParser(in_reasoning) if server.reasoning else None,
                ToolCallParser(tools) if use_tools else None,
            )
        )
        seed = _seed(req.seed, i)
        options.append(server.sampling_options(req, max_new, stop_ids, top, seed, req.prompt_logprobs, constraint))
    job = Job(server, choices, [prompt_ids] * req.n, options)
    job.prompt_tokens = len(prompt_ids)
    return job, prompt


def _thinking_mode(server: Server, prompt: str, in_reasoning: bool) -> str | None:
    """How a chat's output may open with reasoning: "inside" (the prompt opened `<think>`), None (the
    prompt closed an empty block: thinking off) or "optional" (the model may open a block itself)."""
    if not server.reasoning:
        return None
    if in_reasoning:
        return "inside"
    if prompt.rstrip().endswith(THINK_END):
        return None
    return "optional"


def _json_text(value: dict | str, param: str) -> dict:
    if isinstance(value, dict):
        return value
    try:
        schema = json.loads(value)
    except ValueError as e:
        raise P.invalid(f"'{param}' is not valid JSON: {e}", param, "invalid_value") from None
    if not isinstance(schema, dict):
        raise P.invalid(f"'{param}' must be a JSON schema object", param, "invalid_value")
    return schema


def _output_spec(req: P.SamplingFields) -> tuple[dict, str] | None:
    """The structured-output constraint a request asks for, and the parameter that asked (one at most)."""
    found: list[tuple[dict, str]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(({"json_object": True}, "response_format"))
    elif rf is not None and rf.type == "json_schema":
        schema, strict = rf.json_schema.schema_, bool(rf.json_schema.strict)
        spec = {"json_object": True} if schema is None else {"json_schema": schema, "strict": strict}
        found.append((spec, "response_format"))
    if req.regex is not None:
        found.append(({"regex": req.regex}, "regex"))
    if req.ebnf is not None:
        found.append(({"ebnf": req.ebnf}, "ebnf"))
    so = req.structured_outputs
    if so is not None:
        given = [
            (k, v)
            for k, v in (("json", so.json_), ("regex", so.regex), ("grammar", so.grammar), ("choice", so.choice))
            if v is not None
        ] + ([("json_object", True)] if so.json_object else [])
        if len(given) != 1:
            raise P.invalid(
                "structured_outputs takes exactly one of json, regex, grammar, choice, json_object",
                "structured_outputs",
                "invalid_value",
            )
        kind, value = given[0]
        param = f"structured_outputs.{kind}"
        if kind == "json":
            found.append(({"json_schema": _json_text(value, param)}, param))
        elif kind == "grammar":
            found.append(({"ebnf": value}, param))
        elif kind == "json_object":
            found.append(({"json_object": True}, param))
        else:
            found.append(({kind: value}, param))
    if req.guided_json is not None:
        found.append(({"json_schema": _json_text(req.guided_json, "guided_json")}, "guided_json"))
    if req.guided_regex is not None:
        found.append(({"regex": req.guided_regex}, "guided_regex"))
    if req.guided_choice is not None:
        found.append(({"choice": req.guided_choice}, "guided_choice"))
    if req.guided_grammar is not None:
        found.append(({"ebnf": req.guided_grammar}, "guided_grammar"))
    if len(found) > 1:
        raise P.invalid(
            f"'{found[0][1]}' and '{found[1][1]}' both constrain the output; give one", found[1][1], "invalid_value"
        )
    return found[0] if found else None


def _seed(seed: int | None, i: int) -> int | None:
    # Choice i draws from the stream `mimo_jax.generate(seed=seed)` uses for prompt i.
    from mimo_jax.engine.sampling import derived_seed

    return None if seed is None else derived_seed(seed, i)


# ---------------------------------------------------------------------------- completions
def completion_job(server: Server, req: P.CompletionRequest) -> tuple[Job, list[str]]:
    if req.suffix:
        raise P.invalid("'suffix' is not supported", "suffix", "unsupported_value")
    if req.best_of is not None and req.best_of != req.n:
        raise P.invalid("'best_of' other than n is not supported", "best_of", "unsupported_value")
    server.check_logprobs(req.logprobs, "logprobs")
    server.check_prompt_logprobs(req)
    # The prompt is scored for echo + logprobs (OpenAI's legacy format: the prompt tokens' logprobs come first)
    # and for prompt_logprobs (vLLM's): the engine computes the larger top-N of the two.
    wanted = [n for n in (req.logprobs if req.echo else None, req.prompt_logprobs) if n is not None]
    scores = max(wanted) if wanted else None
    stop_ids = server.stop_ids(req)
    given = req.prompts()
    # Cheap checks of every prompt before any is tokenized.
    server.check_sequences(len(given) * req.n)
    for p in given:
        if isinstance(p, str):
            server.check_prompt_text(p, "prompt")
        elif len(p) >= server.limits.max_context:
            server.check_prompt(p, "prompt")
    constraint = server.constraint(_output_spec(req), None)
    prompts, texts = [], []
    for p in given:
        ids = server.tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
        server.check_prompt(ids, "prompt")
        prompts.append(ids)
        texts.append(p if isinstance(p, str) else server.tokenizer.decode(ids, req.skip_special_tokens))
    # max_tokens 0 (lm-eval's loglikelihood requests): only the prompt, when it comes back (echo) or is scored
    minimum = 0 if req.echo or req.prompt_logprobs is not None else 1
    max_news = [
        server.max_new_tokens(req.max_tokens, "max_tokens", len(ids), COMPLETIONS_DEFAULT_MAX_TOKENS, minimum)
        for ids in prompts
    ]
    choices, seq_prompts, options = [], [], []
    for k, ids in enumerate(prompts):
        for j in range(req.n):
            i = k * req.n + j
            choices.append(ChoiceOutput(i, server.tokenizer, req.stop_strings(), stop_ids, req.skip_special_tokens))
            seq_prompts.append(ids)
            seed = _seed(req.seed, i)
            options.append(server.sampling_options(req, max_news[k], stop_ids, req.logprobs, seed, scores, constraint))
    job = Job(server, choices, seq_prompts, options)
    job.prompt_tokens = sum(len(ids) for ids in prompts)
    echo = [texts[i // req.n] if req.echo else "" for i in range(len(choices))]
    return job, echo
