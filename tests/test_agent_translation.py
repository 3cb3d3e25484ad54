"""The Responses and Messages requests as the chat requests they become (no model needed): roles, parts and
blocks, tool calls and results in the history, tool choices, and the errors that name what is wrong."""
import json

import pytest

pytest.importorskip("fastapi")

from ocula.server.anthropic_api import to_chat as from_messages  # noqa: E402
from ocula.server.errors import APIError  # noqa: E402
from ocula.server.responses_api import to_chat as from_responses  # noqa: E402

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_responses_items_become_chat_messages():
    chat = from_responses({
        "instructions": "Be brief.",
        "input": [
            {"role": "developer", "content": "Use metric units."},
            {"role": "user", "content": [{"type": "input_text", "text": "Weather here?"},
                                         {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call", "call_id": "c1", "name": "forecast", "arguments": '{"city": "Oslo"}'},
            {"type": "function_call", "call_id": "c2", "name": "forecast", "arguments": '{"city": "Rome"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "rain"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "sun"}]},
        ],
        "tools": [{"type": "function", "name": "forecast", "parameters": SCHEMA, "strict": True}],
        "tool_choice": {"type": "function", "name": "forecast"},
        "parallel_tool_calls": False, "max_output_tokens": 30, "temperature": 0.2,
        "text": {"format": {"type": "json_schema", "name": "w", "schema": SCHEMA}},
    })
    roles = [m["role"] for m in chat["messages"]]
    assert roles == ["system", "system", "user", "assistant", "tool", "tool"]
    assert chat["messages"][2]["content"][1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    calls = chat["messages"][3]["tool_calls"]  # consecutive calls are one assistant turn
    assert [c["id"] for c in calls] == ["c1", "c2"] and calls[1]["function"]["arguments"] == '{"city": "Rome"}'
    assert chat["messages"][5] == {"role": "tool", "tool_call_id": "c2", "content": "sun"}
    assert chat["tools"] == [{"type": "function", "function": {"name": "forecast", "parameters": SCHEMA}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "forecast"}}
    assert chat["max_tokens"] == 30 and chat["temperature"] == 0.2 and chat["parallel_tool_calls"] is False
    assert chat["response_format"]["json_schema"]["schema"] == SCHEMA


@pytest.mark.parametrize("body,fragment", [
    ({"input": 5}, "input must be"),
    ({"input": "x", "previous_response_id": "resp_9"}, "keeps no responses"),
    ({"input": [{"type": "web_search_call"}]}, "'web_search_call'"),
    ({"input": [{"role": "robot", "content": "x"}]}, "role must be"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f1"}]}]}, "file_id is not supported"),
    ({"input": "x", "tools": [{"type": "file_search"}]}, "only function tools"),
    ({"input": "x", "tool_choice": {"type": "mcp"}}, "tool_choice must be"),
    ({"input": "x", "instructions": 5}, "instructions must be a string"),
])
def test_responses_refusals_name_the_problem(body, fragment):
    with pytest.raises(APIError) as e:
        from_responses(body)
    assert e.value.status == 400 and fragment in e.value.message


def test_messages_blocks_become_chat_messages():
    chat = from_messages({
        "max_tokens": 64, "system": [{"type": "text", "text": "Be brief."}],
        "messages": [
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                {"type": "text", "text": "Weather there?"}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "They want weather.", "signature": "s"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "forecast", "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [
                {"type": "text", "text": "Here:"},
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "no city"}],
                 "is_error": True}]},
        ],
        "tools": [{"name": "forecast", "description": "Weather", "input_schema": SCHEMA}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"], "top_k": 5, "thinking": {"type": "disabled"},
    })
    m = chat["messages"]
    assert [x["role"] for x in m] == ["system", "user", "assistant", "user", "tool"]
    assert m[0]["content"] == "Be brief."
    assert [p["image_url"]["url"] for p in m[1]["content"][:2]] == ["data:image/png;base64,AAAA",
                                                                   "https://example.com/a.png"]
    assert m[2]["reasoning_content"] == "They want weather." and m[2]["content"] == [{"type": "text", "text": "Checking."}]
    assert json.loads(m[2]["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
    assert m[3]["content"] == [{"type": "text", "text": "Here:"}]  # text before a result stays before it
    assert m[4] == {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: no city"}
    assert chat["tool_choice"] == "required" and chat["parallel_tool_calls"] is False
    assert chat["stop"] == ["END"] and chat["top_k"] == 5
    assert chat["chat_template_kwargs"] == {"enable_thinking": False}
    named = from_messages({"max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
                           "tool_choice": {"type": "tool", "name": "forecast"}})
    assert named["tool_choice"] == {"type": "function", "function": {"name": "forecast"}}
    assert from_messages({"max_tokens": 1, "messages": []})["messages"] == [{"role": "user", "content": ""}]
    assert "max_tokens" not in from_messages({"messages": [{"role": "user", "content": "x"}]}, need_max_tokens=False)


@pytest.mark.parametrize("body,fragment", [
    ({"messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"max_tokens": 1, "messages": "hi"}, "messages must be a list"),
    ({"max_tokens": 1, "system": [{"type": "image"}], "messages": []}, "system must be"),
    ({"max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t"}]}]},
     "'tool_use' block"),
    ({"max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "tool_result", "content": [
        {"type": "image", "source": {}}]}]}]}, "only text is supported inside a tool_result"),
    ({"max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64"}}]}]},
     "needs media_type and data"),
    ({"max_tokens": 1, "messages": [], "tools": [{"type": "bash_20250124", "name": "bash"}]}, "server tools"),
    ({"max_tokens": 1, "messages": [], "tool_choice": {"type": "sometimes"}}, "tool_choice must be"),
])
def test_messages_refusals_name_the_problem(body, fragment):
    with pytest.raises(APIError) as e:
        from_messages(body)
    assert e.value.status == 400 and fragment in e.value.message
