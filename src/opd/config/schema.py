"""Typed, strict run configuration: `Config`, the sections of opd.config.sections put together, with the
checks of their combinations and what the rest of opd asks of a config (the teachers by name, what
they must give, GKD's lambda at a step, the schedule's horizon).

Validation is pure: it touches no network, no disk and no torch.distributed, so a recipe can be
checked before any weight is loaded. Reading files, `--set` and error messages are in opd.config.files.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from opd.config.capabilities import FULL_DISTRIBUTION, check_needs, forward_kl_default, run_needs, teacher_limits
from opd.config.sections import (
    BatchConfig,
    DataConfig,
    LossConfig,
    NamedTeacher,
    OptimConfig,
    RewardConfig,
    RolloutConfig,
    RunConfig,
    StudentConfig,
    TeacherConfig,
    _Strict,
)


class Config(_Strict):
    run: RunConfig
    student: StudentConfig
    teacher: TeacherConfig | None = Field(
        None, description="Needed by every run except SFT on the data set's answers, where it only adds metrics."
    )
    teachers: list[NamedTeacher] | None = Field(
        None, description="Several named teachers instead of one; rows go to theirs by a `teacher` field or their file."
    )
    data: DataConfig
    rollout: RolloutConfig = RolloutConfig()
    loss: LossConfig = LossConfig()
    reward: RewardConfig | None = Field(None, description="A task reward beside the teacher's (opd.rewards).")
    batch: BatchConfig = BatchConfig()
    optim: OptimConfig = OptimConfig()

    @model_validator(mode="after")
    def _check_combinations(self) -> "Config":
        rollouts = self.batch.prompts_per_step * self.rollout.samples_per_prompt
        if self.batch.micro_batch_size > rollouts:
            raise ValueError(
                f"batch.micro_batch_size={self.batch.micro_batch_size} exceeds the "
                f"{rollouts} rollouts of a step (batch.prompts_per_step={self.batch.prompts_per_step}"
                f" x rollout.samples_per_prompt={self.rollout.samples_per_prompt})"
            )
        mixed = self.mixed
        ramp = self.rollout.student_fraction_start is not None or self.rollout.student_fraction_ramp_steps
        if self.rollout.student_fraction == "auto" and ramp:
            raise ValueError(
                "rollout.student_fraction_start / student_fraction_ramp_steps: a ramp runs to a number; set "
                "rollout.student_fraction (auto, the default, chooses its own)"
            )
        if mixed and self.rollout.source != "student":
            raise ValueError(
                f"rollout.student_fraction: a mixture needs rollout.source=student (got "
                f"{self.rollout.source}); its other share comes from rollout.off_policy_source"
            )
        if self.rollout.engine != "opd" and self.rollout.source != "student":
            raise ValueError(
                f"rollout.engine: {self.rollout.engine} samples the student, and rollout.source="
                f"{self.rollout.source} leaves it nothing to sample; use rollout.engine: opd"
            )
        servers = self.rollout.vllm_server.urls
        if self.rollout.engine == "vllm_server" and not servers:
            raise ValueError("rollout.vllm_server.urls: rollout.engine vllm_server needs at least one server's URL")
        if servers and self.rollout.engine != "vllm_server":
            raise ValueError(
                f"rollout.vllm_server.urls: given, but rollout.engine is {self.rollout.engine}; "
                "set rollout.engine: vllm_server to sample on those servers"
            )
        if self.loss.forward_kl_coef and self.loss.kind != "reverse_kl_pg":
            raise ValueError(
                f"loss.forward_kl_coef={self.loss.forward_kl_coef} adds to reverse_kl_pg only "
                f"(loss.kind={self.loss.kind})"
            )
        self._check_reward()
        self._check_teachers()
        self._check_teacher_views()
        needs = run_needs(self)
        if self.teacher is None and not self.teachers and needs:
            raise ValueError(
                f"teacher.path: required for loss.kind={self.loss.kind} with rollout.source={self.rollout.source}; "
                "only SFT on the data set's answers (source dataset) runs without a teacher"
            )
        on_policy = self.rollout.source == "student"
        if on_policy == (self.loss.kind == "sft"):
            raise ValueError(
                f"loss.kind={self.loss.kind} with rollout.source={self.rollout.source}: distillation losses need the "
                "student's own samples (source student); sft needs someone else's (source teacher or dataset)"
            )
        check_needs(self)  # what each teacher gives, as far as the config tells; setup checks again with its tokenizer
        full = next((need for need in needs if need.capability == FULL_DISTRIBUTION), None)
        if full is not None and self.rollout.truncated:
            raise ValueError(
                f"{full.reason} compares full distributions; it needs rollout.top_k=0 and "
                f"rollout.top_p=1 (got {self.rollout.top_k} and {self.rollout.top_p})"
            )
        return self

    def _check_reward(self) -> None:
        reward = self.reward
        if reward is None:
            return
        if self.loss.kind != "reverse_kl_pg":
            raise ValueError(
                f"reward: adds its advantage to reverse_kl_pg's, a policy gradient (loss.kind={self.loss.kind})"
            )
        if reward.coef and self.rollout.samples_per_prompt < 2:
            raise ValueError(
                "reward: each reward is compared with the mean of its prompt's samples, which needs "
                f"rollout.samples_per_prompt >= 2 (got {self.rollout.samples_per_prompt})"
            )
        forward_kl = self.loss.forward_kl_coef if self.loss.forward_kl_coef is not None else forward_kl_default(self)
        if not reward.coef and not self.loss.kl_coef and not forward_kl and not self.mixed:
            raise ValueError(
                "reward.coef=0 and loss.kl_coef=0 (no forward-KL term, no mixture) leave the student "
                "nothing to learn from"
            )

    def _check_teacher_views(self) -> None:
        """What a teacher that reads rows its own way needs (what it can't give is capabilities' part)."""
        if not all(field in self.data.teacher_context_format for field in ("{context}", "{prompt}")):
            raise ValueError(
                f"data.teacher_context_format: {self.data.teacher_context_format!r} must contain "
                "{context} and {prompt}"
            )
        for teacher in self.teacher_configs.values():
            if (
                teacher.remote
                and teacher.tokenizer is None
                and (teacher.chat_template == "own" or teacher.alignment == "chunks")
            ):
                raise ValueError(
                    "teacher.tokenizer: a teacher on a server that renders its own template or has its "
                    "own tokens needs its tokenizer here (a folder or hub id) to build its sequences"
                )

    def _check_teachers(self) -> None:
        named = [file.teacher for file in self.data.train if file.teacher] if isinstance(self.data.train, list) else []
        if self.teachers is None:
            if named:
                raise ValueError(
                    f"data.train: files name teachers ({', '.join(named)}) but no teachers: list names them"
                )
            return
        if self.teacher is not None:
            raise ValueError("teacher and teachers: give one teacher, or a list of named teachers, not both")
        names = [teacher.name for teacher in self.teachers]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"teachers: names must be given and distinct (got {names})")
        unknown = sorted(set(named) - set(names))
        if unknown:
            raise ValueError(f"data.train: teacher {unknown[0]!r} is not one of the teachers {names}")
        if self.rollout.source != "student" or self.mixed or any(teacher.shard for teacher in self.teachers):
            raise ValueError(
                "teachers: several teachers need the student's own samples (rollout.source student, "
                "no mixture) and replicated teachers (shard: false)"
            )
        if len({teacher.top_k for teacher in self.teachers}) > 1:
            raise ValueError("teachers: give every teacher the same top_k")

    @property
    def teacher_configs(self) -> dict[str, TeacherConfig]:
        """Every teacher by name: the one `teacher` (named "teacher"), or the `teachers` list."""
        if self.teachers:
            return {teacher.name: teacher for teacher in self.teachers}
        return {"teacher": self.teacher} if self.teacher is not None else {}

    def teacher_path(self, name: str) -> str | None:
        """A local teacher's weights: its path, with `student` meaning the student's initial weights
        (self-distillation, frozen); None for a teacher on a server."""
        path = self.teacher_configs[name].path
        return self.student.path if path == "student" else path

    def teacher_key(self, name: str) -> str:
        """The config key of a teacher (see teacher_configs), for messages: `teacher`, or `teachers[NAME]`."""
        return "teacher" if self.teacher is not None else f"teachers[{name}]"

    @property
    def teacher_writes(self) -> bool:
        """The teacher writes some of the rollouts: rollout.source, or a mixture's off_policy_source."""
        return self.rollout.source == "teacher" or (self.mixed and self.rollout.off_policy_source == "teacher")

    @property
    def off_policy_loss(self) -> str:
        """loss.off_policy_kind, or where null what it resolves to: sft where the forward KL can't run,
        since the one teacher gives no whole distribution (a server without lm_head, a sharded teacher)
        or the sampling is truncated (rollout.top_k, top_p: full distributions need it whole), else
        forward_kl."""
        if self.loss.off_policy_kind is not None:
            return self.loss.off_policy_kind
        if self.teacher is not None and FULL_DISTRIBUTION in teacher_limits(self, "teacher"):
            return "sft"
        if self.rollout.truncated:
            return "sft"
        return "forward_kl"

    @property
    def mixed(self) -> bool:
        """Some rows of a step are someone else's (GKD's lambda below 1 at some step). Not yet where
        lambda is `auto`: that run is on-policy until step 0 decides (opd.train.start)."""
        rollout = self.rollout
        if rollout.student_fraction == "auto":
            return False
        return rollout.student_fraction < 1 or (
            rollout.student_fraction_start is not None and rollout.student_fraction_start < 1
        )

    def student_fraction_at(self, step: int) -> float:
        """GKD's lambda at a step (from 1): a linear ramp from student_fraction_start over the ramp steps;
        1 while `auto` is undecided."""
        rollout = self.rollout
        if rollout.student_fraction == "auto":
            return 1.0
        if rollout.student_fraction_start is None or rollout.student_fraction_ramp_steps == 0:
            return rollout.student_fraction
        progress = min(1.0, (step - 1) / rollout.student_fraction_ramp_steps)
        return rollout.student_fraction_start + progress * (rollout.student_fraction - rollout.student_fraction_start)

    @property
    def decay_steps(self) -> int:
        """The cosine schedule's horizon: optim.decay_steps, else run.max_steps."""
        return self.optim.decay_steps or self.run.max_steps
