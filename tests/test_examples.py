"""The documented reference config lists every key the code accepts, with the code's defaults."""

from __future__ import annotations

import yaml

from opd.config import Config, _known_keys, load_config
from conftest import ROOT

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
    documented = _flatten(yaml.safe_load(REFERENCE.read_text()))
    assert sorted(documented) == sorted(_known_keys(Config))
    for section, model in ((name, field.annotation) for name, field in Config.model_fields.items()):
        for key, field in model.model_fields.items():
            if field.is_required():
                continue
            value = getattr(getattr(config, section), key)
            assert value == field.default, f"{section}.{key}: reference.yaml says {value!r}, code default is {field.default!r}"
