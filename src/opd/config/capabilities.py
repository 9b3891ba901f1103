"""What a run needs from its teachers, what each teacher gives, and one rule: needs ⊆ gives.

A run may need, each for a reason (the config key that asks for it):
- TOKEN_LOGPROBS: the teacher's log-prob of every sampled token (reverse_kl_pg's reward);
- TOP_K: its top-k log-probs at every position (topk_forward_kl);
- FULL_DISTRIBUTION: its whole next-token distribution at every position (forward_kl, reverse_kl, jsd,
  a forward-KL term, a GKD mixture's forward-KL rows); a teacher on opd's server gives it as hidden
  states where the trainer holds its LM head (lm_head);
- SAMPLES: its own samples (rollout.source or rollout.off_policy_source teacher).

A teacher gives all four unless where it lives or how it reads rows rules one out: each `Limit` names
the key that rules it out, why, and what to change. Config validation checks the rule with what the
config alone tells (a server, sharding, `alignment: chunks`, top_k); setup checks it again with what the
tokenizers and rows tell (`TeacherFacts`: another vocabulary, a template that ends turns differently,
privileged context), before any weight loads. The objectives (opd.objectives.kinds) and the trainer
read what a run needs from `run_needs` too, so there is one answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opd.config.schema import Config
    from opd.config.sections import TeacherConfig

TOKEN_LOGPROBS, TOP_K, FULL_DISTRIBUTION, SAMPLES = "token_logprobs", "top_k", "full_distribution", "samples"

DEFAULT_TOP_K = 20  # teacher.top_k's resolved value where the run reads a top-k: vLLM's --max-logprobs default

WHAT = {
    TOKEN_LOGPROBS: "the teacher's log-prob of every sampled token",
    TOP_K: "the teacher's top-k log-probs at every token",
    FULL_DISTRIBUTION: "the teacher's full distribution at every token",
    SAMPLES: "the teacher's own samples",
}

# The capabilities a teacher gives, from the least to the most a loss can ask of it.
NEED_ORDER = (TOKEN_LOGPROBS, TOP_K, FULL_DISTRIBUTION)

# What each loss.kind needs of its teacher; sft needs none (a teacher only adds metrics).
KIND_NEEDS: dict[str, str | None] = {
    "reverse_kl_pg": TOKEN_LOGPROBS,
    "topk_forward_kl": TOP_K,
    "forward_kl": FULL_DISTRIBUTION,
    "reverse_kl": FULL_DISTRIBUTION,
    "jsd": FULL_DISTRIBUTION,
    "sft": None,
}


@dataclass(frozen=True)
class TeacherFacts:
    """What is known of a teacher before its weights load; from the config alone (`config_facts`), then
    from its tokenizer and rows (opd.teachers.build)."""

    chunked: bool = False  # another vocabulary (or alignment: chunks): its scores compare chunk by chunk
    ends_turns_differently: bool = False  # its own template ends a turn with a token the student never stops on
    own_view: bool = False  # it reads rows its own way: template, system prompt, privileged context or tokens


@dataclass(frozen=True)
class Need:
    capability: str
    reason: str  # the key that asks for it, e.g. "loss.kind=jsd"
    instead: str = ""  # another change that would need less, e.g. "set loss.forward_kl_coef: 0"
    kinds_instead: tuple[str, ...] = ()  # loss kinds that would need less (offered where the teacher gives their need)


@dataclass(frozen=True)
class Limit:
    key: str  # the key that rules the capability out, e.g. "teacher.url"
    why: str
    fix: str


def config_facts(config: Config, name: str) -> TeacherFacts:
    """A teacher's facts as far as the config alone tells."""
    settings = config.teacher_configs[name]
    own_view = (
        settings.chat_template == "own"
        or settings.alignment == "chunks"
        or config.data.teacher_system_prompt is not None
    )
    return TeacherFacts(chunked=settings.alignment == "chunks", own_view=own_view)


def teacher_limits(config: Config, name: str, facts: TeacherFacts | None = None) -> dict[str, Limit]:
    """What the teacher `name` can't give, by capability (absent: it gives it)."""
    settings: TeacherConfig = config.teacher_configs[name]
    facts = facts or config_facts(config, name)
    key = config.teacher_key(name)
    limits: dict[str, Limit] = {}

    def rule_out(capabilities: tuple[str, ...], limit: Limit) -> None:
        for capability in capabilities:
            limits.setdefault(capability, limit)

    if settings.remote and settings.lm_head is None:
        rule_out(
            (FULL_DISTRIBUTION,),
            Limit(
                f"{key}.url",
                "which a server sends only as hidden states, for a trainer that holds the teacher's LM head "
                "(it sends token log-probs and a top-k otherwise)",
                f"with api: opd set {key}.lm_head to the served model's files"
                if settings.api == "opd"
                else "serve the teacher with opd serve-teacher and set lm_head, or give its path",
            ),
        )
    if settings.remote and settings.api == "sglang":  # opd and vLLM servers sample (opd.train.served_teacher)
        rule_out(
            (SAMPLES,),
            Limit(
                f"{key}.api",
                "and opd asks an SGLang teacher for scores only; it does not write rollouts",
                "serve the teacher with opd serve-teacher or vllm serve, or give its path",
            ),
        )
    if settings.shard:
        rule_out(
            (FULL_DISTRIBUTION,),
            Limit(
                f"{key}.shard",
                "which a sharded teacher can't give inside the student's loss (its LM head is not gathered there)",
                f"set {key}.shard: false",
            ),
        )
    if config.teachers:
        rule_out(
            (SAMPLES,), Limit("teachers", "and several teachers need the student's own samples", "give one teacher")
        )
    if facts.chunked:
        where = f"{key}.alignment=chunks" if settings.alignment == "chunks" else key
        rule_out(
            (TOP_K, FULL_DISTRIBUTION),
            Limit(
                where,
                "and its tokenizer differs from the student's: across tokenizers only the sampled text's "
                "log-probs compare, chunk by chunk, not distributions over one vocabulary",
                "give a teacher with the student's tokenizer",
            ),
        )
    if facts.ends_turns_differently:
        rule_out(
            (TOP_K, FULL_DISTRIBUTION),
            Limit(
                f"{key}.chat_template=own",
                "and the teacher ends turns with a token the student never stops on, so their "
                "distributions at the last position are over different events",
                f"set {key}.chat_template: student",
            ),
        )
    if facts.own_view:
        rule_out(
            (SAMPLES,),
            Limit(
                key,
                "and it reads rows its own way (its template, tokenizer, system prompt or privileged context), so "
                "its samples are not the student's tokens of the student's prompt: it can score rollouts, not write "
                "them",
                "give a teacher that reads rows as the student does",
            ),
        )
    if settings.top_k == 0:  # last: where a limit above rules a top-k out too, setting top_k would not help
        rule_out(
            (TOP_K,),
            Limit(
                f"{key}.top_k",
                f"and {key}.top_k is 0",
                f"set {key}.top_k, e.g. 20" if config.teacher is not None else "set top_k on each",
            ),
        )
    return limits


def forward_kl_term_need(config: Config) -> str:
    """What the forward-KL term reads: the teachers' top-k (its top-k estimate, a tail bucket for the rest)
    where every teacher is on a server without its head here and sends a top-k, else the full distribution."""
    teachers = config.teacher_configs.values()
    top_k_only = all(teacher.remote and teacher.lm_head is None and teacher.top_k != 0 for teacher in teachers)
    return TOP_K if teachers and top_k_only else FULL_DISTRIBUTION


def run_needs(config: Config, forward_kl_coef: float | None = None) -> list[Need]:
    """What the run needs of its teachers. forward_kl_coef: the forward-KL term's weight (default:
    loss.forward_kl_coef, or where it is null the default the config alone implies)."""
    loss, needs = config.loss, []
    if forward_kl_coef is None:
        forward_kl_coef = loss.forward_kl_coef if loss.forward_kl_coef is not None else forward_kl_default(config)
    kind_need = KIND_NEEDS[loss.kind]
    pure_rl = loss.kind == "reverse_kl_pg" and not loss.kl_coef and config.reward is not None and config.reward.coef
    if kind_need is not None and not pure_rl:
        lighter = tuple(
            kind
            for kind in ("reverse_kl_pg", "topk_forward_kl")
            if NEED_ORDER.index(KIND_NEEDS[kind]) < NEED_ORDER.index(kind_need)
        )
        needs.append(Need(kind_need, f"loss.kind={loss.kind}", kinds_instead=lighter))
    if forward_kl_coef:
        needs.append(
            Need(
                forward_kl_term_need(config),
                f"loss.forward_kl_coef={forward_kl_coef}",
                "set loss.forward_kl_coef: 0 (its default, null, turns it on only where it can run)",
            )
        )
    if config.mixed and config.off_policy_loss == "forward_kl":
        needs.append(
            Need(
                FULL_DISTRIBUTION,
                "loss.off_policy_kind=forward_kl (a mixture's off-policy rows)",
                "use loss.off_policy_kind: sft",
            )
        )
    if config.teacher_writes:
        writer = "rollout.source=teacher" if config.rollout.source == "teacher" else "rollout.off_policy_source=teacher"
        needs.append(Need(SAMPLES, writer, "let the data set's answers write the rollouts (dataset)"))
    return needs


def needed(config: Config, forward_kl_coef: float | None = None) -> set[str]:
    """The capabilities of run_needs, as a set."""
    return {need.capability for need in run_needs(config, forward_kl_coef)}


def check_needs(
    config: Config, facts: dict[str, TeacherFacts] | None = None, forward_kl_coef: float | None = None
) -> None:
    """The one rule: every teacher gives what the run needs. Raises ValueError naming the key that rules a
    need out, the need's reason, and what to change. facts: by teacher name (default: the config's)."""
    for name in config.teacher_configs:
        limits = teacher_limits(config, name, (facts or {}).get(name))
        for need in run_needs(config, forward_kl_coef):
            limit = limits.get(need.capability)
            if limit is not None:
                # A lighter kind is offered where the teacher gives its need, or can once another key is set.
                kinds = [
                    kind if KIND_NEEDS[kind] not in limits else f"{kind} ({limits[KIND_NEEDS[kind]].fix})"
                    for kind in need.kinds_instead
                    if limits.get(KIND_NEEDS[kind])
                    in (None, *[other for other in limits.values() if other is not limit])
                ]
                fixes = [
                    limit.fix,
                    *([f"use loss.kind {' or '.join(kinds)}"] if kinds else []),
                    *([need.instead] if need.instead else []),
                ]
                raise ValueError(
                    f"{limit.key}: {need.reason} needs {WHAT[need.capability]}, {limit.why}; " + ", or ".join(fixes)
                )


def forward_kl_default(config: Config, facts: dict[str, TeacherFacts] | None = None) -> float:
    """loss.forward_kl_coef's default (null): 1.0 where the run can add a forward-KL term on the student's
    samples, else 0. That is reverse_kl_pg with a teacher term (kl_coef != 0); teachers that each give
    their full distribution (in this process, or on opd's server with lm_head: the exact term) or are all
    servers that send a top-k (teacher.top_k not 0: the top-k estimate with its tail bucket, measured to
    keep a far student alive as the exact term does: docs/teacher_server.md); read as the student reads
    rows (the student's template, no system prompt of their own); and untruncated sampling from the student."""
    loss, rollout, data = config.loss, config.rollout, config.data
    if loss.kind != "reverse_kl_pg" or not loss.kl_coef or not config.teacher_configs:
        return 0.0
    need = forward_kl_term_need(config)
    for name, teacher in config.teacher_configs.items():
        if need in teacher_limits(config, name, (facts or {}).get(name)):
            return 0.0
        if teacher.chat_template != "student":
            return 0.0
    untruncated = rollout.source == "student" and not rollout.truncated
    return 1.0 if data.teacher_system_prompt is None and untruncated else 0.0


def resolved_top_k(config: Config, name: str, forward_kl_coef: float) -> int:
    """teacher.top_k as asked, or where null DEFAULT_TOP_K if the run reads the teachers' top-k (with the
    forward-KL term's weight `forward_kl_coef`), else 0."""
    asked = config.teacher_configs[name].top_k
    if asked is not None:
        return asked
    return DEFAULT_TOP_K if TOP_K in needed(config, forward_kl_coef) else 0
