"""The rollout engine and continuous batching, on the real tiny model."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch

import memenv  # noqa: F401  (registers MemSession-v0)
from agents.generation.continuous import _SlabLayer, sample_tokens, supports_continuous
from agents.generation.hf import HFBackend
from agents.generation.interface import WORK_COUNTS
from agents.generation.rollout import RolloutEngine, Start
from agents.policy import SharedPolicy
from agents.policy.tiny import build_tiny_model
from memenv.data.synthetic import SyntheticConfig

LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    corpus = ['{"facts": [{"speaker": "Ann", "dia_id": "D1:1", "fact": "Ann likes tea."}]}', '{"operations": []}'] * 40
    path = build_tiny_model(tmp_path_factory.mktemp("tiny"), corpus, seed=0, hidden_size=64, num_layers=2)
    return SharedPolicy.from_pretrained(path)


def _prompts(policy, n=7):
    """Prompts of many different lengths, so the running cache is padded in every way."""
    return [policy.render(i % 2, "Ann: I like tea." + " and cake" * (3 * i)) for i in range(n)]


def _env_fn():
    config = SyntheticConfig(num_sessions=3, turns_per_session=(4, 5))
    return gym.make("MemSession-v0", horizon=3, task_seeds=[0, 1], synthetic_config=config, slices_per_session=2)


def test_the_tiny_llama_supports_continuous_batching(policy):
    assert supports_continuous(policy.model) and policy.supports_continuous


@pytest.mark.parametrize("spare, shared_prefixes", [(64, True), (1, True), (64, False)])
def test_greedy_continuous_batching_reproduces_static_batching(policy, spare, shared_prefixes, monkeypatch):
    """Merging, dropping and trimming rows of the running cache must not change what the model
    computes: greedy completions equal solo greedy generations, even with a batch of 3 slots
    refilled from a queue of 7 prompts (prefilled ahead and taking over finished rows in place,
    widening the cache when longer), each slot chaining a second prompt. With one spare
    cache column, the in-place cache buffers are reallocated on almost every step. Reusing the
    role prefixes' keys and values (two prefixes of different lengths, so rows are laid out
    as pad, prefix, pad, rest) must not change it either."""
    monkeypatch.setattr(_SlabLayer, "spare", spare)
    prompts = _prompts(policy)
    assert len(policy.role_prefixes[0]) != len(policy.role_prefixes[1])
    assert all(p[: len(policy.role_prefixes[i % 2])] == policy.role_prefixes[i % 2] for i, p in enumerate(prompts))
    prefixes = policy.role_prefixes if shared_prefixes else ()
    follow_ups = {slot: _prompts(policy, 9)[(slot + 3) % 9] for slot in range(len(prompts))}
    got: dict[tuple[int, int], tuple] = {}

    def next_prompt(slot, output):
        turn = sum(1 for s, _ in got if s == slot)
        got[(slot, turn)] = output
        return follow_ups[slot] if turn == 0 else None

    counts = policy.backend.generate_continuous(
        prompts, next_prompt, temperature=0, max_new_tokens=12, max_batch=3, prefixes=prefixes
    )
    assert len(got) == 2 * len(prompts)
    # Every prompt is prefilled exactly once, its shared prefix (if any) from the stored keys
    # and values; decode steps make up the other forward calls.
    total = sum(len(p) for p in prompts) + sum(len(p) for p in follow_ups.values())
    assert counts["prefill_tokens"] + counts["prefix_tokens"] == total
    reused = sum(len(x) for p in (*prompts, *follow_ups.values()) for x in prefixes if p[: len(x)] == x)
    assert counts["prefix_tokens"] == reused and (reused > 0) == shared_prefixes
    assert 1 <= counts["prefill_calls"] <= 2 * len(prompts) < counts["forward_calls"]
    assert counts["takeovers"] > 0
    empty = dict.fromkeys(WORK_COUNTS, 0)
    assert policy.backend.generate_continuous([], next_prompt, prefixes=prefixes) == empty
    for slot, prompt in enumerate(prompts):
        for turn, p in enumerate((prompt, follow_ups[slot])):
            (expected,) = policy.backend.generate([p], temperature=0, max_new_tokens=12)
            ids, logprobs, reason = got[(slot, turn)]
            assert ids == expected[0] and reason == expected[2]
            assert torch.allclose(torch.tensor(logprobs), torch.tensor(expected[1]), atol=LOGPROB_ATOL)


def test_queued_prompts_are_served_in_arrival_order(policy):
    """With fewer rows than slots, every slot starts before any slot's second prompt runs, and
    next prompts queue behind those already waiting: all episodes advance together."""
    order = []

    def next_prompt(slot, output):
        order.append(slot)
        return _prompts(policy, 1)[0] if order.count(slot) < 3 else None

    policy.backend.generate_continuous(_prompts(policy, 3), next_prompt, temperature=0, max_new_tokens=4, max_batch=1)
    assert order == [0, 1, 2, 0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("continuous", [True, False])
def test_max_batch_caps_the_rows_and_keeps_greedy_rollouts(policy, continuous):
    """Capping the batch queues environments for a row (continuous) or splits each step into
    smaller calls (lockstep); greedy rollouts are the same as with every env in one batch."""
    widths = []

    class Counting:
        supports_continuous = policy.supports_continuous

        def generate(self, observations, **kwargs):
            widths.append(len(observations))
            return policy.generate(observations, **kwargs)

        def generate_continuous(self, observations, on_generation, **kwargs):
            widths.append(kwargs["max_batch"])
            return policy.generate_continuous(observations, on_generation, **kwargs)

    starts = [Start(options={"task": t % 2}, rollout_id=t) for t in range(5)]

    def completions(max_batch):
        engine = RolloutEngine(Counting(), _env_fn, temperature=0.0, max_new_tokens=16, continuous=continuous, max_batch=max_batch)
        records = engine.run(starts, seed=0)
        assert all(r.done and sorted(r.session_rewards) == [1, 2, 3] for r in records)
        return [[t.completion_ids for t in r.turns] for r in records]

    unlimited = completions(None)
    widths.clear()
    assert completions(2) == unlimited
    assert widths and max(widths) == 2
    with pytest.raises(ValueError, match="max_batch"):
        RolloutEngine(policy, _env_fn, max_batch=0)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_continuous_logprobs_match_a_fresh_forward_pass(policy, temperature, top_p):
    prompts = _prompts(policy)
    outputs = {}
    policy.backend.generate_continuous(
        prompts, lambda slot, out: outputs.setdefault(slot, out) and None,
        temperature=temperature, top_p=top_p, max_new_tokens=20, seed=4, max_batch=4,
    )
    recomputed = policy.logprobs_of(prompts, [outputs[i][0] for i in range(len(prompts))], temperature=temperature)
    for i, lp in enumerate(recomputed):
        assert len(outputs[i][0]) == len(outputs[i][1]) == lp.shape[0] > 0
        assert torch.allclose(lp, torch.tensor(outputs[i][1]), atol=LOGPROB_ATOL, rtol=0)


def test_continuous_sampling_is_seeded(policy):
    def run(seed):
        outputs = {}
        policy.backend.generate_continuous(
            _prompts(policy), lambda slot, out: outputs.setdefault(slot, out) and None, max_new_tokens=16, seed=seed
        )
        return [outputs[i][0] for i in range(len(outputs))]

    state = torch.get_rng_state()
    assert run(5) == run(5) != run(6)
    assert torch.equal(state, torch.get_rng_state())


def test_length_limit_and_stop_tokens(policy):
    (first,) = policy.backend.generate(_prompts(policy, 1), temperature=0, max_new_tokens=4)
    stop = first[0][1]
    stopper = HFBackend(policy.model, policy.tokenizer, stop_ids=[stop])
    outputs = {}
    stopper.generate_continuous(_prompts(policy, 1) * 2, lambda s, o: outputs.setdefault(s, o) and None, temperature=0, max_new_tokens=8)
    expected = first[0][: first[0].index(stop) + 1]
    assert outputs[0] == outputs[1] == (expected, outputs[0][1], "stop") and len(outputs[0][1]) == len(expected)
    outputs.clear()
    policy.backend.generate_continuous(_prompts(policy, 2), lambda s, o: outputs.setdefault(s, o) and None, temperature=0, max_new_tokens=3)
    assert all(len(o[0]) <= 3 and (o[2] == "length") == (len(o[0]) == 3) for o in outputs.values())


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    seen = {int(sample_tokens(logits, 1.0, 0.75, generator)[0]) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.75 <= 0.8: the two most likely tokens
    tokens, logprobs = sample_tokens(logits, 0.0, 1.0, None)
    assert int(tokens) == 0 and torch.allclose(logprobs, torch.log(torch.tensor([0.5])))


@pytest.mark.parametrize("continuous", [True, False])
def test_rollouts_are_deterministic_and_complete(policy, continuous):
    def run():
        engine = RolloutEngine(policy, _env_fn, max_new_tokens=24, continuous=continuous)
        return engine, engine.run([Start(options={"task": t}, rollout_id=t) for t in (0, 1, 0)], seed=3)

    engine, a = run()
    _, b = run()
    assert [[t.completion_ids for t in r.turns] for r in a] == [[t.completion_ids for t in r.turns] for r in b]
    assert [r.session_rewards for r in a] == [r.session_rewards for r in b]
    for rec in a:
        assert rec.done and sorted(rec.session_rewards) == [1, 2, 3] and sorted(rec.states) == [1, 2, 3]
        assert {t.session for t in rec.turns} <= {1, 2, 3}
        assert all(len(t.logprobs) == len(t.completion_ids) > 0 for t in rec.turns)
        # Untrained model: most actions do not parse, and that is recorded, not fatal.
        assert all(t.finish_reason in ("stop", "length") for t in rec.turns)
    assert engine.timing["generated_tokens"] == sum(r.generated_tokens for r in a)
    assert (engine.timing["forward_calls"] > 0) == continuous


def test_rerollouts_start_from_exactly_the_saved_state(policy):
    engine = RolloutEngine(policy, _env_fn, max_new_tokens=24)
    (source,) = engine.run([Start(options={"task": 1})], seed=0)
    state = source.states[2]
    reruns = engine.run([Start(options={"state": state}, max_sessions=1, rollout_id=j) for j in range(3)], seed=1)
    source_first = next(t for t in source.turns if t.session == 2)
    for rec in reruns:
        assert rec.states[2] == state and {t.session for t in rec.turns} == {2}
        assert sorted(rec.session_rewards) == [2] and not rec.done
        assert rec.turns[0].prompt_ids == source_first.prompt_ids  # the same observation to act on
    assert len({tuple(tuple(t.completion_ids) for t in r.turns) for r in reruns}) > 1  # reruns differ


def test_continuous_true_without_support_is_refused(policy):
    class LockstepOnly:
        def generate(self, *args, **kwargs):
            return policy.generate(*args, **kwargs)

    engine = RolloutEngine(LockstepOnly(), _env_fn, continuous=True)
    with pytest.raises(ValueError, match="continuous"):
        engine.run([Start(options={"task": 0})])
