"""The documented reference config lists every key the code accepts, with the code's defaults."""

from __future__ import annotations

from typing import get_args

import pytest
import yaml
from pydantic import BaseModel

from opd.config.files import _known_keys, load_config
from opd.config.schema import Config

from conftest import ROOT, run_cli

REFERENCE = ROOT / "examples" / "reference.yaml"


def _flatten(node: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat[prefix + key] = value
            flat.update(_flatten(value, prefix + key + "."))
        else:
            flat[prefix + key] = value
    return flat


def test_reference_config_lists_every_key_with_its_default():
    config = load_config(REFERENCE)
    text = REFERENCE.read_text()
    documented = _flatten(yaml.safe_load(text))
    known = _known_keys(Config)
    # An optional subsection that is off by default (student.lora: null) lists its keys in comments.
    off = [key for key, value in documented.items() if value is None and any(k.startswith(key + ".") for k in known)]
    for section in off:
        for key in (k for k in known if k.startswith(section + ".")):
            assert f"#   {key.rsplit('.', 1)[-1]}:" in text, f"{key} is not documented in reference.yaml"
    known = [key for key in known if not any(key.startswith(section + ".") for section in off)]
    assert sorted(documented) == sorted(known)
    for section, annotation in ((name, field.annotation) for name, field in Config.model_fields.items()):
        model = next(
            (
                a
                for a in (annotation, *get_args(annotation))  # X | None -> X
                if isinstance(a, type) and issubclass(a, BaseModel)
            ),
            None,
        )
        if model is None or getattr(config, section) is None:  # teachers, reward: off by default (see above)
            continue
        for key, field in model.model_fields.items():
            if field.is_required() or (section, key) == ("teacher", "path"):  # path or url: one is given
                continue
            value = getattr(getattr(config, section), key)
            default = field.get_default(call_default_factory=True)
            assert value == default, f"{section}.{key}: reference.yaml says {value!r}, code default is {default!r}"


def test_every_example_recipe_validates():
    recipes = sorted(ROOT.glob("examples/*.yaml"))
    assert {path.name for path in recipes} >= {"reference.yaml", "gsm8k_qwen3.yaml"}
    for path in recipes:
        load_config(path)


@pytest.mark.e2e
def test_dry_run_validates_the_gpu_recipe_without_weights_or_network(tmp_path, gsm8k_dir):
    recipe = ROOT / "examples" / "gsm8k_qwen3.yaml"
    config = load_config(recipe)
    assert (config.student.path, config.teacher.path) == ("Qwen/Qwen3-1.7B", "Qwen/Qwen3-8B")
    assert (config.rollout.samples_per_prompt, config.rollout.max_new_tokens, config.rollout.temperature) == (
        8,
        128,
        0.7,
    )
    assert (config.optim.lr, config.optim.schedule, config.run.precision) == (1e-5, "cosine", "bf16")
    output_dir = tmp_path / "run"
    local_data = gsm8k_dir
    result = run_cli(
        "train",
        "--dry-run",
        str(recipe),
        "--set",
        f"run.output_dir={output_dir}",
        f"data.train={local_data / 'train.jsonl'}",
        f"data.eval={local_data / 'test.jsonl'}",
    )
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout and "7473 rows" in result.stdout and "1319 rows" in result.stdout
    assert not output_dir.exists()
    broken = run_cli("train", "--dry-run", str(recipe), "--set", f"data.train={tmp_path / 'absent.jsonl'}")
    assert broken.returncode == 2 and "data.train: no such file" in broken.stderr
