"""Throughput of the batched rollout engine.

Compares generated tokens per second of

* the engine with continuous batching (the default): each env steps as soon as its own action is
  complete and its next prompt joins the running batch;
* the engine in lockstep mode: N environments, one batched ``generate`` call per step;
* the ceiling: one big ``generate`` call over the same first-step prompts (no env at all);
* a naive loop: the same episodes, one environment and one generation call at a time;

and reports the share of the engine's wall time spent inside the environments. Targets: at
least 0.8x the ceiling, env time under 5% of rollout time with the tiny model. All figures are
ratios measured in this one run.

    python benchmarks/rollout_perf.py [--model DIR] [--envs 16] [--horizon 2] [--max-new-tokens 128]

Without ``--model`` a warm-started tiny model is built first (about a minute), so that
completions have realistic lengths (a random model never stops before ``max_new_tokens``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="policy directory (default: warm-start a tiny model)")
    ap.add_argument("--envs", type=int, default=16)
    ap.add_argument("--horizon", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    args = ap.parse_args()

    import torch

    from agents.policy import SharedPolicy
    from agents.rollout import RolloutEngine, Start
    from agents.train import PRESETS, _task_seeds, make_env_fn

    torch.set_num_threads(max(1, torch.get_num_threads()))
    preset = PRESETS["tiny"]
    seeds = _task_seeds(0, preset)
    model_dir = args.model
    if model_dir is None:
        from agents.sft import warm_start

        model_dir = Path(tempfile.mkdtemp()) / "warm"
        warm_start(model_dir, PRESETS["smoke"], seed=0, task_seeds=seeds["sft"][:4], eval_seeds=seeds["val"][:1], progress=False)
    policy = SharedPolicy.from_pretrained(model_dir, prompt_style=preset.prompt_style)
    env_fn = make_env_fn(preset, args.horizon, seeds["train"])
    starts = [Start(options={"task": i % len(seeds["train"])}) for i in range(args.envs)]

    def engine_run(continuous: bool):
        engine = RolloutEngine(
            policy, env_fn, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
            save_states=False, continuous=continuous,
        )
        t = time.perf_counter()
        records = engine.run(starts, seed=0)
        wall = time.perf_counter() - t
        tokens = sum(r.generated_tokens for r in records)
        return records, tokens / wall, engine.timing["env_s"] / wall, engine, tokens

    # Warm-up on the same tasks: generating a synthetic conversation (about 35 ms) happens once
    # per task and process, and a trainer resets on the same tasks over and over.
    RolloutEngine(policy, env_fn, max_new_tokens=8, save_states=False).run(starts, seed=1)

    # Engine: continuous batching (the default), then lockstep (one generate call per step).
    records, engine_tps, env_share, engine, tokens = engine_run(True)
    _, lockstep_tps, lockstep_env_share, lockstep, _ = engine_run(False)

    # Ceiling: one plain model.generate call over the first-step prompts of every env, forced to
    # generate max_new_tokens for every row (no early stop, nothing wasted on padding rows).
    from agents.backends import left_pad

    first = [r.turns[0].prompt_ids for r in records if r.turns]
    ids, mask = left_pad(first, policy.pad_id, policy.model.device)
    t = time.perf_counter()
    with torch.no_grad():
        out = policy.model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=max(args.temperature, 1e-5), top_k=0,
            max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, pad_token_id=policy.pad_id,
        )
    ceiling_tps = (out.shape[1] - ids.shape[1]) * len(first) / (time.perf_counter() - t)

    # Naive: one env at a time, one prompt per call (a subset of envs, scaled).
    naive_envs = max(2, args.envs // 4)
    naive = RolloutEngine(policy, env_fn, temperature=args.temperature, max_new_tokens=args.max_new_tokens, save_states=False, continuous=False)
    t = time.perf_counter()
    naive_tokens = 0
    for s in starts[:naive_envs]:
        naive_tokens += sum(r.generated_tokens for r in naive.run([s], seed=0))
    naive_tps = naive_tokens / (time.perf_counter() - t)

    print(f"model: {model_dir}  envs: {args.envs}  horizon: {args.horizon}  max_new_tokens: {args.max_new_tokens}")
    print("| rollout | generated tokens/s | vs ceiling |")
    print("|---|---:|---:|")
    print(f"| one big generate call (ceiling) | {ceiling_tps:,.0f} | 1.00x |")
    print(f"| rollout engine, continuous batching ({args.envs} envs) | {engine_tps:,.0f} | {engine_tps / ceiling_tps:.2f}x |")
    print(f"| rollout engine, lockstep ({args.envs} envs, one generate call per step) | {lockstep_tps:,.0f} | {lockstep_tps / ceiling_tps:.2f}x |")
    print(f"| naive per-env loop ({naive_envs} envs) | {naive_tps:,.0f} | {naive_tps / ceiling_tps:.2f}x |")
    print("\n(the engines and the loop count useful tokens; the ceiling generates max_new_tokens in every row)")
    print(f"env time: {env_share:.1%} of the continuous engine's rollout time ({engine.timing['forward_calls']} forward calls, {tokens} tokens)")
    print(f"env time: {lockstep_env_share:.1%} of the lockstep engine's rollout time ({lockstep.timing['calls']} generate calls)")


if __name__ == "__main__":
    main()
