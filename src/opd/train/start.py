"""`rollout.student_fraction: auto`, decided once at step 0: does the student start far from the teacher?

On-policy distillation learns from the states the student's own samples reach. A student far from its
teacher (a pruned or much smaller model) samples text the teacher would never write, and on a real far
pair every on-policy loss then rewards staying there: after a blank line the teacher agrees another
blank line is likely (docs/far_apart.md). Such a student learns more, and keeps its entropy, when it
first learns from the teacher's own samples, as GKD's mixture does.

How far: the per-token reverse KL of the student's samples to the teacher, mean over their tokens of
ℓˢ − ℓᵀ (`distill/seq_reverse_kl`, defined for every teacher), measured before any update: the step-0
evaluation's figure where the run evaluates at step 0, else the same over the first training prompts
(a step's worth of rollouts, sampled and scored without training). Every rank computes the same figure
(evaluate combines the ranks), so every rank decides alike. At or above rollout.far_reverse_kl the run
switches to `far_start` (opd.config.resolve); below, it is on-policy (lambda 1). The decision is
written to resolved.yaml, which a resumed run repeats without measuring again.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

from opd.config.capabilities import needed
from opd.config.files import dump_config
from opd.config.resolve import RESOLVED_FILE, on_policy
from opd.objectives.kinds import build_objective
from opd.train.evaluate import evaluate_session
from opd.train.setup import Session

GAP_KEY = "distill/seq_reverse_kl"


def start_gap(session: Session, first_eval: dict[str, float]) -> tuple[float, str]:
    """How far the untrained student is: the per-token reverse KL of its samples (nats/token), and where
    it was measured."""
    held_out = first_eval.get(f"eval/{GAP_KEY}")
    if held_out is not None:
        return held_out, "held-out prompts"
    config = session.config
    count = min(len(session.train_prompts), config.batch.prompts_per_step)
    metrics = evaluate_session(session, session.train_prompts, max_prompts=count)
    return metrics.get(f"eval/{GAP_KEY}", math.nan), f"the first {count} training prompts"


def choose_start(session: Session, first_eval: dict[str, float], log=print) -> Session:
    """The session the run trains with: unchanged unless rollout.student_fraction is `auto` and undecided;
    then measured (start_gap) and switched to the far start or to lambda 1, recorded in resolved.yaml.
    first_eval: the step-0 evaluation's metrics ({} where the run has none). Every rank must call this."""
    config = session.config
    if config.rollout.student_fraction != "auto":
        return session
    gap, where = start_gap(session, first_eval)
    threshold = config.rollout.far_reverse_kl
    far = session.far_config is not None and gap >= threshold  # NaN (no tokens sampled) is not far
    if far:
        chosen, rollouts = session.far_config, session.far_rollouts
        writer = "the teacher's samples" if chosen.rollout.off_policy_source == "teacher" else "the data's answers"
        trained = "forward KL" if chosen.loss.off_policy_kind == "forward_kl" else "NLL (loss.off_policy_kind sft)"
        log(
            f"rollout.student_fraction auto: the student starts far from the teacher (reverse KL {gap:.2f} "
            f"nats/token on {where}, at least rollout.far_reverse_kl={threshold:g}): {writer} are the other "
            f"rows, trained by {trained}, lambda rising from 0 to {chosen.rollout.student_fraction:g} over "
            f"{chosen.rollout.student_fraction_ramp_steps} steps"
        )
    else:
        chosen, rollouts = on_policy(config), session.rollouts
        measured = (
            f"reverse KL {gap:.2f} nats/token on {where}, below rollout.far_reverse_kl={threshold:g}"
            if not math.isnan(gap)
            else f"not measured: the student's samples on {where} were all empty"
        )
        log(f"rollout.student_fraction auto: on-policy ({measured})")
    if session.world.is_main:
        write_atomically(session.output_dir / RESOLVED_FILE, dump_config(chosen))
    return replace(
        session,
        config=chosen,
        rollouts=rollouts,
        objective=build_objective(chosen),
        needs=needed(chosen),
        far_config=None,
        far_rollouts=None,
    )


def write_atomically(path: Path, text: str) -> None:
    """`text` into `path`, whole or not at all (a kill mid-write leaves the old file)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)
