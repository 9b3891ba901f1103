"""The demo's step time on an idle machine and beside one busy process, with long-spinning, briefly
spinning and sleeping OpenMP workers (see opd.distributed.threads).

    python benchmarks/busy_machine.py [--steps 12] [--loads none python torch]    # about 6 minutes

Each run is `opd train` on the demo's models and data (its config, without evaluation or checkpoints)
in a process of its own, as a user starts it, with the machine's default thread count. The wait
policies compared:
- `spin`: GOMP_SPINCOUNT=300000, libgomp's own default when nothing is set (opd before it chose);
- `brief`: nothing set, so opd sets GOMP_SPINCOUNT=3000 (its default now);
- `sleep`: OMP_WAIT_POLICY=PASSIVE, a wake-up for every operation.
The loads beside it: `none` (idle); `python`, one process spinning on one core (a plain CPU-bound job);
`torch`, one process of matrix products on every core with torch's defaults (another training job).
Reported: the median seconds a step (rollout + teacher + update) after the first, from metrics.jsonl,
and whether all three trained the same weights bit for bit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

POLICIES = {"spin": {"GOMP_SPINCOUNT": "300000"}, "brief": {}, "sleep": {"OMP_WAIT_POLICY": "PASSIVE"}}
LOADS = {
    "python": "while True: pass",
    "torch": "import torch\nx = torch.randn(256, 256)\nwhile True: x = torch.tanh(x @ x.T / 256)",
}


def demo_run_config(root: Path, steps: int) -> Path:
    """The demo's run folder (data, models) and its config for `steps` steps, nothing but training."""
    from opd.config.files import dump_config
    from opd.demo.run import ASSETS, demo_config
    from opd.demo.task import write_split

    (root / "data").mkdir(parents=True)
    write_split(root / "data" / "train.jsonl", 4000, seed=1)
    write_split(root / "data" / "eval.jsonl", 200, seed=2)
    for name in ("student", "teacher"):
        shutil.copytree(ASSETS / name, root / "models" / name)
    raw = yaml.safe_load(dump_config(demo_config(root)))
    raw["run"].update(max_steps=steps, save_every=0, eval_every=0, progress=False)
    raw["data"]["eval"] = None
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def timed_run(config: Path, out: Path, policy: dict, load: str | None) -> list[float]:
    """Seconds of each step of one `opd train` run, beside `load` (a LOADS key) if given."""
    from opd.io.sinks import read_metrics

    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS")
    }
    busy = subprocess.Popen([sys.executable, "-c", LOADS[load]], env=env) if load else None
    try:
        subprocess.run(
            [sys.executable, "-m", "opd", "train", str(config), "--set", f"run.output_dir={out}"],
            env={**env, **policy},
            check=True,
            capture_output=True,
        )
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    rows = read_metrics(out / "metrics.jsonl")
    return [row["timing/rollout_s"] + row["timing/teacher_s"] + row["timing/update_s"] for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--loads", nargs="+", default=["none", "python", "torch"], choices=["none", *LOADS])
    args = parser.parse_args()
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        config = demo_run_config(Path(tmp) / "demo", args.steps)
        print(f"{os.cpu_count()} cores; median seconds a demo step after the first ({args.steps} steps)")
        print(f"{'beside':>8}" + "".join(f"{policy:>8}" for policy in POLICIES) + "  same weights")
        for load in args.loads:
            medians, finals = {}, {}
            for policy, env in POLICIES.items():
                out = Path(tmp) / f"{load}-{policy}"
                medians[policy] = statistics.median(timed_run(config, out, env, None if load == "none" else load)[1:])
                finals[policy] = load_file(out / "final" / "model.safetensors")
            same = all(finals[policy][name].equal(finals["spin"][name]) for policy in finals for name in finals["spin"])
            print(f"{load:>8}" + "".join(f"{medians[policy]:8.3f}" for policy in POLICIES) + f"  {same}", flush=True)


if __name__ == "__main__":
    main()
