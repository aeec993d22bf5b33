"""``memr2 train``: the main job.

On a fresh CPU machine, with no download: generate synthetic train / validation / test tasks,
build the tiny model and warm-start it from the noisy teacher (or load ``--model PATH``), train
with LoGo-GRPO (or ``--algo grpo``) through the 8 -> 16 -> 32 horizon curriculum, evaluate on
the test tasks, and write metrics (JSONL, TensorBoard when installed), PNG learning curves and
checkpoints under ``--out``. ``--resume`` continues an interrupted run from its last completed
update step: the metrics log is cut back to what that checkpoint had logged (a step logged
after it is logged again, not twice) and ``elapsed_s`` in ``results.json`` adds up the time of
every attempt up to its last checkpoint.

Layout of ``--out``::

    config.json            the resolved settings of the run
    metrics.jsonl          one record per update step and per validation
    warm_start/            the warm-started tiny model (when no --model is given)
    checkpoints/checkpoint-<step>/   the latest step (model, optimizer, trainer state, RNGs)
    stage<i>-best/         the best validation checkpoint of stage i
    final/                 the policy after the curriculum (best of the last stage)
    results.json           validation per stage, the test evaluation and the rollout backend used
    curves.png             learning curves
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from agents.policy.models import ModelImportError, resolve_model
from agents.policy.precision import add_dtype_argument, describe_dtype
from agents.presets import PRESETS, TrainPreset, add_set_argument, make_env_fn, preset_from_args, task_seeds, without_curriculum
from agents.rl.curriculum import parse_stages

__all__ = ["add_arguments", "run", "train"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="run size (default: tiny)")
    p.add_argument("--algo", choices=("logo-grpo", "grpo"), default="logo-grpo", help="trainer (default: logo-grpo)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<preset>-<algo>-s<seed>)")
    p.add_argument(
        "--model", default=None,
        help="local HF checkpoint directory or known model name (memr2 models list) to train as is, "
        "instead of warm-starting the preset's model",
    )
    add_dtype_argument(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed for tasks, sampling and the model")
    p.add_argument("--stages", type=str, default=None, help="curriculum override, e.g. '8:10,16:5,32:5'")
    add_set_argument(p)
    p.add_argument("--no-curriculum", action="store_true", help="train at the last stage's horizon for all steps")
    p.add_argument("--n-rollouts", type=int, default=None, help="override the global group size")
    p.add_argument("--rollout-batch", type=int, default=None, help="most prompts decoded at once in rollouts (default: all)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument(
        "--backend", choices=("auto", "hf", "vllm"), default="auto",
        help="rollout sampler: vllm (in-process vLLM, weights synced after every update), hf (transformers), "
        "auto (default: vllm where installed and able to serve the model, else hf)",
    )
    p.add_argument(
        "--workers", type=int, default=0,
        help="run the rollouts on this many Ray actors (needs the ray extra; default 0: in this process); "
        "results do not depend on the number",
    )
    p.add_argument("--ray-address", default=None, help="a running Ray cluster (host:port or auto; default: start a local one)")
    p.add_argument("--worker-timeout", type=float, default=1800.0, help="seconds a worker may take for its share of one call before it is replaced")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    preset = preset_from_args(args, "train")
    if args.stages:
        preset = replace(preset, stages=parse_stages(args.stages))
    if args.no_curriculum:
        preset = without_curriculum(preset)
    if args.n_rollouts:
        preset = replace(preset, n_rollouts=args.n_rollouts)
    if args.rollout_batch is not None:
        if args.rollout_batch < 1:
            raise SystemExit(f"memr2 train: --rollout-batch must be at least 1, got {args.rollout_batch}")
        preset = replace(preset, rollout_batch=args.rollout_batch)
    if args.dtype is not None:
        preset = replace(preset, dtype=args.dtype)
    try:
        print(describe_dtype(preset.dtype, args.device))
        model_path = resolve_model(args.model) if args.model is not None else None
    except (ModelImportError, ValueError) as err:
        raise SystemExit(f"memr2 train: {err}") from err
    if args.workers < 0:
        raise SystemExit(f"memr2 train: --workers must be 0 (in process) or more, got {args.workers}")
    if args.workers and args.backend == "vllm":
        raise SystemExit("memr2 train: --backend vllm runs in this process; the Ray workers (--workers N) sample with the HF backend")
    if args.ray_address and not args.workers:
        raise SystemExit("memr2 train: --ray-address needs --workers N")
    if args.workers:  # before any work: Ray missing or a cluster that is down is a clear error now
        from agents.generation.distributed import RayUnavailableError, connect_ray

        try:
            connect_ray(args.ray_address)
        except RayUnavailableError as err:
            raise SystemExit(f"memr2 train: {err}") from err
    out = args.out or Path("runs") / f"{args.preset}-{args.algo}-s{args.seed}"
    result = train(
        preset, out=out, algo=args.algo, model_path=model_path, resume=args.resume, seed=args.seed,
        device=args.device, progress=not args.no_progress, preset_name=args.preset,
        workers=args.workers, worker_timeout=args.worker_timeout, backend="hf" if args.workers else args.backend,
    )
    test = result["test"]
    print(f"test F1 {test['f1']:.3f}  (memory {test['memory_size']:.1f} entries, parse errors {test['parse_error_rate']:.1%})")
    print(f"results: {Path(out) / 'results.json'}")
    return 0


def _load_policy(path: Path, preset: TrainPreset, device: str, sampler: dict | None = None):
    """The policy saved at ``path``. ``sampler`` (``{"choice": ..., "backend": ...}``) gives it the
    run's backend: the first call builds it (``choice``: auto, hf or vllm), later calls reuse it
    and load the new weights into it."""
    from agents.policy import SharedPolicy

    policy = SharedPolicy.from_pretrained(path, device=device, prompt_style=preset.prompt_style, dtype=preset.dtype)
    if sampler is not None and sampler["choice"] != "hf":
        if sampler.get("backend") is None:  # the first load decides; "hf" from then on if vLLM is not used
            from agents.policy.backends import choose_backend

            chosen = choose_backend(policy, sampler["choice"], path, device=device)
            sampler.update(choice="hf" if chosen is policy.backend else sampler["choice"], backend=chosen)
            if chosen is policy.backend:
                return policy
        policy.backend = sampler["backend"]
        policy.sync_backend()
    return policy


def train(
    preset: TrainPreset,
    *,
    out: Path,
    algo: str = "logo-grpo",
    model_path: Path | None = None,
    resume: bool = False,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    preset_name: str = "custom",
    workers: int = 0,
    worker_timeout: float = 1800.0,
    backend: str = "hf",
) -> dict[str, Any]:
    """Run the whole job and return the contents of ``results.json``.

    ``workers > 0`` runs the training rollouts (global and local) on that many Ray actors
    (:mod:`agents.generation.distributed`; Ray must be installed, and is started locally
    unless already initialised); the rollouts and metrics are the same as in process.
    ``backend`` is the rollout sampler (:mod:`agents.policy.backends`: ``hf``, ``vllm`` or
    ``auto``); with vLLM the update recomputes the old log-probs with the trained model
    (``UpdateConfig.old_logprobs="trainer"``).
    """
    import torch

    from agents.commands.checkpoint import latest_checkpoint, load_checkpoint

    t0 = time.perf_counter()
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    last = latest_checkpoint(ckpt_dir)
    if last is not None and not resume:
        raise SystemExit(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume and last is None and (out / "results.json").exists():
        raise SystemExit(f"{out} holds a finished run; nothing to resume")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    seeds = task_seeds(seed, preset)
    settings = run_settings(preset, preset_name=preset_name, algo=algo, seed=seed, model_path=model_path)
    if not resume or not (out / "config.json").exists():
        (out / "config.json").write_text(json.dumps(settings, indent=2))

    # 1. The starting policy: a local checkpoint as it is, or the preset's model (the tiny one,
    #    or a known pretrained model imported on first use) warm-started from the noisy teacher.
    if model_path is not None:
        start_path = Path(model_path)
    else:
        start_path = out / "warm_start"
        if not (start_path / "config.json").exists():
            from agents.commands.sft import warm_start

            base = resolve_model(preset.model) if preset.model else None
            report = warm_start(
                start_path, preset, seed=seed, task_seeds=seeds["sft"], eval_seeds=seeds["val"], progress=progress,
                model_path=base, device=device,
            )
            print(f"warm start: valid JSON {report['valid_json_after']['valid_json']:.1%}, held-out F1 "
                  f"{report['env']['model']['f1']:.3f} (teacher {report['env']['teacher']['f1']:.3f}, "
                  f"{report['env']['eval_tasks']} conversations, horizon {report['env']['horizon']})")

    sampler: dict[str, Any] = {"choice": backend, "backend": None}
    state: dict[str, Any] = {"prompt_style": preset.prompt_style, "max_new_tokens": preset.max_new_tokens, "stage": 0, "step": 0, "global_step": 0, "stage_start": str(start_path), "best": None, "validation": [], "generated_tokens": 0, "trainer_rng": None}
    policy = None
    optimizer_state = None
    if last is not None:
        ck = load_checkpoint(last, load_model=False)
        state = ck["trainer_state"]
        optimizer_state = ck["optimizer"]
        policy = _load_policy(last, preset, device, sampler)
        from agents.commands.checkpoint import restore_rng_state

        restore_rng_state(ck["rng_state"])
        # Records logged after the checkpoint are logged again by the steps that redo them.
        _rewind_metrics(out / "metrics.jsonl", state.get("metrics_bytes"))
        print(f"resuming from {last} (stage {state['stage'] + 1}, step {state['step']})")
    elif resume:
        _rewind_metrics(out / "metrics.jsonl", 0)  # killed before its first checkpoint: the run starts over
    if policy is None:
        policy = _load_policy(Path(state["stage_start"]), preset, device, sampler)

    elapsed_before = float(state.get("elapsed_s", 0.0))

    def clock() -> float:  # seconds of work this run has kept, over all its attempts
        return elapsed_before + time.perf_counter() - t0

    pool = None
    if workers:
        from agents.generation.distributed import WorkerPool

        pool = WorkerPool(policy, workers, timeout_s=worker_timeout)
    try:
        return _curriculum(
            preset, out=out, algo=algo, seed=seed, device=device, progress=progress, policy=policy, state=state,
            optimizer_state=optimizer_state, seeds=seeds, settings=settings, pool=pool, clock=clock, sampler=sampler,
        )
    finally:
        if pool is not None:
            pool.close()


def run_settings(preset: TrainPreset, *, preset_name: str, algo: str, seed: int, model_path: Path | None) -> dict[str, Any]:
    """What :func:`train` writes to ``config.json``: the settings a resumed run must share."""
    return {"preset": preset_name, "algo": algo, "seed": seed, "model": str(model_path) if model_path else None, **_jsonable(asdict(preset))}


def _curriculum(preset, *, out, algo, seed, device, progress, policy, state, optimizer_state, seeds, settings, pool, clock, sampler=None):
    """Steps 2 and 3 of :func:`train`: the curriculum and the test evaluation."""
    from agents.commands.checkpoint import checkpoint_path, save_checkpoint
    from agents.commands.logging import MetricsLogger, plot_curves
    from agents.generation.rollout import RolloutEngine
    from agents.rl.curriculum import validate
    from agents.rl.grpo import GRPO, GRPOConfig
    from agents.rl.logo_grpo import LoGoConfig, LoGoGRPO
    from agents.rl.update import UpdateConfig

    ckpt_dir = out / "checkpoints"
    logger = MetricsLogger(out, clock=clock)  # elapsed_s continues across resumes

    def checkpoint(with_optimizer) -> None:
        # What a resumed run needs besides weights: how much of the log and the clock to keep.
        state.update(metrics_bytes=logger.position, elapsed_s=clock())
        save_checkpoint(checkpoint_path(ckpt_dir, state["global_step"]), policy.model, policy.tokenizer, _jsonable(state), with_optimizer)
    trainer_cls, cfg_cls = (LoGoGRPO, LoGoConfig) if algo == "logo-grpo" else (GRPO, GRPOConfig)
    update_cfg = UpdateConfig(
        lr=preset.lr, epochs=preset.epochs, micro_batch=preset.micro_batch,
        gradient_checkpointing=preset.gradient_checkpointing, kl_coef=preset.kl_coef,
        entropy_coef=preset.entropy_coef, temperature=preset.temperature,
        old_logprobs="trainer" if sampler and sampler["choice"] != "hf" else "sampler",
    )
    extra = {"p_local": preset.p_local, "m_reruns": preset.m_reruns, "local_max_questions": preset.local_max_questions} if algo == "logo-grpo" else {}
    cfg = cfg_cls(
        n_rollouts=preset.n_rollouts, tasks_per_step=preset.tasks_per_step, max_questions=preset.max_questions,
        max_new_tokens=preset.max_new_tokens, update=update_cfg, **extra,
    )

    # 2. The curriculum.
    for stage_idx, stage in enumerate(preset.stages):
        if stage_idx < state["stage"]:
            continue
        env_fn = make_env_fn(preset, stage.horizon, seeds["train"])
        val_fn = make_env_fn(preset, stage.horizon, seeds["val"])
        ref = _load_policy(Path(state["stage_start"]), preset, device) if preset.kl_coef > 0 else None
        if ref is not None:
            ref.model.eval().requires_grad_(False)
        sampling = dict(temperature=preset.temperature, max_new_tokens=preset.max_new_tokens, max_batch=preset.rollout_batch)
        engine = pool.engine(policy, env_fn, **sampling) if pool is not None else RolloutEngine(policy, env_fn, progress=progress, **sampling)
        trainer = trainer_cls(policy, engine, env_fn().unwrapped, cfg, ref_policy=ref, seed=seed * 1000 + stage_idx)
        trainer.generated_tokens = state["generated_tokens"]
        if optimizer_state is not None and state["step"] > 0:
            trainer.optimizer.load_state_dict(optimizer_state)
        if state["trainer_rng"] is not None:
            trainer.rng.bit_generator.state = state["trainer_rng"]
        optimizer_state = None
        steps = range(state["step"], stage.steps)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=stage.steps, initial=state["step"], desc=f"stage {stage_idx + 1}/{len(preset.stages)} (horizon {stage.horizon})", unit="step")
        for step in steps:
            tasks = trainer.rng.choice(len(seeds["train"]), size=min(cfg.tasks_per_step, len(seeds["train"])), replace=False)
            metrics = trainer.step([int(t) for t in tasks], state["global_step"])
            state.update(step=step + 1, global_step=state["global_step"] + 1, generated_tokens=trainer.generated_tokens,
                         trainer_rng=trainer.rng.bit_generator.state)
            logger.log(state["global_step"], {"stage": stage_idx, "horizon": stage.horizon, **metrics})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(f1=f"{metrics['global/f1']:.3f}", rows=int(metrics.get("update/rows", 0)))
            if preset.val_every and (step + 1) % preset.val_every == 0 and step + 1 < stage.steps:
                _validate_and_keep(policy, val_fn, seeds["val"], preset, state, stage_idx, stage, logger, out)
            # Checkpoint every step: a killed run loses at most the unfinished step.
            checkpoint(trainer.optimizer)
            _prune(ckpt_dir, keep=state["global_step"])
        if bar is not None:
            bar.close()
        _validate_and_keep(policy, val_fn, seeds["val"], preset, state, stage_idx, stage, logger, out)
        # The best checkpoint of the stage starts the next one and is its KL reference.
        best_path = out / f"stage{stage_idx}-best"
        policy = _load_policy(best_path, preset, device, sampler)
        state.update(stage=stage_idx + 1, step=0, stage_start=str(best_path), best=None, trainer_rng=None)
        checkpoint(None)

    # 3. The final policy and the test evaluation.
    final = out / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(state["stage_start"], final)
    horizon = preset.stages[-1].horizon
    # Per-conversation F1 as well: paired comparisons of runs (memr2 sweep) resample conversations.
    test = validate(policy, make_env_fn(preset, horizon, seeds["test"]), range(len(seeds["test"])), max_new_tokens=preset.max_new_tokens, seed=seed,
                    max_batch=preset.rollout_batch, per_task=True)
    logger.log(state["global_step"], {f"test/{k}": v for k, v in test.items() if k != "f1_per_task"})
    logger.close()
    results = {"settings": settings, "validation": state["validation"], "test": test, "generated_tokens": state["generated_tokens"],
               "elapsed_s": clock(), "backend": "vllm" if sampler and sampler["choice"] != "hf" else "hf"}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_curves(out / "metrics.jsonl", out / "curves.png", keys=["global/f1", "local/f1", "val/f1", "update/loss", "global/memory_size", "parse_error_rate"])
    return results


def _validate_and_keep(policy, val_fn, val_seeds, preset, state, stage_idx, stage, logger, out) -> None:
    from agents.commands.checkpoint import save_checkpoint
    from agents.rl.curriculum import validate

    val = validate(policy, val_fn, range(len(val_seeds)), max_new_tokens=preset.max_new_tokens, max_batch=preset.rollout_batch)
    record = {"stage": stage_idx, "horizon": stage.horizon, "step": state["step"], "train_generated_tokens": state["generated_tokens"], **val}
    state["validation"].append(record)
    logger.log(state["global_step"], {f"val/{k}": v for k, v in val.items()})
    best_path = out / f"stage{stage_idx}-best"
    if state["best"] is None or val["f1"] > state["best"] or not best_path.exists():
        state["best"] = val["f1"]
        # prompt style and max_new_tokens: `memr2 eval --agent checkpoint:` decodes as trained
        best_state = {"stage": stage_idx, "step": state["step"], "val": val, "prompt_style": preset.prompt_style, "max_new_tokens": preset.max_new_tokens}
        save_checkpoint(best_path, policy.model, policy.tokenizer, best_state)


def _rewind_metrics(path: Path, size: int | None) -> None:
    """Cut the metrics log back to its first ``size`` bytes (``None``: a checkpoint from before
    the log's size was recorded; the log is left as it is)."""
    if size is not None and path.exists() and path.stat().st_size > size:
        os.truncate(path, size)


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Keep only the newest numbered checkpoint."""
    from agents.commands.checkpoint import checkpoint_step

    for child in ckpt_dir.glob("checkpoint-*"):
        step = checkpoint_step(child)
        if step is not None and step < keep:
            shutil.rmtree(child, ignore_errors=True)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "__dataclass_fields__"):
        return _jsonable(asdict(obj))
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            return obj.item()
        except (ValueError, TypeError):
            return str(obj)
    return obj
