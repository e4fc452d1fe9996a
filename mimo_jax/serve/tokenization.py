"""`POST /tokenize` and `POST /detokenize` in vLLM's shapes.

tokenize: `{"model", "prompt", "add_special_tokens": true}` or `{"model", "messages", "add_generation_prompt": true,
"tools", "chat_template_kwargs"}` (rendered as chat completions render them) -> `{"count", "max_model_len", "tokens",
"token_strs"}` (`token_strs` with `return_token_strs`); detokenize: `{"model", "tokens"}` -> `{"prompt"}` (special
tokens kept, as vLLM decodes). A prompt longer than the context is counted, not refused: that is what a client asks
a tokenizer to find out.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from mimo_jax.serve import protocol as P
from mimo_jax.serve.requests import template_messages
from mimo_jax.serve.server import Server
from mimo_jax.text import ChatTemplateError


class TokenizeRequest(P._Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[P.ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (the template's own)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[P.Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        if self.prompt is not None and (self.tools is not None or self.chat_template_kwargs is not None):
            raise ValueError("'tools' and 'chat_template_kwargs' apply to 'messages' only")
        return self


class DetokenizeRequest(P._Request):
    model: str | None = None
    tokens: list[int]


def tokenize(server: Server, body: bytes) -> dict:
    req = P.parse_request(TokenizeRequest, body)
    server.check_model(req.model)
    if req.prompt is not None:
        ids = server.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    else:
        if server.template is None:
            raise P.invalid("this model has no chat template; give 'prompt'", "messages")
        for name, given in (
            ("chat_template", req.chat_template is not None),
            ("continue_final_message", req.continue_final_message),
            ("add_special_tokens", req.add_special_tokens),
        ):
            if given:
                message = f"'{name}' is not supported with 'messages' (the checkpoint's template renders them)"
                raise P.invalid(message, name, "unsupported_value")
        kwargs = dict(req.chat_template_kwargs or {})
        reserved = {"messages", "tools", "documents", "add_generation_prompt"} & set(kwargs)
        if reserved:
            raise P.invalid(f"chat_template_kwargs may not set {sorted(reserved)}", "chat_template_kwargs")
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        try:
            _, ids = server.template.render_ids(
                server.tokenizer, template_messages(req), tools, req.add_generation_prompt, kwargs
            )
        except ChatTemplateError as e:
            raise P.invalid(str(e), "messages", "invalid_value") from None
    out = {"count": len(ids), "max_model_len": server.limits.max_context, "tokens": ids}
    if req.return_token_strs:
        out["token_strs"] = [server.tokenizer.token_text(t) for t in ids]
    return out


def detokenize(server: Server, body: bytes) -> dict:
    req = P.parse_request(DetokenizeRequest, body)
    server.check_model(req.model)
    vocab = server.scheduler.engine.config.vocab_size
    for k, t in enumerate(req.tokens):
        if not 0 <= t < vocab:
            raise P.invalid(
                f"token id {t} (tokens[{k}]) is outside the vocabulary [0, {vocab})", "tokens", "invalid_value"
            )
    return {"prompt": server.tokenizer.decode(req.tokens, skip_special_tokens=False)}
