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

``--compare-transformers N`` prints another table instead: our continuous batching
(``HFBackend.generate_continuous``) against transformers' own (``ContinuousBatchingManager``
with its paged KV cache, what ``model.generate_batch`` runs) on the same N fixed prompts (taken
from a warm-up rollout, no env stepping), greedy and at ``--temperature``: generated tokens/s
of both (best of ``--repeats``, the two engines alternating), their ratio, and whether the
greedy completions are token for token the same.

    python benchmarks/rollout_perf.py --compare-transformers 16 [--model DIR] [--rows 16] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None,
                    help="policy directory (default: warm-start a tiny model; with --preset small: SmolLM2, imported on first use)")
    ap.add_argument("--preset", default="tiny", help="whose prompt style and task sizes to use (tiny, small, ...)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="weight dtype (see memr2 train --dtype)")
    ap.add_argument("--envs", type=int, default=16, help="rollouts, all started at once")
    ap.add_argument("--rows", type=int, default=None, help="batch rows, the engine's max_batch (default: --envs)")
    ap.add_argument("--horizon", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2, help="runs of the engine and the same-work ceiling (median ratio)")
    ap.add_argument("--compare-transformers", type=int, default=0, metavar="N",
                    help="instead of the table: N fixed prompts through transformers' continuous batching and ours")
    ap.add_argument("--compare-backends", type=int, default=0, metavar="N",
                    help="instead of the table: N fixed prompts and --envs rollouts through the vLLM backend and the HF ones")
    ap.add_argument("--logprob-gap", type=int, default=0, metavar="N",
                    help="instead of the table: the sampler/trainer log-prob gap of vLLM on N prompts, in float32 and bfloat16")
    ap.add_argument("--rl-update", action="store_true",
                    help="with --compare-backends: also time one whole RL step (rollouts, update, weight sync) per backend")
    args = ap.parse_args()
    rows = args.rows or (args.compare_transformers or args.compare_backends or args.envs)

    import torch

    from agents.generation.interface import left_pad
    from agents.policy import SharedPolicy
    from agents.generation.rollout import RolloutEngine, Start
    from agents.presets import PRESETS, task_seeds, make_env_fn

    torch.set_num_threads(max(1, torch.get_num_threads()))
    preset = PRESETS[args.preset]
    seeds = task_seeds(0, preset)
    model_dir = args.model
    if model_dir is None and preset.model:
        from agents.policy.models import resolve_model

        model_dir = resolve_model(preset.model)
    if model_dir is None:
        from agents.commands.sft import warm_start

        model_dir = Path(tempfile.mkdtemp()) / "warm"
        warm_start(model_dir, PRESETS["smoke"], seed=0, task_seeds=seeds["sft"][:4], eval_seeds=seeds["val"][:1], progress=False)
    policy = SharedPolicy.from_pretrained(model_dir, dtype=args.dtype, prompt_style=preset.prompt_style)
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
    if args.compare_transformers:
        prompts = [t.prompt_ids for r in warmup for t in r.turns]
        prompts = [prompts[i % len(prompts)] for i in range(args.compare_transformers)]
        compare_transformers(policy, prompts, args, rows, model_dir)
        return
    if args.logprob_gap:
        prompts = [t.prompt_ids for r in warmup for t in r.turns]
        logprob_gap(policy, [prompts[i % len(prompts)] for i in range(args.logprob_gap)], args, model_dir)
        return
    if args.compare_backends:
        prompts = [t.prompt_ids for r in warmup for t in r.turns]
        prompts = [prompts[i % len(prompts)] for i in range(args.compare_backends)]
        compare_backends(policy, prompts, env_fn, starts, args, rows, model_dir)
        return

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


def clock() -> tuple[float, float]:
    """(wall, CPU) seconds now."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    return tuple(now - then for now, then in zip(clock(), start))


def transformers_continuous(policy, prompts, temperature: float, width: int, new: int):
    """transformers' own continuous batching (``ContinuousBatchingManager``) over ``prompts``:
    completions and {span: (wall, cpu) seconds}, the whole call and from adding the requests to
    the last result (the manager already running)."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model, backend = policy.model, policy.backend
    # Sampling as ours samples: plain temperature, no top-k, stop at our stop ids. The paged
    # cache is sized to hold every prompt and completion at once: sized from free memory (the
    # default), it takes 90% of the machine's RAM on CPU and seconds to allocate.
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else {}
    config = GenerationConfig(**sampling, max_new_tokens=new, eos_token_id=backend.stop_ids, pad_token_id=policy.pad_id)
    page = ContinuousBatchingConfig.page_size
    blocks = sum(-(-(len(p) + new) // page) for p in prompts)
    cb = ContinuousBatchingConfig(num_blocks=blocks, max_requests_per_batch=width, seed=0)
    whole = clock()
    # What model.generate_batch does, less its progress bar, raising errors it only logs.
    with model.continuous_batching_context_manager(generation_config=config, continuous_batching_config=cb) as manager:
        requests = clock()
        ids = manager.add_requests(inputs=prompts, max_new_tokens=new)
        results = {}
        while len(results) < len(ids):
            result = manager.get_result(timeout=1)
            if result is None and not manager.is_running():
                raise RuntimeError("the continuous batching thread stopped")
            if result is not None and result.is_finished():
                if result.error is not None:
                    raise RuntimeError(result.error)
                results[result.request_id] = result.generated_tokens
        requests = since(requests)
    return [results[i] for i in ids], {"whole": since(whole), "requests": requests}


def compare_transformers(policy, prompts, args, rows: int, model_dir) -> None:
    """Print tokens/s of our continuous batching and of transformers' own on ``prompts``, and
    whether their greedy completions agree token for token.

    Both are timed in wall seconds and in CPU seconds of this process (every thread): on a
    machine that other jobs share, the CPU figure varies far less than the wall one.
    """
    import torch
    import transformers

    model, backend, new = policy.model, policy.backend, args.max_new_tokens

    # One random stream per prompt, as the rollout engine gives each rollout (rollout_seed).
    streams = list(range(len(prompts)))

    def ours(temperature: float, width: int = rows):
        """Completions and {span: (wall, cpu) seconds}."""
        completions = {}

        def done(slot, output):
            completions[slot] = output[0]  # one completion per prompt: no next prompt
            return None

        start = clock()
        backend.generate_continuous(prompts, done, temperature=temperature, max_new_tokens=new, seed=streams,
                                    max_batch=width, prefixes=policy.role_prefixes)
        return [completions[i] for i in range(len(prompts))], {"ours": since(start)}

    def theirs(temperature: float, width: int = rows):
        return transformers_continuous(policy, prompts, temperature, width, new)

    print(f"model: {model_dir}  prompts: {len(prompts)} ({min(map(len, prompts))}-{max(map(len, prompts))} tokens)  "
          f"rows: {rows}  max_new_tokens: {new}  repeats: {args.repeats}  torch threads: {torch.get_num_threads()}  "
          f"transformers {transformers.__version__}, torch {torch.__version__}, {model.dtype}, {model.device}")
    print("| temperature | run | tokens/s (wall) | tokens per CPU second | vs ours (wall / CPU) | greedy outputs identical to ours |")
    print("|---:|---|---:|---:|---:|---|")
    labels = {"ours": "ours (HFBackend.generate_continuous)", "whole": "transformers, whole call (manager start and stop included)",
              "requests": "transformers, requests only (manager running)"}
    for temperature in dict.fromkeys([0.0, args.temperature]):
        best = {name: [0.0, 0.0] for name in labels}  # best (wall, cpu) tokens/s per span
        outputs, error, reproduced = {}, None, {}

        def timed(engine: str, run) -> None:
            outputs[engine], spans = run(temperature)
            tokens = sum(map(len, outputs[engine]))
            for name, seconds in spans.items():
                best[name] = [max(b, tokens / s) for b, s in zip(best[name], seconds)]

        for _ in range(args.repeats):  # alternate, so that a drifting machine slows both alike
            timed("ours", ours)
            if error is None:
                try:
                    timed("theirs", theirs)
                except Exception as exc:  # noqa: BLE001 - transformers' failure is a result too
                    error = f"{type(exc).__name__}: {exc}"
        same = "n/a (sampled)"
        if temperature > 0 and error is None:
            # Reproducibility of sampling, which training needs (same seed, same rollouts, whatever
            # the batch width or the number of workers): the same call again, and the same call at
            # half the batch width, against the last repeat's completions.
            half = max(1, rows // 2)
            for engine, run in (("ours", ours), ("theirs", theirs)):
                again, _ = run(temperature)
                narrower, _ = run(temperature, half)
                reproduced[engine] = (
                    f"same call again: {sum(a == b for a, b in zip(again, outputs[engine]))} of {len(prompts)} identical; "
                    f"at {half} rows: {sum(a == b for a, b in zip(narrower, outputs[engine]))} of {len(prompts)}"
                )
        if temperature == 0 and error is None:
            agree = sum(a == b for a, b in zip(outputs["ours"], outputs["theirs"]))
            same = f"{'yes' if agree == len(prompts) else 'no'} ({agree} of {len(prompts)} completions)"
        for name, label in labels.items():
            if name != "ours" and error is not None:
                print(f"| {temperature:g} | transformers | failed: {error} | | | |")
                break
            wall, cpu = best[name]
            vs = f"{wall / best['ours'][0]:.2f}x / {cpu / best['ours'][1]:.2f}x"
            print(f"| {temperature:g} | {label} | {wall:,.0f} | {cpu:,.0f} | {vs} | {same if name != 'ours' else ''} |")
        for engine, line in reproduced.items():
            print(f"| {temperature:g} | sampled completions of {engine}, same seed | {line} | | | |")
    print("(generated tokens over seconds, best of the repeats)")

def compare_backends(policy, prompts, env_fn, starts, args, rows: int, model_dir) -> None:
    """Print the vLLM backend against the HF ones (issue 38's table).

    1. The same fixed prompts, sampled at ``--temperature`` with one random stream per prompt:
       vLLM (``VLLMBackend.generate_continuous``), our HF continuous engine, transformers'
       ``ContinuousBatchingManager`` and the ceiling (one batched ``generate`` call per
       ``rows`` prompts, forced to ``max_new_tokens``). Best of ``--repeats``, alternating.
    2. Whole rollouts of ``--envs`` environments through the rollout engine with each backend:
       tokens/s and the env's share of the wall time; for vLLM also whether the same seed gives
       the same tokens at half the batch width.
    3. The sampler/trainer log-prob gap on vLLM's completions: mean and max absolute difference
       per token, and the first epoch's turn-level importance ratio ``exp(mean_t(trainer - sampler))``.
    4. ``--rl-update``: one whole step of ``memr2 train`` per backend from ``model_dir``: the
       rollouts, the update, the weight sync (vLLM) and the step, from the run's metrics.
    """
    import json

    import numpy as np
    import torch

    from agents.generation.interface import left_pad
    from agents.generation.rollout import RolloutEngine
    from agents.generation.vllm import VLLMBackend
    from agents.policy import SharedPolicy

    new, temperature = args.max_new_tokens, args.temperature
    dtype = str(policy.model.dtype).removeprefix("torch.")
    t0 = time.perf_counter()
    vllm_backend = VLLMBackend(model_dir, policy.stop_ids, dtype=dtype)
    load_s = time.perf_counter() - t0
    vllm_policy = SharedPolicy(policy.model, policy.tokenizer, prompt_style=policy.prompt_style, backend=vllm_backend)
    streams = list(range(len(prompts)))

    def continuous(backend, width=rows, extra=None):
        completions = {}

        def done(slot, output):
            completions[slot] = output
            return None

        start = clock()
        backend.generate_continuous(prompts, done, temperature=temperature, max_new_tokens=new, seed=streams, max_batch=width, **(extra or {}))
        return [completions[i] for i in range(len(prompts))], since(start)

    def hf():
        outputs, spans = continuous(policy.backend, extra={"prefixes": policy.role_prefixes})
        return [ids for ids, _, _ in outputs], spans

    def vllm():
        outputs, spans = continuous(vllm_backend)
        return [ids for ids, _, _ in outputs], spans

    def transformers_cb():
        outputs, spans = transformers_continuous(policy, prompts, temperature, rows, new)
        return outputs, spans["whole"]

    def ceiling():
        start, tokens = clock(), []
        for i in range(0, len(prompts), rows):
            ids, mask = left_pad(prompts[i : i + rows], policy.pad_id, policy.model.device)
            with torch.no_grad():
                out = policy.model.generate(
                    input_ids=ids, attention_mask=mask, do_sample=True, temperature=max(temperature, 1e-5), top_k=0,
                    max_new_tokens=new, min_new_tokens=new, pad_token_id=policy.pad_id,
                )
            tokens += [out[j, ids.shape[1]:].tolist() for j in range(len(out))]
        return tokens, since(start)

    runs = {"vLLM backend (VLLMBackend.generate_continuous)": vllm, "our HF continuous engine (HFBackend.generate_continuous)": hf,
            "transformers' ContinuousBatchingManager": transformers_cb, f"batched generate, {rows} per call, forced to {new} tokens (ceiling)": ceiling}
    best = {name: (0.0, 0.0) for name in runs}
    first_call = {}
    for repeat in range(args.repeats):
        for name, run in runs.items():
            try:
                outputs, (wall, cpu) = run()
            except Exception as error:  # noqa: BLE001 - a failing engine is a result too
                best[name] = f"failed: {type(error).__name__}: {str(error)[:120]}"
                continue
            tokens = sum(map(len, outputs))
            if repeat == 0:
                first_call[name] = tokens / wall
            if isinstance(best[name], tuple):
                best[name] = (max(best[name][0], tokens / wall), max(best[name][1], tokens / cpu))
    print(f"model: {model_dir} ({dtype})  prompts: {len(prompts)} ({min(map(len, prompts))}-{max(map(len, prompts))} tokens)  rows: {rows}  "
          f"max_new_tokens: {new}  temperature: {temperature:g}  repeats: {args.repeats}  torch threads: {torch.get_num_threads()}  "
          f"vLLM engine load: {load_s:.1f} s")
    print("\n| sampler | tokens/s (wall, best) | tokens per CPU second | first call tokens/s | vs our HF engine |")
    print("|---|---:|---:|---:|---:|")
    ours = best["our HF continuous engine (HFBackend.generate_continuous)"]
    for name, value in best.items():
        if isinstance(value, str):
            print(f"| {name} | {value} | | | |")
            continue
        vs = f"{value[0] / ours[0]:.2f}x" if isinstance(ours, tuple) and ours[0] else ""
        print(f"| {name} | {value[0]:,.0f} | {value[1]:,.0f} | {first_call.get(name, 0):,.0f} | {vs} |")

    # 2. Whole rollouts.
    print("\n| rollouts through the engine | tokens/s | env share of wall time |")
    print("|---|---:|---:|")
    records = {}
    for name, p in (("HF continuous", policy), ("vLLM", vllm_policy)):
        engine = RolloutEngine(p, env_fn, temperature=temperature, max_new_tokens=new, save_states=False, max_batch=rows)
        start = time.perf_counter()
        records[name] = engine.run(starts, seed=0)
        wall = time.perf_counter() - start
        tokens = sum(r.generated_tokens for r in records[name])
        print(f"| {name}, {len(starts)} envs, {rows} rows | {tokens / wall:,.0f} | {engine.timing['env_s'] / wall:.1%} |")
    half = max(1, rows // 2)
    narrow = RolloutEngine(vllm_policy, env_fn, temperature=temperature, max_new_tokens=new, save_states=False, max_batch=half).run(starts, seed=0)
    turns = [t for r in records["vLLM"] for t in r.turns]
    same = sum(a.completion_ids == b.completion_ids for r, q in zip(records["vLLM"], narrow) for a, b in zip(r.turns, q.turns))
    print(f"\nvLLM, same seed at {half} rows instead of {rows}: {same} of {len(turns)} turns token for token identical")

    # 3. Sampler vs trainer log-probs on vLLM's own turns.
    diffs = []
    for i in range(0, len(turns), 8):
        batch = turns[i : i + 8]
        with torch.no_grad():
            trainer = policy.logprobs_of([t.prompt_ids for t in batch], [t.completion_ids for t in batch], temperature=temperature)
        diffs += [lp.double().numpy() - np.asarray(t.logprobs) for lp, t in zip(trainer, batch) if len(t.completion_ids)]
    flat = np.abs(np.concatenate(diffs))
    ratios = np.exp([d.mean() for d in diffs])
    print(f"sampler (vLLM, {dtype}) vs trainer (HF, {dtype}) log-probs over {flat.size} tokens: mean |diff| {flat.mean():.2e}, "
          f"max {flat.max():.2e}; first-epoch turn ratio exp(mean(trainer - sampler)): mean {ratios.mean():.4f}, "
          f"range {ratios.min():.4f}-{ratios.max():.4f}")
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        vllm_policy.sync_backend()
        timings.append(time.perf_counter() - start)
    print(f"weight sync (state dict into the running engine, prefix cache reset): {min(timings):.2f}-{max(timings):.2f} s")

    if args.rl_update:
        from agents.commands.train import train
        from agents.presets import PRESETS, override_preset

        preset = override_preset(PRESETS[args.preset], [
            f"stages={args.horizon}:1", "n_val=1", "n_test=1", f"max_new_tokens={new}", f"rollout_batch={rows}",
        ])
        print("\n| one RL step (memr2 train, 1 step) | rollouts s | step s (rollouts, update, sync) | update rows |")
        print("|---|---:|---:|---:|")
        for backend in ("hf", "vllm"):
            out = Path(tempfile.mkdtemp()) / backend
            train(preset, out=out, model_path=Path(model_dir), seed=0, progress=False, preset_name=args.preset, backend=backend)
            step = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"time/step_s"' in line][0]
            print(f"| {backend} | {step['time/rollout_s']:.1f} | {step['time/step_s']:.1f} | {step.get('update/rows', 0):.0f} |")


def logprob_gap(policy, prompts, args, model_dir) -> None:
    """vLLM's sampled log-probs against the trainer's recomputation, for a vLLM engine in float32
    and in bfloat16, each against the HF model in float32 and in bfloat16 (bfloat16 is loaded
    here even on a CPU without bfloat16 instructions, where torch emulates it: slow, but the
    numbers are the ones a bfloat16 CPU gives up to kernel differences)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from agents.generation.vllm import VLLMBackend
    from agents.policy import SharedPolicy

    trainers = {
        dtype: SharedPolicy(AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)), policy.tokenizer, prompt_style=policy.prompt_style)
        for dtype in ("float32", "bfloat16")
    }
    print(f"model: {model_dir}  prompts: {len(prompts)}  max_new_tokens: {args.max_new_tokens}  temperature: {args.temperature:g}")
    print("\n| sampler | trainer | tokens | mean abs diff | max abs diff | first-epoch turn ratio: mean | min | max |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for dtype in ("float32", "bfloat16"):
        engine = VLLMBackend(model_dir, policy.stop_ids, dtype=dtype)  # kept alive: one dropped engine breaks the others
        outputs = engine.generate(prompts, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=0)
        for name, trainer in trainers.items():
            diffs = []
            for i in range(0, len(prompts), 4):
                batch = outputs[i : i + 4]
                with torch.no_grad():
                    recomputed = trainer.logprobs_of(prompts[i : i + 4], [ids for ids, _, _ in batch], temperature=args.temperature)
                diffs += [lp.double().numpy() - np.asarray(lps) for lp, (_, lps, _) in zip(recomputed, batch) if len(lps)]
            flat, ratios = np.abs(np.concatenate(diffs)), np.exp([d.mean() for d in diffs])
            print(f"| vLLM {dtype} | HF {name} | {flat.size} | {flat.mean():.2e} | {flat.max():.2e} | {ratios.mean():.4f} | {ratios.min():.4f} | {ratios.max():.4f} |")


if __name__ == "__main__":
    main()
