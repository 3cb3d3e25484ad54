"""Chat templates selectable by name with `--chat-template NAME` (run, chat, serve), as llama-server's built-in
names: for GGUFs that carry no template, or to replace the file's own.

`llama3` starts with BOS as Llama 3's own template does (ocula's prompts carry the BOS their template writes);
`command-r` is the text llama-server's built-in renders, without one.
"""
from __future__ import annotations

from ocula.text.chat import CHATML_TEMPLATE, GEMMA_TEMPLATE

# Llama 3 / 3.1 turns: a header per role, the content, <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Cohere Command-R: one token per role inside START/END_OF_TURN tokens; the assistant is the CHATBOT.
COMMAND_R_TEMPLATE = (
    "{% for message in messages %}"
    "{% set role = {'system': 'SYSTEM', 'user': 'USER', 'assistant': 'CHATBOT'}.get(message['role'], 'USER') %}"
    "{{ '<|START_OF_TURN_TOKEN|><|' + role + '_TOKEN|>' + message['content'] | trim + '<|END_OF_TURN_TOKEN|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)

BUILTIN_TEMPLATES = {
    "chatml": CHATML_TEMPLATE,
    "gemma": GEMMA_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
    "command-r": COMMAND_R_TEMPLATE,
}
