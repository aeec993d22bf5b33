"""Evaluate an agent on synthetic tasks, LoCoMo or LongMemEval: ``memr2 eval``.

    memr2 eval --agent NAME [--noise P] --data synthetic|locomo:PATH|longmemeval:PATH
               [--split test] [--drop-adversarial] [--episodes N] [--seed S] [--horizon H]
               [--slices N] [--reader extractive|hf:PATH|openai:URL#MODEL] [--reader-prefill]
               [--judge URL#MODEL] [--out DIR] [--max-questions N]

Protocol. Every task is played once, from an empty memory, through its first ``horizon``
sessions, in the env's ``final`` reward mode: no question is asked during the episode; after the
last session the reader answers every question that is valid then (answerable, and not stale)
from the final memory, once. This is how the paper reports LoCoMo (and how LongMemEval asks its
question after the whole history), and it scores the memory the agent actually ends with, not a
mix of intermediate ones.

Reported, per question category and over all questions:

* ``F1``: the reward token F1 (SQuAD normalisation), ``BLEU-1`` beside it;
* on LoCoMo also the official ``LoCoMo F1`` (:func:`memenv.scoring.locomo_f1`, stemmed, with
  per-category rules) and ``NLTK BLEU-1`` (:func:`memenv.scoring.nltk_bleu1`);
* ``J`` (LLM-judge accuracy) when ``--judge`` names an OpenAI-compatible endpoint;

and per episode, averaged: M-Fail (share of the evaluated questions' evidence turns that no
memory entry holds, pooled over all questions), memory entries and words at the end, the
operations applied (ADD, UPDATE, DELETE, NOOP), skipped operations and unparsable actions, and
the final reward (F1 minus the bloat penalty). Scores are printed as percentages.

Agents: the scripted baselines of :mod:`agents.baselines` (``oracle``, ``add-only`` and
``noisy-teacher`` follow the gold operation log, which only synthetic tasks have) or
``checkpoint:PATH``, a :class:`agents.policy.SharedPolicy` directory decoding greedily.

Readers: ``extractive`` (model-free, the default) or an LLM reader (:mod:`memenv.llm_reader`):
``hf:PATH`` runs a local model, ``--reader-prefill`` starts its replies with ``<answer>`` for
small models that never write the tags, and ``--dtype`` sets its precision.

The module also keeps the plain building blocks: :func:`play_episode`, :class:`EpisodeSummary`
and :func:`summarize`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from agents.policy.precision import add_dtype_argument, describe_dtype, dtype_name

__all__ = [
    "EpisodeSummary",
    "play_episode",
    "play_episodes",
    "summarize",
    "PolicyAgent",
    "EvalError",
    "add_arguments",
    "run",
    "evaluate",
    "format_results",
]

#: ``final`` reward mode: all questions valid at the end, scored once with the final memory.
REWARD_MODE = "final"
DEFAULT_MAX_NEW_TOKENS = 256  # a checkpoint policy's limit per action when it records none
OP_COUNTS = ("adds", "updates", "deletes", "noops", "invalid_ops", "parse_errors")


class EvalError(ValueError):
    """The evaluation was asked for something it cannot do (bad spec, wrong agent for the data)."""


# ---------------------------------------------------------------------------------------------
# Playing episodes
# ---------------------------------------------------------------------------------------------


@dataclass
class EpisodeSummary:
    """The outcome of one episode: rewards, every scored question, and the final env stats."""

    conv_id: str
    total_reward: float
    qa: list[dict] = field(default_factory=list)
    m_fail: list[float] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    memory_size: int = 0
    memory_words: int = 0
    steps: int = 0

    @property
    def mean_f1(self) -> float:
        return float(np.mean([q["f1"] for q in self.qa])) if self.qa else 0.0

    def record_step(self, reward: float, info: dict) -> None:
        """Add one ``env.step`` outcome."""
        self.total_reward += reward
        self.steps += 1
        self.qa.extend(info.get("qa", []))
        if info.get("m_fail") is not None:
            self.m_fail.append(info["m_fail"])

    def finish(self, info: dict) -> None:
        """Take the final stats and memory size from the last step's ``info``."""
        self.stats = dict(info.get("stats", {}))
        self.memory_size = info.get("memory_size", 0)
        self.memory_words = info.get("memory_words", 0)


def play_episode(env, agent, *, seed: int | None = None, options: dict | None = None) -> EpisodeSummary:
    """Run ``agent`` on ``env`` from ``reset(seed, options)`` to the end of the episode."""
    obs, info = env.reset(seed=seed, options=options)
    summary = EpisodeSummary(conv_id=info["conv_id"], total_reward=0.0)
    done = False
    while not done:
        obs, reward, terminated, truncated, info = env.step(agent.act(obs, info))
        summary.record_step(reward, info)
        done = terminated or truncated
    summary.finish(info)
    return summary


def play_episodes(
    envs: Sequence, agent, options: Sequence[dict], *, seed: int | None = None, on_done: Callable[[EpisodeSummary], None] | None = None
) -> list[EpisodeSummary]:
    """Play one episode per entry of ``options`` on ``envs`` in lockstep (``len(options) <=
    len(envs)``), so an agent with ``act_batch(observations, infos)`` answers all pending
    observations in one call (a language model generates them as one batch). Other agents are
    asked one observation at a time. Returns the summaries in the order of ``options``."""
    if len(options) > len(envs):
        raise ValueError(f"{len(options)} episodes need as many envs, got {len(envs)}")
    obs, infos, summaries = [], [], []
    for env, opts in zip(envs, options):
        o, info = env.reset(seed=seed, options=opts)
        obs.append(o)
        infos.append(info)
        summaries.append(EpisodeSummary(conv_id=info["conv_id"], total_reward=0.0))
    active = list(range(len(options)))
    while active:
        if hasattr(agent, "act_batch"):
            actions = agent.act_batch([obs[i] for i in active], [infos[i] for i in active])
        else:
            actions = [agent.act(obs[i], infos[i]) for i in active]
        still = []
        for i, action in zip(active, actions):
            obs[i], reward, terminated, truncated, infos[i] = envs[i].step(action)
            summaries[i].record_step(reward, infos[i])
            if terminated or truncated:
                summaries[i].finish(infos[i])
                if on_done is not None:
                    on_done(summaries[i])
            else:
                still.append(i)
        active = still
    return summaries


def summarize(episodes: list[EpisodeSummary]) -> dict[str, Any]:
    """Mean F1 over all scored questions, per category, and means of the memory statistics."""
    qa = [q for e in episodes for q in e.qa]
    by_cat: dict[str, list[float]] = {}
    for q in qa:
        by_cat.setdefault(q.get("category", "all"), []).append(q["f1"])
    return {
        "episodes": len(episodes),
        "questions": len(qa),
        "f1": float(np.mean([q["f1"] for q in qa])) if qa else 0.0,
        "bleu1": float(np.mean([q["bleu1"] for q in qa])) if qa else 0.0,
        "f1_by_category": {c: float(np.mean(v)) for c, v in sorted(by_cat.items())},
        "m_fail": float(np.mean([m for e in episodes for m in e.m_fail])) if any(e.m_fail for e in episodes) else None,
        "memory_size": float(np.mean([e.memory_size for e in episodes])) if episodes else 0.0,
        "reward": float(np.mean([e.total_reward for e in episodes])) if episodes else 0.0,
        "ops": {k: float(np.mean([e.stats.get(k, 0) for e in episodes])) for k in OP_COUNTS},
    }


class PolicyAgent:
    """Acts with a :class:`agents.policy.SharedPolicy`, decoding greedily (temperature 0).

    ``act_batch`` makes one batched ``generate`` call for many observations, which
    :func:`play_episodes` uses to step several episodes at once.
    """

    def __init__(self, policy, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, name: str = "policy"):
        self.policy = policy
        self.max_new_tokens = int(max_new_tokens)
        self.name = name

    def act_batch(self, observations: Sequence[dict], infos: Sequence[dict]) -> list[str]:
        generations = self.policy.generate(list(observations), temperature=0.0, max_new_tokens=self.max_new_tokens)
        return [g.text for g in generations]

    def act(self, observation: dict, info: dict) -> str:
        return self.act_batch([observation], [info])[0]

    def settings(self) -> dict[str, Any]:
        """How it decodes: prompt style, ``max_new_tokens``, dtype and the sampling backend
        (``hf`` or ``vllm``; for ``results.json``)."""
        return {
            "prompt_style": self.policy.prompt_style,
            "max_new_tokens": self.max_new_tokens,
            "dtype": dtype_name(self.policy.model.dtype),
            "backend": "vllm" if hasattr(self.policy.backend, "load_weights") else "hf",
        }


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

DATA_KINDS = ("synthetic", "locomo", "longmemeval")
SYNTHETIC_DEFAULTS = {"episodes": 20, "horizon": 32, "slices": 3}
REAL_DATA_SLICES = 6  # the paper's N for LoCoMo's ~22-turn sessions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``memr2 eval`` options."""
    from agents.baselines import AGENTS

    parser.add_argument("--agent", required=True, help=f"a scripted baseline ({', '.join(AGENTS)}) or checkpoint:PATH (a SharedPolicy directory)")
    parser.add_argument("--noise", type=float, default=None, help="mistake rate of the noisy-teacher agent (default 0.3)")
    parser.add_argument("--data", default="synthetic", help="synthetic (default), locomo:PATH or longmemeval:PATH")
    parser.add_argument("--split", choices=("train", "validation", "test", "all"), default=None, help="LoCoMo split (default test: the paper's seven test conversations)")
    parser.add_argument("--drop-adversarial", action="store_true", help="leave out LoCoMo category-5 questions (the paper does)")
    parser.add_argument("--episodes", type=int, default=None, help=f"synthetic: number of conversations (default {SYNTHETIC_DEFAULTS['episodes']}); real data: at most this many conversations (default all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic conversations, the env and the noisy teacher")
    parser.add_argument("--horizon", type=int, default=None, help=f"sessions per episode (default: synthetic {SYNTHETIC_DEFAULTS['horizon']}, real data all)")
    parser.add_argument("--slices", type=int, default=None, help=f"slices per session (default: synthetic {SYNTHETIC_DEFAULTS['slices']}, real data {REAL_DATA_SLICES})")
    parser.add_argument("--max-questions", type=int, default=None, help="score at most this many questions per conversation (a fixed seeded subset)")
    parser.add_argument("--reader", default="extractive", help="extractive (default), hf:PATH (local model directory) or openai:URL#MODEL")
    parser.add_argument("--reader-k", type=int, default=30, help="LLM reader: memories retrieved per speaker (default 30)")
    parser.add_argument("--reader-cache", default=None, help="LLM reader: JSON cache of replies (default OUT/reader_cache.json)")
    parser.add_argument("--reader-prefill", action="store_true", help="hf: reader: start each reply with <answer> so that a small model only writes the answer (its first line); for models such as SmolLM2-135M that never write the tags")
    parser.add_argument("--reader-on-missing", choices=("raise", "penalty"), default="raise", help="LLM reader: a reply without <answer> tags fails the run (raise, default) or scores 0 and is counted (penalty)")
    parser.add_argument("--judge", default=None, help="URL#MODEL of an OpenAI-compatible endpoint for the LLM-judge accuracy J")
    parser.add_argument("--api-key-env", default=None, help="name of an environment variable holding the API key for --reader openai: and --judge")
    parser.add_argument(
        "--backend", choices=("auto", "hf", "vllm"), default="auto",
        help="sampler of a checkpoint policy: vllm, hf, or auto (default: vllm where installed and able to serve the model)",
    )
    parser.add_argument("--device", default="auto", help="device of a checkpoint policy or HF reader: auto (default), cpu, cuda, ...")
    parser.add_argument("--prompt-style", choices=("compact", "full"), default=None, help="checkpoint policy prompts (default: what the checkpoint records, else compact)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help=f"checkpoint policy: most tokens per action (default: what the checkpoint records, else {DEFAULT_MAX_NEW_TOKENS})")
    add_dtype_argument(parser)
    parser.add_argument("--batch", type=int, default=8, help="episodes played in lockstep (a checkpoint policy generates for all of them at once)")
    parser.add_argument("--out", default=None, help="write results.json and results.md here (default: print only)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """``memr2 eval``: returns 0 on success, 2 for a bad request, 1 when a reader or judge fails."""
    from memenv.data.errors import DataError
    from memenv.readers import ReaderError
    from memenv.scoring import JudgeError

    try:
        results = evaluate(args)
    except (EvalError, DataError, FileNotFoundError) as e:
        print(f"memr2 eval: error: {e}", file=sys.stderr)
        return 2
    except (ReaderError, JudgeError) as e:
        print(f"memr2 eval: failed: {e}", file=sys.stderr)
        return 1
    text = format_results(results)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        (out / "results.md").write_text(text + "\n", encoding="utf-8")
        print(f"wrote {out / 'results.json'} and {out / 'results.md'}", file=sys.stderr)
    return 0


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation described by parsed ``memr2 eval`` arguments; return the results
    (``config``, ``summary``, ``categories``, ``episodes``, ``questions``) as plain JSON data."""
    from memenv.env import MemSessionEnv

    for name in ("episodes", "horizon", "slices", "max_questions", "batch", "reader_k", "max_new_tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    # Check every request before the slow parts (loading data or models).
    kind, path = _data_spec(args)
    _check_agent(args, has_gold=kind == "synthetic")
    reader_spec = _reader_spec(args)
    judge_spec = _split_spec(args.judge, "--judge") if args.judge else None

    conversations = _load_tasks(args, kind, path)
    horizon = args.horizon or (SYNTHETIC_DEFAULTS["horizon"] if kind == "synthetic" else max(c.num_sessions for c in conversations))
    slices = args.slices or (SYNTHETIC_DEFAULTS["slices"] if kind == "synthetic" else REAL_DATA_SLICES)
    reader, reader_info = _make_reader(args, reader_spec, _unknown_answer(kind))
    judge = _make_judge(args, judge_spec)
    agent, agent_name = _make_agent(args)

    envs = [
        MemSessionEnv(
            horizon=horizon, conversations=conversations, reader=reader, reward_mode=REWARD_MODE,
            max_questions=args.max_questions, question_seed=args.seed, slices_per_session=slices,
        )
        for _ in range(min(args.batch, len(conversations)))
    ]
    bar = _progress(total=len(conversations), desc=f"eval {agent_name}", unit="episode", disable=args.no_progress)
    episodes: list[EpisodeSummary] = []
    for start in range(0, len(conversations), len(envs)):
        tasks = [{"task": i} for i in range(start, min(start + len(envs), len(conversations)))]
        episodes += play_episodes(envs, agent, tasks, seed=args.seed, on_done=lambda _: bar.update(1))
    bar.close()

    questions = [dict(q, conv_id=e.conv_id) for e in episodes for q in e.qa]
    if kind == "locomo":
        _add_locomo_scores(questions)
    if judge is not None:
        for q in _progress(questions, desc="judge", unit="question", disable=args.no_progress):
            q["j"] = float(judge.judge(q["question"], q["answer"], q["prediction"]))
    config = {
        "agent": agent_name,
        "data": args.data,
        "kind": kind,
        "split": args.split or ("test" if kind == "locomo" else None),
        "drop_adversarial": bool(args.drop_adversarial),
        "episodes": len(conversations),
        "seed": args.seed,
        "horizon": horizon,
        "slices_per_session": slices,
        "max_questions": args.max_questions,
        "reward_mode": REWARD_MODE,
        "reader": reader_info,
        "judge": judge.info if judge is not None else None,
    }
    if args.noise is not None:
        config["noise"] = args.noise
    if isinstance(agent, PolicyAgent):
        config["policy"] = agent.settings()
    return {
        "config": config,
        "summary": _episode_summary(episodes, questions),
        "categories": _category_scores(questions, kind),
        "episodes": [
            {
                "conv_id": e.conv_id,
                "questions": len(e.qa),
                "f1": e.mean_f1,
                "reward": e.total_reward,
                "m_fail": e.m_fail[-1] if e.m_fail else None,
                "memory_size": e.memory_size,
                "memory_words": e.memory_words,
                "stats": e.stats,
            }
            for e in episodes
        ],
        "questions": questions,
    }


# ---------------------------------------------------------------------------------------------
# Building blocks of the command
# ---------------------------------------------------------------------------------------------


def _data_spec(args) -> tuple[str, str]:
    """``(kind, path)`` of ``--data``, checked together with ``--split`` and ``--drop-adversarial``."""
    kind, _, path = args.data.partition(":")
    if kind not in DATA_KINDS:
        raise EvalError(f"--data must be synthetic, locomo:PATH or longmemeval:PATH, got {args.data!r}")
    if kind == "synthetic" and path:
        raise EvalError("--data synthetic takes no path")
    if kind != "synthetic" and not path:
        raise EvalError(f"--data {kind} needs a path: --data {kind}:PATH")
    if args.split is not None and kind != "locomo":
        raise EvalError("--split applies to LoCoMo only")
    if args.drop_adversarial and kind != "locomo":
        raise EvalError("--drop-adversarial applies to LoCoMo only")
    return kind, path


def _load_tasks(args, kind: str, path: str) -> list:
    """The conversations to evaluate, one episode each."""
    if kind == "synthetic":
        from memenv.data.synthetic import SyntheticConfig, generate_conversations

        n = args.episodes or SYNTHETIC_DEFAULTS["episodes"]
        horizon = args.horizon or SYNTHETIC_DEFAULTS["horizon"]
        # As many sessions as the env would generate for itself (at least the default 40).
        config = SyntheticConfig(num_sessions=max(SyntheticConfig().num_sessions, horizon))
        return generate_conversations(n, seed=args.seed, config=config)
    if kind == "locomo":
        from memenv.data.locomo import load_locomo, locomo_split

        convs = load_locomo(path, drop_adversarial=args.drop_adversarial)
        split = args.split or "test"
        if split != "all":
            convs = locomo_split(convs, split)
    else:
        from memenv.data.longmemeval import load_longmemeval

        convs = load_longmemeval(path)
    if args.episodes is not None:
        convs = convs[: args.episodes]
    if not convs:
        raise EvalError(f"no conversations to evaluate in {args.data!r} (split {args.split or 'test'})")
    return convs


def _check_agent(args, has_gold: bool) -> None:
    """Refuse agents that cannot run on the data, and ``--noise`` for agents without it."""
    from agents.baselines import AGENTS, OracleAgent

    name = args.agent
    if args.noise is not None and name != "noisy-teacher":
        raise EvalError("--noise applies to --agent noisy-teacher only")
    if args.noise is not None and not 0.0 <= args.noise <= 1.0:
        raise EvalError(f"--noise must be in [0, 1], got {args.noise}")
    if name.startswith("checkpoint:"):
        path = Path(name.partition(":")[2]).expanduser()
        if not path.is_dir():
            raise EvalError(f"--agent {name}: the directory {str(path)!r} does not exist")
        return
    if name not in AGENTS:
        raise EvalError(f"unknown agent {name!r}; choose one of {', '.join(AGENTS)} or checkpoint:PATH")
    if issubclass(AGENTS[name], OracleAgent) and not has_gold:
        raise EvalError(
            f"agent {name!r} follows the gold operation log, which only synthetic tasks have; on real data "
            "use no-memory, store-turns or checkpoint:PATH"
        )


def _make_agent(args) -> tuple[Any, str]:
    """The agent for ``--agent`` (checked by :func:`_check_agent`) and its display name."""
    from agents.baselines import make_agent

    name = args.agent
    if name.startswith("checkpoint:"):
        return _load_policy_agent(name.partition(":")[2], args), name
    if name == "noisy-teacher":
        noise = 0.3 if args.noise is None else args.noise
        return make_agent(name, noise=noise, seed=args.seed), f"{name}({noise:g})"
    return make_agent(name), name


def _load_policy_agent(path: str, args) -> PolicyAgent:
    """A greedy :class:`PolicyAgent` on the ``SharedPolicy`` saved at ``path``.

    Settings the command line leaves unset come from what the checkpoint records (see
    :func:`checkpoint_settings`), so a policy is evaluated as it was trained.
    """
    from agents.policy import SharedPolicy

    directory = Path(path).expanduser()
    recorded = checkpoint_settings(directory)
    style = args.prompt_style or recorded["prompt_style"]
    max_new_tokens = args.max_new_tokens or recorded["max_new_tokens"]
    dtype = args.dtype or recorded["dtype"]
    device = _device(args.device)
    try:
        print(describe_dtype(dtype, device), file=sys.stderr)
        policy = SharedPolicy.from_pretrained(directory, device=device, prompt_style=style, dtype=dtype)
        if getattr(args, "backend", "hf") != "hf":
            from agents.policy.backends import choose_backend

            policy.backend = choose_backend(policy, args.backend, directory, device=device)
    except (ValueError, ImportError) as err:
        raise EvalError(f"--agent checkpoint:{path}: {err}") from err
    print(f"checkpoint policy: {style} prompts, up to {max_new_tokens} tokens per action", file=sys.stderr)
    return PolicyAgent(policy, max_new_tokens=max_new_tokens, name=f"checkpoint:{path}")


def checkpoint_settings(directory: str | Path) -> dict[str, Any]:
    """How the policy saved in ``directory`` was run, for the ``memr2 eval`` defaults.

    ``memr2 train`` records its prompt style and ``max_new_tokens`` in each policy's
    ``trainer_state.json``, ``memr2 sft`` in ``sft_report.json``; ``config.json`` holds the
    weights' dtype. Returns ``prompt_style`` (else ``"compact"``), ``max_new_tokens`` (else 256)
    and ``dtype``: ``"auto"`` for weights saved in bfloat16 (bfloat16 where the CPU has the
    instructions, float32 elsewhere), else ``None`` (float32 on CPU).
    """
    directory = Path(directory)
    recorded: dict[str, Any] = {}
    for name in ("sft_report.json", "trainer_state.json", "config.json"):  # later files win
        file = directory / name
        if file.is_file():
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise EvalError(f"--agent checkpoint:{directory}: {name} is not readable JSON ({err})") from err
            for key in ("prompt_style", "max_new_tokens", "dtype", "torch_dtype"):
                value = _find_key(data, key)
                if value is not None:
                    recorded[key] = value
    saved_dtype = recorded.get("dtype") or recorded.get("torch_dtype")
    return {
        "prompt_style": recorded.get("prompt_style") or "compact",
        "max_new_tokens": int(recorded.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
        "dtype": "auto" if saved_dtype == "bfloat16" else None,
    }


def _find_key(data: Any, key: str) -> Any:
    """``data[key]``, looked up at the top level and one level down (``{"config": {...}}``)."""
    if not isinstance(data, dict):
        return None
    if key in data:
        return data[key]
    return next((v[key] for v in data.values() if isinstance(v, dict) and key in v), None)


def _device(spec: str) -> str:
    if spec != "auto":
        return spec
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _unknown_answer(kind: str) -> str:
    """What a reader answers when the memory does not hold the answer, in the data's own terms
    (the synthetic tasks' abstention answer; LoCoMo's scorer rewards "Not mentioned ...")."""
    if kind == "synthetic":
        from memenv.data.synthetic import NONE_ANSWER

        return NONE_ANSWER
    from memenv.data.locomo import LOCOMO_ADVERSARIAL_ANSWER

    return LOCOMO_ADVERSARIAL_ANSWER


def _split_spec(spec: str, what: str) -> tuple[str, str]:
    url, sep, model = spec.rpartition("#")
    if not sep or not url or not model:
        raise EvalError(f"{what} must look like URL#MODEL (e.g. http://127.0.0.1:8000#Qwen/Qwen2.5-7B-Instruct), got {spec!r}")
    return url, model


def _api_key(args) -> str | None:
    if args.api_key_env is None:
        return None
    key = os.environ.get(args.api_key_env)
    if not key:
        raise EvalError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    return key


def _reader_spec(args) -> tuple[str, ...]:
    """``("extractive",)``, ``("hf", PATH)`` or ``("openai", URL, MODEL)`` from ``--reader``."""
    spec = args.reader
    if spec == "extractive":
        return (spec,)
    kind, _, target = spec.partition(":")
    if kind == "hf" and target:
        return kind, target
    if kind == "openai" and target:
        return (kind, *_split_spec(target, "--reader openai:"))
    raise EvalError(f"--reader must be extractive, hf:PATH or openai:URL#MODEL, got {spec!r}")


def _make_reader(args, spec: tuple[str, ...], unknown_answer: str) -> tuple[Any, dict]:
    """The reader for ``--reader`` and a description of it for ``results.json``."""
    if spec[0] == "extractive":
        from memenv.readers import ExtractiveReader

        return ExtractiveReader(none_answer=unknown_answer), {"reader": "extractive"}
    from memenv.llm_reader import HFReaderBackend, LLMReader, OpenAIReaderBackend

    if spec[0] == "hf":
        from agents.policy.precision import resolve_dtype

        device = _device(args.device)
        try:
            dtype = resolve_dtype(args.dtype, device)  # None: float32 on CPU, the checkpoint's own elsewhere
        except ValueError as err:
            raise EvalError(f"--dtype: {err}") from err
        backend = HFReaderBackend(spec[1], device=device, dtype=dtype, prefill_answer=args.reader_prefill)
    else:
        if args.reader_prefill:
            raise EvalError("--reader-prefill needs --reader hf:PATH (an OpenAI-compatible server owns its reply)")
        backend = OpenAIReaderBackend(spec[1], spec[2], api_key=_api_key(args))
    cache = args.reader_cache or (Path(args.out) / "reader_cache.json" if args.out else None)
    reader = LLMReader(backend, k=args.reader_k, cache_path=cache, on_missing_answer=args.reader_on_missing, unknown_answer=unknown_answer)
    return reader, reader.info


def _make_judge(args, spec: tuple[str, str] | None):
    if spec is None:
        return None
    from memenv.scoring import LLMJudge

    cache = Path(args.out) / "judge_cache.json" if args.out else None
    return LLMJudge(spec[0], spec[1], api_key=_api_key(args), cache_path=cache)


def _add_locomo_scores(questions: list[dict]) -> None:
    """Add the official LoCoMo F1 and NLTK BLEU-1 to each question record."""
    from memenv.scoring import locomo_f1, nltk_bleu1

    for q in questions:
        q["locomo_f1"] = locomo_f1(q["prediction"], q["answer"], q["category"])
        q["nltk_bleu1"] = nltk_bleu1(q["prediction"], q["answer"])


def _progress(iterable=None, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, file=sys.stderr, **kwargs)


# ---------------------------------------------------------------------------------------------
# Aggregation and tables
# ---------------------------------------------------------------------------------------------

#: question-level metrics: key in the records, column title
METRICS = (("f1", "F1"), ("bleu1", "BLEU-1"), ("locomo_f1", "LoCoMo F1"), ("nltk_bleu1", "NLTK BLEU-1"), ("j", "J"))


def _category_scores(questions: list[dict], kind: str) -> dict[str, dict[str, float]]:
    """Mean of every metric per category (LoCoMo categories in their numbered order), plus
    ``"all"``. Only metrics every question has are reported."""
    present = [key for key, _ in METRICS if questions and all(key in q for q in questions)]
    groups: dict[str, list[dict]] = {}
    for q in questions:
        groups.setdefault(q["category"], []).append(q)
    if kind == "locomo":
        from memenv.scoring import LOCOMO_CATEGORIES

        order = [c for c in LOCOMO_CATEGORIES.values() if c in groups]
    else:
        order = sorted(groups)
    out = {}
    for name, items in [(c, groups[c]) for c in order] + [("all", questions)]:
        out[name] = {"n": len(items), **{key: float(np.mean([q[key] for q in items])) if items else 0.0 for key in present}}
    return out


def _episode_summary(episodes: list[EpisodeSummary], questions: list[dict]) -> dict[str, Any]:
    """Memory and operation statistics averaged over episodes; M-Fail pooled over questions."""
    evidence = sum(len(q["evidence"]) for q in questions)
    # Final mode scores once per episode, so an episode's M-Fail covers exactly its questions.
    missed = sum(e.m_fail[-1] * sum(len(q["evidence"]) for q in e.qa) for e in episodes if e.m_fail)
    mean = lambda values: float(np.mean(values)) if len(values) else 0.0  # noqa: E731
    return {
        "episodes": len(episodes),
        "questions": len(questions),
        "f1": mean([q["f1"] for q in questions]),
        "reward": mean([e.total_reward for e in episodes]),
        "m_fail": missed / evidence if evidence else None,
        "memory_size": mean([e.memory_size for e in episodes]),
        "memory_words": mean([e.memory_words for e in episodes]),
        "ops": {k: mean([e.stats.get(k, 0) for e in episodes]) for k in OP_COUNTS},
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def format_results(results: dict[str, Any]) -> str:
    """The markdown report of :func:`evaluate`'s results: a line on the setup, the
    per-category table and the memory table."""
    cfg, summary, cats = results["config"], results["summary"], results["categories"]
    reader = cfg["reader"].get("backend", cfg["reader"]["reader"])
    lines = [
        f"## {cfg['agent']} on {cfg['kind']}" + (f" ({cfg['split']})" if cfg.get("split") else ""),
        "",
        f"{cfg['episodes']} episodes, {summary['questions']} questions, horizon {cfg['horizon']}, "
        f"{cfg['slices_per_session']} slices per session, reader {reader}, {cfg['reward_mode']} scoring"
        + (", category 5 dropped" if cfg.get("drop_adversarial") else "")
        + (f", at most {cfg['max_questions']} questions per conversation" if cfg.get("max_questions") else ""),
        "",
    ]
    keys = [(k, t) for k, t in METRICS if k in cats.get("all", {})]
    lines.append("| category | n | " + " | ".join(t for _, t in keys) + " |")
    lines.append("|---|---:|" + "---:|" * len(keys))
    for name, row in cats.items():
        label = f"**{name}**" if name == "all" else name
        lines.append(f"| {label} | {row['n']} | " + " | ".join(_pct(row[k]) for k, _ in keys) + " |")
    ops = summary["ops"]
    lines += [
        "",
        "| M-Fail | entries | words | ADD | UPDATE | DELETE | NOOP | skipped ops | parse errors | reward |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {_pct(summary['m_fail'])} | {summary['memory_size']:.1f} | {summary['memory_words']:.0f} | "
        f"{ops['adds']:.1f} | {ops['updates']:.1f} | {ops['deletes']:.1f} | {ops['noops']:.1f} | "
        f"{ops['invalid_ops']:.1f} | {ops['parse_errors']:.1f} | {summary['reward']:.3f} |",
        "",
        "Scores in %; memory and operation counts are means per episode; M-Fail pools the evidence turns of all questions.",
    ]
    return "\n".join(lines)
