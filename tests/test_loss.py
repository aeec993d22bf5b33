"""Policy losses: hand-computed values, finite-difference gradients, clipping and masking."""

from __future__ import annotations

import math

import pytest
import torch

from agents.rl.loss import token_entropy, token_level_loss, turn_level_loss

LOSSES = [turn_level_loss, token_level_loss]


def _f64(x):
    return torch.tensor(x, dtype=torch.float64)


# A two-turn batch with old log-probs 0, so logprobs are the per-token log-ratios directly.
#   turn 0: tokens 0,1 generated, log-ratios 0.2, 0.0 (token 2 is padding), A = +1
#   turn 1: tokens 0,1,2 generated, log-ratios 0.3 each,                  A = +2
LOGP = [[0.2, 0.0, 9.9], [0.3, 0.3, 0.3]]
MASK = [[True, True, False], [True, True, True]]
ADV = [1.0, 2.0]


def test_turn_level_hand_computed():
    # turn 0: r = exp(mean(0.2, 0.0)) = exp(0.1) = 1.105171 (inside [0.8, 1.2]) -> s = 1.105171
    # turn 1: r = exp(0.3) = 1.349859 > 1.2, A > 0 -> s = min(2.699718, 1.2 * 2) = 2.4 (clipped)
    # loss = -(1.105171 + 2.4) / 2 = -1.752585
    loss, stats = turn_level_loss(_f64(LOGP), torch.zeros(2, 3, dtype=torch.float64), _f64(ADV), torch.tensor(MASK))
    assert loss.item() == pytest.approx(-(math.exp(0.1) + 2.4) / 2)
    assert stats["clip_frac"] == pytest.approx(0.5)
    assert stats["ratio_mean"] == pytest.approx((math.exp(0.1) + math.exp(0.3)) / 2)
    assert stats["dual_clip_frac"] == 0.0


def test_token_level_hand_computed():
    # turn 0: r = exp(0.2) = 1.221403 -> clipped to 1.2 (A > 0); r = exp(0) = 1 -> 1.0
    # turn 1: three tokens with r = exp(0.3) = 1.349859, A = 2 -> 2.4 each (clipped)
    # loss = -(1.2 + 1.0 + 3 * 2.4) / 5 = -1.88
    loss, stats = token_level_loss(_f64(LOGP), torch.zeros(2, 3, dtype=torch.float64), _f64(ADV), torch.tensor(MASK))
    assert loss.item() == pytest.approx(-1.88)
    assert stats["clip_frac"] == pytest.approx(4 / 5)


def test_dual_clip_hand_computed():
    # turn 0: A = -1, r = exp(ln 4) = 4: min(-4, 1.2 * -1) = -4; dual clip max(-4, 3 * -1) = -3
    # turn 1: A = -1, r = exp(-0.5) = 0.606531: min(-0.606531, 0.8 * -1) = -0.8 (clipped); dual: -0.8
    # loss = -(-3 - 0.8) / 2 = 1.9
    logp = _f64([[math.log(4.0)], [-0.5]])
    old, mask, adv = torch.zeros_like(logp), torch.ones(2, 1, dtype=torch.bool), _f64([-1.0, -1.0])
    loss, stats = turn_level_loss(logp, old, adv, mask)
    assert loss.item() == pytest.approx(1.9)
    assert stats["dual_clip_frac"] == pytest.approx(0.5)
    assert stats["clip_frac"] == pytest.approx(0.5)  # turn 1; turn 0 is cut by the dual clip
    # without the dual clip turn 0 keeps -4: loss = -(-4 - 0.8) / 2 = 2.4
    loss, _ = turn_level_loss(logp, old, adv, mask, dual_clip=None)
    assert loss.item() == pytest.approx(2.4)


def test_logratio_cap_hand_computed():
    # mean log-ratio 5 is capped at 3: r = exp(3) = 20.085537; A = -1, no dual clip
    # s = min(-20.085537, -1.2) = -20.085537, loss = 20.085537
    logp = _f64([[5.0, 5.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = turn_level_loss(logp, torch.zeros_like(logp), _f64([-1.0]), mask, dual_clip=None)
    assert loss.item() == pytest.approx(math.exp(3.0))
    assert stats["logratio_capped_frac"] == 1.0


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_kl_and_entropy_hand_computed(loss_fn):
    # ratio 1 everywhere (logp == old), A = 0: the surrogate is 0.
    # ref - logp = [ln 2, 0] on the two generated tokens: k3 = (2 - ln 2 - 1) and 0, mean 0.153426
    # entropy per token [ln 2, ln 4], mean 1.039721
    # loss = 0.5 * 0.153426 - 0.1 * 1.039721 = -0.027259
    logp = _f64([[-1.0, -2.0, 0.0]])
    ref = logp + _f64([[math.log(2.0), 0.0, 123.0]])
    ent = _f64([[math.log(2.0), math.log(4.0), 55.0]])
    mask = torch.tensor([[True, True, False]])
    loss, stats = loss_fn(
        logp, logp.clone(), _f64([0.0]), mask, ref_logprobs=ref, kl_coef=0.5, entropy=ent, entropy_coef=0.1
    )
    kl = (1 - math.log(2.0)) / 2
    ent_mean = (math.log(2.0) + math.log(4.0)) / 2
    assert stats["kl_ref"] == pytest.approx(kl)
    assert stats["entropy"] == pytest.approx(ent_mean)
    assert loss.item() == pytest.approx(0.5 * kl - 0.1 * ent_mean)
    assert stats["loss"] == pytest.approx(loss.item())


def test_token_entropy():
    # row 0: uniform over 4 -> ln 4; row 1: uniform over 2 (others ~ -inf) -> ln 2; row 2: ~one-hot -> ~0
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1e4, -1e4], [100.0, 0.0, 0.0, 0.0]])
    h = token_entropy(logits)
    assert h.tolist() == pytest.approx([math.log(4.0), math.log(2.0), 0.0], abs=1e-6)
    assert token_entropy(logits.to(torch.bfloat16)).dtype == torch.float32


def _token_logprobs(logits, tokens):
    """log-prob of each next token: logits [B, T, V], tokens [B, T + 1] -> [B, T]."""
    return torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


class TinyPolicy(torch.nn.Module):
    """Logits = embedding of the previous token projected to the vocabulary (float64)."""

    def __init__(self, vocab=7, dim=4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=g, dtype=torch.float64))
        self.out = torch.nn.Parameter(torch.randn(dim, vocab, generator=g, dtype=torch.float64))

    def forward(self, tokens):
        return _token_logprobs(self.emb[tokens[:, :-1]] @ self.out, tokens)


def _random_batch(seed, B=4, T=6, V=7):
    """Tokens, a mask for turns of 6, 3, 1 and 5 generated tokens, logits, and a noise maker."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T + 1), generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor([6, 3, 1, 5])[:, None]
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    return tokens, mask, logits, lambda scale: scale * torch.randn(B, T, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_gradient_at_ratio_one_is_advantage_weighted_logprob_gradient(loss_fn):
    # At logp == old_logp every ratio is 1 and inside the clip range, so
    # grad L = -mean_turns A * grad(mean_t logp)       (turn level)
    # grad L = -mean_tokens A * grad(logp_t)             (token level)
    policy = TinyPolicy()
    tokens, mask, _, _ = _random_batch(seed=0)
    adv = _f64([1.0, -0.5, 2.0, -1.5])
    logp = policy(tokens)
    loss, stats = loss_fn(logp, logp.detach(), adv, mask)
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["clip_frac"] == 0.0
    grads = torch.autograd.grad(loss, list(policy.parameters()))

    logp = policy(tokens)
    m = mask.double()
    if loss_fn is turn_level_loss:
        reference = -(adv * (logp * m).sum(1) / m.sum(1)).mean()
    else:
        reference = -(adv[:, None] * logp * m).sum() / m.sum()
    expected = torch.autograd.grad(reference, list(policy.parameters()))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_gradcheck_end_to_end_float64(loss_fn):
    # Finite differences through log-softmax, the ratio, clipping, k3 KL and entropy. Old
    # log-probs are shifted so that some units sit inside and some outside the clip range;
    # random values keep them away from the kinks.
    tokens, mask, logits0, noise = _random_batch(seed=1)
    old = _token_logprobs(logits0, tokens) + noise(0.4)
    old = old + _f64([[0.0], [0.0], [-1.5], [0.5]])  # push turns 2 and 3 into their clipped region
    ref = old + noise(0.3)
    adv = _f64([1.0, -0.7, 0.4, -2.0])

    def f(logits):
        logp = _token_logprobs(logits, tokens)
        entropy = token_entropy(logits)
        return loss_fn(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, entropy=entropy, entropy_coef=0.01)

    logits = logits0.clone().requires_grad_(True)
    assert 0 < f(logits)[1]["clip_frac"] < 1  # both regions are exercised
    assert torch.autograd.gradcheck(lambda x: f(x)[0], (logits,), eps=1e-6, atol=1e-6)


def _grad_of_single_turn(loss_fn, logratio, adv, **kw):
    logp = _f64([[logratio, logratio]]).requires_grad_(True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, _ = loss_fn(logp, torch.zeros_like(logp), _f64([adv]), mask, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return grad


@pytest.mark.parametrize("loss_fn", LOSSES)
@pytest.mark.parametrize(
    "logratio, adv, stopped",
    [
        (math.log(1.5), 1.0, True),  # r = 1.5 > 1.2 with A > 0: clipped
        (math.log(0.5), -1.0, True),  # r = 0.5 < 0.8 with A < 0: clipped
        (math.log(3.5), -1.0, True),  # r = 3.5 > c = 3 with A < 0: dual clip
        (4.0, 1.0, True),  # log-ratio above the cap (and clipped anyway)
        (-4.0, 1.0, True),  # log-ratio below the cap: exp(-3) with A > 0 is unclipped, but capped
        (math.log(0.5), 1.0, False),  # r < 0.8 with A > 0: the min keeps the unclipped term
        (math.log(2.0), -1.0, False),  # 1.2 < r < c with A < 0: pessimistic term still active
        (math.log(1.1), 1.0, False),  # inside the trust region
    ],
)
def test_clipping_stops_gradient_outside_trust_region(loss_fn, logratio, adv, stopped):
    grad = _grad_of_single_turn(loss_fn, logratio, adv)
    if stopped:
        assert torch.all(grad == 0)
    else:
        assert torch.all(grad != 0)


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_masked_tokens_do_not_affect_loss_or_gradient(loss_fn):
    tokens, mask, logits, noise = _random_batch(seed=3)
    logp0 = _token_logprobs(logits, tokens)
    old, ref, ent = logp0 + noise(0.1), logp0 + noise(0.1), noise(1.0).abs()
    adv = _f64([1.0, -1.0, 0.5, 2.0])
    kw = dict(kl_coef=0.1, entropy_coef=0.1)

    def run(garbage):
        logp = torch.where(mask, logp0, garbage).requires_grad_(True)
        entropy = torch.where(mask, ent, garbage).requires_grad_(True)
        junk = lambda t: torch.where(mask, t, garbage)  # noqa: E731
        loss, _ = loss_fn(logp, junk(old), adv, mask, ref_logprobs=junk(ref), entropy=entropy, **kw)
        return loss, torch.autograd.grad(loss, (logp, entropy))

    loss_a, grads_a = run(torch.tensor(0.0, dtype=torch.float64))
    for garbage in (1e6, -1e6, float("nan"), float("inf"), float("-inf")):
        loss_b, grads_b = run(torch.tensor(garbage, dtype=torch.float64))
        torch.testing.assert_close(loss_b, loss_a)
        for ga, gb in zip(grads_a, grads_b):
            torch.testing.assert_close(gb, ga)
            assert torch.all(gb[~mask] == 0)


def test_empty_turns_are_left_out_of_the_turn_mean():
    # turn 1 has no generated token: the loss is that of turn 0 alone
    logp = _f64([[0.1, 0.1], [0.0, 0.0]])
    mask = torch.tensor([[True, True], [False, False]])
    both, _ = turn_level_loss(logp, torch.zeros_like(logp), _f64([1.0, 5.0]), mask)
    alone, _ = turn_level_loss(logp[:1], torch.zeros(1, 2, dtype=torch.float64), _f64([1.0]), mask[:1])
    assert both.item() == pytest.approx(alone.item()) == pytest.approx(-math.exp(0.1))


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_bad_inputs(loss_fn):
    logp, mask, adv = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2)
    with pytest.raises(ValueError, match="advantages"):
        loss_fn(logp, logp, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="mask"):
        loss_fn(logp, logp, adv, mask[:, :2])
    with pytest.raises(ValueError, match="no generated token"):
        loss_fn(logp, logp, adv, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="ref_logprobs"):
        loss_fn(logp, logp, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy"):
        loss_fn(logp, logp, adv, mask, entropy_coef=0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        loss_fn(logp, logp, adv, mask, dual_clip=1.0)
    with pytest.raises(ValueError, match="clip_eps"):
        loss_fn(logp, logp, adv, mask, clip_eps=0.0)
