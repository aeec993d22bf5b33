"""Throughput of the batched rollout engine.

Compares generated tokens per second of

* the engine with continuous batching (the default): each env steps as soon as its own action is
  complete and its next prompt joins the running batch;
* the same engine with every prompt prefilled whole, without reusing the keys and values of
  the role prefixes (chat markers and system prompt), to show what that reuse buys;
* the engine in lockstep mode: N environments, one batched ``generate`` call per step;
* the ceiling: one big ``generate`` call over ``--rows`` first-step prompts (no env at all),
  forced to ``max_new_tokens`` per row: the model's decode throughput at this batch width;
* the same-work ceiling: every prompt the engine ran, ``--rows`` per ``generate`` call, forced
  to the engine's mean completion length: the same prefill and decode work with no env and no
  waiting, so the engine's ratio to it is what scheduling costs;
* plain ``generate`` over the same prompts: every prompt the engine ran, ``--rows`` per call,
  sampled like the engine (stop at end of turn, ``max_new_tokens``); the issue's "one big
  ``generate`` call over the same prompts" at the engine's batch width. Every row of a call
  waits for its longest completion, which is what continuous batching removes;
* a naive loop: the same episodes, one environment and one generation call at a time;

and reports the share of the engine's wall time spent inside the environments, the prompt tokens
per generated token, the mean number of rows per decode step and the bound that the longest
episode puts on any scheduler (an env's actions are sequential). Targets: at least 0.8x the
ceiling, env time under 5% of rollout time with the tiny model. All figures are ratios measured
in this one run: each run is divided by ceiling runs made just before and after it, because
the speed of a shared machine drifts (median over ``--repeats`` for the engine).

``--envs`` rollouts share ``--rows`` batch rows (the engine's ``max_batch``; default: one row per
env). With one row per env, the longest episode bounds the ratio (above); with more envs than
rows, envs queue for a free row, as LoGo-GRPO's many short local reruns do in training.

    python benchmarks/rollout_perf.py [--model DIR] [--envs 16] [--rows 16] [--horizon 2] [--max-new-tokens 128] [--repeats 2]

Without ``--model`` a warm-started tiny model is built first (about a minute), so that
completions have realistic lengths (a random model never stops before ``max_new_tokens``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="policy directory (default: warm-start a tiny model)")
    ap.add_argument("--envs", type=int, default=16, help="rollouts, all started at once")
    ap.add_argument("--rows", type=int, default=None, help="batch rows, the engine's max_batch (default: --envs)")
    ap.add_argument("--horizon", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2, help="runs of the engine and the same-work ceiling (median ratio)")
    args = ap.parse_args()
    rows = args.rows or args.envs

    import torch

    from agents.generation.interface import left_pad
    from agents.policy import SharedPolicy
    from agents.generation.rollout import RolloutEngine, Start
    from agents.presets import PRESETS, task_seeds, make_env_fn

    torch.set_num_threads(max(1, torch.get_num_threads()))
    preset = PRESETS["tiny"]
    seeds = task_seeds(0, preset)
    model_dir = args.model
    if model_dir is None:
        from agents.commands.sft import warm_start

        model_dir = Path(tempfile.mkdtemp()) / "warm"
        warm_start(model_dir, PRESETS["smoke"], seed=0, task_seeds=seeds["sft"][:4], eval_seeds=seeds["val"][:1], progress=False)
    policy = SharedPolicy.from_pretrained(model_dir, prompt_style=preset.prompt_style)
    env_fn = make_env_fn(preset, args.horizon, seeds["train"])
    starts = [Start(options={"task": i % len(seeds["train"])}) for i in range(args.envs)]

    def engine_run(continuous: bool):
        engine = RolloutEngine(
            policy, env_fn, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
            save_states=False, continuous=continuous, max_batch=rows,
        )
        t = time.perf_counter()
        records = engine.run(starts, seed=0)
        wall = time.perf_counter() - t
        tokens = sum(r.generated_tokens for r in records)
        return records, tokens / wall, engine.timing["env_s"] / wall, engine, tokens

    def sampled_generate(prompts) -> tuple[int, float]:
        """One generate call over ``prompts``, sampled as the engine samples: (useful tokens, seconds)."""
        t = time.perf_counter()
        outputs = policy.backend.generate(prompts, temperature=args.temperature, top_p=1.0, max_new_tokens=args.max_new_tokens, seed=0)
        return sum(len(ids) for ids, _, _ in outputs), time.perf_counter() - t

    def forced_generate(prompts, new_tokens: int) -> tuple[int, float]:
        """One generate call over ``prompts``, every row forced to ``new_tokens``: (tokens, seconds)."""
        ids, mask = left_pad(prompts, policy.pad_id, policy.model.device)
        t = time.perf_counter()
        with torch.no_grad():
            out = policy.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=max(args.temperature, 1e-5), top_k=0,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=policy.pad_id,
            )
        return (out.shape[1] - ids.shape[1]) * len(prompts), time.perf_counter() - t

    # Warm-up on the same tasks: generating a synthetic conversation (about 35 ms) happens once
    # per task and process, and a trainer resets on the same tasks over and over.
    warmup = RolloutEngine(policy, env_fn, max_new_tokens=8, save_states=False).run(starts, seed=1)

    # The speed of a shared machine drifts by up to 2x within minutes, so a ratio is only fair
    # between runs made close together: every repeat brackets the engine and the same-work
    # ceiling with ceiling runs (a few seconds each) and divides by their mean. The table shows
    # the median ratio over --repeats and the best tokens/s of each. Runs are seeded, so every
    # repeat does exactly the same work.
    def ceiling_tps() -> float:
        # One plain generate call over the first-step prompts of `rows` envs, forced to
        # max_new_tokens in every row (no early stop, no padding rows): the model's decode
        # throughput at this batch width with one prefill per max_new_tokens tokens.
        n, seconds = forced_generate(first, args.max_new_tokens)
        return n / seconds

    first = [r.turns[0].prompt_ids for r in warmup if r.turns][:rows]
    best = {"engine": 0.0, "ceiling": 0.0, "same_work": 0.0}
    ratios: dict[str, list[float]] = {"engine": [], "same_work": []}
    for _ in range(args.repeats):
        before = ceiling_tps()
        records, engine_tps, env_share, engine, tokens = engine_run(True)  # continuous batching
        between = ceiling_tps()

        # Same-work ceiling: every prompt the engine ran, in its order, `rows` per generate call,
        # each row forced to the engine's mean completion length: the same prefill and about the
        # same decode work, but no env in the loop and no turn waiting for the previous one.
        turns = [t for r in records for t in r.turns]
        mean_completion = max(1, round(tokens / len(turns)))
        done = [forced_generate([t.prompt_ids for t in turns[i : i + rows]], mean_completion) for i in range(0, len(turns), rows)]
        same_work_tps = sum(n for n, _ in done) / sum(s for _, s in done)
        after = ceiling_tps()

        ratios["engine"].append(engine_tps / ((before + between) / 2))
        ratios["same_work"].append(same_work_tps / ((between + after) / 2))
        for name, value in (("engine", engine_tps), ("ceiling", max(before, between, after)), ("same_work", same_work_tps)):
            best[name] = max(best[name], value)
    ratio = {name: statistics.median(values) for name, values in ratios.items()}
    ratio["ceiling"] = 1.0

    def bracketed(name: str, run) -> float:
        """Tokens/s of ``run()``, and its ratio to the mean of ceiling runs just before and after."""
        before = ceiling_tps()
        tps = run()
        ratio[name] = tps / ((before + ceiling_tps()) / 2)
        return tps

    def plain_run() -> float:
        # Plain generate over the same prompts, `rows` per call, natural stops.
        done = [sampled_generate([t.prompt_ids for t in turns[i : i + rows]]) for i in range(0, len(turns), rows)]
        return sum(n for n, _ in done) / sum(s for _, s in done)

    def lockstep_run() -> float:
        # One generate call per step over every env's pending prompt.
        nonlocal lockstep, lockstep_env_share
        _, tps, lockstep_env_share, lockstep, _ = engine_run(False)
        return tps

    naive_envs = max(2, args.envs // 4)

    def naive_run() -> float:
        # The same episodes, one env and one generate call at a time.
        naive = RolloutEngine(policy, env_fn, temperature=args.temperature, max_new_tokens=args.max_new_tokens, save_states=False, continuous=False)
        t = time.perf_counter()
        naive_tokens = sum(r.generated_tokens for s in starts[:naive_envs] for r in naive.run([s], seed=0))
        return naive_tokens / (time.perf_counter() - t)

    def whole_prompts_run() -> float:
        # The continuous engine with every prompt prefilled whole: the role prefixes' keys and
        # values are not reused.
        policy.share_role_prefixes = False
        try:
            return engine_run(True)[1]
        finally:
            policy.share_role_prefixes = True

    lockstep = lockstep_env_share = None
    whole_tps = bracketed("whole", whole_prompts_run)
    plain_tps = bracketed("plain", plain_run)
    lockstep_tps = bracketed("lockstep", lockstep_run)
    naive_tps = bracketed("naive", naive_run)

    print(f"model: {model_dir}  envs: {args.envs}  rows: {rows}  horizon: {args.horizon}  max_new_tokens: {args.max_new_tokens}  repeats: {args.repeats}")
    print("| rollout | generated tokens/s | vs ceiling |")
    print("|---|---:|---:|")
    table = [
        (f"one big generate call, {rows} first-step prompts, {args.max_new_tokens} tokens per row (ceiling)", best["ceiling"], "ceiling"),
        (f"every prompt the engine ran, {rows} per generate call, mean completion length (same-work ceiling)", best["same_work"], "same_work"),
        (f"every prompt the engine ran, {rows} per generate call, sampled like the engine (plain generate)", plain_tps, "plain"),
        (f"rollout engine, continuous batching ({args.envs} envs, {rows} rows)", best["engine"], "engine"),
        ("rollout engine, continuous batching, every prompt prefilled whole (no shared role prefix)", whole_tps, "whole"),
        (f"rollout engine, lockstep ({args.envs} envs, generate calls of at most {rows})", lockstep_tps, "lockstep"),
        (f"naive per-env loop ({naive_envs} envs)", naive_tps, "naive"),
    ]
    for label, tps, name in table:
        print(f"| {label} | {tps:,.0f} | {ratio[name]:.2f}x |")
    print(
        "\n(tokens/s: best run; vs ceiling: each run against ceiling runs just before and after it, the median over "
        f"{args.repeats} repeats for the engine and the same-work ceiling; engine per repeat: "
        + ", ".join(f"{r:.2f}x" for r in ratios["engine"])
        + ". The engines and the loop count useful tokens; the ceilings count every forced token.)"
    )

    # Where the engine's time goes. An env's actions are sequential (each prompt needs the env's
    # reply to the previous action), so no scheduler can take fewer decode steps than the longest
    # episode has tokens, nor fewer than the decoded tokens spread over every row; no schedule
    # averages more rows per decode step than that allows.
    timing = engine.timing
    decode_steps = timing["forward_calls"] - timing["prefill_calls"]
    decoded = tokens - len(turns)  # each completion's first token comes from its prefill
    longest = max(r.generated_tokens - len(r.turns) for r in records)
    fewest = max(longest, decoded / rows)
    print(f"\nengine / same-work ceiling: {ratio['engine'] / ratio['same_work']:.2f}x; engine / plain generate: {ratio['engine'] / ratio['plain']:.2f}x")
    print(
        f"continuous engine: {len(turns)} actions, {tokens} generated tokens, {timing['prefill_tokens']} prompt tokens run "
        f"({timing['prefill_tokens'] / tokens:.1f} per generated token; {timing['prefix_tokens']} more taken from the shared "
        f"role prefixes), {timing['prefill_calls']} prefill calls, {timing['takeovers']} rows taken over in place, "
        f"{decode_steps} decode steps with {decoded / max(1, decode_steps):.1f} of {rows} rows on average"
    )
    print(
        f"longest episode: {longest} decode steps; all {rows} rows busy: {decoded / rows:.0f}; so any scheduler needs at "
        f"least {fewest:.0f} decode steps and averages at most {decoded / fewest:.1f} rows per step, "
        f"{decoded / (rows * fewest):.2f} of the ceiling's {rows}"
    )
    print(f"env time: {env_share:.1%} of the continuous engine's rollout time ({timing['forward_calls']} forward calls)")
    print(f"env time: {lockstep_env_share:.1%} of the lockstep engine's rollout time ({lockstep.timing['calls']} generate calls)")


if __name__ == "__main__":
    main()
