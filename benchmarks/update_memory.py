"""Peak memory and time of one policy-update micro-batch, with and without gradient checkpointing.

One forward and backward pass of ``SharedPolicy.logprobs_of`` over ``--rows`` rows of random
tokens (``--prompt`` prompt tokens and ``--completion`` completion tokens each: the shape of a
horizon-4 manager turn of the `small` preset), each mode in a fresh process so that its peak
resident memory is its own. Prints both and their ratios::

    python benchmarks/update_memory.py --model runs/ws --rows 8 --prompt 1200 --completion 384
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(model: str, rows: int, prompt: int, completion: int, checkpointing: bool, dtype: str, threads: int) -> dict:
    import torch

    from agents.policy import SharedPolicy
    from agents.rl.update import enable_checkpointing

    torch.set_num_threads(threads)
    policy = SharedPolicy.from_pretrained(model, dtype=dtype)
    if checkpointing:
        enable_checkpointing(policy.model)
    policy.model.train()
    g = torch.Generator().manual_seed(0)
    vocab = policy.model.config.vocab_size
    prompts = [torch.randint(0, vocab, (prompt,), generator=g).tolist() for _ in range(rows)]
    completions = [torch.randint(0, vocab, (completion,), generator=g).tolist() for _ in range(rows)]
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t = time.perf_counter()
    loss = -sum(lp.sum() for lp in policy.logprobs_of(prompts, completions))
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
    parser.add_argument("--one", choices=["plain", "checkpointing"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.model, args.rows, args.prompt, args.completion, args.one == "checkpointing", args.dtype, args.threads)))
        return
    results = {}
    for mode in ("plain", "checkpointing"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", mode], check=True, capture_output=True, text=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:>13}: peak {r['peak_gib']:.2f} GiB (model loaded: {r['after_load_gib']:.2f}), {r['seconds']:.1f} s", flush=True)
    plain, ckpt = results["plain"], results["checkpointing"]
    print(f"checkpointing / plain: peak memory {ckpt['peak_gib'] / plain['peak_gib']:.2f}x, time {ckpt['seconds'] / plain['seconds']:.2f}x "
          f"({args.rows} rows of {args.prompt} + {args.completion} tokens, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
