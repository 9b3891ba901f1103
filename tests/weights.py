"""Comparing trained students: final weights, exactly or up to a share of what training moved."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from opd.config.files import validate
from opd.train.trainer import train


def final_weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(output_dir) / "final" / "model.safetensors")


def assert_weights_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def assert_same_learning(a: dict, b: dict, student: str, fraction: float = 1e-3) -> None:
    """The same weights up to `fraction` of the largest change training made (Adam's eps at 1e-3 keeps
    near-zero gradients from turning ℓᵀ's last-bit differences into lr-sized steps)."""
    start = load_file(Path(student) / "model.safetensors")
    assert a.keys() == b.keys()
    moved = max(float((a[name] - start[name]).abs().max()) for name in a)
    difference = max(float((a[name] - b[name]).abs().max()) for name in a)
    assert moved > 1e-3 and difference <= fraction * moved, (difference, moved)


def one_step(raw: dict, tmp_path: Path, name: str, **sections) -> dict[str, torch.Tensor]:
    raw = {key: dict(value) for key, value in raw.items()}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    raw["run"].update(output_dir=str(tmp_path / name), max_steps=1)
    raw["data"]["eval"] = None
    train(validate(raw), log=lambda *_: None)
    return final_weights(tmp_path / name)
