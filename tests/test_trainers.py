"""GRPO and LoGo-GRPO on the tiny model.

A randomly initialised model never writes valid JSON, so every reward would be 0 and every
advantage 0. These tests drive the trainers with :class:`ScriptedSampler`: a behaviour policy
that, per observation, picks (seeded) between "store every line" and "store nothing", and reports
the real model's log-probs of that completion. Rewards then vary across rollouts, and the
update is a real gradient step on the real model.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from agents.rl.grpo import GRPO, GRPOConfig, final_session_rewards
from agents.rl.logo_grpo import LoGoConfig, LoGoGRPO
from agents.policy import Generation, SharedPolicy
from agents.generation.rollout import RolloutEngine, Start
from agents.policy.tiny import build_tiny_model
from agents.rl.update import UpdateConfig, policy_update
from memenv.env import MemSessionEnv
from memenv.types import Conversation, QAItem, Session, Turn

_LINE = re.compile(r"^\[(D\d+:\d+)\] ([^:]+): (.*)$")


class ScriptedSampler:
    """A behaviour policy with a controllable choice, scored by the real model."""

    def __init__(self, policy: SharedPolicy, p_store: float = 0.5):
        self.policy = policy
        self.model = policy.model
        self.tokenizer = policy.tokenizer
        self.p_store = p_store

    def _action(self, obs: dict, store: bool) -> str:
        lines = [m.groups() for m in map(_LINE.match, obs["text"].splitlines()) if m]
        if obs["role"] == 0:
            facts = [{"speaker": s, "dia_id": d, "fact": t} for d, s, t in lines] if store else []
            return json.dumps({"facts": facts})
        ops = [{"op": "ADD", "text": t, "speaker": s, "dia_id": d} for d, s, t in lines] if store else []
        return json.dumps({"operations": ops})

    def generate(self, observations, *, temperature=1.0, top_p=1.0, max_new_tokens=64, seed=None):
        rng = np.random.default_rng(seed)
        out = []
        for obs in observations:
            text = self._action(obs, bool(rng.random() < self.p_store))
            prompt = self.policy.render(obs["role"], text=obs["text"])
            completion = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
            with torch.no_grad():
                lp = self.policy.logprobs_of([prompt], [completion], temperature=temperature or 1.0)[0]
            out.append(Generation(int(obs["role"]), prompt, completion, lp.tolist(), text, "stop"))
        return out

    def logprobs_of(self, *args, **kwargs):
        return self.policy.logprobs_of(*args, **kwargs)


def _conversation(i: int) -> Conversation:
    people = ("Ann", "Bo")
    sessions, questions = [], []
    for k in (1, 2):
        turns = tuple(Turn(people[j % 2], f"D{k}:{j + 1}", f"{people[j % 2]} likes item{k}{j} a lot.") for j in range(2))
        sessions.append(Session(k, f"{k} May 2023", turns))
        for j, t in enumerate(turns):
            questions.append(QAItem(f"c{i}:q{k}{j}", f"What does {t.speaker} like?", f"item{k}{j}", (t.dia_id,), "current_value", k))
    return Conversation(f"c{i}", people, tuple(sessions), tuple(questions))


def _env_fn():
    return MemSessionEnv(conversations=[_conversation(0), _conversation(1)], horizon=2, slices_per_session=1, reward_mode="final", bloat_lambda=0.0)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    corpus = ['{"facts": [{"speaker": "Ann", "dia_id": "D1:1", "fact": "Ann likes item a lot."}]}'] * 50
    return SharedPolicy.from_pretrained(build_tiny_model(tmp_path_factory.mktemp("tiny"), corpus, seed=0, hidden_size=64, num_layers=2))


def _cfg(cls, **kw):
    update = UpdateConfig(lr=1e-3, epochs=1, micro_batch=64, kl_coef=0.0, entropy_coef=0.001)
    return cls(n_rollouts=4, max_questions=None, update=update, **kw)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("algo", ["grpo", "logo-grpo"])
def test_one_iteration_changes_the_weights_and_keeps_numbers_finite(policy, algo):
    sampler = ScriptedSampler(policy)
    engine = RolloutEngine(sampler, _env_fn, max_new_tokens=64)
    if algo == "grpo":
        trainer = GRPO(sampler, engine, _env_fn(), _cfg(GRPOConfig), seed=0)
    else:
        trainer = LoGoGRPO(sampler, engine, _env_fn(), _cfg(LoGoConfig, p_local=1.0, m_reruns=3, local_max_questions=None), seed=0)
    before = _params(policy.model)
    metrics = trainer.step([0], step=0)
    assert metrics["update/rows"] > 0
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert any((a != b).any() for a, b in zip(before, policy.model.parameters()))
    assert all(torch.isfinite(p).all() for p in policy.model.parameters())
    if algo == "logo-grpo":
        assert metrics["local/planned"] == 2 and metrics["local/rows"] > 0
        # groups are counted per session and role, like the global ones, so the zero-variance
        # count is a share of them (it was counted against the planned sessions: up to 2x)
        assert 2 <= metrics["local/groups"] <= 4 and metrics["local/zero_variance_groups"] <= metrics["local/groups"]



def test_a_bfloat16_policy_trains_on_float32_master_weights(tmp_path):
    """On an accelerator checkpoints load in bfloat16; the trainer must not round its updates
    away (agents.rl.optim). Same code path on the CPU with an explicit dtype."""
    from agents.rl.optim import MasterWeightAdamW

    corpus = ['{"facts": [{"speaker": "Ann", "dia_id": "D1:1", "fact": "Ann likes item a lot."}]}'] * 50
    half = SharedPolicy.from_pretrained(build_tiny_model(tmp_path, corpus, seed=0, hidden_size=64, num_layers=2), dtype=torch.bfloat16)
    sampler = ScriptedSampler(half)
    trainer = LoGoGRPO(sampler, RolloutEngine(sampler, _env_fn, max_new_tokens=64), _env_fn(), _cfg(LoGoConfig, p_local=1.0, m_reruns=3, local_max_questions=None), seed=0)
    assert isinstance(trainer.optimizer, MasterWeightAdamW)
    masters = [m.clone() for m in trainer.optimizer.master_weights]
    metrics = trainer.step([0], step=0)
    assert metrics["update/rows"] > 0 and all(math.isfinite(v) for v in metrics.values()), metrics
    assert all(p.dtype == torch.bfloat16 for p in half.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(masters, trainer.optimizer.master_weights))
    for param, master in zip(half.model.parameters(), trainer.optimizer.master_weights):
        assert torch.equal(param.detach(), master.to(torch.bfloat16))

def test_local_groups_start_from_one_snapshot_and_exclude_the_source(policy):
    sampler = ScriptedSampler(policy)
    engine = RolloutEngine(sampler, _env_fn, max_new_tokens=64)
    trainer = LoGoGRPO(sampler, engine, _env_fn(), _cfg(LoGoConfig, p_local=1.0, m_reruns=3, local_max_questions=None), seed=1)
    episodes = trainer.global_rollouts([0, 1], seed=5)
    global_rows, _ = trainer.global_rows(episodes)
    plan = trainer.plan_rerollouts(episodes)
    assert {(p.conv_id, p.session) for p in plan} == {("c0", 1), ("c0", 2), ("c1", 1), ("c1", 2)}
    reruns = trainer.rerun(plan, seed=5)
    local_rows, _ = trainer.local_rows(plan, reruns)
    global_ids = {ep.episode_id for ep in episodes}
    for p, group in zip(plan, reruns):
        assert len(group) == 3
        source = next(ep for ep in episodes if ep.conv_id == p.conv_id and ep.rollout_id == p.source_rollout)
        assert p.state is source.states[p.session]
        for ep in group:
            assert ep.states[p.session] == p.state  # every member starts from the identical snapshot
            assert ep.states[p.session].bank is p.state.bank
            assert ep.episode_id not in global_ids  # the source rollout is not a member
            assert {t.session for t in ep.turns} == {p.session}  # one session only
    for t in local_rows:
        assert t.group_id.kind == "local" and t.episode_id not in global_ids
    for t in global_rows:
        assert t.group_id.kind == "global"


def test_session_credit_goes_to_evidence_sessions():
    env = _env_fn()
    obs, info = env.reset(options={"task": 0})
    # store only session 2's turns
    while True:
        store = info["session"] == 2
        if obs["role"] == 0:
            lines = [m.groups() for m in map(_LINE.match, obs["text"].splitlines()) if m]
            action = json.dumps({"facts": [{"speaker": s, "dia_id": d, "fact": t} for d, s, t in lines] if store else []})
        else:
            action = json.dumps({"operations": [{"op": "ADD", "text": f["text"], "speaker": f["speaker"], "dia_id": f["dia_id"]} for f in info["facts"]]})
        obs, r, term, _, info = env.step(action)
        if term:
            break

    class Ep:
        final_state = env.save_state()
        sessions = [1, 2]

    rewards, final = final_session_rewards(_env_fn(), Ep, max_questions=None, credit="session")
    assert rewards[1] < rewards[2]
    assert rewards[2] > 0.5 and final["questions"] == 4
    flat, _ = final_session_rewards(_env_fn(), Ep, max_questions=None, credit="trajectory")
    assert flat[1] == flat[2] == pytest.approx(final["f1"])


def test_update_raises_logprob_of_positive_advantage_turns(policy):
    sampler = ScriptedSampler(policy)
    engine = RolloutEngine(sampler, _env_fn, max_new_tokens=64, save_states=False)
    rows = [t for ep in engine.run([Start(options={"task": 0}, rollout_id=r) for r in range(2)], seed=3) for t in ep.turns]
    for i, t in enumerate(rows):
        t.advantage = 1.0 if i % 2 == 0 else -1.0
    cfg = UpdateConfig(lr=3e-3, epochs=1, micro_batch=64, kl_coef=0.0, entropy_coef=0.0)
    opt = torch.optim.AdamW(policy.model.parameters(), lr=cfg.lr)

    def mean_logp(sign):
        sel = [t for t in rows if t.advantage * sign > 0]
        with torch.no_grad():
            lps = policy.logprobs_of([t.prompt_ids for t in sel], [t.completion_ids for t in sel])
        return float(torch.cat(lps).mean())

    pos0, neg0 = mean_logp(1), mean_logp(-1)
    for step in range(3):
        with torch.no_grad():  # refresh old log-probs, as a new batch would
            fresh = policy.logprobs_of([t.prompt_ids for t in rows], [t.completion_ids for t in rows])
        for t, lp in zip(rows, fresh):
            t.logprobs = lp.tolist()
        policy_update(policy, opt, rows, cfg, seed=step)
    pos1, neg1 = mean_logp(1), mean_logp(-1)
    assert pos1 > pos0
    # Positive and negative turns share most tokens (JSON syntax), so both may rise; the
    # update must still separate them.
    assert pos1 - neg1 > pos0 - neg0


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    """The `small` preset recomputes activations in the backward pass to fit in memory; the
    update it makes must be the one without."""
    corpus = ['{"facts": [{"speaker": "Ann", "dia_id": "D1:1", "fact": "Ann likes item a lot."}]}'] * 50
    path = build_tiny_model(tmp_path, corpus, seed=0, hidden_size=64, num_layers=2)
    plain, ckpt = SharedPolicy.from_pretrained(path), SharedPolicy.from_pretrained(path)
    engine = RolloutEngine(ScriptedSampler(plain), _env_fn, max_new_tokens=64, save_states=False)
    rows = [t for ep in engine.run([Start(options={"task": 0}, rollout_id=r) for r in range(2)], seed=3) for t in ep.turns]
    for i, t in enumerate(rows):
        t.advantage = 1.0 if i % 3 == 0 else -0.5
    after = []
    for policy, on in ((plain, False), (ckpt, True)):
        cfg = UpdateConfig(lr=1e-2, epochs=2, micro_batch=4, kl_coef=0.0, entropy_coef=0.001, gradient_checkpointing=on)
        stats = policy_update(policy, torch.optim.SGD(policy.model.parameters(), lr=cfg.lr), rows, cfg, seed=0)
        assert any(getattr(m, "gradient_checkpointing", False) for m in policy.model.modules()) == on
        after.append((stats, _params(policy.model)))
    (stats0, params0), (stats1, params1) = after
    assert stats0["rows"] == stats1["rows"] > 0 and stats0["loss"] == pytest.approx(stats1["loss"], abs=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(params0, _params(SharedPolicy.from_pretrained(path).model)))
    for p, q in zip(params0, params1):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_old_logprobs_from_the_trainer_correct_a_sampler_that_differs(tmp_path):
    """With ``old_logprobs="trainer"`` (the vLLM backend's setting) the ratio's old log-probs are
    the trainer's own, and each turn's advantage is scaled by the truncated importance weight
    ``min(exp(mean_t(trainer - sampler)), tis_cap)``: the update equals a sampler-mode update on
    exact log-probs with the advantages scaled by hand."""
    import copy

    corpus = ['{"facts": [{"speaker": "Ann", "dia_id": "D1:1", "fact": "Ann likes item a lot."}]}'] * 50
    path = build_tiny_model(tmp_path, corpus, seed=0, hidden_size=64, num_layers=2)
    exact_policy, skewed_policy = SharedPolicy.from_pretrained(path), SharedPolicy.from_pretrained(path)
    engine = RolloutEngine(ScriptedSampler(exact_policy), _env_fn, max_new_tokens=64, save_states=False)
    rows = [t for ep in engine.run([Start(options={"task": 0}, rollout_id=r) for r in range(2)], seed=3) for t in ep.turns]
    with torch.no_grad():
        exact = exact_policy.logprobs_of([t.prompt_ids for t in rows], [t.completion_ids for t in rows])
    shifts = [(0.0, -0.5, 2.0)[i % 3] for i in range(len(rows))]  # sampler = trainer - shift
    skewed, scaled = [], []
    for i, (t, lp) in enumerate(zip(rows, exact)):
        t.advantage = 1.0 if i % 2 == 0 else -0.5
        a, b = copy.copy(t), copy.copy(t)
        a.logprobs = (lp - shifts[i]).tolist()
        b.logprobs = lp.tolist()
        b.advantage = t.advantage * min(float(np.exp(shifts[i])), 2.0)
        skewed.append(a)
        scaled.append(b)
    base = dict(lr=1e-2, epochs=2, micro_batch=4, kl_coef=0.0, entropy_coef=0.0)
    stats = policy_update(skewed_policy, torch.optim.SGD(skewed_policy.model.parameters(), lr=1e-2), skewed,
                          UpdateConfig(**base, old_logprobs="trainer", tis_cap=2.0), seed=0)
    policy_update(exact_policy, torch.optim.SGD(exact_policy.model.parameters(), lr=1e-2), scaled, UpdateConfig(**base), seed=0)
    for p, q in zip(_params(skewed_policy.model), _params(exact_policy.model)):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
    assert stats["sampler/logprob_abs_diff_max"] == pytest.approx(2.0, abs=1e-4)
    assert stats["sampler/ratio_max"] == pytest.approx(float(np.exp(2.0)), rel=1e-4)
    assert stats["sampler/truncated_share"] == pytest.approx(sum(s > np.log(2.0) for s in shifts) / len(rows))
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_update(exact_policy, torch.optim.SGD(exact_policy.model.parameters(), lr=1e-2), scaled, UpdateConfig(**base, old_logprobs="vllm"))
