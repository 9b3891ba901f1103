"""Losses chosen once: each loss kind has one objective, what a run needs of its teacher is declared in one
place (opd.config.capabilities) that the config checks and the trainer read, and the policy gradient keeps
every sampled token in its support, so numerics never silently zero a token's importance weight."""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch

from opd.config.capabilities import FULL_DISTRIBUTION, KIND_NEEDS, SAMPLES, TOKEN_LOGPROBS, TOP_K, needed
from opd.config.files import validate
from opd.config.resolve import resolve
from opd.config.sections import LossConfig
from opd.objectives.kinds import OBJECTIVES, PolicyGradient, build_objective
from opd.ops.batch import TokenChunk


def chunk(tokens, sampler_logprobs, advantages) -> TokenChunk:
    return TokenChunk(
        completion_ids=torch.tensor(tokens),
        sampler_logprobs=torch.tensor(sampler_logprobs),
        teacher_logprobs=None,
        teacher_hidden=None,
        teacher_topk_ids=None,
        teacher_topk_logprobs=None,
        advantages=torch.tensor(advantages),
        source=torch.zeros(len(tokens), dtype=torch.long),
    )


@pytest.mark.parametrize("kind", get_args(LossConfig.model_fields["kind"].annotation))
def test_every_loss_kind_has_one_objective_and_one_declared_need(kind, tiny_config):
    source = "dataset" if kind == "sft" else "student"
    teacher = {**tiny_config["teacher"], "top_k": 4} if kind == "topk_forward_kl" else tiny_config["teacher"]
    loss = {"kind": kind, **({"forward_kl_coef": 0.0} if kind == "reverse_kl_pg" else {})}
    config = resolve(validate({**tiny_config, "loss": loss, "rollout": {"source": source}, "teacher": teacher}))
    assert build_objective(config) is not None
    assert needed(config) == ({KIND_NEEDS[kind]} if KIND_NEEDS[kind] else set())
    assert set(OBJECTIVES) == set(KIND_NEEDS) == set(get_args(LossConfig.model_fields["kind"].annotation))


def test_the_objective_is_built_from_a_resolved_config_only(tiny_config):
    with pytest.raises(ValueError, match="resolved config"):
        build_objective(validate(tiny_config))  # forward_kl_coef still null


@pytest.mark.parametrize(
    "changes,needs",
    [
        ({}, {FULL_DISTRIBUTION, TOKEN_LOGPROBS}),  # the default: a local teacher adds the forward-KL term
        ({"rollout": {"top_k": 5}}, {TOKEN_LOGPROBS}),  # ... but not under truncation
        # from a server, the term's top-k estimate (teacher.top_k resolves to 20); without a top-k, no term
        ({"teacher": {"url": "http://127.0.0.1:1", "path": None}}, {TOKEN_LOGPROBS, TOP_K}),
        ({"teacher": {"url": "http://127.0.0.1:1", "path": None, "top_k": 0}}, {TOKEN_LOGPROBS}),
        ({"loss": {"forward_kl_coef": 0.1}}, {FULL_DISTRIBUTION, TOKEN_LOGPROBS}),
        ({"rollout": {"student_fraction": 0.5}}, {FULL_DISTRIBUTION, TOKEN_LOGPROBS, SAMPLES}),
        (
            {"rollout": {"student_fraction": 0.5}, "loss": {"off_policy_kind": "sft", "forward_kl_coef": 0}},
            {TOKEN_LOGPROBS, SAMPLES},
        ),
        (
            {
                "rollout": {"student_fraction": 0.5, "off_policy_source": "dataset"},
                "loss": {"off_policy_kind": "sft", "forward_kl_coef": 0},
            },
            {TOKEN_LOGPROBS},
        ),
        (
            {
                "rollout": {"student_fraction": 1.0, "student_fraction_start": 0.2, "student_fraction_ramp_steps": 5},
                "loss": {"kind": "forward_kl", "off_policy_kind": "sft"},
            },
            {FULL_DISTRIBUTION, SAMPLES},
        ),
        ({"reward": {"verifier": "gsm8k"}, "loss": {"forward_kl_coef": 0}}, {TOKEN_LOGPROBS}),
        ({"reward": {"verifier": "gsm8k"}, "loss": {"kl_coef": 0}}, set()),  # pure RL: the teacher only watches
        ({"reward": {"verifier": "gsm8k", "coef": 0}, "loss": {"kl_coef": 1}}, {FULL_DISTRIBUTION, TOKEN_LOGPROBS}),
        ({"loss": {"kind": "topk_forward_kl"}, "teacher": {"top_k": 3}}, {TOP_K}),
        (  # a server's top-k without the head here: the term is the top-k estimate
            {"teacher": {"url": "http://127.0.0.1:1", "path": None, "top_k": 20}, "loss": {"forward_kl_coef": 1.0}},
            {TOP_K, TOKEN_LOGPROBS},
        ),
        (  # with the head here, the exact term
            {"teacher": {"url": "http://127.0.0.1:1", "path": None, "lm_head": "/x"}},
            {FULL_DISTRIBUTION, TOKEN_LOGPROBS},
        ),
    ],
)
def test_added_terms_and_mixtures_need_what_they_compute_with(tiny_config, changes, needs):
    raw = {
        **tiny_config,
        **{section: {**(tiny_config.get(section) or {}), **values} for section, values in changes.items()},
    }
    config = resolve(validate(raw))
    assert needed(config) == needs
    build_objective(config)


def test_the_forward_kl_term_reads_the_whole_distribution_or_else_the_top_k_with_its_tail():
    """Against the brute-force terms: the exact forward KL from the teacher's logits where its hidden states
    are at hand; the top-k estimate (topk_forward_kl) where a server sent its top-k only."""
    from opd.objectives import losses

    torch.manual_seed(0)
    objective = PolicyGradient(1.0, 0, 1.0, None, kl_coef=1.0, discount=0.0, forward_kl_coef=0.5)
    student = torch.randn(3, 6)
    teacher_logits = torch.randn(3, 6)
    base = chunk([1, 2, 3], [-1.0, -2.0, -1.5], [0.2, -0.1, 0.3])
    plain = PolicyGradient(1.0, 0, 1.0, None, kl_coef=1.0, discount=0.0).per_token(student, base, None)[0]

    class Teacher:
        def logits(self, hidden):
            return hidden  # the "hidden states" here are the logits themselves

    exact = objective.per_token(student, TokenChunk(**{**vars(base), "teacher_hidden": teacher_logits}), Teacher())[0]
    reference = (teacher_logits.softmax(-1) * (teacher_logits.log_softmax(-1) - student.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(exact, plain + 0.5 * reference)
    top_logprobs, top_ids = teacher_logits.log_softmax(-1).topk(2, dim=-1)
    with_top = TokenChunk(**{**vars(base), "teacher_topk_ids": top_ids, "teacher_topk_logprobs": top_logprobs})
    estimated = objective.per_token(student, with_top, None)[0]
    torch.testing.assert_close(estimated, plain + 0.5 * losses.topk_forward_kl(student, top_ids, top_logprobs))


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
