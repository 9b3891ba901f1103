"""The collapse guard: notice when the student's own samples collapse, before the update that would
entrench it.

On a far-apart pair, the sampled-token reward of `reverse_kl_pg` can find a degenerate optimum, such as
repeating a token the teacher finds likely, while `distill/reverse_kl` still falls. Two figures of the
student's samples show it: the entropy of the distribution that drew them (`entropy/student`) and how
much of each completion repeats itself (`generation/repetition`). The guard fires when, for `patience`
steps in a row, the entropy is below a fraction of its reference (the untrained student's own, or the
teacher's on the same samples) or the repetition is above a threshold.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CollapseGuard:
    mode: str  # warn | stop | off
    entropy_fraction: float
    reference: str  # start | teacher
    max_repetition: float
    patience: int
    start_entropy: float | None = None  # the student's entropy before training (see observe_start)
    streak: int = 0

    def observe_start(self, entropy: float | None) -> None:
        """The untrained student's entropy, from the held-out evaluation at step 0 where there is one.
        Otherwise the first step with student samples sets it, which is the same policy unless a
        mixture started with none."""
        if self.start_entropy is None and entropy is not None:
            self.start_entropy = entropy

    def check(self, step: int, figures: dict[str, float]) -> str | None:
        """Update with one step's figures of the student's samples; return a one-line message (without
        the step, which the caller adds) when the guard fires: at `patience` collapsed steps in a row,
        and again every `patience` steps after."""
        if self.mode == "off" or "entropy/student" not in figures:
            return None
        entropy = figures["entropy/student"]
        self.observe_start(entropy)
        reference = figures.get("entropy/teacher") if self.reference == "teacher" else self.start_entropy
        low_entropy = reference is not None and entropy < self.entropy_fraction * reference
        repetitive = figures.get("generation/repetition", 0.0) > self.max_repetition
        self.streak = self.streak + 1 if (low_entropy or repetitive) else 0
        if self.streak == 0 or self.streak % self.patience:
            return None
        reference_name = "the teacher's" if self.reference == "teacher" else "its first step's"
        repetition = figures.get("generation/repetition", 0.0)
        reasons = []  # what fired this step, with its figures
        if low_entropy:
            reasons.append(
                f"entropy/student {entropy:.3g} is below {self.entropy_fraction:g}x {reference_name} {reference:.3g}"
            )
        if repetitive:
            reasons.append(f"generation/repetition {repetition:.2f} is above {self.max_repetition:g}")
        return (
            f"the student's samples look collapsed for {self.streak} steps in a row: {' and '.join(reasons)}; "
            "read its samples (run.collapse_guard)"
        )

    def state_dict(self) -> dict:
        return {"start_entropy": self.start_entropy, "streak": self.streak}

    def load_state_dict(self, state: dict) -> None:
        self.start_entropy, self.streak = state["start_entropy"], state["streak"]
