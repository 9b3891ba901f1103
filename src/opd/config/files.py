"""A config from a YAML file and `--set` overrides, validated with every error reported at once (each
with its dotted key path and, for a misspelt key, the key probably meant); and the resolved config
written back as YAML, which `opd train` accepts as it is."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from opd.config.schema import Config
from opd.errors import ConfigError


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        for annotation in (field.annotation, *get_args(field.annotation)):  # X and X | None alike
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                keys.extend(_known_keys(annotation, prefix + name + "."))
    return keys


# What a key's pattern (opd.config.sections) allows, in words, for its error message.
PATTERNS_IN_WORDS = {
    r"^(gsm8k|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$": "a built-in verifier (gsm8k) or a function as package.module:function",
    r"^[A-Za-z0-9_.-]+$": "letters, digits, '_', '.' and '-' only",
}


def _describe(error: dict[str, Any]) -> str:
    path = ".".join(str(part) for part in error["loc"])
    if error["type"] == "string_pattern_mismatch":
        words = PATTERNS_IN_WORDS.get(
            error.get("ctx", {}).get("pattern"), f"the form {error.get('ctx', {}).get('pattern')}"
        )
        return f"{path}: expected {words} (got {error.get('input')!r})"
    if error["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(path, _known_keys(Config), n=1, cutoff=0.6)
        hint_text = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"{path}: unknown key{hint_text}"
    message = error["msg"].removeprefix("Value error, ")
    if not path or error["type"] == "value_error":  # a validator's message names its keys itself
        return message
    return f"{path}: {message} (got {error.get('input')!r})"


def _blame(error: dict[str, Any], origin: str, overrides: list[str]) -> str:
    """Where a problem comes from: the `--set` override that wrote its key (or a section above it), else
    `origin`."""
    path = [str(part) for part in error["loc"]]
    for text in reversed(overrides):  # the last override of a key is the one that counts
        key = parse_override(text)[0]
        if path[: len(key)] == key or key[: len(path)] == path:
            return f"--set {text}"
    return origin


def validate(raw: dict[str, Any], origin: str = "config", overrides: list[str] | None = None) -> Config:
    """Validate a nested dict into a Config; raises ConfigError listing every problem at once, each after
    where it came from: `origin` (the file), or the `--set` override (in `overrides`) that set its key."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        blamed: dict[str, list[str]] = {}
        for error in exc.errors():
            blamed.setdefault(_blame(error, origin, overrides or []), []).append(_describe(error))
        raise ConfigError("; ".join(f"{where}: " + "; ".join(problems) for where, problems in blamed.items())) from None


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
            if node.get(part) is None:  # absent, or an optional section left null (a run's config.yaml has those)
                node[part] = {}
            child = node[part]
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
    return validate(apply_overrides(raw, overrides or []), origin=str(path), overrides=overrides)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
