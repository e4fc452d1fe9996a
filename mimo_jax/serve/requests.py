"""Turning a validated chat or completions request into a `Job` (`chat_job`, `completion_job`), with the
checks of the `Server` (mimo_jax.serve.server) and the structured-output spec it asks for."""

from __future__ import annotations

import json

from mimo_jax.engine.sampling import derived_seed
from mimo_jax.grammar import OUTPUT_FIELDS, GrammarError, output_spec, thinking_mode, tool_call_spec
from mimo_jax.serve import protocol as P
from mimo_jax.serve.jobs import ChoiceOutput, Job
from mimo_jax.serve.parsers import ReasoningParser, ToolCallParser
from mimo_jax.serve.server import Server
from mimo_jax.text import THINK_END, THINK_START, ChatTemplateError, nested_deeper_than

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# ---------------------------------------------------------------------------- chat
MAX_ARGUMENTS_DEPTH = 100  # nesting levels (objects, arrays) of a tool call's arguments in the conversation


def template_messages(req: P.ChatCompletionRequest) -> list[dict]:
    """A request's messages as the chat template reads them (text parts joined, tool-call arguments as objects)."""
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
            template_messages(req),
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
        name = tool_choice.function.name if isinstance(tool_choice, P.NamedToolChoice) else None
        call = tool_call_spec(tools, name, req.parallel_tool_calls is not False)
        spec = (call, "functions" if req.functions is not None else "tools")
    constraint = server.constraint(spec, thinking_mode(prompt, server.reasoning))
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


def _output_spec(req: P.SamplingFields) -> tuple[dict, str] | None:
    """The structured-output constraint a request asks for, and the parameter that asked (one at most)."""
    fields = req.model_dump(by_alias=True, exclude_none=True, include=set(OUTPUT_FIELDS))
    try:
        return output_spec(fields)
    except GrammarError as e:
        raise P.invalid(str(e), e.key, "invalid_value") from None


def _seed(seed: int | None, i: int) -> int | None:
    # Choice i draws from the stream `mimo_jax.generate(seed=seed)` uses for prompt i.

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
