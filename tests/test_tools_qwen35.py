"""Tool calls in the Qwen3-Coder / Qwen3.5 XML format, through the library and a thinking template: the
`qwen3vl` fixture (real Qwen vocabulary, random weights, with its mmproj) rewritten with Qwen3.5's own chat
template, whose generation prompt opens `<think>` unless `enable_thinking` is false.

A forced call closes the open `<think>` and is then a valid XML call; a scripted model shows `auto` parses a
model-written XML call (typed parameters) after its reasoning; the history renders calls and results the
template's way; images and tools go together.
"""
import json
from pathlib import Path

import pytest
from tiny import FIXTURES

pytest.importorskip("llguidance")

import ocula  # noqa: E402

MODEL = FIXTURES / "models" / "qwen3vl" / "qwen3vl-f16.gguf"
MMPROJ = FIXTURES / "models" / "qwen3vl" / "mmproj-qwen3vl-f16.gguf"
IMAGE = FIXTURES / "images" / "camera_gray_128.png"
TEMPLATE = (Path(__file__).parent / "data" / "templates" / "qwen3_5.jinja").read_text()
pytestmark = [pytest.mark.skipif(not (MODEL.exists() and MMPROJ.exists()), reason="qwen3vl fixture not found"),
              pytest.mark.usefixtures("one_torch_thread")]

FORECAST = {"type": "function", "function": {"name": "forecast", "description": "Weather forecast", "parameters": {
    "type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "note": {"type": "string"}},
    "required": ["city", "days"]}}}
ASK = [{"role": "user", "content": "Weather in Rome for two days?"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from gguf import GGUFValueType
    from gguf_edit import rewrite_gguf

    path = rewrite_gguf(MODEL, tmp_path_factory.mktemp("q35") / "qwen35-tools.gguf",
                        metadata={"tokenizer.chat_template": (TEMPLATE, GGUFValueType.STRING)})
    return ocula.load(path, MMPROJ, n_ctx=4096)


def valid(call) -> dict:
    args = json.loads(call.arguments)
    assert call.name == "forecast" and args["city"] in ("Paris", "Rome") and 1 <= args["days"] <= 9
    assert set(args) <= {"city", "days", "note"} and isinstance(args.get("note", ""), str)
    return args


def test_forced_xml_call_closes_the_open_think(model):
    assert model.apply_chat_template(ASK, tools=[FORECAST]).endswith("<|im_start|>assistant\n<think>\n")
    r = model.chat(ASK, tools=[FORECAST], tool_choice="required", max_tokens=120, temperature=0.9, seed=2,
                   parallel_tool_calls=False)
    assert r.text.startswith("</think>\n\n<tool_call>\n<function=forecast>\n")
    (call,) = r.parsed.tool_calls
    valid(call)
    assert r.parsed.reasoning == "" and r.parsed.content == ""
    off = model.chat(ASK, tools=[FORECAST], tool_choice="required", max_tokens=120, temperature=0.9, seed=2,
                     parallel_tool_calls=False, chat_template_kwargs={"enable_thinking": False})
    assert off.text.startswith("<tool_call>\n<function=forecast>\n")
    valid(off.parsed.tool_calls[0])


def test_history_renders_calls_and_results_as_xml(model):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "forecast", "arguments": '{"city": "Rome", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    from ocula.engine.tool_calls import ToolPlan

    plan = ToolPlan.create([FORECAST], None, model.template.source)
    assert plan.format == "qwen3_xml"
    text = model.apply_chat_template(plan.history(history), **plan.template_kwargs())
    assert ("<tool_call>\n<function=forecast>\n<parameter=city>\nRome\n</parameter>\n<parameter=days>\n2\n"
            "</parameter>\n</function>\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nsunny\n"
            "</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n") in text


def test_auto_parses_reasoning_then_an_xml_call(model, monkeypatch):
    import ocula.engine.generate as generate

    said = ("The user wants Rome.\n</think>\n\nChecking.\n<tool_call>\n<function=forecast>\n<parameter=city>\nRome\n"
            "</parameter>\n<parameter=days>\n2\n</parameter>\n<parameter=note>\n42\n</parameter>\n</function>\n"
            "</tool_call>")
    script = model.tokenize(said, add_special=False) + [min(model.tokenizer.eot_ids)]

    class Scripted:
        def __init__(self, params):
            self.i = -1

        def __call__(self, logits, history):
            self.i += 1
            return script[self.i]

    monkeypatch.setattr(generate, "Sampler", Scripted)
    r = model.chat(ASK, tools=[FORECAST], max_tokens=200)
    assert r.parsed.reasoning == "The user wants Rome.\n" and r.parsed.content == "Checking."
    (call,) = r.parsed.tool_calls
    assert json.loads(call.arguments) == {"city": "Rome", "days": 2, "note": "42"}  # a string stays a string


def test_image_and_tools_together(model):
    messages = [{"role": "user", "content": [{"type": "image", "image": str(IMAGE)},
                                             {"type": "text", "text": "Weather where this was taken?"}]}]
    r = model.chat(messages, tools=[FORECAST], tool_choice={"type": "function", "function": {"name": "forecast"}},
                   max_tokens=120, temperature=0)
    valid(r.parsed.tool_calls[0])
    assert r.prompt_tokens > len(model.prompt_token_ids([{"role": "user", "content": "Weather where this was taken?"}]))
