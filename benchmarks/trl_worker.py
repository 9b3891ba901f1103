"""TRL side of the opd-vs-TRL speed benchmark: run TRL's DistillationTrainer and time each optimizer step.

    python benchmarks/trl_worker.py --work WORK --settings JSON --warmup-steps W \
        (--steps N | --wall-seconds S) --out RESULT.json [--save-student DIR]

Needs an environment with `trl` installed (it is not a dependency of opd). WORK holds models/student,
models/teacher (Hugging Face causal LMs sharing one tokenizer) and data/train.jsonl ({"prompt": ...} rows).

One optimizer step = prompts_per_step prompts x samples_per_prompt completions sampled from the current
student (lmbda = 1: every batch is on-policy), scored by the teacher, reverse KL loss (beta = 1), one AdamW
step. DistillationTrainer samples one completion per dataset row, so each prompt is repeated
samples_per_prompt times in a row in the dataset and the dataset is read in order (no shuffle).

Timing: the student's `generate` is wrapped (rollout_s, token counts), the teacher's backbone forward is
wrapped (teacher_s; TRL calls the teacher's backbone directly, not its top-level forward), and a
TrainerCallback times the whole step (total_s). update_s = total_s - rollout_s - teacher_s. TRL projects
the teacher's hidden states through its LM head inside the chunked loss, so that part is in update_s; it is
also timed on its own as teacher_head_s (an extra key, a part of update_s).

Optional settings keys beyond the shared ones, for trying TRL's own speed options (defaults in brackets):
gradient_checkpointing [false], optim ["adamw_torch"], teacher_dtype ["fp32"; "bf16" loads the teacher
in bf16], student_dtype ["fp32"; "bf16" trains bf16 weights, no fp32 master copy], torch_compile [false],
use_cache [true], cache_implementation [none], num_threads [torch's default].
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from memory import peak_rss_mb  # benchmarks/memory.py, beside this script


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--settings", required=True, help="JSON object (or a path to a JSON file)")
    parser.add_argument("--warmup-steps", type=int, default=0)
    stop = parser.add_mutually_exclusive_group(required=True)
    stop.add_argument("--steps", type=int, help="measured steps after the warm-up steps")
    stop.add_argument("--wall-seconds", type=float, help="train until this much wall time (warm-up included)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--save-student")
    return parser.parse_args(argv)


def load_settings(text: str) -> dict:
    if os.path.isfile(text):
        with open(text) as handle:
            text = handle.read()
    settings = json.loads(text)
    required = ["samples_per_prompt", "max_new_tokens", "prompts_per_step", "temperature", "lr", "seed", "precision"]
    missing = [key for key in required if key not in settings]
    if missing:
        raise SystemExit(f"--settings is missing {missing}")
    if settings["precision"] not in ("fp32", "bf16"):
        raise SystemExit(f"precision must be fp32 or bf16, got {settings['precision']!r}")
    return settings


class StepClock:
    """Per-step accumulators shared by the wrappers and the callback."""

    def __init__(self):
        self.in_step = False
        self.reset()

    def reset(self):
        self.rollout_s = 0.0
        self.teacher_s = 0.0
        self.teacher_head_s = 0.0
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.rollouts = 0
        self.generate_calls = 0
        self.distinct_prompts = 0


def count_tokens(input_ids, attention_mask, output, eos_ids):
    """Real prompt tokens, and generated tokens up to and including the first EOS of each row."""
    import torch

    prompt_tokens = int(attention_mask.sum()) if attention_mask is not None else input_ids.numel()
    completion = output[:, input_ids.shape[1] :]
    if completion.shape[1] == 0:
        return prompt_tokens, 0
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device))
    has_eos = is_eos.any(dim=1)
    first_eos = is_eos.int().argmax(dim=1)
    lengths = torch.where(has_eos, first_eos + 1, torch.full_like(first_eos, completion.shape[1]))
    return prompt_tokens, int(lengths.sum())


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = load_settings(args.settings)

    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    if settings.get("num_threads"):
        torch.set_num_threads(int(settings["num_threads"]))
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    prompts_per_step = int(settings["prompts_per_step"])
    samples = int(settings["samples_per_prompt"])
    rollouts_per_step = prompts_per_step * samples
    micro = int(settings.get("micro_batch_size") or rollouts_per_step)
    if rollouts_per_step % micro:
        raise SystemExit(
            f"micro_batch_size {micro} must divide prompts_per_step*samples_per_prompt {rollouts_per_step}"
        )
    grad_accum = rollouts_per_step // micro
    bf16 = settings["precision"] == "bf16"
    teacher_dtype = settings.get("teacher_dtype", "fp32")
    warmup = args.warmup_steps
    total_steps = warmup + args.steps if args.steps is not None else 10**7

    student_dir = os.path.join(args.work, "models", "student")
    teacher_dir = os.path.join(args.work, "models", "teacher")
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    student_dtype = settings.get("student_dtype", "fp32")
    student = AutoModelForCausalLM.from_pretrained(
        student_dir, dtype=torch.bfloat16 if student_dtype == "bf16" else torch.float32
    )
    teacher = AutoModelForCausalLM.from_pretrained(
        teacher_dir, dtype=torch.bfloat16 if teacher_dtype == "bf16" else torch.float32
    )

    with open(os.path.join(args.work, "data", "train.jsonl")) as handle:
        prompts = [json.loads(line)["prompt"] for line in handle if line.strip()]
    if len(prompts) < prompts_per_step:
        raise SystemExit(f"need at least {prompts_per_step} prompts, found {len(prompts)}")
    # One row per rollout: each prompt samples_per_prompt times in a row, read in order.
    dataset = datasets.Dataset.from_list([{"prompt": prompt} for prompt in prompts for _ in range(samples)])

    output_dir = tempfile.mkdtemp(prefix="trl_worker_")
    config = DistillationConfig(
        output_dir=output_dir,
        # on-policy distillation with reverse KL
        beta=1.0,
        temperature=float(settings["temperature"]),
        top_k=0,
        top_p=1.0,
        min_p=None,
        repetition_penalty=1.0,
        max_completion_length=int(settings["max_new_tokens"]),
        generation_kwargs={"use_cache": bool(settings.get("use_cache", True))},
        cache_implementation=settings.get("cache_implementation"),
        # batching: one generation batch = one optimizer step
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=grad_accum,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        # optimizer
        learning_rate=float(settings["lr"]),
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim=settings.get("optim", "adamw_torch"),
        max_steps=total_steps,
        # precision and speed options
        use_cpu=not torch.cuda.is_available(),
        bf16=bf16,
        fp16=False,
        gradient_checkpointing=bool(settings.get("gradient_checkpointing", False)),
        torch_compile=bool(settings.get("torch_compile", False)),
        disable_dropout=True,
        # no logging, checkpoints or evaluation
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        seed=int(settings["seed"]),
        data_seed=int(settings["seed"]),
    )

    clock = StepClock()
    steps: list[dict] = []
    observed: dict = {}
    timeline = {"first_begin": None, "last_end": None, "step_begin": None, "done": 0}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, _args, state, control, **kwargs):
            clock.reset()
            clock.in_step = True
            now = time.perf_counter()
            timeline["step_begin"] = now
            if timeline["first_begin"] is None:
                timeline["first_begin"] = now

        def on_step_end(self, _args, state, control, **kwargs):
            now = time.perf_counter()
            clock.in_step = False
            total = now - timeline["step_begin"]
            timeline["last_end"] = now
            timeline["done"] += 1
            if timeline["done"] == 1:
                print(
                    f"[trl_worker] step 1: {clock.generate_calls} generate call(s) on the student, "
                    f"{clock.rollouts} rollouts from {clock.distinct_prompts} distinct prompts "
                    f"(expected {rollouts_per_step} = {prompts_per_step} x {samples}), "
                    f"{clock.completion_tokens} completion tokens",
                    file=sys.stderr,
                    flush=True,
                )
            if clock.rollouts != rollouts_per_step:
                raise RuntimeError(
                    f"step {timeline['done']} saw {clock.rollouts} rollouts, expected {rollouts_per_step}"
                )
            if timeline["done"] > warmup:
                steps.append(
                    {
                        "rollout_s": clock.rollout_s,
                        "teacher_s": clock.teacher_s,
                        "update_s": total - clock.rollout_s - clock.teacher_s,
                        "total_s": total,
                        "completion_tokens": clock.completion_tokens,
                        "prompt_tokens": clock.prompt_tokens,
                        "teacher_head_s": clock.teacher_head_s,
                        "rollouts": clock.rollouts,
                        "generate_calls": clock.generate_calls,
                    }
                )
            if args.wall_seconds is not None and now - timeline["first_begin"] >= args.wall_seconds:
                control.should_training_stop = True
            if args.steps is not None and timeline["done"] >= total_steps:
                control.should_training_stop = True
            return control

    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )

    student_model = trainer.accelerator.unwrap_model(trainer.model)
    teacher_model = trainer.accelerator.unwrap_model(trainer.teacher_model)
    eos_ids = list(trainer.eos_token_ids)

    # Student rollouts: time `generate` and count real tokens.
    original_generate = student_model.generate

    def timed_generate(*gen_args, **gen_kwargs):
        start = time.perf_counter()
        output = original_generate(*gen_args, **gen_kwargs)
        elapsed = time.perf_counter() - start
        input_ids = gen_kwargs.get("input_ids", gen_args[0] if gen_args else None)
        prompt_tokens, completion_tokens = count_tokens(input_ids, gen_kwargs.get("attention_mask"), output, eos_ids)
        clock.rollout_s += elapsed
        clock.prompt_tokens += prompt_tokens
        clock.completion_tokens += completion_tokens
        clock.rollouts += input_ids.shape[0]
        clock.generate_calls += 1
        clock.distinct_prompts += len({tuple(row.tolist()) for row in input_ids})
        if "generation" not in observed:
            gen_config = gen_kwargs.get("generation_config")
            observed["generation"] = {
                key: getattr(gen_config, key, None)
                for key in (
                    "do_sample",
                    "temperature",
                    "top_k",
                    "top_p",
                    "min_p",
                    "max_new_tokens",
                    "use_cache",
                    "cache_implementation",
                    "num_return_sequences",
                )
            }
            observed["generation"]["batch_rows"] = int(input_ids.shape[0])
        return output

    student_model.generate = timed_generate

    # Teacher: TRL runs the teacher's backbone (base_model) directly, then its LM head inside the loss.
    teacher_backbone = teacher_model.base_model
    original_teacher_forward = teacher_backbone.forward

    def timed_teacher_forward(*f_args, **f_kwargs):
        start = time.perf_counter()
        output = original_teacher_forward(*f_args, **f_kwargs)
        clock.teacher_s += time.perf_counter() - start
        if "teacher_forward" not in observed:
            observed["teacher_forward"] = {
                "autocast_cpu": torch.is_autocast_enabled("cpu"),
                "hidden_dtype": str(output.last_hidden_state.dtype),
            }
        return output

    teacher_backbone.forward = timed_teacher_forward

    # Where the student's backbone runs under autocast (observation only, not timed).
    student_backbone = student_model.base_model
    original_student_forward = student_backbone.forward

    def observed_student_forward(*f_args, **f_kwargs):
        output = original_student_forward(*f_args, **f_kwargs)
        key = "student_train_forward" if torch.is_grad_enabled() else "student_generate_forward"
        if key not in observed:
            observed[key] = {
                "autocast_cpu": torch.is_autocast_enabled("cpu"),
                "hidden_dtype": str(output.last_hidden_state.dtype),
            }
        return output

    student_backbone.forward = observed_student_forward

    # The teacher's LM-head projections inside TRL's chunked divergence (forward and backward recompute).
    from trl.kernels import chunked_divergence

    original_project = chunked_divergence._project
    teacher_head_weight = teacher_model.get_output_embeddings().weight

    def timed_project(tile, hidden_chunk, weight, *p_args, **p_kwargs):
        if weight is not teacher_head_weight:
            return original_project(tile, hidden_chunk, weight, *p_args, **p_kwargs)
        start = time.perf_counter()
        result = original_project(tile, hidden_chunk, weight, *p_args, **p_kwargs)
        clock.teacher_head_s += time.perf_counter() - start
        return result

    chunked_divergence._project = timed_project

    trainer.train()

    if args.save_student:
        os.makedirs(args.save_student, exist_ok=True)
        del student_model.generate  # drop the timing wrapper before saving
        student_model.save_pretrained(args.save_student)
        tokenizer.save_pretrained(args.save_student)

    effective = dict(settings)
    effective.update(
        {
            "micro_batch_size": micro,
            "per_device_train_batch_size": micro,
            "gradient_accumulation_steps": grad_accum,
            "rollouts_per_step": rollouts_per_step,
            "dataset_rows": len(dataset),
            "dataset_layout": "each prompt repeated samples_per_prompt times in a row, no shuffle",
            "beta": config.beta,
            "lmbda": 1.0,
            "loss": "token-level reverse KL(student || teacher) over the full vocabulary, mean over completion tokens",
            "top_k": config.top_k,
            "top_p": config.top_p,
            "max_completion_length": config.max_completion_length,
            "bf16": config.bf16,
            "teacher_dtype": teacher_dtype,
            "student_dtype": student_dtype,
            "cache_implementation": config.cache_implementation,
            "gradient_checkpointing": config.gradient_checkpointing,
            "optim": str(getattr(config.optim, "value", config.optim)),
            "lr_scheduler_type": str(getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type)),
            "max_grad_norm": config.max_grad_norm,
            "weight_decay": config.weight_decay,
            "torch_compile": config.torch_compile,
            "use_cache": bool(settings.get("use_cache", True)),
            "num_threads": torch.get_num_threads(),
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "observed": observed,
        }
    )
    train_wall = (timeline["last_end"] - timeline["first_begin"]) if timeline["first_begin"] is not None else 0.0
    result = {
        "system": "trl",
        "trl_version": trl.__version__,
        "settings": effective,
        "steps": steps,
        "train_wall_s": train_wall,
        "steps_done": timeline["done"],
        "peak_rss_mb": peak_rss_mb(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
