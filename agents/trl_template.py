"""A tool-calling chat template for ChatML models whose own template has none (SmolLM2), and the
settings that let TRL's ``GRPOTrainer`` run where it is started (CPU or GPU, dtype).

Why a template is needed: ``GRPOTrainer(environment_factory=...)`` (TRL 1.16) refuses a tokenizer
whose chat template cannot render a tool-calling conversation. Its check
(``trl.chat_template_utils.supports_tool_calling``) renders ``user -> assistant with tool_calls ->
tool`` and wants the tool's name, argument name, argument value and the tool's answer all in the
text. SmolLM2-135M-Instruct's template renders ``message['content']`` only, so it fails.

What TRL needs of the tokenizer, and what :func:`apply_tool_template` gives it:

* ``chat_template``: :data:`TOOL_CHAT_TEMPLATE`, ChatML (``<|im_start|>role ... <|im_end|>``,
  the format SmolLM2 was tuned on). With ``tools=`` it adds a system section that lists the tools
  as JSON schemas (name, description, parameters; the return description is left out to keep the
  prompt short) between ``<tools>`` and ``</tools>`` and shows the call format. An assistant
  tool call renders as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (one block
  per call, after any text); the answers of consecutive ``tool`` messages render inside one
  ``user`` turn, each as ``<tool_response>\\n...\\n</tool_response>``. In the arguments' JSON,
  ``</`` is written ``<\\/`` (the same string to a JSON reader), so an argument that contains
  ``</tool_call>`` cannot close the block early.
* prefix preservation: rendering a conversation and then the same conversation with more messages
  gives the first rendering as a token prefix. TRL checks this
  (``is_chat_template_prefix_preserving``) and builds multi-turn rollouts by concatenating token
  ids; the template never looks ahead except to close a run of tool answers, which comes last.
* ``response_template``: :data:`RESPONSE_TEMPLATE`, the transformers (>= 5.13) response parser
  spec that ``tokenizer.parse_response`` uses. TRL only knows the templates of some model
  families (``add_response_schema`` raises "Unrecognized chat template" for others), so this must
  be set before the trainer is built. It reads every ``<tool_call>`` block as JSON into
  ``{"type": "function", "function": {...}}`` and the text before the first block as ``content``;
  a block that is not valid JSON makes TRL treat the whole reply as text (no tool call).
* the system section also names the tools and shows one example call built from the first tool and
  its required arguments (with a generic ``function_name`` example SmolLM2-135M copied the name).
* the template variable ``start_with_tool_call`` (``GRPOConfig(chat_template_kwargs=...)``)
  prefills every generation prompt with ``<tool_call>\\n{"name": "``, including the one TRL renders
  after tool answers (without ``tools=``), so a small model writes a call at every turn.

Tried with SmolLM2-135M-Instruct (transformers 5.25, TRL 1.16); see docs/third_party.md.

Nothing here imports TRL or transformers at module level.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = [
    "TOOL_CHAT_TEMPLATE", "RESPONSE_TEMPLATE", "TOOL_TEMPLATE_HINT", "apply_tool_template", "supports_tools",
    "with_tool_template_hint", "precision_settings",
]

#: The system text used when a conversation has no system message.
DEFAULT_SYSTEM = "You are a helpful AI assistant."

# Jinja, rendered by transformers' sandboxed environment (``tojson`` there keeps non-ASCII text).
TOOL_CHAT_TEMPLATE = (
    "{%- set default_system = '" + DEFAULT_SYSTEM + "' -%}\n"
    r"""{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system_text = messages[0]['content'] -%}
    {%- set rest = messages[1:] -%}
{%- else -%}
    {%- set system_text = default_system -%}
    {%- set rest = messages -%}
{%- endif -%}
{{- '<|im_start|>system\n' + system_text -}}
{%- if tools -%}
    {{- '\n\nYou can call these functions. Each is described by a JSON schema:\n<tools>\n' -}}
    {%- for tool in tools -%}
        {%- set fn = tool['function'] if tool['function'] is defined else tool -%}
        {{- {'name': fn['name'], 'description': fn.get('description', ''), 'parameters': fn.get('parameters', {})} | tojson -}}{{- '\n' -}}
    {%- endfor -%}
    {%- set first = tools[0]['function'] if tools[0]['function'] is defined else tools[0] -%}
    {%- set required = (first.get('parameters') or {}).get('required') or [] -%}
    {{- '</tools>\n\nThe function names are: ' -}}
    {%- for tool in tools -%}
        {{- (tool['function']['name'] if tool['function'] is defined else tool['name']) + (', ' if not loop.last else '.') -}}
    {%- endfor -%}
    {{- '\nTo call a function, write a block like this one, one block per call:\n<tool_call>\n{"name": ' + (first['name'] | tojson) + ', "arguments": {' -}}
    {%- for arg in required -%}{{- (arg | tojson) + ': "<' + arg + '>"' + (', ' if not loop.last else '') -}}{%- endfor -%}
    {{- '}}\n</tool_call>\nThe results come back between <tool_response> and </tool_response>.' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- for message in rest -%}
    {%- set role = message['role'] -%}
    {%- if role == 'tool' -%}
        {%- if loop.first or rest[loop.index0 - 1]['role'] != 'tool' -%}
            {{- '<|im_start|>user\n' -}}
        {%- else -%}
            {{- '\n' -}}
        {%- endif -%}
        {{- '<tool_response>\n' + (message['content'] | string) + '\n</tool_response>' -}}
        {%- if loop.last or rest[loop.index0 + 1]['role'] != 'tool' -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- elif role == 'assistant' -%}
        {{- '<|im_start|>assistant\n' -}}
        {%- generation -%}
        {{- message['content'] or '' -}}
        {%- if message['tool_calls'] is defined and message['tool_calls'] -%}
            {%- for call in message['tool_calls'] -%}
                {%- set fn = call['function'] if call['function'] is defined else call -%}
                {%- if message['content'] or not loop.first -%}{{- '\n' -}}{%- endif -%}
                {{- '<tool_call>\n{"name": ' + (fn['name'] | tojson) + ', "arguments": ' -}}
                {%- if fn['arguments'] is string -%}{{- fn['arguments'] -}}{%- else -%}{{- fn['arguments'] | tojson | replace('</', '<\\/') -}}{%- endif -%}
                {{- '}\n</tool_call>' -}}
            {%- endfor -%}
        {%- endif -%}
        {{- '<|im_end|>' -}}
        {%- endgeneration -%}
        {{- '\n' -}}
    {%- else -%}
        {{- '<|im_start|>' + role + '\n' + (message['content'] or '') + '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if start_with_tool_call is defined and start_with_tool_call -%}
        {{- '<tool_call>\n{"name": "' -}}
    {%- endif -%}
{%- endif -%}
"""
)

#: How ``tokenizer.parse_response`` reads a reply written in :data:`TOOL_CHAT_TEMPLATE`'s format.
RESPONSE_TEMPLATE: dict[str, Any] = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "tool_calls": {
            "open": "<tool_call>",
            "close_pattern": r"</tool_call>\s*",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
    },
}

#: Appended to TRL's "does not support tool calling" error by :func:`with_tool_template_hint`.
TOOL_TEMPLATE_HINT = (
    "This model's chat template cannot render tool calls. For a ChatML model such as SmolLM2, use the "
    "project's tool template: pass --tool-template to examples/trl_grpo.py, or call "
    "agents.trl_template.apply_tool_template(tokenizer) and give the tokenizer to GRPOTrainer as processing_class."
)

_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def supports_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a whole tool-calling exchange.

    Uses TRL's own check when TRL is installed, else the same test done here: render ``user ->
    assistant with a tool call -> tool`` and look for the call's name, argument and the answer.
    """
    try:
        from trl.chat_template_utils import supports_tool_calling
    except ImportError:
        supports_tool_calling = None
    if supports_tool_calling is not None:
        return bool(supports_tool_calling(tokenizer))
    if getattr(tokenizer, "chat_template", None) is None:
        return False
    marks = ("fn_name_q1", "arg_key_q2", "arg_val_q3", "answer_q4")
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": marks[0], "arguments": {marks[1]: marks[2]}}}]},
        {"role": "tool", "name": marks[0], "content": marks[3]},
    ]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that rejects the roles cannot do tools
        return False
    return all(m in text for m in marks)


def apply_tool_template(tokenizer: Any) -> Any:
    """Give a ChatML tokenizer :data:`TOOL_CHAT_TEMPLATE` and :data:`RESPONSE_TEMPLATE` (in place;
    returns the tokenizer). The model and its vocabulary are unchanged: every marker is plain text
    except ``<|im_start|>``/``<|im_end|>``, which the tokenizer must already know.

    Raises:
        ValueError: the tokenizer has no ``<|im_start|>``/``<|im_end|>`` tokens (not a ChatML
            model), or its end-of-sequence token is not ``<|im_end|>`` (generation would not stop
            at the end of a turn).
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in _CHATML_TOKENS if t not in vocab]
    if missing:
        raise ValueError(
            f"the tool template is ChatML, but this tokenizer has no {' or '.join(missing)} token; "
            "use a model whose own chat template supports tool calling"
        )
    if tokenizer.eos_token != "<|im_end|>":
        raise ValueError(
            f"the tool template ends each turn with <|im_end|>, but this tokenizer's end-of-sequence token is "
            f"{tokenizer.eos_token!r}; generation would not stop at the end of a turn"
        )
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    tokenizer.response_template = copy.deepcopy(RESPONSE_TEMPLATE)
    return tokenizer


def with_tool_template_hint(error: BaseException) -> BaseException:
    """TRL's "does not support tool calling" error with :data:`TOOL_TEMPLATE_HINT` added, or
    ``error`` unchanged if it is another error."""
    if isinstance(error, ValueError) and "does not support tool calling" in str(error):
        new = ValueError(f"{error} {TOOL_TEMPLATE_HINT}")
        new.__cause__ = error
        return new
    return error


def precision_settings(dtype: str = "auto", device: str | None = None) -> dict[str, Any]:
    """``GRPOConfig`` arguments that run where this is called: device and precision.

    TRL's ``GRPOConfig`` turns bf16 mixed precision on by default, which transformers refuses on a
    machine without a GPU ("Your setup doesn't support bf16/gpu"). This picks the device (``cuda``
    when available, unless ``device`` says otherwise) and the compute dtype with the project's rule,
    :func:`agents.policy.precision.resolve_dtype`: on a CPU ``auto`` is bfloat16 when it has
    bfloat16 instructions (``avx512_bf16``/``amx_bf16``) and float32 otherwise; on a GPU ``auto`` is
    bfloat16 when the GPU supports it. The weights are always loaded in float32 (the optimizer's
    master copy: a 1e-6 step is lost in bfloat16 weights); bfloat16 is used as mixed precision
    (``bf16=True``: autocast in the forward passes) only.

    Raises:
        ValueError: an unknown dtype name; ``bfloat16`` on a CPU without bfloat16 instructions or on
            a GPU without bfloat16 support; ``device="cuda"`` where no GPU is visible; a device
            other than ``cpu`` or ``cuda``.

    Returns:
        ``{"use_cpu": bool, "bf16": bool, "fp16": False, "model_init_kwargs": {"dtype": "float32"}}``.
    """
    import torch

    from agents.policy.precision import resolve_dtype

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, not {device.type!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but no GPU is visible to torch; use --device cpu")
    resolved = resolve_dtype(dtype, device)
    if device.type == "cpu":
        bf16 = resolved == torch.bfloat16
    else:
        gpu_bf16 = torch.cuda.is_bf16_supported()
        if resolved == torch.bfloat16 and not gpu_bf16:
            raise ValueError("--dtype bfloat16 asked for, but this GPU does not support bfloat16; use --dtype float32 or auto")
        bf16 = gpu_bf16 and (resolved == "auto" or resolved == torch.bfloat16)
    return {"use_cpu": device.type == "cpu", "bf16": bool(bf16), "fp16": False, "model_init_kwargs": {"dtype": "float32"}}
