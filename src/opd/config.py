"""Typed, strict run configuration.

One set of pydantic models describes a run. Validation is pure: it touches no network, no disk and
no torch.distributed, so a recipe can be checked before any weight is loaded. Every error in a file
is reported at once, each with its dotted key path and, for a misspelt key, the key probably meant.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from opd.errors import ConfigError


# What each loss needs from the teacher. Sampled-token log-probs are what any teacher gives, a server
# included; the full next-token distribution needs a teacher in this process; sft needs no teacher
# (one only adds metrics). opd.objectives declares the same per objective.
TOKEN_LOGPROBS, TOP_K, FULL_DISTRIBUTION = "token_logprobs", "top_k", "full_distribution"
TEACHER_NEEDS: dict[str, str | None] = {
    "reverse_kl_pg": TOKEN_LOGPROBS,
    "topk_forward_kl": TOP_K,  # the teacher's top-k log-probs at every position (teacher.top_k)
    "forward_kl": FULL_DISTRIBUTION,
    "reverse_kl": FULL_DISTRIBUTION,
    "jsd": FULL_DISTRIBUTION,
    "sft": None,
}


class _Strict(BaseModel):
    # A path such as `output_dir: 2024` is still a path, so numbers are accepted where text is expected.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class RunConfig(_Strict):
    output_dir: str = Field(description="Run directory: config.yaml, metrics.jsonl, checkpoints/, final/.")
    seed: int = 0
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: none; final/ is always written).")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (0: before and after only).")
    log_every: int = Field(1, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast where the device has fast bf16, fp32 otherwise."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = Field(True, description="Live progress bar on the console.")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Also log metrics to TensorBoard and/or Weights & Biases (optional extras)."
    )
    wandb_project: str = Field("opd", description="W&B project, when report_to has wandb.")
    collapse_guard: Literal["warn", "stop", "off"] = Field(
        "warn", description="When the student's samples collapse (entropy or repetition, below): warn, stop, or off."
    )
    collapse_entropy_fraction: float = Field(
        0.2, gt=0, lt=1, description="Collapse: entropy/student below this fraction of the reference..."
    )
    collapse_reference: Literal["start", "teacher"] = Field(
        "start", description="...the student's own at the first step, or the teacher's on the same samples."
    )
    collapse_repetition: float = Field(0.5, gt=0, le=1, description="Collapse: generation/repetition above this.")
    collapse_patience: int = Field(3, ge=1, description="Steps in a row that must show collapse before the guard fires.")


class ModelConfig(_Strict):
    path: str = Field(description="Local folder or Hugging Face hub id.")
    trust_remote_code: bool = False


class LoraSettings(_Strict):
    r: int = Field(16, ge=1, description="Rank of each adapter.")
    alpha: float = Field(32.0, gt=0, description="Scale: the adapter's update is multiplied by alpha / r.")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Must be 0: the policy that samples must be the one trained (on-policy)."
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names (e.g. [q_proj, v_proj]) or all-linear (every linear layer but the LM head)."
    )

    @model_validator(mode="after")
    def _no_dropout(self) -> "LoraSettings":
        if self.dropout:
            raise ValueError(f"student.lora.dropout={self.dropout}: opd keeps the student in eval mode so that the "
                             "policy it trains is the one that sampled (rho = 1); adapter dropout would be ignored")
        return self


class StudentConfig(ModelConfig):
    lora: LoraSettings | None = Field(None, description="Train LoRA adapters (peft) instead of every weight.")
    shard: bool = Field(False, description="Under torchrun, shard the student with FSDP2 instead of replicating it.")


class TeacherConfig(_Strict):
    path: str | None = Field(None, description="Local folder or hub id of a teacher in this process (or url); "
                             "`student`: the frozen initial student (self-distillation, with privileged context).")
    url: str | None = Field(None, description="A teacher on a server instead: its base URL, e.g. http://host:8000.")
    api: Literal["opd", "vllm", "sglang"] = Field(
        "opd", description="The server's protocol: opd serve-teacher, vllm serve (/v1/completions), sglang (/generate)."
    )
    model: str | None = Field(None, description="The served model's name (default: the server's only one).")
    api_key: str | None = Field(None, exclude=True, description="Bearer token for the server; default: the "
                                "api_key_env variable. Never written to the run's config.yaml or trackers.")
    api_key_env: str = Field("OPD_TEACHER_API_KEY", description="Environment variable holding the API key.")
    timeout_s: float = Field(60.0, gt=0, description="Seconds one request may take before it is retried.")
    concurrency: int = Field(4, ge=1, description="Requests in flight at once.")
    request_tokens: int = Field(8192, ge=1, description="Tokens per request at most (a longer row goes alone).")
    retry_deadline_s: float = Field(300.0, gt=0, description="Retry failed requests for this long, then stop the run.")
    trust_remote_code: bool = False
    temperature: float = Field(1.0, gt=0, description="Temperature of the teacher's log-probs.")
    top_k: int = Field(0, ge=0, description="Also take the teacher's top-k log-probs at every position (topk_forward_kl).")
    shard: bool = Field(False, description="Under torchrun, shard the teacher with FSDP2 instead of replicating it.")
    chat_template: Literal["student", "own"] = Field(
        "student", description="The teacher's prompt: rendered by the student's template, or by the teacher's own "
        "tokenizer and template (its end-of-turn token in place of the student's).")
    tokenizer: str | None = Field(None, description="The teacher's tokenizer (folder or hub id); default: its path, "
                                  "and for a teacher on a server the student's.")
    alignment: Literal["auto", "tokens", "chunks"] = Field(
        "auto", description="Matching teacher scores to student tokens: one for one (tokens; one vocabulary), the "
        "chunk estimator (chunks; any two tokenizers), or auto: chunks where the vocabularies differ.")

    @model_validator(mode="after")
    def _where(self) -> "TeacherConfig":
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"teacher.url: {self.url!r} should start with http:// or https://")
        if (self.path is None) == (self.url is None):
            raise ValueError("teacher.path or teacher.url: give one (a teacher in this process, or one on a server), "
                             "not both or neither")
        if self.url is not None and self.shard:
            raise ValueError("teacher.shard: a teacher on a server (teacher.url) is not sharded by opd")
        if self.url is not None and self.api != "opd" and self.temperature != 1:
            raise ValueError(
                f"teacher.temperature={self.temperature}: {self.api} returns prompt log-probs at temperature 1 whatever "
                "the request asks (vLLM and SGLang apply temperature to sampling only), so opd would train against "
                "the wrong distribution; use temperature 1, or serve the teacher with opd serve-teacher (api: opd)")
        return self

    @property
    def remote(self) -> bool:
        return self.url is not None


class NamedTeacher(TeacherConfig):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="How rows, files and metrics name this teacher.")


class TrainFile(_Strict):
    path: str = Field(description="JSONL path or hf:NAME[:CONFIG]:SPLIT.")
    teacher: str | None = Field(None, description="The named teacher (teachers:) of this file's rows without their own.")


class DataConfig(_Strict):
    train: str | list[TrainFile] = Field(
        description="JSONL path, or hf:NAME[:CONFIG]:SPLIT; rows with a `prompt` string, chat `messages` or a `question`."
    )
    eval: str | None = Field(None, description="Held-out data in the same forms.")
    system_prompt: str | None = Field(None, description="Prepended as a system turn to chat and question rows.")
    teacher_system_prompt: str | None = Field(
        None, description="The teacher's system turn instead of system_prompt; the student never sees it.")
    teacher_context_format: str = Field(
        "{context}\n\n{prompt}", description="Where a row's `teacher_context` field (teacher only) goes in the last "
        "user turn, question or prompt text.")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra chat-template variables, e.g. {enable_thinking: false} for Qwen3."
    )
    max_prompt_tokens: int = Field(
        512, ge=1, description="Longer prompts are skipped, and the number skipped is reported."
    )
    eval_max_prompts: int = Field(256, ge=1)
    shuffle: bool = True


class RolloutConfig(_Strict):
    source: Literal["student", "teacher", "dataset"] = Field(
        "student", description="Who writes the completions: the student (on-policy), the teacher, or the data's answers."
    )
    samples_per_prompt: int = Field(4, ge=1)
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; ℓˢ is taken under it.")
    top_k: int = Field(0, ge=0, description="0 disables top-k truncation.")
    top_p: float = Field(1.0, gt=0, le=1, description="1 disables nucleus truncation.")
    eval_samples_per_prompt: int = Field(1, ge=1)
    student_fraction: float = Field(
        1.0, ge=0, le=1, description="GKD's lambda: the share of each step's prompts the student samples; the rest "
        "go to off_policy_source. 1: fully on-policy."
    )
    student_fraction_start: float | None = Field(
        None, ge=0, le=1, description="With ramp steps: lambda rises (or falls) linearly from this to student_fraction."
    )
    student_fraction_ramp_steps: int = Field(0, ge=0, description="Steps of the linear lambda ramp.")
    off_policy_source: Literal["teacher", "dataset"] = Field(
        "teacher", description="Who writes the other 1 - lambda share: teacher samples or the data's answers."
    )


class LossConfig(_Strict):
    kind: Literal["reverse_kl_pg", "topk_forward_kl", "forward_kl", "reverse_kl", "jsd", "sft"] = "reverse_kl_pg"
    kl_coef: float = Field(1.0, description="c in A_t = -c * sum_j gamma^(j-t) k_j.")
    discount: float = Field(0.0, ge=0, le=1, description="gamma; 0 makes A_t = -c * k_t.")
    ratio_clip: float | None = Field(
        None, gt=1, description="Truncate the importance weight rho at this value (None: no truncation)."
    )
    jsd_beta: float = Field(0.5, ge=0, le=1, description="Mixture weight of the teacher in jsd.")
    chunk_size: int | None = Field(
        None, ge=1, description="Completion tokens per chunk of full-vocabulary logits; None: 2**24 // vocabulary size."
    )
    forward_kl_coef: float = Field(
        0.0, ge=0, description="reverse_kl_pg only: add this times the exact forward KL(teacher || student) at every "
        "position of the student's samples (mass-covering, against collapse)."
    )
    off_policy_kind: Literal["forward_kl", "sft"] = Field(
        "forward_kl", description="Loss of the rows the student did not sample (rollout.student_fraction < 1)."
    )


class BatchConfig(_Strict):
    prompts_per_step: int = Field(8, ge=1)
    micro_batch_size: int = Field(8, ge=1, description="Sequences per backward pass.")


class OptimConfig(_Strict):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    decay_steps: int | None = Field(
        None, ge=1, description="Steps over which the cosine decays (then it stays at its floor); None: run.max_steps."
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm (None: off).")


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
        if self.loss.forward_kl_coef and self.loss.kind != "reverse_kl_pg":
            raise ValueError(f"loss.forward_kl_coef={self.loss.forward_kl_coef} adds to reverse_kl_pg only "
                             f"(loss.kind={self.loss.kind})")
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
        if self.loss.forward_kl_coef or (self.mixed and self.loss.off_policy_kind == "forward_kl"):
            return FULL_DISTRIBUTION
        return TEACHER_NEEDS[self.loss.kind]

    def _full_distribution_reason(self) -> str:
        if TEACHER_NEEDS[self.loss.kind] == FULL_DISTRIBUTION:
            return f"loss.kind={self.loss.kind}"
        if self.loss.forward_kl_coef:
            return f"loss.forward_kl_coef={self.loss.forward_kl_coef}"
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


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        for annotation in (field.annotation, *get_args(field.annotation)):  # X and X | None alike
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                keys.extend(_known_keys(annotation, prefix + name + "."))
    return keys


def _describe(error: dict[str, Any]) -> str:
    path = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(path, _known_keys(Config), n=1, cutoff=0.6)
        hint_text = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"{path}: unknown key{hint_text}"
    message = error["msg"].removeprefix("Value error, ")
    if not path or error["type"] == "value_error":  # a validator's message names its keys itself
        return message
    return f"{path}: {message} (got {error.get('input')!r})"


def validate(raw: dict[str, Any], source: str = "config") -> Config:
    """Validate a nested dict into a Config; raises ConfigError listing every problem at once."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(error) for error in exc.errors()]
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=3e-4' -> (['optim', 'lr'], 3e-4); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. optim.lr=1e-5")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None, defaults: dict[str, Any] | None = None) -> Config:
    """Read YAML, fill `defaults` (dotted keys) where the file is silent, apply `--set` overrides,
    validate. Reads only the one file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for dotted, value in (defaults or {}).items():
        section, key = dotted.split(".")
        if not isinstance(raw.get(section, {}), dict):
            continue  # validation reports the malformed section
        raw.setdefault(section, {}).setdefault(key, value)
    return validate(apply_overrides(raw, overrides or []), source=str(path))


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
