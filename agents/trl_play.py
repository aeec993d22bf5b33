"""Play ``MemoryToolEnv`` episodes with a tool-calling model, outside TRL, for evaluation.

A model trained through TRL's ``GRPOTrainer(environment_factory=...)`` (or warm-started for it by
``examples/trl_sft.py``) acts by writing tool calls. :func:`play_tool_episodes` runs the loop TRL
runs during training, with greedy decoding: render the chat with the tools, generate a reply, parse
it as TRL does (:func:`agents.trl_sft.parse_reply`), run the calls against the env and append the
answers (``str(result)``, or ``str({"error": ...})`` when a tool raises or does not exist), until a
reply has no tool call, the conversation is over and answered, or a limit is hit. The episodes run
as one batch, a round of replies at a time (left padding).

:func:`tool_final_score` scores the played episodes exactly as
:func:`agents.commands.sft.agent_final_score` scores a scripted agent, so a TRL-trained model sits
in the same held-out table as the project's own checkpoints (``benchmarks/held_out.py
--tool-checkpoint``).
"""

from __future__ import annotations

from typing import Any, Sequence

from agents.baselines import final_memory_score, mean_final_scores
from agents.trl_adapter import DEFAULT_PROMPT, MemoryToolEnv
from agents.trl_sft import call_tool, parse_reply, tool_methods

__all__ = ["play_tool_episodes", "tool_final_score", "load_tool_model"]


def load_tool_model(path: str, *, dtype: str = "float32", device: str = "cpu"):
    """A local model directory as ``(model, tokenizer)`` with the project's tool template (SmolLM2's
    own template has no tool calling; see :mod:`agents.trl_template`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agents.trl_template import apply_tool_template

    tokenizer = apply_tool_template(AutoTokenizer.from_pretrained(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    return model, tokenizer


def play_tool_episodes(model: Any, tokenizer: Any, envs: Sequence[MemoryToolEnv], rows: Sequence[dict], *,
                       max_new_tokens: int = 512, max_replies: int = 64, prompt: str = DEFAULT_PROMPT,
                       chat_template_kwargs: dict | None = None, batch: int = 8) -> list[dict]:
    """Play ``rows[i]`` on ``envs[i]`` greedily; returns one record per episode: ``reward`` (the env's
    return, the rest of the episode played with no operations if the model stopped early),
    ``replies``, ``open_replies`` (those written before the conversation was over),
    ``replies_with_call`` (open replies that TRL would parse into at least one tool call),
    ``calls`` (by tool name), ``tool_errors``, ``truncated`` (replies cut at ``max_new_tokens``),
    ``finished_by_model`` and ``messages`` (the chat)."""
    import torch

    if len(envs) != len(rows):
        raise ValueError(f"{len(envs)} envs for {len(rows)} rows")
    kwargs = dict(chat_template_kwargs or {})
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    episodes = []
    for env, row in zip(envs, rows):
        tools = tool_methods(env)
        episodes.append({
            "env": env, "tools": tools, "by_name": {t.__name__: t for t in tools},
            "messages": [{"role": "user", "content": prompt + env.reset(**row)}], "open": True,
            "replies": 0, "open_replies": 0, "replies_with_call": 0, "calls": {}, "tool_errors": 0, "truncated": 0,
        })
    while any(e["open"] for e in episodes):
        active = [e for e in episodes if e["open"]]
        for start in range(0, len(active), batch):
            chunk = active[start:start + batch]
            prompts = [tokenizer.apply_chat_template(e["messages"], tools=e["tools"], add_generation_prompt=True, tokenize=True,
                                                     return_dict=False, **kwargs) for e in chunk]
            width = max(map(len, prompts))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=eos, pad_token_id=pad, top_p=None, top_k=None, temperature=None)
            for e, p, row_ids in zip(chunk, prompts, out[:, width:].tolist()):
                _take_reply(e, tokenizer, p, row_ids, eos, max_replies)
    records = []
    for e in episodes:
        finished = e["env"].done
        reward = e["env"].get_reward()
        records.append({"reward": reward, "finished_by_model": finished,
                        **{k: e[k] for k in ("replies", "open_replies", "replies_with_call", "calls", "tool_errors", "truncated", "messages")}})
    return records


def _take_reply(e: dict, tokenizer: Any, prompt: list[int], ids: list[int], eos: int, max_replies: int) -> None:
    """Parse one generated reply into the episode's chat, run its calls, and close the episode when
    it is over."""
    if eos in ids:
        ids = ids[: ids.index(eos) + 1]
    else:
        e["truncated"] += 1
    message = parse_reply(tokenizer, ids, prompt, e["tools"])
    calls = message.get("tool_calls") or []
    e["replies"] += 1
    if not e["env"].done:  # a reply after the end ("Done.") rightly has no call
        e["open_replies"] += 1
        e["replies_with_call"] += bool(calls)
    e["messages"].append({"role": "assistant", "content": message.get("content") or "", **({"tool_calls": calls} if calls else {})})
    for call in calls:
        fn = call.get("function", {}) if call.get("type") == "function" else {}
        name = fn.get("name") or call.get("name", "unknown")
        e["calls"][name] = e["calls"].get(name, 0) + 1
        answer, failed = call_tool(e["by_name"], name, fn.get("arguments") or {})
        e["tool_errors"] += failed
        e["messages"].append({"role": "tool", "name": name, "content": answer})
    if not calls or e["replies"] >= max_replies:
        e["open"] = False


def tool_final_score(model: Any, tokenizer: Any, env_fn, tasks: Sequence[int], **play_kwargs: Any) -> dict[str, Any]:
    """Play one episode per task index (``reset(options={"task": t})`` on a ``single_agent`` env from
    ``env_fn``) and score it as :func:`agents.commands.sft.agent_final_score` does: the final memory
    answers every question valid at the end. Returns ``f1``, ``penalty``, ``reward``,
    ``memory_size``, ``f1_per_task``, and the replies' figures (``reply_parse_rate``: the share of
    replies written before the conversation was over that parse into a tool call, and
    ``parse_error_rate``, one minus it; ``tool_error_rate``; ``truncated_rate``; ``calls``)."""
    envs = [MemoryToolEnv(env=env_fn()) for _ in tasks]
    records = play_tool_episodes(model, tokenizer, envs, [{"task": int(t)} for t in tasks], **play_kwargs)
    scores = [final_memory_score(env.env) for env in envs]
    for env in envs:
        env.env.close()
    replies = sum(r["replies"] for r in records)
    open_replies = sum(r["open_replies"] for r in records)
    parsed = sum(r["replies_with_call"] for r in records) / max(open_replies, 1)
    calls: dict[str, int] = {}
    for r in records:
        for name, n in r["calls"].items():
            calls[name] = calls.get(name, 0) + n
    n_calls = sum(calls.values())
    return {
        **mean_final_scores(scores, per_task=True),
        "replies": replies, "open_replies": open_replies, "reply_parse_rate": parsed,
        "tool_error_rate": sum(r["tool_errors"] for r in records) / max(n_calls, 1),
        "truncated_rate": sum(r["truncated"] for r in records) / max(replies, 1),
        "finished_by_model": sum(r["finished_by_model"] for r in records) / len(records), "calls": calls,
        "parse_error_rate": 1 - parsed,
    }
