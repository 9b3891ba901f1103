"""Pin every function of opd.objectives.losses to a reference written straight from its definition.

References enumerate a tiny vocabulary (V = 5..7) with plain Python floats (float64) or with an
explicit float64 torch formula; none of them calls the function under test or F.kl_div. opd.objectives.losses
works in float32 internally, so its results are compared with float32 tolerances.
"""

from __future__ import annotations

import math

import pytest
import torch

from opd.objectives import losses
from opd.ops.logprobs import process_logits, token_logprobs

NEG_INF = float("-inf")


# ---------------------------------------------------------------- references (float64, from the definitions)


def ref_softmax(row: list[float]) -> list[float]:
    """Probabilities of one row of logits; -inf logits get probability exactly 0."""
    top = max(row)
    exps = [0.0 if x == NEG_INF else math.exp(x - top) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def ref_kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) = sum_i p_i (log p_i - log q_i), with 0 log 0 = 0."""
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0.0)


def ref_jsd(p_student: list[float], p_teacher: list[float], beta: float) -> float:
    """beta * KL(pT || M) + (1 - beta) * KL(pS || M), M = beta * pT + (1 - beta) * pS."""
    mixture = [beta * t + (1 - beta) * s for s, t in zip(p_student, p_teacher)]
    return beta * ref_kl(p_teacher, mixture) + (1 - beta) * ref_kl(p_student, mixture)


def rows_of(tensor: torch.Tensor) -> list[list[float]]:
    """(..., V) -> list of rows as Python floats."""
    return tensor.detach().double().reshape(-1, tensor.shape[-1]).tolist()


def torch_kl64(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Explicit float64 KL(p || q) = sum p (log p - log q) over the last axis, differentiable."""
    return (p * (p.log() - q.log())).sum(-1)


def torch_softmax64(logits: torch.Tensor) -> torch.Tensor:
    """Explicit exp / sum exp in float64 (max-shifted), differentiable."""
    shifted = logits - logits.max(-1, keepdim=True).values.detach()
    exps = shifted.exp()
    return exps / exps.sum(-1, keepdim=True)


def torch_divergence64(kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float):
    p_student = torch_softmax64(student_logits)
    p_teacher = torch_softmax64(teacher_logits)
    if kind == "forward_kl":
        return torch_kl64(p_teacher, p_student)
    if kind == "reverse_kl":
        return torch_kl64(p_student, p_teacher)
    mixture = beta * p_teacher + (1 - beta) * p_student
    return beta * torch_kl64(p_teacher, mixture) + (1 - beta) * torch_kl64(p_student, mixture)


def random_logits(*shape: int, seed: int, scale: float = 1.5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


def under_test(kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    if kind == "forward_kl":
        return losses.forward_kl(student_logits, teacher_logits)
    if kind == "reverse_kl":
        return losses.reverse_kl(student_logits, teacher_logits)
    return losses.generalized_jsd(student_logits, teacher_logits, beta)


# ---------------------------------------------------------------- token_logprobs


def test_token_logprobs_equals_enumerated_log_softmax():
    """token_logprobs(logits, tokens) == log(softmax(logits)[token]) at every position of a (B, T, V) batch."""
    logits = random_logits(3, 4, 6, seed=0, scale=3.0)  # (B, T, V)
    tokens = torch.randint(0, 6, (3, 4), generator=torch.Generator().manual_seed(1))  # (B, T)
    got = token_logprobs(logits, tokens)  # (B, T)
    assert got.shape == (3, 4)
    expected = [math.log(ref_softmax(row)[tok]) for row, tok in zip(rows_of(logits), tokens.reshape(-1).tolist())]
    torch.testing.assert_close(got.double().reshape(-1), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)


def test_token_logprobs_gradient_is_onehot_minus_softmax():
    """d log p(y) / d logits = onehot(y) - softmax(logits)."""
    logits = random_logits(4, 5, seed=2).requires_grad_()
    tokens = torch.tensor([0, 4, 2, 2])
    token_logprobs(logits, tokens).sum().backward()
    expected = [
        [(1.0 if i == tok else 0.0) - p for i, p in enumerate(ref_softmax(row))]
        for row, tok in zip(rows_of(logits), tokens.tolist())
    ]
    torch.testing.assert_close(logits.grad, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


def test_token_logprobs_finite_with_minus_inf_logit_elsewhere():
    """A -inf logit on another entry is probability 0: the picked log-prob stays finite and exact."""
    logits = torch.tensor([[0.3, NEG_INF, 1.2, -0.7, 0.0], [NEG_INF, NEG_INF, 2.0, 1.0, -3.0]], dtype=torch.float64)
    tokens = torch.tensor([2, 4])
    got = token_logprobs(logits, tokens)
    expected = [math.log(ref_softmax(row)[tok]) for row, tok in zip(rows_of(logits), tokens.tolist())]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


def test_token_logprobs_minus_inf_at_token_gives_minus_inf_not_nan():
    """A token whose own logit is -inf has log-prob -inf (never NaN), and its gradient stays finite."""
    logits = torch.tensor([[0.3, NEG_INF, 1.2, -0.7, 0.0], [NEG_INF, 0.5, NEG_INF, 1.0, -3.0]], dtype=torch.float64)
    logits.requires_grad_()
    tokens = torch.tensor([1, 2])
    got = token_logprobs(logits, tokens)
    assert not torch.isnan(got).any()
    assert torch.isneginf(got).all()
    # The pipeline turns such a log-prob into rho = exp(-inf - 0) = 0; the gradient must stay finite.
    torch.exp(got).sum().backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- process_logits


def ref_top_k_keep(row: list[float], k: int) -> set[int]:
    order = sorted(range(len(row)), key=lambda i: -row[i])
    return set(order[:k]) if k else set(range(len(row)))


def ref_top_p_keep(probs: list[float], top_p: float, allowed: set[int]) -> tuple[set[int], float]:
    """Smallest prefix of `allowed` sorted by probability (renormalized) whose mass reaches top_p.

    Also returns how close any prefix mass came to top_p, so float32 ties at the boundary can be skipped.
    """
    total = sum(probs[i] for i in allowed)
    order = sorted(allowed, key=lambda i: -probs[i])
    kept: set[int] = set()
    mass = 0.0
    margin = math.inf
    for i in order:
        kept.add(i)
        mass += probs[i] / total
        margin = min(margin, abs(mass - top_p))
        if mass >= top_p:
            break
    return kept, margin


def kept_set(row: list[float]) -> set[int]:
    return {i for i, x in enumerate(row) if x != NEG_INF}


def test_process_logits_temperature_divides_logits():
    """With no truncation, process_logits is logits / temperature; top_k=0 and top_p=1 are no-ops."""
    logits = random_logits(2, 3, 7, seed=3)
    for temperature in (1.0, 0.7, 2.5):
        got = process_logits(logits, temperature, top_k=0, top_p=1.0)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), logits / temperature, atol=1e-5, rtol=1e-6)
    # top_k >= V is also a no-op.
    got = process_logits(logits, 1.0, top_k=7, top_p=1.0)
    torch.testing.assert_close(got.double(), logits, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 4, 6])
def test_process_logits_top_k_keeps_exactly_the_k_largest(top_k):
    """top-k leaves exactly the k largest entries (values = logits / temperature), the rest -inf."""
    logits = random_logits(40, 7, seed=4)
    temperature = 0.8
    got = process_logits(logits, temperature, top_k=top_k)
    for row_in, row_out in zip(rows_of(logits), rows_of(got)):
        keep = ref_top_k_keep(row_in, top_k)
        assert kept_set(row_out) == keep
        for i in keep:
            assert row_out[i] == pytest.approx(row_in[i] / temperature, abs=1e-5)


def test_process_logits_top_p_hand_checked():
    """probs (0.5, 0.3, 0.15, 0.05): top_p=0.4 keeps 1 token, 0.75 keeps 2, 0.85 keeps 3, 0.99 keeps 4."""
    logits = torch.tensor([[math.log(0.15), math.log(0.5), math.log(0.05), math.log(0.3)]], dtype=torch.float64)
    expectations = {0.4: {1}, 0.75: {1, 3}, 0.85: {0, 1, 3}, 0.99: {0, 1, 2, 3}, 1e-6: {1}}
    for top_p, keep in expectations.items():
        got = process_logits(logits, 1.0, top_p=top_p)
        assert kept_set(rows_of(got)[0]) == keep, top_p


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("top_k", [0, 4])
@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9, 0.97])
def test_process_logits_top_p_matches_brute_force(temperature, top_k, top_p):
    """Nucleus keeps the smallest probability-sorted prefix reaching top_p (of the top-k-renormalized
    distribution at this temperature); kept logits keep their value."""
    logits = random_logits(300, 7, seed=5, scale=2.0)
    got = process_logits(logits, temperature, top_k=top_k, top_p=top_p)
    checked = 0
    for row_in, row_out in zip(rows_of(logits), rows_of(got)):
        scaled = [x / temperature for x in row_in]
        allowed = ref_top_k_keep(scaled, top_k)
        keep, margin = ref_top_p_keep(ref_softmax(scaled), top_p, allowed)
        if margin < 1e-5:  # float32 cannot decide a prefix mass this close to top_p
            continue
        checked += 1
        assert kept_set(row_out) == keep
        for i in keep:
            assert row_out[i] == pytest.approx(scaled[i], abs=1e-5)
    assert checked >= 290


def test_process_logits_top_p_always_keeps_the_most_likely_token():
    """Even a tiny top_p keeps exactly the argmax token, so the row stays a distribution."""
    logits = random_logits(50, 6, seed=6)
    got = process_logits(logits, 1.0, top_p=1e-9)
    for row_in, row_out in zip(rows_of(logits), rows_of(got)):
        assert kept_set(row_out) == {max(range(6), key=lambda i: row_in[i])}


# ---------------------------------------------------------------- forward_kl, reverse_kl, generalized_jsd

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]


def reference_values(kind: str, student_logits, teacher_logits, beta: float) -> torch.Tensor:
    values = []
    for s_row, t_row in zip(rows_of(student_logits), rows_of(teacher_logits)):
        p_s, p_t = ref_softmax(s_row), ref_softmax(t_row)
        if kind == "forward_kl":
            values.append(ref_kl(p_t, p_s))
        elif kind == "reverse_kl":
            values.append(ref_kl(p_s, p_t))
        else:
            values.append(ref_jsd(p_s, p_t, beta))
    return torch.tensor(values, dtype=torch.float64).reshape(student_logits.shape[:-1])


@pytest.mark.parametrize("kind,beta", [("forward_kl", None), ("reverse_kl", None)] + [("jsd", b) for b in BETAS])
def test_divergence_values_match_enumeration(kind, beta):
    """Per-position values of forward KL(pT||pS), reverse KL(pS||pT) and JSD_beta vs enumerated sums."""
    student = random_logits(3, 4, 6, seed=7)  # (B, T, V)
    teacher = random_logits(3, 4, 6, seed=8)
    if kind == "jsd" and beta in (0.0, 1.0):
        # GKD's convention at the endpoints: beta=0 is forward KL(pT||pS), beta=1 is reverse KL(pS||pT).
        expected = reference_values("forward_kl" if beta == 0.0 else "reverse_kl", student, teacher, beta)
    else:
        expected = reference_values(kind, student, teacher, beta)
    got = under_test(kind, student, teacher, beta)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,beta", [("forward_kl", None), ("reverse_kl", None)] + [("jsd", b) for b in BETAS])
def test_divergence_gradients_match_explicit_float64_formula(kind, beta):
    """d/d student_logits of each divergence == autograd of sum p (log p - log q) written out in float64."""
    student = random_logits(2, 3, 6, seed=9)
    teacher = random_logits(2, 3, 6, seed=10)
    weights = random_logits(2, 3, seed=11)  # a random upstream gradient, so positions are not all equal

    student_ut = student.clone().requires_grad_()
    (under_test(kind, student_ut, teacher, beta) * weights).sum().backward()

    ref_kind = kind
    if kind == "jsd" and beta == 0.0:
        ref_kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        ref_kind = "reverse_kl"
    student_ref = student.clone().requires_grad_()
    (torch_divergence64(ref_kind, student_ref, teacher, beta) * weights).sum().backward()

    assert student_ut.grad is not None and student_ut.grad.abs().max() > 1e-3
    torch.testing.assert_close(student_ut.grad, student_ref.grad, atol=1e-5, rtol=1e-5)


def test_reference_float64_jsd_formula_matches_enumeration():
    """Sanity of the float64 formula itself against the Python enumeration at interior betas."""
    student = random_logits(4, 5, seed=12)
    teacher = random_logits(4, 5, seed=13)
    for beta in (0.1, 0.5, 0.9):
        torch.testing.assert_close(
            torch_divergence64("jsd", student, teacher, beta),
            reference_values("jsd", student, teacher, beta),
            atol=1e-12,
            rtol=0,
        )


def test_jsd_near_endpoints_is_beta_times_the_kl():
    """JSD_beta -> 0 at both ends; JSD_beta / beta -> KL(pT||pS) as beta -> 0 and
    JSD_beta / (1 - beta) -> KL(pS||pT) as beta -> 1 (the KLs the endpoints return)."""
    student = random_logits(2, 4, 6, seed=14)
    teacher = random_logits(2, 4, 6, seed=15)
    forward = reference_values("forward_kl", student, teacher, 0.0)
    reverse = reference_values("reverse_kl", student, teacher, 0.0)
    for eps in (1e-2, 1e-3):
        near_zero = losses.generalized_jsd(student, teacher, eps).double()
        near_one = losses.generalized_jsd(student, teacher, 1 - eps).double()
        # Exact references at these betas, then the normalized limits (error O(eps)).
        torch.testing.assert_close(near_zero, reference_values("jsd", student, teacher, eps), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(near_one, reference_values("jsd", student, teacher, 1 - eps), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(near_zero / eps, forward, rtol=20 * eps, atol=1e-4)
        torch.testing.assert_close(near_one / eps, reverse, rtol=20 * eps, atol=1e-4)


@pytest.mark.parametrize(
    "kind,beta", [("forward_kl", None), ("reverse_kl", None), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0)]
)
def test_divergences_with_zero_probability_entries_are_finite(kind, beta):
    """A -inf logit (probability 0, as top-k/top-p truncation makes) contributes 0 log 0 = 0, not NaN:
    teacher zeros in forward KL(pT||pS) and student zeros in reverse KL(pS||pT) and JSD are finite."""
    student = random_logits(3, 6, seed=16)
    teacher = random_logits(3, 6, seed=17)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        student[:, 1] = NEG_INF  # KL(pS||pT) with pS_i = 0 where pT_i > 0: finite
        student[0, 4] = NEG_INF
    elif kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        teacher[:, 1] = NEG_INF  # KL(pT||pS) with pT_i = 0 where pS_i > 0: finite
        teacher[0, 4] = NEG_INF
    else:
        student[:, 1] = NEG_INF  # JSD is finite for any zeros: M > 0 wherever either is > 0
        teacher[:, 3] = NEG_INF
    ref_kind = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, kind) if kind == "jsd" else kind
    expected = reference_values(ref_kind, student, teacher, beta)
    got = under_test(kind, student, teacher, beta)
    assert torch.isfinite(got).all(), got
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_where_both_models_give_an_entry_zero_probability_has_the_reference_gradient(beta):
    """Both logits -inf at the same entry (a token both truncate, or a masked vocabulary row): the value is
    the JSD over the other entries, and the gradient matches float64 autograd of the formula over those
    entries, with no NaN anywhere in the row (logaddexp(-inf, -inf)'s backward is 0/0)."""
    student = random_logits(3, 6, seed=30)
    teacher = random_logits(3, 6, seed=31)
    student[:, 2] = teacher[:, 2] = NEG_INF
    student[1, 4] = teacher[1, 4] = NEG_INF
    student[2, 0] = NEG_INF  # one side only, as well
    weights = random_logits(3, seed=32)
    student_ut = student.clone().requires_grad_()
    got = losses.generalized_jsd(student_ut, teacher, beta)
    (got * weights).sum().backward()
    torch.testing.assert_close(got.double(), reference_values("jsd", student, teacher, beta), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(student_ut.grad).all(), student_ut.grad
    for row in range(3):  # reference: the formula over the entries where either model has mass
        keep = ~(torch.isneginf(student[row]) & torch.isneginf(teacher[row]))
        reference = student[row, keep].clone().requires_grad_()
        p_student = torch_softmax64(reference)
        p_teacher = torch_softmax64(teacher[row, keep])
        mixture = beta * p_teacher + (1 - beta) * p_student
        support = p_student > 0
        value = (
            beta * torch_kl64(p_teacher, mixture)
            + (1 - beta) * (p_student[support] * (p_student[support].log() - mixture[support].log())).sum()
        )
        (value * weights[row]).backward()
        expected = torch.zeros(6, dtype=torch.float64)
        expected[keep] = torch.nan_to_num(reference.grad)
        torch.testing.assert_close(student_ut.grad[row], expected, atol=1e-6, rtol=1e-5)


def test_process_logits_keeps_the_given_tokens_in_the_truncated_support():
    """keep: a token the sampler drew stays in the update's support with its own logit, even where
    rounding put it just past the top-k or top-p boundary; everything else is truncated as usual."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.1, 2.0, 1.9, -1.0]])
    keep = torch.tensor([2, 2])
    top_k = process_logits(logits, 1.0, top_k=2, keep=keep)
    assert kept_set(rows_of(top_k)[0]) == {0, 1, 2} and kept_set(rows_of(top_k)[1]) == {1, 2}
    assert top_k[0, 2] == 1.0
    top_p = process_logits(logits, 0.5, top_p=0.5, keep=torch.tensor([1, 3]))
    assert kept_set(rows_of(top_p)[0]) == {0, 1} and kept_set(rows_of(top_p)[1]) == {1, 3}
    assert top_p[1, 3] == -2.0  # the kept token's logit at the temperature
    untouched = process_logits(logits, 0.7, keep=keep)
    torch.testing.assert_close(untouched, logits / 0.7)


def backward_nodes(tensor: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind a tensor."""
    names, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            names.add(type(node).__name__)
            stack.extend(child for child, _ in node.next_functions)
    return names


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_kl_uses_its_closed_form_gradient_and_autograd_where_the_teacher_needs_one(kind):
    """With a fixed teacher the KLs backpropagate through the closed form (whose gradients the tests
    above check against float64 autograd); a teacher that needs gradients gets autograd's chain,
    and its gradient matches the float64 formula too."""
    student = random_logits(3, 7, seed=18).requires_grad_()
    teacher = random_logits(3, 7, seed=19)
    nodes = backward_nodes(under_test(kind, student, teacher, None))
    assert any("ClosedForm" in node for node in nodes) and "LogSoftmaxBackward0" not in nodes
    teacher_ut, teacher_ref = teacher.clone().requires_grad_(), teacher.clone().requires_grad_()
    weights = random_logits(3, seed=20)
    (under_test(kind, student, teacher_ut, None) * weights).sum().backward()
    (torch_divergence64(kind, student.detach(), teacher_ref, None) * weights).sum().backward()
    assert teacher_ut.grad.abs().max() > 1e-3
    torch.testing.assert_close(teacher_ut.grad, teacher_ref.grad, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- discounted_advantages


def ref_advantages(student_lp, teacher_lp, mask, coef, discount) -> torch.Tensor:
    """A_t = -coef * sum_{j>=t, mask_j} discount^(j-t) (s_j - t_j), and 0 where mask_t = 0."""
    s, t, m = student_lp.tolist(), teacher_lp.tolist(), mask.tolist()
    out = []
    for b in range(len(s)):
        row = []
        for i in range(len(s[b])):
            if not m[b][i]:
                row.append(0.0)
                continue
            total = sum(discount ** (j - i) * (s[b][j] - t[b][j]) for j in range(i, len(s[b])) if m[b][j])
            row.append(-coef * total)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def advantage_inputs(seed: int):
    generator = torch.Generator().manual_seed(seed)
    student_lp = -torch.rand(4, 7, generator=generator, dtype=torch.float64) * 3  # (B, T)
    teacher_lp = -torch.rand(4, 7, generator=generator, dtype=torch.float64) * 3  # (B, T)
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 0, 0, 0, 0],  # ends early (after EOS)
            [1, 0, 1, 1, 0, 1, 0],  # holes inside
            [0, 0, 0, 0, 0, 0, 0],  # empty row
        ],
        dtype=torch.bool,
    )
    return student_lp, teacher_lp, mask


@pytest.mark.parametrize("discount", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("coef", [1.0, 0.3])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float64])
def test_discounted_advantages_match_double_loop(discount, coef, mask_dtype):
    """Discounted advantages equal the python double loop, 0 at masked-out positions."""
    student_lp, teacher_lp, mask = advantage_inputs(seed=18)
    got = losses.discounted_advantages(student_lp, teacher_lp, mask.to(mask_dtype), coef=coef, discount=discount)
    expected = ref_advantages(student_lp, teacher_lp, mask, coef, discount)
    torch.testing.assert_close(got.double(), expected, atol=1e-10, rtol=0)
    assert (got[~mask] == 0).all()


def test_discounted_advantages_zero_discount_is_minus_coef_times_k():
    """discount = 0 gives A_t = -coef * (s_t - t_t) inside the mask."""
    student_lp, teacher_lp, mask = advantage_inputs(seed=19)
    got = losses.discounted_advantages(student_lp, teacher_lp, mask, coef=0.7, discount=0.0)
    expected = torch.where(mask, -0.7 * (student_lp - teacher_lp), torch.zeros_like(student_lp))
    torch.testing.assert_close(got.double(), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("discount", [0.0, 0.9, 1.0])
def test_discounted_advantages_masked_positions_never_leak(discount):
    """Garbage (large, -inf, NaN) at masked-out positions changes nothing and produces no NaN."""
    student_lp, teacher_lp, mask = advantage_inputs(seed=20)
    clean = losses.discounted_advantages(student_lp, teacher_lp, mask, discount=discount)
    dirty_student, dirty_teacher = student_lp.clone(), teacher_lp.clone()
    outside = ~mask
    dirty_student[outside] = NEG_INF
    dirty_teacher[outside] = NEG_INF  # -inf - -inf = NaN if it were used
    dirty_student[1, 5] = 1e6
    dirty_teacher[2, 4] = float("nan")
    dirty = losses.discounted_advantages(dirty_student, dirty_teacher, mask, discount=discount)
    assert torch.isfinite(dirty).all()
    torch.testing.assert_close(dirty, clean, atol=0, rtol=0)


# ---------------------------------------------------------------- reverse_kl_pg


def pg_inputs(seed: int):
    generator = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(3, 6, generator=generator, dtype=torch.float64) * 3  # (B, T)
    old = logprobs + 0.4 * torch.randn(3, 6, generator=generator, dtype=torch.float64)
    advantages = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    return logprobs, old, advantages


def test_reverse_kl_pg_value_and_gradient_are_minus_rho_times_advantage():
    """Loss per token is -rho * A, rho = exp(lp - old); its gradient w.r.t. lp is also -rho * A."""
    logprobs, old, advantages = pg_inputs(seed=21)
    logprobs.requires_grad_()
    got = losses.reverse_kl_pg(logprobs, old, advantages)
    expected = [
        [-math.exp(lp - o) * a for lp, o, a in zip(*rows)]
        for rows in zip(logprobs.tolist(), old.tolist(), advantages.tolist())
    ]
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-6)
    got.sum().backward()
    torch.testing.assert_close(logprobs.grad.double(), expected, atol=1e-6, rtol=1e-6)


def test_reverse_kl_pg_on_policy_is_reinforce():
    """With old == logprobs, rho = 1: the value is -A and the gradient is exactly -A."""
    logprobs, _, advantages = pg_inputs(seed=22)
    logprobs.requires_grad_()
    got = losses.reverse_kl_pg(logprobs, logprobs.detach().clone(), advantages)
    assert torch.equal(got.detach(), -advantages)
    got.sum().backward()
    assert torch.equal(logprobs.grad, -advantages)


def test_reverse_kl_pg_ratio_clip_truncates_the_importance_weight():
    """Truncated IS: clipped tokens have value -clip * A and gradient -clip * A (weight min(rho, clip))."""
    logprobs, old, advantages = pg_inputs(seed=23)
    clip = 1.2
    rho = torch.exp(logprobs - old)
    clipped = rho > clip
    assert clipped.any() and (~clipped).any()
    logprobs.requires_grad_()
    got = losses.reverse_kl_pg(logprobs, old, advantages, ratio_clip=clip)
    expected = -torch.where(clipped, torch.full_like(rho, clip), rho) * advantages
    torch.testing.assert_close(got.double().detach(), expected, atol=1e-6, rtol=1e-6)
    got.sum().backward()
    torch.testing.assert_close(logprobs.grad[clipped].double(), (-clip * advantages)[clipped], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logprobs.grad[~clipped], (-rho * advantages)[~clipped], atol=1e-6, rtol=1e-6)


def test_reverse_kl_pg_does_not_differentiate_advantages_or_old_logprobs():
    """Advantages and old log-probs are constants of the loss: they receive no gradient."""
    logprobs, old, advantages = pg_inputs(seed=24)
    logprobs.requires_grad_()
    old.requires_grad_()
    advantages.requires_grad_()
    losses.reverse_kl_pg(logprobs, old, advantages, ratio_clip=1.5).sum().backward()
    assert logprobs.grad is not None
    assert old.grad is None
    assert advantages.grad is None


# ---------------------------------------------------------------- statistics of the sampled estimate (DESIGN §5)

STUDENT_ROW = [0.8, -0.4, 1.3, 0.1, -1.5, 0.6]
TEACHER_ROW = [1.5, 0.2, -0.9, 0.4, -0.2, 0.9]


def test_sampled_reverse_kl_estimate_averages_to_exact_reverse_kl():
    """Mean over student samples of log pS(y) - log pT(y) equals exact KL(pS||pT) within 4 standard errors."""
    student = torch.tensor(STUDENT_ROW, dtype=torch.float64)
    teacher = torch.tensor(TEACHER_ROW, dtype=torch.float64)
    p_s, p_t = ref_softmax(STUDENT_ROW), ref_softmax(TEACHER_ROW)
    exact = ref_kl(p_s, p_t)
    generator = torch.Generator().manual_seed(25)
    count = 200_000
    samples = torch.multinomial(torch.tensor(p_s), count, replacement=True, generator=generator)  # (N,)
    k = (
        token_logprobs(student.expand(count, -1), samples) - token_logprobs(teacher.expand(count, -1), samples)
    ).double()  # (N,)
    standard_error = k.std().item() / math.sqrt(count)
    assert abs(k.mean().item() - exact) < 4 * standard_error
    # The estimate is not trivially exact: per-sample values vary.
    assert standard_error > 1e-4


def test_expected_policy_gradient_equals_exact_reverse_kl_gradient():
    """sum_y pS(y) * grad[-rho(y) A(y)] with A = -(log pS - log pT), rho = 1, equals grad KL(pS||pT), exactly."""
    vocab = len(STUDENT_ROW)
    student = torch.tensor(STUDENT_ROW, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor(TEACHER_ROW, dtype=torch.float64)
    tokens = torch.arange(vocab)
    student_lp = token_logprobs(student.expand(vocab, -1), tokens)  # (V,) one row per token y
    teacher_lp = token_logprobs(teacher.expand(vocab, -1), tokens)
    advantages = losses.discounted_advantages(
        student_lp.detach()[None], teacher_lp[None], torch.ones(1, vocab, dtype=torch.bool)
    )[0]  # (V,) = -(log pS(y) - log pT(y))
    per_token = losses.reverse_kl_pg(student_lp, student_lp.detach(), advantages)  # (V,)
    weights = torch.tensor(ref_softmax(STUDENT_ROW), dtype=torch.float64)
    (weights * per_token).sum().backward()

    student_ref = student.detach().clone().requires_grad_()
    torch_kl64(torch_softmax64(student_ref), torch_softmax64(teacher)).backward()
    assert student_ref.grad.abs().max() > 1e-2
    torch.testing.assert_close(student.grad, student_ref.grad, atol=1e-6, rtol=1e-5)


def test_sampled_policy_gradient_averages_to_exact_reverse_kl_gradient():
    """The same gradient averaged over 200k student samples lands within 4 standard errors per logit."""
    vocab = len(STUDENT_ROW)
    count = 200_000
    student = torch.tensor(STUDENT_ROW, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor(TEACHER_ROW, dtype=torch.float64)
    p_s = ref_softmax(STUDENT_ROW)
    samples = torch.multinomial(torch.tensor(p_s), count, replacement=True, generator=torch.Generator().manual_seed(26))
    student_lp = token_logprobs(student.expand(count, -1), samples)  # (N,)
    teacher_lp = token_logprobs(teacher.expand(count, -1), samples)
    advantages = -(student_lp.detach() - teacher_lp)
    per_token = losses.reverse_kl_pg(student_lp, student_lp.detach(), advantages)
    losses.reduce_tokens(per_token, torch.ones(count, dtype=torch.bool), count).backward()

    # Per-sample gradient k(y) * (onehot(y) - pS), only to size the standard error.
    k = -advantages.double()
    per_sample = k[:, None] * (torch.nn.functional.one_hot(samples, vocab).double() - torch.tensor(p_s)[None])
    standard_error = per_sample.std(0) / math.sqrt(count)
    student_ref = student.detach().clone().requires_grad_()
    torch_kl64(torch_softmax64(student_ref), torch_softmax64(teacher)).backward()
    assert ((student.grad - student_ref.grad).abs() < 4 * standard_error).all()


# ---------------------------------------------------------------- reduce_tokens


def reduce_inputs(seed: int):
    generator = torch.Generator().manual_seed(seed)
    per_token = torch.randn(8, 5, generator=generator, dtype=torch.float64)  # (B, T)
    mask = torch.rand(8, 5, generator=generator) < 0.6
    mask[0] = True
    mask[3] = False
    per_token[~mask] = NEG_INF  # padding that would poison a multiply-by-mask reduction
    return per_token, mask


def test_reduce_tokens_is_masked_sum_over_global_count():
    """reduce_tokens = (sum of masked values) / num_tokens, with -inf at masked-out positions ignored."""
    per_token, mask = reduce_inputs(seed=27)
    num_tokens = int(mask.sum()) + 3  # the global count may exceed this batch's tokens (other ranks)
    expected = sum(v for v, m in zip(per_token.reshape(-1).tolist(), mask.reshape(-1).tolist()) if m) / num_tokens
    got = losses.reduce_tokens(per_token, mask, num_tokens)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(expected, abs=1e-12)
    got_tensor_count = losses.reduce_tokens(per_token, mask, torch.tensor(num_tokens))
    assert got_tensor_count.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("micro_batch_rows", [1, 3, 8])
def test_reduce_tokens_micro_batches_sum_to_the_whole(micro_batch_rows):
    """Summing reduce_tokens over row micro-batches (global token count) equals the whole batch, value and grad."""
    per_token, mask = reduce_inputs(seed=28)
    num_tokens = int(mask.sum())
    whole_input = per_token.clone().requires_grad_()
    whole = losses.reduce_tokens(whole_input, mask, num_tokens)
    whole.backward()

    parts_input = per_token.clone().requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, 8, micro_batch_rows):
        rows = slice(start, start + micro_batch_rows)
        part = losses.reduce_tokens(parts_input[rows], mask[rows], num_tokens)
        part.backward()
        total = total + part.detach()
    assert torch.isfinite(whole)
    torch.testing.assert_close(total, whole.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(parts_input.grad, whole_input.grad, atol=0, rtol=0)
    # Gradient is mask / N: zero (not NaN) at the -inf positions.
    torch.testing.assert_close(whole_input.grad, mask.double() / num_tokens, atol=0, rtol=0)


def test_reduce_tokens_of_pg_loss_with_minus_inf_padding_has_finite_gradient():
    """The pipeline's padding (lp = -inf from truncated logits, old lp = 0, A = 0 after EOS) gives no NaN."""
    logprobs, old, advantages = pg_inputs(seed=29)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 5] = False
    logprobs[~mask] = NEG_INF
    old[~mask] = 0.0
    advantages[~mask] = 0.0
    logprobs.requires_grad_()
    loss = losses.reduce_tokens(losses.reverse_kl_pg(logprobs, old, advantages), mask, int(mask.sum()))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logprobs.grad).all()
    expected = torch.where(mask, -torch.exp(logprobs.detach() - old) * advantages, 0.0) / int(mask.sum())
    torch.testing.assert_close(logprobs.grad.double(), expected, atol=1e-6, rtol=1e-6)


def test_topk_forward_kl_over_every_token_is_the_forward_kl():
    torch.manual_seed(3)
    student = torch.randn(4, 11, requires_grad=True)
    teacher = torch.randn(4, 11)
    values, ids = teacher.log_softmax(-1).topk(11, dim=-1)
    topk = losses.topk_forward_kl(student, ids, values)
    full = losses.forward_kl(student, teacher)
    torch.testing.assert_close(topk, full, atol=1e-6, rtol=1e-6)
    (grad_topk,) = torch.autograd.grad(topk.sum(), student)
    (grad_full,) = torch.autograd.grad(losses.forward_kl(student, teacher).sum(), student)
    assert torch.isfinite(grad_topk).all()
    torch.testing.assert_close(grad_topk, grad_full, atol=1e-6, rtol=1e-6)


def test_topk_forward_kl_matches_a_float64_reference_with_its_tail_bucket():
    torch.manual_seed(4)
    student = torch.randn(5, 13, dtype=torch.float64) * 2
    teacher = torch.randn(5, 13, dtype=torch.float64) * 2
    k = 3
    teacher_logp, ids = teacher.log_softmax(-1).topk(k, dim=-1)

    def reference(logits):  # explicit sums in float64, one position at a time
        rows = []
        for position in range(logits.shape[0]):
            q = logits[position].softmax(-1)
            p = teacher[position].softmax(-1)
            top = ids[position]
            value = sum(p[i] * (p[i].log() - q[i].log()) for i in top)
            p_tail, q_tail = 1 - p[top].sum(), 1 - q[top].sum()
            rows.append(value + p_tail * (p_tail.log() - q_tail.log()))
        return torch.stack(rows)

    leaf = student.clone().requires_grad_()
    expected = reference(leaf)
    (expected_grad,) = torch.autograd.grad(expected.sum(), leaf)
    mine_leaf = student.float().clone().requires_grad_()
    mine = losses.topk_forward_kl(mine_leaf, ids, teacher_logp.float())
    (mine_grad,) = torch.autograd.grad(mine.sum(), mine_leaf)
    torch.testing.assert_close(mine.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine_grad.double(), expected_grad, atol=1e-5, rtol=1e-5)
    assert (mine > 0).all()  # the tail term is what keeps it a divergence: without it the value can go negative


def test_topk_forward_kl_stays_finite_for_a_confident_student():
    """The student's mass on S rounds to 1 in fp32; its tail must come from its own log-probs, not 1 - that."""
    student = torch.zeros(2, 1000)
    student[:, 3] = 40.0  # one token of S holds all but e^-40 of the mass
    student.requires_grad_()
    teacher = torch.randn(2, 1000, dtype=torch.float64)
    values, ids = teacher.log_softmax(-1).topk(5, dim=-1)
    ids[:, 0] = 3
    loss = losses.topk_forward_kl(student, ids, values.float())
    (grad,) = torch.autograd.grad(loss.sum(), student)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    q = student.detach().double().log_softmax(-1)
    outside = q.scatter(-1, ids, float("-inf")).logsumexp(-1)
    p_tail = 1 - values.exp().sum(-1)
    expected = (values.exp() * (values - q.gather(-1, ids))).sum(-1) + p_tail * (p_tail.log() - outside)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-4)
