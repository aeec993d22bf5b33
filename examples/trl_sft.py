"""Warm-start a chat model for the TRL path with TRL's ``SFTTrainer`` on the noisy teacher's tool calls.

The data are the noisy teacher's episodes of ``MemoryToolEnv`` written as the chats the model has
under ``GRPOTrainer(environment_factory=...)`` (``agents/trl_sft.py``): the same prompt and tool
list, one reply of tool calls per slice of dialogue (``add_memory``/``update_memory``/
``delete_memory`` for the teacher's operations, then ``next_turns``), the tools' answers, and a
final ``Done.``. Every reply is rendered with the chat template and parsed back as GRPO would
parse it before training starts; the loss is on the assistant replies only
(``SFTConfig(assistant_only_loss=True)``). The conversations are the preset's warm-start ones
(``memr2 sft`` uses the same), so the preset's validation and test conversations stay unseen.

    # SmolLM2-135M-Instruct on a 2-core CPU with bfloat16 (about 26 minutes for the defaults:
    # 64 teacher episodes at horizon 4, one epoch, 32 steps of 2 chats; --episodes 128, the warm
    # start of the documented GRPO run, about 54), then GRPO from the result
    python examples/trl_sft.py --model "$(memr2 models path smollm2-135m-instruct)" --output-dir runs/trl_sft
    python examples/trl_grpo.py --model runs/trl_sft --preset small ...

    # build and check the data only (no training; needs transformers and TRL, not a model run)
    python examples/trl_sft.py --model "$(memr2 models path smollm2-135m-instruct)" --check-only

At the end it plays ``--probe-episodes`` of the preset's validation conversations greedily with
the trained model (``agents.trl_play``) and reports the share of replies that parse into tool
calls, the tool errors and the F1. Output: the model and tokenizer (with the tool template) in
``--output-dir``, ``sft_summary.json`` (data, loss per logged step, probe) and ``data_sample.json``
(the first chat). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local directory of a ChatML chat model (SmolLM2)")
    p.add_argument("--preset", default="small", help="whose warm-start and validation conversations to use (agents/presets.py)")
    p.add_argument("--seed", type=int, default=0, help="run seed of the preset's conversations, and of training")
    p.add_argument("--horizon", type=int, default=4,
                   help="sessions per episode (4, as the preset's warm start: at 2 the gold logs hold no UPDATE or DELETE)")
    p.add_argument("--episodes", type=int, default=64,
                   help="teacher episodes (at most the preset's sft_tasks; 64 at horizon 4 give 576 replies in about 26 min on "
                        "2 CPU cores; 128, as many decisions as the preset's warm start sees, take twice as long and scored "
                        "no better held out)")
    p.add_argument("--noise", type=float, default=None, help="teacher mistake rate (default: the preset's teacher_noise)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: --epochs)")
    p.add_argument("--batch-size", type=int, default=2,
                   help="chats per optimizer step, run one at a time (gradient accumulation; a batch of 4 chats of 2k tokens "
                        "held 24 GB of activations without it): 2 gives 64 updates for the default data")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=4096, help="longest tokenized chat; a longer one is an error, not cut")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute precision (weights stay float32); auto: bf16 mixed precision where the CPU or GPU has it")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--probe-episodes", type=int, default=8, help="validation conversations played after training (0: none)")
    p.add_argument("--probe-max-new-tokens", type=int, default=512, help="most tokens per reply in the probe")
    p.add_argument("--check-only", action="store_true", help="build and check the data, then stop")
    p.add_argument("--output-dir", default="runs/trl_sft")
    return p


def build_data(args, tokenizer) -> tuple[list[dict], dict, dict]:
    """The checked SFT rows, their summary, and the preset's env arguments (validation seeds)."""
    from agents.presets import PRESETS, env_kwargs, task_seeds
    from agents.trl_sft import build_sft_dataset, check_round_trip

    preset = PRESETS[args.preset]
    seeds = task_seeds(args.seed, preset)
    if not 1 <= args.episodes <= len(seeds["sft"]):
        raise SystemExit(f"--episodes must be between 1 and {len(seeds['sft'])} (preset {args.preset}'s sft_tasks)")
    noise = preset.teacher_noise if args.noise is None else args.noise
    examples, summary = build_sft_dataset([{"task": i} for i in range(args.episodes)],
                                          env_kwargs=env_kwargs(preset, args.horizon, seeds["sft"]), noise=noise, seed=args.seed)
    try:
        summary["replies_checked"] = check_round_trip(tokenizer, examples)
    except ValueError as err:
        raise SystemExit(f"the warm-start data do not survive the chat template: {err}") from None
    lengths = [len(tokenizer.apply_chat_template(e["messages"], tools=json.loads(e["tools"]), tokenize=True, return_dict=False))
               for e in examples]
    if max(lengths) > args.max_length:
        raise SystemExit(f"the longest chat has {max(lengths)} tokens, over --max-length {args.max_length}; raise it or lower --horizon")
    summary.update(noise=noise, tokens_total=sum(lengths), tokens_max=max(lengths), tokens_mean=sum(lengths) / len(lengths))
    return examples, summary, env_kwargs(preset, args.horizon, seeds["val"])


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not Path(args.model).is_dir():
        raise SystemExit(f"--model must be a local model directory (no downloads): {args.model}")
    from agents.trl_sft import require_trl

    try:
        require_trl("SFTTrainer on MemoryToolEnv chats")
    except ImportError as err:
        raise SystemExit(str(err)) from None
    from transformers import AutoTokenizer

    from agents.trl_template import apply_tool_template, precision_settings

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    tokenizer = apply_tool_template(AutoTokenizer.from_pretrained(args.model))
    examples, data, val_kwargs = build_data(args, tokenizer)
    print(f"data: {data['episodes']} teacher episodes, {data['replies']} replies ({data['replies_checked']} parsed back "
          f"as written), tool calls {data['tool_calls']}, {data['tokens_total']} tokens (longest {data['tokens_max']}), "
          f"teacher return {data['teacher_mean_return']:.3f}", flush=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_sample.json").write_text(json.dumps(examples[0], indent=1, ensure_ascii=False))
    if args.check_only:
        return {"data": data}

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    checkpointing = "activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__ else "gradient_checkpointing"
    precision = precision_settings(args.dtype, args.device)
    config = SFTConfig(
        output_dir=str(out), assistant_only_loss=True, max_length=args.max_length, num_train_epochs=args.epochs,
        max_steps=args.max_steps, per_device_train_batch_size=1, gradient_accumulation_steps=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
        seed=args.seed, **{checkpointing: False}, **precision,
    )
    trainer = SFTTrainer(model=args.model, args=config, train_dataset=Dataset.from_list(examples), processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    trainer.save_model(str(out))
    losses = [{"step": r["step"], "loss": r["loss"]} for r in trainer.state.log_history if "loss" in r]
    summary = {"args": vars(args), "data": data, "train_wall_s": round(wall, 1), "steps": trainer.state.global_step,
               "losses": losses, "precision": {k: precision[k] for k in ("use_cpu", "bf16")}}
    print(f"trained {trainer.state.global_step} steps in {wall:.0f} s; loss {losses[0]['loss']:.3f} -> {losses[-1]['loss']:.3f}", flush=True)
    if args.probe_episodes:
        summary["probe"] = probe(trainer.model, tokenizer, val_kwargs, args)
    (out / "sft_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def probe(model, tokenizer, val_kwargs: dict, args) -> dict:
    """Greedy episodes on the preset's validation conversations: replies with a parsed call, errors, F1."""
    import functools

    import gymnasium as gym

    from agents.trl_play import tool_final_score

    model.eval()
    env_fn = functools.partial(gym.make, "MemSession-v0", single_agent=True, **val_kwargs)
    n = min(args.probe_episodes, len(val_kwargs["task_seeds"]))
    start = time.perf_counter()
    score = tool_final_score(model, tokenizer, env_fn, range(n), max_new_tokens=args.probe_max_new_tokens)
    score["wall_s"] = round(time.perf_counter() - start, 1)
    print(f"probe on {n} validation conversations: {score['reply_parse_rate']:.1%} of {score['open_replies']} replies parsed "
          f"into tool calls, tool errors {score['tool_error_rate']:.1%} of {sum(score['calls'].values())} calls, "
          f"{score['truncated_rate']:.1%} cut at the token limit, F1 {score['f1']:.3f} ({score['wall_s']:.0f} s)", flush=True)
    return score


if __name__ == "__main__":
    main()
