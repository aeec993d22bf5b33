"""Held-out F1 of trained policies against the warm start and the scripted baselines, with 95%
bootstrap confidence intervals over conversations.

Every agent plays the same held-out synthetic conversations (the run seed's test tasks, which
neither the warm start nor RL trained on) in the environment ``memr2 train`` builds for the
preset (slices, turns per session, final-mode scoring), at ``--horizon`` sessions. Policies decode
greedily. For each agent: mean F1 with a percentile-bootstrap 95% CI over conversations; for
each checkpoint after the first: the paired difference to the first one (same conversations),
with its own bootstrap CI, which is what "RL improved on the warm start" has to clear.

    python benchmarks/held_out.py --preset small --episodes 16 --horizon 8 \\
        --checkpoint warm=runs/small-logo-grpo-s0/warm_start --checkpoint rl=runs/small-logo-grpo-s0/final \\
        --out runs/held-out-small

``--tool-checkpoint NAME=DIR`` adds a chat model trained through TRL (``examples/trl_sft.py``,
``examples/trl_grpo.py``). It plays the same conversations in the same env with the manager reading
the raw turns (``single_agent=True``, the env ``MemoryToolEnv`` wraps), writing tool calls, decoded
greedily by ``agents.trl_play``; its F1 is scored on the final memory exactly as the others', so
its paired differences are computed like theirs. Its "parse errors" are the replies written before
the conversation was over that did not parse into a tool call.

Writes ``held_out.json`` and ``held_out.md`` under ``--out``. Agents evaluated in separate calls
on the same conversations (say one RL seed per call) merge into one report, with paired
differences and the difference of the seeds' mean, by
``python benchmarks/held_out.py --combine A/held_out.json B/held_out.json ... --out DIR``.
``--combine ... --pool`` also merges reports of different sets of conversations (other
``--seed`` values) into one, for more conversations than one run seed's test set holds.
``--group logo=rl-s1,rl-s2 --group grpo=grpo-s1,grpo-s2`` (with either mode) also reports each
group's seed mean against the first checkpoint and the paired difference between groups (say
LoGo-GRPO against GRPO). These bootstrap CIs resample conversations for the seeds at hand; they
do not cover the spread between seeds, which the per-seed rows show.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from agents.commands.sweep import bootstrap_ci


def main() -> None:
    from agents.baselines import NoisyTeacher, NoMemoryAgent, OracleAgent
    from agents.commands.sft import agent_final_score
    from agents.policy import SharedPolicy
    from agents.presets import PRESETS, make_env_fn, task_seeds
    from agents.rl.curriculum import validate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0, help="run seed whose test conversations are played")
    parser.add_argument("--episodes", type=int, default=16, help="held-out conversations (at most the preset's n_test)")
    parser.add_argument("--horizon", type=int, default=8)
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR", help="a SharedPolicy directory (repeatable)")
    parser.add_argument("--tool-checkpoint", action="append", default=[], metavar="NAME=DIR",
                        help="a tool-calling chat model trained through TRL (examples/trl_sft.py, examples/trl_grpo.py), played "
                             "through MemoryToolEnv's tools on the same conversations (repeatable; after the --checkpoint ones)")
    parser.add_argument("--dtype", default=None, help="dtype of the checkpoints (default: the preset's)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="most tokens per action (default: the preset's)")
    parser.add_argument("--device", default="cpu", help="torch device of the checkpoints (cpu, cuda)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                        help="merge these held_out.json files (same conversations) instead of evaluating")
    parser.add_argument("--pool", action="store_true",
                        help="with --combine: pool reports of different conversation sets (--seed) into one")
    parser.add_argument("--group", action="append", default=[], metavar="NAME=A,B,...",
                        help="report the mean of these checkpoints (e.g. one algorithm's seeds) as a group (repeatable)")
    args = parser.parse_args()
    groups = parse_groups(args.group)
    if args.combine:
        combine(args.combine, args.out, groups, pool=args.pool)
        return

    names = [spec.partition("=")[0] for spec in args.checkpoint + args.tool_checkpoint]
    check_groups(groups, names)  # before hours of evaluation
    preset = PRESETS[args.preset]
    max_new_tokens = args.max_new_tokens or preset.max_new_tokens
    seeds = task_seeds(args.seed, preset)["test"]
    if not 1 <= args.episodes <= len(seeds):
        raise SystemExit(f"--episodes must be between 1 and {len(seeds)} (the preset's n_test)")
    env_fn = make_env_fn(preset, args.horizon, seeds)
    tasks = range(args.episodes)
    rows: dict[str, dict] = {}
    for name, agent in (("no memory", NoMemoryAgent()), (f"noisy teacher ({preset.teacher_noise:g})", NoisyTeacher(noise=preset.teacher_noise, seed=args.seed)), ("oracle", OracleAgent())):
        rows[name] = agent_final_score(agent, env_fn, tasks, per_task=True)
    for spec in args.checkpoint:
        name, _, path = spec.partition("=")
        policy = SharedPolicy.from_pretrained(path, device=args.device, prompt_style=preset.prompt_style, dtype=args.dtype or preset.dtype)
        t = time.perf_counter()
        rows[name] = validate(policy, env_fn, tasks, max_new_tokens=max_new_tokens, per_task=True, max_batch=preset.rollout_batch)
        rows[name]["wall_s"] = time.perf_counter() - t
        print(f"{name}: F1 {rows[name]['f1']:.3f} ({rows[name]['wall_s']:.0f} s)", flush=True)
    if args.tool_checkpoint:
        from agents.trl_play import load_tool_model, tool_final_score

        tool_env_fn = make_env_fn(preset, args.horizon, seeds, single_agent=True)  # the same tasks, the manager reads raw turns
    for spec in args.tool_checkpoint:
        name, _, path = spec.partition("=")
        model, tokenizer = load_tool_model(path, dtype=args.dtype or "float32", device=args.device)
        t = time.perf_counter()
        rows[name] = tool_final_score(model, tokenizer, tool_env_fn, tasks, max_new_tokens=max_new_tokens)
        rows[name]["wall_s"] = time.perf_counter() - t
        print(f"{name}: F1 {rows[name]['f1']:.3f}, replies with a tool call {rows[name]['reply_parse_rate']:.1%} "
              f"({rows[name]['wall_s']:.0f} s)", flush=True)

    meta = {"preset": args.preset, "seed": args.seed, "episodes": args.episodes, "horizon": args.horizon,
            "slices": preset.slices_per_session, "max_new_tokens": max_new_tokens}
    write_report(rows, names, meta, args.out, {k: str(v) for k, v in vars(args).items()}, groups)


def parse_groups(specs: list[str]) -> dict[str, list[str]]:
    """``["logo=a,b", "grpo=c"]`` -> ``{"logo": ["a", "b"], "grpo": ["c"]}``."""
    groups: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, members = spec.partition("=")
        name, names = name.strip(), [m.strip() for m in members.split(",") if m.strip()]
        if not sep or not name or not names:
            raise SystemExit(f"--group {spec!r}: expected NAME=CHECKPOINT,CHECKPOINT,...")
        if name in groups:
            raise SystemExit(f"--group {name!r} is given twice")
        groups[name] = names
    return groups


def check_groups(groups: dict[str, list[str]], names: list[str]) -> None:
    """Every group member must be a checkpoint after the first (the base of the differences)."""
    for group, members in groups.items():
        unknown = [m for m in members if m not in names[1:]]
        if unknown:
            raise SystemExit(f"--group {group}: {', '.join(unknown)} is not a checkpoint after the first "
                             f"(checkpoints: {', '.join(names) or 'none'})")


def write_report(rows: dict, names: list[str], meta: dict, out: Path, args: dict,
                 groups: dict[str, list[str]] | None = None) -> None:
    """Write ``held_out.json`` and ``held_out.md``: per-agent F1 with bootstrap CIs, then the paired
    difference of every checkpoint after the first to the first; with three or more checkpoints,
    also the difference of their per-conversation mean (e.g. several RL seeds) to the first. With
    ``groups`` (name -> checkpoints), each group's per-conversation mean against the first
    checkpoint instead, and the paired difference of every two groups."""
    groups = groups or {}
    check_groups(groups, names)
    limit = meta.get("max_new_tokens")  # absent from reports written before it was recorded
    decoding = "greedy decoding" if limit is None else f"greedy decoding of at most {limit} tokens per action"
    lines = [
        f"Preset `{meta['preset']}`, {_seeds(meta['seed'])}: {meta['episodes']} held-out test conversations, horizon "
        f"{meta['horizon']}, {meta['slices']} slices per session, {decoding}, final-mode F1 (extractive reader).",
        "",
        "| agent | F1 | 95% CI | memory entries | parse errors | truncated |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lo, hi = bootstrap_ci(row["f1_per_task"])
        row["ci95"] = [lo, hi]
        parse, cut = (("-" if row.get(k) is None else f"{row[k]:.1%}") for k in ("parse_error_rate", "truncated_rate"))
        lines.append(f"| {name} | {row['f1']:.3f} | [{lo:.3f}, {hi:.3f}] | {row['memory_size']:.1f} | {parse} | {cut} |")
    summary, group_summary = {}, {}
    if len(names) > 1:
        lines += ["", "| paired difference (same conversations) | mean | 95% CI |", "|---|---:|---:|"]
        base = np.asarray(rows[names[0]]["f1_per_task"])

        def difference(label: str, diff: np.ndarray) -> dict:
            lo, hi = bootstrap_ci(diff)
            lines.append(f"| {label} | {diff.mean():+.3f} | [{lo:+.3f}, {hi:+.3f}] |")
            return {"mean": float(diff.mean()), "ci95": [lo, hi]}

        for name in names[1:]:
            diff = np.asarray(rows[name]["f1_per_task"]) - base
            rows[name]["diff_to_" + names[0]] = difference(f"{name} - {names[0]}", diff)
        def seed_mean(members: list[str]) -> np.ndarray:
            return np.mean([rows[name]["f1_per_task"] for name in members], axis=0)

        if len(names) > 2 and not groups:
            label = f"mean of {', '.join(names[1:])} - {names[0]}"
            summary = {"label": label, **difference(label, seed_mean(names[1:]) - base)}
        for group, members in groups.items():
            label = f"{group} (mean of {', '.join(members)}) - {names[0]}"
            group_summary[group] = {"label": label, "members": members, **difference(label, seed_mean(members) - base)}
        for first, second in itertools.combinations(groups, 2):
            label = f"{first} - {second}"
            group_summary[label] = {"label": label, **difference(label, seed_mean(groups[first]) - seed_mean(groups[second]))}
    out.mkdir(parents=True, exist_ok=True)
    (out / "held_out.json").write_text(json.dumps({"args": args, "meta": meta, "checkpoints": names, "rows": rows, "pooled": summary,
                                                   "groups": group_summary}, indent=2))
    (out / "held_out.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _seeds(seed: int | list[int]) -> str:
    """Whose test conversations a report holds: ``run seed 0``, or ``run seeds 0 and 9`` pooled."""
    if not isinstance(seed, list):
        return f"run seed {seed}"
    return "run seeds " + ", ".join(map(str, seed[:-1])) + f" and {seed[-1]}"


def combine(paths: list[Path], out: Path, groups: dict[str, list[str]] | None = None, pool: bool = False) -> None:
    """Merge several ``held_out.json`` files of the same conversations into one report (agents
    evaluated in separate calls, e.g. one RL seed per call); the first file's first checkpoint is
    the base of the paired differences.

    With ``pool``, the files may cover several sets of conversations (different ``--seed``, all
    else equal): each set is merged as above, then the agents present in every set are pooled,
    their per-conversation F1 concatenated (so the CIs resample all the conversations) and their
    other figures averaged with the number of conversations as weights."""
    sets: dict[str, tuple[dict, list[str], dict]] = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise SystemExit(f"{path}: not a readable held_out.json ({err})") from err
        this = data.get("meta")
        if this is None:
            raise SystemExit(f"{path}: no 'meta' entry; rerun held_out.py to make it")
        key = json.dumps(this, sort_keys=True)
        if sets and key not in sets and not pool:
            first = next(iter(sets.values()))[2]
            raise SystemExit(f"{path}: played {this}, not the same conversations as the first file ({first}); "
                             "--pool merges different sets of conversations")
        rows, names, _ = sets.setdefault(key, ({}, [], this))
        for name, row in data["rows"].items():
            if name in rows:
                continue
            rows[name] = row
            if name in data.get("checkpoints", []):
                names.append(name)
    rows, names, meta = pool_sets(list(sets.values())) if len(sets) > 1 else next(iter(sets.values()))
    write_report(rows, names, meta, out, {"combine": [str(p) for p in paths], "pool": pool, "out": str(out)}, groups)


def pool_sets(sets: list[tuple[dict, list[str], dict]]) -> tuple[dict, list[str], dict]:
    """Pool reports of different conversation sets: see :func:`combine`."""
    meta = sets[0][2]
    same = {k: v for k, v in meta.items() if k not in ("seed", "episodes")}
    for _, _, other in sets[1:]:
        if {k: v for k, v in other.items() if k not in ("seed", "episodes")} != same:
            raise SystemExit(f"--pool: {other} and {meta} differ in more than the conversations (seed, episodes)")
    seeds = [m["seed"] for _, _, m in sets]
    if len(set(map(str, seeds))) != len(seeds):
        raise SystemExit(f"--pool: two reports of the same conversations (seed {seeds}) differ in what they hold")
    names = [n for n in sets[0][1] if all(n in s[1] for s in sets)]
    dropped = sorted({n for s in sets for n in s[1]} - set(names))
    if dropped:
        print(f"--pool: left out {', '.join(dropped)} (not evaluated on every set)")
    rows = {}
    for name in (n for n in sets[0][0] if all(n in s[0] for s in sets)):
        parts = [s[0][name] for s in sets]
        sizes = [len(p["f1_per_task"]) for p in parts]
        row = {"f1_per_task": [x for p in parts for x in p["f1_per_task"]]}
        for key in parts[0]:
            values = [p.get(key) for p in parts]
            if key in row or key == "wall_s" or not all(isinstance(v, (int, float)) for v in values):
                continue
            row[key] = float(np.average(values, weights=sizes))
        rows[name] = row
    return rows, names, {**meta, "seed": seeds, "episodes": sum(m["episodes"] for _, _, m in sets)}


if __name__ == "__main__":
    main()
