"""Losses chosen once: each objective declares what it needs, and the policy gradient keeps every sampled
token in its support, so numerics never silently zero a token's importance weight."""

from __future__ import annotations

import math

import pytest
import torch
from typing import get_args

from opd.ops.batch import TokenChunk
from opd.config.sections import FULL_DISTRIBUTION, TEACHER_NEEDS, TOKEN_LOGPROBS, LossConfig
from opd.config.files import validate
from opd.objectives.kinds import OBJECTIVES, PolicyGradient, build_objective


def chunk(tokens, sampler_logprobs, advantages) -> TokenChunk:
    return TokenChunk(completion_ids=torch.tensor(tokens), sampler_logprobs=torch.tensor(sampler_logprobs),
                      teacher_logprobs=None, teacher_hidden=None, teacher_topk_ids=None, teacher_topk_logprobs=None,
                      advantages=torch.tensor(advantages), source=torch.zeros(len(tokens), dtype=torch.long))


@pytest.mark.parametrize("kind", get_args(LossConfig.model_fields["kind"].annotation))
def test_every_loss_kind_has_one_objective_that_declares_what_config_says_it_needs(kind, tiny_config):
    source = "dataset" if kind == "sft" else "student"
    teacher = {**tiny_config["teacher"], "top_k": 4} if kind == "topk_forward_kl" else tiny_config["teacher"]
    loss = {"kind": kind, **({"forward_kl_coef": 0.0} if kind == "reverse_kl_pg" else {})}
    config = validate({**tiny_config, "loss": loss, "rollout": {"source": source}, "teacher": teacher})
    objective = build_objective(config)
    assert objective.needs == TEACHER_NEEDS[kind] == config.teacher_needs
    assert set(OBJECTIVES) == set(TEACHER_NEEDS)


@pytest.mark.parametrize("changes,needs", [
    ({}, FULL_DISTRIBUTION),  # the default: a local teacher adds the forward-KL term
    ({"rollout": {"top_k": 5}}, TOKEN_LOGPROBS),  # ... but not under truncation
    ({"teacher": {"url": "http://127.0.0.1:1", "path": None}}, TOKEN_LOGPROBS),  # nor from a server
    ({"loss": {"forward_kl_coef": 0.1}}, FULL_DISTRIBUTION),
    ({"rollout": {"student_fraction": 0.5}}, FULL_DISTRIBUTION),
    ({"rollout": {"student_fraction": 0.5}, "loss": {"off_policy_kind": "sft", "forward_kl_coef": 0}}, TOKEN_LOGPROBS),
    ({"rollout": {"student_fraction": 1.0, "student_fraction_start": 0.2, "student_fraction_ramp_steps": 5},
      "loss": {"kind": "forward_kl", "off_policy_kind": "sft"}}, FULL_DISTRIBUTION),
    ({"reward": {"verifier": "gsm8k"}, "loss": {"forward_kl_coef": 0}}, TOKEN_LOGPROBS),
    ({"reward": {"verifier": "gsm8k"}, "loss": {"kl_coef": 0}}, None),  # pure RL: the teacher only watches
    ({"reward": {"verifier": "gsm8k", "coef": 0}, "loss": {"kl_coef": 1}}, FULL_DISTRIBUTION),
])
def test_added_terms_and_mixtures_declare_what_they_need_as_config_does(tiny_config, changes, needs):
    raw = {**tiny_config, **{section: {**tiny_config.get(section, {}), **values} for section, values in changes.items()}}
    config = validate(raw)
    assert build_objective(config).needs == config.teacher_needs == needs


def test_a_sampled_token_just_outside_the_updates_top_k_still_gets_its_gradient():
    """The sampler (fp32) kept token 2 in its top-2; the update's logits (bf16 rounding) put it third.
    Without `keep`, log pi_theta = -inf, rho = 0, and the token contributes no gradient, silently."""
    objective = PolicyGradient(1.0, top_k=2, top_p=1.0, ratio_clip=None, kl_coef=1.0, discount=0.0)
    logits = torch.tensor([[3.0, 1.01, 1.0, -2.0]], requires_grad=True)  # the update's view
    sampled = chunk([2], [math.log(0.1)], [0.5])
    values, logprobs = objective.per_token(logits, sampled, None)
    assert torch.isfinite(logprobs).all() and torch.isfinite(values).all()
    values.sum().backward()
    assert logits.grad[0, 2] < 0 and torch.isfinite(logits.grad).all()  # pushed up: the advantage is positive
    support = torch.tensor([3.0, 1.01, 1.0])
    assert float(logprobs.detach()) == pytest.approx(float(support.log_softmax(-1)[2]), abs=1e-6)
