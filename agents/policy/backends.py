"""The ``--backend`` choice: which sampler a :class:`~agents.policy.SharedPolicy` uses.

- ``hf``: :class:`~agents.generation.hf.HFBackend` on the policy's own model (continuous
  batching where the model allows it).
- ``vllm``: :class:`~agents.generation.vllm.VLLMBackend`, an in-process vLLM engine loaded from
  the checkpoint's directory, kept in sync with the trained weights after every update.
- ``auto`` (the default): vLLM where it is installed and can serve the model, else HF; the
  choice is printed in one line.
"""

from __future__ import annotations

import os
import sys

__all__ = ["BACKENDS", "choose_backend"]

BACKENDS = ("auto", "hf", "vllm")


def choose_backend(policy, choice: str, model_dir: str | os.PathLike, *, device: str = "cpu", seed: int = 0, max_model_len: int = 4096, log=None):
    """The backend ``choice`` names for ``policy``, whose weights were loaded from ``model_dir``.

    Returns the backend (the policy's own HF backend for ``hf``, or when ``auto`` falls back);
    the caller assigns it to ``policy.backend``. ``log`` receives the one-line message
    (default: standard error).

    Raises:
        ValueError: an unknown choice, or ``vllm`` and a model vLLM cannot serve.
        ImportError: ``vllm`` and vLLM is not installed (the message names the install line).
    """
    from agents.generation.vllm import VLLM_INSTALL, VLLMBackend, vllm_available

    say = log or (lambda line: print(line, file=sys.stderr))
    if choice not in BACKENDS:
        raise ValueError(f"unknown backend {choice!r}; expected one of {BACKENDS}")
    if choice == "hf":
        return policy.backend
    if not vllm_available():
        if choice == "vllm":
            raise ImportError(f"--backend vllm needs vLLM, which is not installed; install it with: {VLLM_INSTALL}")
        say("backend: hf (vLLM is not installed)")
        return policy.backend
    dtype = str(policy.model.dtype).removeprefix("torch.")
    try:
        backend = VLLMBackend(model_dir, policy.stop_ids, dtype=dtype, device=str(device), seed=seed, max_model_len=max_model_len)
    except (ValueError, FileNotFoundError) as err:
        if choice == "vllm":
            raise
        say(f"backend: hf ({err})")
        return policy.backend
    say(f"backend: vllm ({dtype}, max_model_len {max_model_len})")
    return backend
