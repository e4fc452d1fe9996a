"""Real clients against `python -m mimo_jax.serve` (the embedded demo model), not in CI: LangChain, litellm, lm-eval.

    pip install langchain-openai litellm lm-eval      # not in the test extras
    python bench/clients_check.py [--url http://127.0.0.1:8000]   # without --url: starts the demo server itself

Runs, each as its client's users write it:
- LangChain `ChatOpenAI(...).with_structured_output(Model, method=...)` for json_schema, function_calling and
  json_mode; `bind_tools(..., tool_choice="any")` and `tool_choice=NAME`; `use_responses_api=True` (plain, and with
  a tool);
- litellm `completion(..., response_format=Model)`;
- lm-eval `local-completions` loglikelihood on a tiny local multiple-choice task (bench/lm_eval_task).
Prints one line per path (PASS / FAIL and why) and the versions; exit status 1 if any path failed. The demo model
writes Python-looking text, so a pass means the client's request was served and its answer parsed and validated,
not that the answer is good.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Literal

import httpx
import pydantic

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODEL = "mimo-demo"
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
QUESTION = "What is the weather in Paris?"


class Forecast(pydantic.BaseModel):
    """Weather forecast."""

    city: Literal["Paris", "Rome", "Oslo"]
    days: int = pydantic.Field(ge=1, le=14)
    rain: bool


def get_weather(city: str) -> str:
    """Weather for a city.

    Args:
        city: the city's name
    """
    return "sun"


@contextlib.contextmanager
def demo_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mimo_jax.serve", "--port", str(port), "--dtype", "float32", "--max-batch", "4",
           "--max-context", "2048", "--prefill-chunk", "128", "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 600
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise SystemExit("the demo server did not start:\n" + log.read())
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            proc.wait(30)


# ----------------------------------------------------------------------------- the paths
def langchain_paths(url: str) -> dict[str, Callable[[], str]]:
    from langchain_openai import ChatOpenAI

    def chat(**kwargs) -> ChatOpenAI:
        return ChatOpenAI(model=MODEL, base_url=url + "/v1", api_key="unused", temperature=0.0, max_tokens=200,
                          max_retries=0, **kwargs)  # fmt: skip

    def structured(method: str) -> Callable[[], str]:
        def run() -> str:
            llm = chat(extra_body=NO_THINKING).with_structured_output(Forecast, method=method, include_raw=True)
            out = llm.invoke(f"{QUESTION} Answer in JSON with keys city, days, rain.")
            if out["parsed"] is None:
                # json_mode sends {"type": "json_object"} without the schema: the answer is JSON, but the schema's
                # fields are the model's to guess
                raw = out["raw"].content
                json.loads(raw)
                if method != "json_mode":
                    raise AssertionError(f"not parsed: {out['parsing_error']}")
                return f"JSON object (the schema is not sent with json_mode): {raw[:60]!r}"
            assert isinstance(out["parsed"], Forecast)
            return repr(out["parsed"])

        return run

    def tools(choice: str) -> Callable[[], str]:
        def run() -> str:
            message = chat(extra_body=NO_THINKING).bind_tools([get_weather], tool_choice=choice).invoke(QUESTION)
            (call,) = message.tool_calls[:1]
            assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str), message.tool_calls
            return f"{call['name']}({call['args']})"

        return run

    def responses() -> str:
        message = chat(use_responses_api=True, reasoning={"effort": "none"}).invoke(
            "Write a function that adds two numbers."
        )
        assert isinstance(message.text, str) and message.response_metadata.get("status") in ("completed", "incomplete")
        return f"{message.response_metadata.get('status')}: {message.text[:60]!r}"

    def responses_tool() -> str:
        llm = chat(use_responses_api=True, reasoning={"effort": "none"}).bind_tools(
            [get_weather], tool_choice="get_weather"
        )
        message = llm.invoke(QUESTION)
        (call,) = message.tool_calls[:1]
        assert call["name"] == "get_weather", message
        return f"{call['name']}({call['args']})"

    def responses_stream() -> str:
        llm = chat(use_responses_api=True, reasoning={"effort": "none"})
        text = "".join(chunk.text for chunk in llm.stream("def fib(n):"))
        assert text, "no text streamed"
        return f"{len(text)} characters streamed"

    return {
        "langchain with_structured_output(method='json_schema')": structured("json_schema"),
        "langchain with_structured_output(method='function_calling')": structured("function_calling"),
        "langchain with_structured_output(method='json_mode')": structured("json_mode"),
        "langchain bind_tools(tool_choice='any')": tools("any"),
        "langchain bind_tools(tool_choice='get_weather')": tools("get_weather"),
        "langchain ChatOpenAI(use_responses_api=True).invoke": responses,
        "langchain ChatOpenAI(use_responses_api=True).stream": responses_stream,
        "langchain use_responses_api + bind_tools(tool_choice=name)": responses_tool,
    }


def litellm_paths(url: str) -> dict[str, Callable[[], str]]:
    import litellm

    def structured() -> str:
        r = litellm.completion(
            model=f"openai/{MODEL}", api_base=url + "/v1", api_key="unused",
            messages=[{"role": "user", "content": QUESTION}], response_format=Forecast, max_tokens=200,
            temperature=0.0, extra_body=NO_THINKING,
        )  # fmt: skip
        parsed = Forecast.model_validate_json(r.choices[0].message.content)
        return repr(parsed)

    return {"litellm completion(response_format=Model)": structured}


def lm_eval_paths(url: str) -> dict[str, Callable[[], str]]:
    def loglikelihood() -> str:
        import lm_eval
        from lm_eval.tasks import TaskManager

        from mimo_jax.weights.demo import demo_model_dir

        task_dir = os.path.join(HERE, "lm_eval_task")
        args = (
            f"model={MODEL},base_url={url}/v1/completions,tokenizer={demo_model_dir()},tokenizer_backend=huggingface,"
            "num_concurrent=1,max_retries=1"
        )
        previous = os.getcwd()
        os.chdir(task_dir)  # the task's data file is relative
        try:
            results = lm_eval.simple_evaluate(
                model="local-completions", model_args=args, tasks=["tiny_python_mc"],
                task_manager=TaskManager(include_path=task_dir), batch_size=1,
            )  # fmt: skip
        finally:
            os.chdir(previous)
        scores = results["results"]["tiny_python_mc"]
        acc = scores.get("acc,none")
        assert acc is not None and 0.0 <= acc <= 1.0, scores
        return f"acc {acc:.3f} on {results['n-samples']['tiny_python_mc']['effective']} questions"

    return {"lm-eval local-completions loglikelihood (multiple_choice)": loglikelihood}


def versions() -> str:
    names = ("openai", "langchain-openai", "langchain-core", "litellm", "lm_eval")
    out = []
    for name in names:
        try:
            out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name} not installed")
    return ", ".join(out)


def run_all(url: str) -> bool:
    ok = True
    for make in (langchain_paths, litellm_paths, lm_eval_paths):
        try:
            paths = make(url)
        except ImportError as e:
            print(f"SKIP {make.__name__}: {e}", flush=True)
            ok = False
            continue
        for name, path in paths.items():
            t0 = time.perf_counter()
            try:
                detail = path()
            except Exception as e:  # report every path, whatever fails
                ok = False
                print(f"FAIL {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                traceback.print_exc(limit=3, file=sys.stderr)
            else:
                print(f"PASS {name} ({time.perf_counter() - t0:.1f} s): {detail}", flush=True)
    print(versions())
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (default: start the demo model)")
    args = p.parse_args()
    if args.url:
        return 0 if run_all(args.url.rstrip("/")) else 1
    with demo_server() as url:
        return 0 if run_all(url) else 1


if __name__ == "__main__":
    sys.exit(main())
