"""A teacher in the trainer's process against the same teacher on opd's server, sending hidden states
(teacher.lm_head) or token log-probs with a top-20 (all a vLLM or SGLang server can send).

    python benchmarks/teacher_hidden_states.py [--vocabs 32000 151936] [--steps 6] [--dtype bf16]

A random Qwen3 (hidden 512, 4 layers, tied embeddings) with a word-level tokenizer of each vocabulary
size teaches itself on prompts of 24 of its words: 4 prompts x 4 samples x 48 tokens a step, the
defaults otherwise (reverse_kl_pg, with its forward-KL term where the full distribution is at hand:
local and hidden states; the top-20 run sets loss.forward_kl_coef 0, to time the scoring path alone).
Per run: the median step time over the steps after the first two, the teacher's share of it
(timing/teacher_s), the bytes on the wire per step (requests' and answers' bodies, counted at the
client, over the run divided by its steps: the start-up checks' few KiB included), the trainer's peak
memory (memory/peak_gib: resident growth) and the server's (VmHWM). The local run has the machine's
two cores; with a server, the server gets one thread and the trainer one. Each run is a process of
its own.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from teacher_server import free_port, wait_healthy  # noqa: E402

from opd.io.sinks import read_metrics  # noqa: E402

from rollout_engines import big_student  # noqa: E402  (the benchmarks' own helpers)

MODES = {  # label -> the teacher section, given the model folder and the server's url; the loss section
    "local": (lambda model, url, dtype: {"path": str(model)}, {}),
    "server, hidden states": (
        lambda model, url, dtype: {"url": url, "lm_head": str(model), "hidden_dtype": dtype},
        {},
    ),
    # The top-20 on the wire without the term it would default to: the scoring path alone.
    "server, top-20 log-probs": (lambda model, url, dtype: {"url": url, "top_k": 20}, {"forward_kl_coef": 0.0}),
}


def base_config(root: Path, model: Path, vocab: int, steps: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    data = root / "train.jsonl"
    with open(data, "w") as handle:
        for _ in range(256):
            words = torch.randint(2, vocab, (24,), generator=generator).tolist()
            handle.write(json.dumps({"prompt": " ".join(f"w{index - 2}" for index in words)}) + "\n")
    return {
        "run": {"precision": "fp32", "progress": False, "max_steps": steps, "eval_every": 0},
        "student": {"path": str(model)},
        "data": {"train": str(data), "max_prompt_tokens": 32},
        "rollout": {"samples_per_prompt": 4, "max_new_tokens": 48, "temperature": 1.0},
        "batch": {"prompts_per_step": 4, "micro_batch_size": 16},
        "optim": {"lr": 1e-5},
    }


def _train(raw: dict, threads: int, counter: Path) -> None:
    """One run, counting every teacher request's and answer's body bytes (the wire's payload)."""
    import httpx

    from opd.config.files import validate
    from opd.train.trainer import train

    torch.set_num_threads(threads)
    sent = [0]
    original = httpx.Client.request

    def counted(self, method, url, **kwargs):
        response = original(self, method, url, **kwargs)
        sent[0] += len(response.request.content) + len(response.content)
        return response

    httpx.Client.request = counted
    train(validate(raw), log=lambda *_: None)
    counter.write_text(str(sent[0]))


def server_peak_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run(raw: dict, out: Path, threads: int) -> dict:
    raw = {**raw, "run": {**raw["run"], "output_dir": str(out)}}
    counter = out.with_suffix(".bytes")
    worker = multiprocessing.get_context("spawn").Process(target=_train, args=(raw, threads, counter))
    worker.start()
    worker.join()
    if worker.exitcode != 0:
        raise SystemExit(f"the run {out.name} failed (exit status {worker.exitcode})")
    rows = [row for row in read_metrics(out / "metrics.jsonl") if "timing/step_s" in row][2:]
    return {
        "step_s": statistics.median(row["timing/step_s"] for row in rows),
        "teacher_s": statistics.median(row["timing/teacher_s"] for row in rows),
        "wire_mib": int(counter.read_text()) / 2**20,
        "peak_gib": max(row["memory/peak_gib"] for row in rows),
        "steps": len(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32_000, 151_936])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="the hidden states on the wire")
    args = parser.parse_args()
    print(f"torch {torch.__version__}; hidden states on the wire in {args.dtype}; {args.steps} steps a run")
    print(
        "| vocabulary | teacher | step (s) | teacher (s) | wire per step (MiB) | trainer peak (GiB) "
        "| server peak (GiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for vocab in args.vocabs:
            root = Path(scratch) / str(vocab)
            model = big_student(root / "model", vocab, layers=4)
            raw = base_config(root, model, vocab, args.steps)
            for label, (teacher, loss) in MODES.items():
                server, url = None, None
                if label != "local":
                    port = free_port()
                    url = f"http://127.0.0.1:{port}"
                    argv = [sys.executable, "-m", "opd", "serve-teacher", str(model), "--port", str(port)]
                    argv += ["--precision", "fp32", "--device", "cpu", "--max-logprobs", "20"]
                    server = subprocess.Popen(argv, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                try:
                    if server is not None:  # inside the try: a server that never comes up is stopped too
                        wait_healthy(url, server, timeout_s=300)
                    config = {**raw, "teacher": teacher(model, url, args.dtype), "loss": loss}
                    result = run(config, root / label.replace(" ", "_").replace(",", ""), 2 if server is None else 1)
                    server_peak = server_peak_gib(server.pid) if server else float("nan")
                finally:
                    if server is not None:
                        server.terminate()
                        server.wait(30)
                wire = result["wire_mib"] / (args.steps + 0.0)
                print(
                    f"| {vocab:,} | {label} | {result['step_s']:.2f} | {result['teacher_s']:.2f} | {wire:.3f} | "
                    f"{result['peak_gib']:.2f} | {'-' if server is None else f'{server_peak:.2f}'} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
