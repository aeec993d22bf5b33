"""The optimizer of every trainer: AdamW, with float32 master weights for half-precision models.

On an accelerator :meth:`agents.policy.SharedPolicy.from_pretrained` keeps a checkpoint in its
own dtype, which for current instruct checkpoints is bfloat16. Plain AdamW on bfloat16 weights
rounds every step back to 8 significant bits: a weight of 0.02 moves only in steps of about
1e-4, so the updates of a learning rate of 2e-5 (the warm start of a pretrained model) or 2e-6
(the paper's RL) are mostly rounded away and training silently stalls. On a small Llama in
bfloat16, 5 AdamW steps at 2e-5 change about a quarter of the weights; the other three
quarters keep their initial values.

:func:`adamw` therefore returns :class:`MasterWeightAdamW` when any parameter is in a half
dtype: the AdamW arithmetic runs on float32 copies of those parameters (the master weights),
and after each step the model's weights are set to the masters rounded to their dtype. The
forward and backward passes stay in the model's dtype, so sampling speed and activation memory
are unchanged. Memory: 2 bytes of bfloat16 weight, 2 of gradient, 4 of master and 8 of AdamW
moments (float32, like the masters they belong to) make 16 bytes per parameter, as for float32
training, against 8 for plain AdamW in bfloat16, which does not train at these rates. A model
that is all float32 (the CPU default) gets ``torch.optim.AdamW`` itself, bit for bit what it got
before.

Limits: gradients are still computed and accumulated over micro-batches in the model's dtype,
and float16 models get no loss scaling (bfloat16 needs none).
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["HALF_DTYPES", "MasterWeightAdamW", "adamw"]

HALF_DTYPES = (torch.bfloat16, torch.float16)
"""Parameter dtypes that get float32 master weights."""

_MASTERS_KEY = "master_weights"


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW that steps float32 master copies of half-precision parameters.

    The optimizer's parameter groups hold the masters (float32 parameters are their own
    master), so learning-rate schedulers and ``param_groups`` work as for ``AdamW``. Gradients
    are read from the model's parameters at :meth:`step`; clip them there beforehand, as with
    any optimizer. :meth:`state_dict` carries the masters, so a run resumed from a checkpoint
    continues from the same float32 values, not from the rounded model weights.

    Args:
        params: the model's parameters (an iterable of tensors; parameter groups as dicts are
            not supported).
        **kwargs: passed to ``torch.optim.AdamW`` (``lr``, ``weight_decay``, ``betas``...).
    """

    def __init__(self, params: Iterable[torch.Tensor], **kwargs):
        self._params = list(params)
        if not self._params or not all(isinstance(p, torch.Tensor) for p in self._params):
            raise ValueError(
                "MasterWeightAdamW takes a non-empty iterable of tensors (parameter groups as dicts are not supported)"
            )
        self._half = [i for i, p in enumerate(self._params) if p.dtype in HALF_DTYPES]
        self._masters = list(self._params)
        for i in self._half:
            param = self._params[i]
            self._masters[i] = param.detach().float().clone().requires_grad_(param.requires_grad)
        super().__init__(self._masters, **kwargs)

    @property
    def master_weights(self) -> list[torch.Tensor]:
        """The float32 tensors the optimizer updates, one per model parameter, in order."""
        return list(self._masters)

    @torch.no_grad()
    def step(self, closure=None):
        """Copy the gradients to the masters in float32, take an AdamW step on them, and write
        the masters back into the model's weights (rounded to nearest)."""
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step does not take a closure")
        for i in self._half:
            grad = self._params[i].grad
            self._masters[i].grad = None if grad is None else grad.float()
        super().step()
        for i in self._half:
            self._params[i].copy_(self._masters[i])
            self._masters[i].grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the masters and of the model's half-precision parameters."""
        super().zero_grad(set_to_none=set_to_none)
        for i in self._half:
            param = self._params[i]
            if param.grad is not None:
                if set_to_none:
                    param.grad = None
                else:
                    param.grad.zero_()

    def state_dict(self) -> dict:
        """``AdamW``'s state dict plus the float32 masters of the half-precision parameters."""
        state = super().state_dict()
        state[_MASTERS_KEY] = {i: self._masters[i].detach().clone() for i in self._half}
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict`; its masters replace both the masters and the model weights.

        A plain ``AdamW`` state dict (no masters) loads too: the masters then stay the float32
        values of the model's current weights.

        Raises:
            ValueError: the masters do not match this optimizer's half-precision parameters.
        """
        state_dict = dict(state_dict)
        masters = state_dict.pop(_MASTERS_KEY, None)
        if masters is not None:
            if sorted(int(i) for i in masters) != self._half:
                raise ValueError(
                    f"optimizer state holds master weights for parameters {sorted(masters)}, "
                    f"but this model's half-precision parameters are {self._half}"
                )
            for i, tensor in masters.items():
                if tuple(tensor.shape) != tuple(self._masters[int(i)].shape):
                    raise ValueError(
                        f"master weight {i} has shape {tuple(tensor.shape)}, "
                        f"the parameter has {tuple(self._masters[int(i)].shape)}"
                    )
        super().load_state_dict(state_dict)
        if masters is not None:
            for i, tensor in masters.items():
                self._masters[int(i)].copy_(tensor)
                self._params[int(i)].copy_(tensor)


def adamw(params: Iterable[torch.Tensor], *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The trainers' optimizer: ``torch.optim.AdamW`` for float32 parameters, and
    :class:`MasterWeightAdamW` as soon as one parameter is bfloat16 or float16."""
    params = list(params)
    if any(p.dtype in HALF_DTYPES for p in params):
        return MasterWeightAdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
