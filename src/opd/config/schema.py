"""Typed, strict run configuration: `Config`, the sections of opd.config.sections put together, with the
checks of their combinations and what the rest of opd asks of a config (the teachers by name, what
they must give, GKD's lambda at a step, the schedule's horizon).

Validation is pure: it touches no network, no disk and no torch.distributed, so a recipe can be
checked before any weight is loaded. Reading files, `--set` and error messages are in opd.config.files.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from opd.config.sections import (
    FULL_DISTRIBUTION, TEACHER_NEEDS, TOP_K, BatchConfig, DataConfig, LossConfig, NamedTeacher, OptimConfig,
    RewardConfig, RolloutConfig, RunConfig, StudentConfig, TeacherConfig, _Strict,
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
        if mixed and self.rollout.source != "student":
            raise ValueError(f"rollout.student_fraction: a mixture needs rollout.source=student (got "
                             f"{self.rollout.source}); its other share comes from rollout.off_policy_source")
        if self.rollout.engine == "vllm" and self.rollout.source != "student":
            raise ValueError(f"rollout.engine: vllm samples the student, and rollout.source={self.rollout.source} "
                             "leaves it nothing to sample; use rollout.engine: opd")
        if self.loss.forward_kl_coef and self.loss.kind != "reverse_kl_pg":
            raise ValueError(f"loss.forward_kl_coef={self.loss.forward_kl_coef} adds to reverse_kl_pg only "
                             f"(loss.kind={self.loss.kind})")
        self._check_reward()
        self._check_teachers()
        self._check_teacher_views()
        teacher_needed = self.teacher_needs is not None or self.teacher_writes
        if self.teacher is None and not self.teachers and teacher_needed:
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
        teacher = self.teacher
        if teacher is not None and teacher.remote and self.teacher_needs == FULL_DISTRIBUTION:
            raise ValueError(
                f"teacher.url: {self._full_distribution_reason()} needs the teacher's whole distribution at every "
                "token, which a server does not send; use loss.kind reverse_kl_pg or topk_forward_kl")
        if teacher is not None and teacher.remote and self.teacher_writes:
            raise ValueError("teacher.url: a teacher on a server scores the rollouts; it does not write them "
                             "(rollout.source / rollout.off_policy_source teacher need teacher.path)")
        if mixed and (self.student.shard or (teacher is not None and teacher.shard
                                             and self.rollout.off_policy_source == "teacher")):
            raise ValueError("student.shard / teacher.shard with a GKD mixture (rollout.student_fraction below 1): "
                             "a rank whose share of the step holds no prompt for a sharded sampler would skip its "
                             "collectives; shard without the mixture, or replicate (shard: false)")
        if self.teacher_needs == TOP_K and not self.teachers and (teacher is None or not teacher.top_k):
            raise ValueError(f"loss.kind={self.loss.kind} needs the teacher's top-k log-probs: set teacher.top_k "
                             "(e.g. 20)")
        if self.teacher_needs == FULL_DISTRIBUTION and self.teacher is not None and self.teacher.shard:
            raise ValueError(
                f"teacher.shard: {self._full_distribution_reason()} needs the teacher's full distribution at every "
                "token inside the student's loss, where a sharded teacher's LM head is not gathered; use "
                "loss.kind=reverse_kl_pg (token log-probs) or teacher.shard: false")
        if self.teacher_needs == FULL_DISTRIBUTION and (self.rollout.top_k or self.rollout.top_p < 1):
            raise ValueError(
                f"{self._full_distribution_reason()} compares full distributions; it needs rollout.top_k=0 and "
                f"rollout.top_p=1 (got {self.rollout.top_k} and {self.rollout.top_p})"
            )
        return self

    def _check_reward(self) -> None:
        reward = self.reward
        if reward is None:
            return
        if self.loss.kind != "reverse_kl_pg":
            raise ValueError(f"reward: adds its advantage to reverse_kl_pg's, a policy gradient (loss.kind={self.loss.kind})")
        if reward.coef and self.rollout.samples_per_prompt < 2:
            raise ValueError("reward: each reward is compared with the mean of its prompt's samples, which needs "
                             f"rollout.samples_per_prompt >= 2 (got {self.rollout.samples_per_prompt})")
        if not reward.coef and not self.loss.kl_coef and not self.forward_kl_weight and not self.mixed:
            raise ValueError("reward.coef=0 and loss.kl_coef=0 (no forward-KL term, no mixture) leave the student "
                             "nothing to learn from")

    def _check_teacher_views(self) -> None:
        """`teacher.path: student`, and what a teacher that reads rows its own way can do."""
        if not all(field in self.data.teacher_context_format for field in ("{context}", "{prompt}")):
            raise ValueError(f"data.teacher_context_format: {self.data.teacher_context_format!r} must contain "
                             "{context} and {prompt}")
        for teacher in self.teacher_configs.values():
            if teacher.path == "student":
                teacher.path = self.student.path  # the initial student's weights, frozen
            own_view = teacher.chat_template == "own" or self.data.teacher_system_prompt is not None
            if (own_view or teacher.alignment == "chunks") and self.teacher_writes:
                raise ValueError("teacher.chat_template / data.teacher_system_prompt / teacher.alignment: a teacher that "
                                 "reads rows its own way scores the student's samples; it can't write rollouts for "
                                 "the student (rollout.source / rollout.off_policy_source teacher)")
            if teacher.remote and teacher.tokenizer is None and (teacher.chat_template == "own"
                                                                  or teacher.alignment == "chunks"):
                raise ValueError("teacher.tokenizer: a teacher on a server that renders its own template or has its "
                                 "own tokens needs its tokenizer here (a folder or hub id) to build its sequences")
            if teacher.alignment == "chunks" and self.teacher_needs in (TOP_K, FULL_DISTRIBUTION):
                raise ValueError(f"teacher.alignment=chunks: {self._teacher_need_reason()} compares the two models' "
                                 "distributions over one vocabulary at every token; across tokenizers only the "
                                 "sampled text's log-probs compare (chunk by chunk), so use loss.kind reverse_kl_pg")

    def _teacher_need_reason(self) -> str:
        return "loss.kind=topk_forward_kl" if self.teacher_needs == TOP_K else self._full_distribution_reason()

    def _check_teachers(self) -> None:
        named = [file.teacher for file in self.data.train if file.teacher] if isinstance(self.data.train, list) else []
        if self.teachers is None:
            if named:
                raise ValueError(f"data.train: files name teachers ({', '.join(named)}) but no teachers: list names them")
            return
        if self.teacher is not None:
            raise ValueError("teacher and teachers: give one teacher, or a list of named teachers, not both")
        names = [teacher.name for teacher in self.teachers]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"teachers: names must be given and distinct (got {names})")
        unknown = sorted(set(named) - set(names))
        if unknown:
            raise ValueError(f"data.train: teacher {unknown[0]!r} is not one of the teachers {names}")
        if self.loss.kind not in ("reverse_kl_pg", "topk_forward_kl") or self.teacher_needs == FULL_DISTRIBUTION:
            raise ValueError(f"teachers: several teachers score token log-probs (loss.kind reverse_kl_pg or "
                             f"topk_forward_kl, without forward-KL terms); got loss.kind={self.loss.kind}")
        if self.rollout.source != "student" or self.mixed or any(teacher.shard for teacher in self.teachers):
            raise ValueError("teachers: several teachers need the student's own samples (rollout.source student, "
                             "no mixture) and replicated teachers (shard: false)")
        if self.teacher_needs == TOP_K and not all(teacher.top_k for teacher in self.teachers):
            raise ValueError(f"loss.kind={self.loss.kind} needs every teacher's top-k log-probs: set top_k on each")
        if len({teacher.top_k for teacher in self.teachers}) > 1:
            raise ValueError("teachers: give every teacher the same top_k")

    @property
    def teacher_configs(self) -> dict[str, TeacherConfig]:
        """Every teacher by name: the one `teacher` (named "teacher"), or the `teachers` list."""
        if self.teachers:
            return {teacher.name: teacher for teacher in self.teachers}
        return {"teacher": self.teacher} if self.teacher is not None else {}

    def teacher_key(self, name: str) -> str:
        """The config key of a teacher (see teacher_configs), for messages: `teacher`, or `teachers[NAME]`."""
        return "teacher" if self.teacher is not None else f"teachers[{name}]"

    @property
    def teacher_writes(self) -> bool:
        """The teacher writes some of the rollouts: rollout.source, or a mixture's off_policy_source."""
        return self.rollout.source == "teacher" or (self.mixed and self.rollout.off_policy_source == "teacher")

    @property
    def mixed(self) -> bool:
        """Some rows of a step are someone else's (GKD's lambda below 1 at some step)."""
        rollout = self.rollout
        return rollout.student_fraction < 1 or (rollout.student_fraction_start is not None
                                                 and rollout.student_fraction_start < 1)

    @property
    def teacher_needs(self) -> str | None:
        """What the run needs from its teacher: the loss's need, or the full distribution where a
        forward-KL term or forward-KL off-policy rows are added."""
        if self.forward_kl_weight or (self.mixed and self.loss.off_policy_kind == "forward_kl"):
            return FULL_DISTRIBUTION
        if self.loss.kind == "reverse_kl_pg" and not self.loss.kl_coef and self.reward and self.reward.coef:
            return None  # pure RL: a teacher, where given, only adds metrics
        return TEACHER_NEEDS[self.loss.kind]

    @property
    def forward_kl_weight(self) -> float:
        """loss.forward_kl_coef, with its default (null) resolved: 1.0 where the run can add the forward KL
        at no more than a local teacher's LM head per chunk, else 0. Setup settles what config alone
        can't tell (a teacher with another vocabulary or turn end) and writes the value into the config."""
        if self.loss.forward_kl_coef is not None:
            return self.loss.forward_kl_coef
        teacher, rollout, data = self.teacher, self.rollout, self.data
        can = (self.loss.kind == "reverse_kl_pg" and self.loss.kl_coef != 0 and self.teachers is None
               and teacher is not None and not teacher.remote and not teacher.shard
               and teacher.alignment != "chunks" and teacher.chat_template == "student"
               and data.teacher_system_prompt is None and rollout.source == "student"
               and rollout.top_k == 0 and rollout.top_p == 1)
        return 1.0 if can else 0.0

    def _full_distribution_reason(self) -> str:
        if TEACHER_NEEDS[self.loss.kind] == FULL_DISTRIBUTION:
            return f"loss.kind={self.loss.kind}"
        if self.forward_kl_weight:
            return f"loss.forward_kl_coef={self.forward_kl_weight}"
        return "loss.off_policy_kind=forward_kl"

    def student_fraction_at(self, step: int) -> float:
        """GKD's lambda at a step (from 1): a linear ramp from student_fraction_start over the ramp steps."""
        rollout = self.rollout
        if rollout.student_fraction_start is None or rollout.student_fraction_ramp_steps == 0:
            return rollout.student_fraction
        progress = min(1.0, (step - 1) / rollout.student_fraction_ramp_steps)
        return rollout.student_fraction_start + progress * (rollout.student_fraction - rollout.student_fraction_start)

    @property
    def decay_steps(self) -> int:
        """The cosine schedule's horizon: optim.decay_steps, else run.max_steps."""
        return self.optim.decay_steps or self.run.max_steps
