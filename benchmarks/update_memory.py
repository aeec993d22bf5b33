"""Peak memory and time of one training micro-batch: with and without gradient checkpointing,
and against projecting every position to the vocabulary.

One forward and backward pass over ``--rows`` rows of random tokens (``--prompt`` prompt tokens
and ``--completion`` completion tokens each: the shape of a horizon-4 manager turn of the
`small` preset), each mode in a fresh process so that its peak resident memory is its own:

- ``plain``: ``SharedPolicy.logprobs_of``, which projects only the completion positions to the
  vocabulary (the RL update and, through ``sft_loss``, the warm start);
- ``checkpointing``: the same with gradient checkpointing (the `small` preset's RL update);
- ``full-logits``: the same loss from ``model(...).logits`` over every position, as a plain
  causal-LM loss computes it (the warm start before 2026-12-04).

Prints each and the ratios to ``plain``::

    python benchmarks/update_memory.py --model runs/ws --rows 8 --prompt 1200 --completion 384
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


MODES = ("plain", "checkpointing", "full-logits")


def _full_logits_logprobs(policy, prompts, completions):
    """Completion log-probs from the logits of every position (right-padded rows of equal length)."""
    import torch

    ids = torch.tensor([p + c for p, c in zip(prompts, completions)])
    logprobs = torch.log_softmax(policy.model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
    n = len(completions[0])
    return [logprobs[row, -n - 1 : -1].gather(-1, ids[row, -n:].unsqueeze(-1)).squeeze(-1) for row in range(len(prompts))]


def one(model: str, rows: int, prompt: int, completion: int, mode: str, dtype: str, threads: int) -> dict:
    import torch

    from agents.policy import SharedPolicy
    from agents.rl.update import enable_checkpointing

    torch.set_num_threads(threads)
    policy = SharedPolicy.from_pretrained(model, dtype=dtype)
    if mode == "checkpointing":
        enable_checkpointing(policy.model)
    policy.model.train()
    g = torch.Generator().manual_seed(0)
    vocab = policy.model.config.vocab_size
    prompts = [torch.randint(0, vocab, (prompt,), generator=g).tolist() for _ in range(rows)]
    completions = [torch.randint(0, vocab, (completion,), generator=g).tolist() for _ in range(rows)]
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t = time.perf_counter()
    logprobs = _full_logits_logprobs if mode == "full-logits" else type(policy).logprobs_of
    loss = -sum(lp.sum() for lp in logprobs(policy, prompts, completions))
    loss.backward()
    return {"seconds": time.perf_counter() - t, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "after_load_gib": loaded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a SharedPolicy checkpoint directory")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=1200)
    parser.add_argument("--completion", type=int, default=384)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.model, args.rows, args.prompt, args.completion, args.one, args.dtype, args.threads)))
        return
    results = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", mode], check=True, capture_output=True, text=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:>13}: peak {r['peak_gib']:.2f} GiB (model loaded: {r['after_load_gib']:.2f}), {r['seconds']:.1f} s", flush=True)
    plain = results["plain"]
    for mode in MODES[1:]:
        r = results[mode]
        print(f"{mode} / plain: peak memory {r['peak_gib'] / plain['peak_gib']:.2f}x, time {r['seconds'] / plain['seconds']:.2f}x "
              f"({args.rows} rows of {args.prompt} + {args.completion} tokens, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
