"""A model's LM head alone, read from its safetensors without loading the rest: what a trainer needs
to turn a served teacher's hidden states into its full distribution (opd.teachers.hidden_states).

The head's tensor is found through the model's own class, built on the meta device (no memory): the
module `get_output_embeddings()` returns, or the input embedding it is tied to. Only that tensor (and
a bias, where the head has one) is read; safetensors maps the file, so a 16 GB teacher costs the
head's bytes (151,936 x 4,096 bf16 = 1.2 GB for Qwen3-8B).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from opd.errors import ModelError
from opd.ops.forward import head_logits


class LMHead:
    """A teacher's LM head and the config that post-processes its logits (scale, soft-capping)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, config, source: str):
        """weight: (V_rows, H), V_rows >= the tokenizer's length (rows past it are padding)."""
        self.linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        self.linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            self.linear.bias = torch.nn.Parameter(bias, requires_grad=False)
        self.config, self.source = config, source

    @property
    def hidden_size(self) -> int:
        return self.linear.weight.shape[1]

    @property
    def rows(self) -> int:
        return self.linear.weight.shape[0]

    @property
    def bytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in self.linear.parameters())

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """(..., H) -> (..., vocab_size), as the whole model's head computes them (opd.ops.forward.head_logits)."""
        return head_logits(self.linear, self.config, hidden.to(self.linear.weight.dtype), vocab_size)


@dataclass
class HeadLocation:
    """Where a model's LM head is in its files, found without reading any weights."""

    config: object  # the model's transformers config
    file: Path  # the safetensors file holding the head
    name: str  # the head's tensor there (the input embedding's where they are tied)
    bias: tuple[Path, str] | None  # the head's bias, where it has one
    shape: tuple[int, int]  # (rows, hidden) as the config makes it


def locate_lm_head(path: str, key: str, trust_remote_code: bool = False) -> HeadLocation:
    """Where the LM head of the model at `path` (a folder, or a hub id already in the local Hugging Face
    cache) is. One-line ModelError naming `key` where it can't be found; reads no weights."""
    from transformers import AutoModelForCausalLM

    from opd.models.loading import model_config

    folder = _local_folder(path, key)
    config = model_config(str(folder), key, trust_remote_code)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types; the user needs one line
        raise ModelError(f"{key}: could not build {type(config).__name__}'s model to find its LM head: {exc}") from None
    head, embedding = skeleton.get_output_embeddings(), skeleton.get_input_embeddings()
    names = {module: name for name, module in skeleton.named_modules()}
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = bool(getattr(text_config, "tie_word_embeddings", False))
    candidates = [f"{names[head]}.weight"] + ([f"{names[embedding]}.weight"] if tied else [])
    where = _tensor_files(folder, key)
    found = next((name for name in candidates if name in where), None)
    if found is None:  # a checkpoint saved under other prefixes: match the name's last two parts
        tails = [".".join(name.split(".")[-2:]) for name in candidates]
        found = next((name for tail in tails for name in where if name == tail or name.endswith("." + tail)), None)
    if found is None:
        raise ModelError(
            f"{key}: '{path}' holds no LM head tensor ({' or '.join(candidates)}) in its safetensors files"
        )
    bias_name = found[: -len("weight")] + "bias"
    bias = (where[bias_name], bias_name) if getattr(head, "bias", None) is not None and bias_name in where else None
    return HeadLocation(config, where[found], found, bias, (head.weight.shape[0], head.weight.shape[1]))


def load_lm_head(
    path: str, key: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False
) -> LMHead:
    """The LM head of the model at `path` (as locate_lm_head finds it), in `dtype` on `device`."""
    location = locate_lm_head(path, key, trust_remote_code)
    weight = _read(location.file, location.name).to(device=device, dtype=dtype)
    if tuple(weight.shape) != location.shape:
        raise ModelError(
            f"{key}: {location.name} in '{path}' is {tuple(weight.shape)}, its config says {location.shape}"
        )
    bias = _read(*location.bias).to(device=device, dtype=dtype) if location.bias else None
    return LMHead(weight, bias, location.config, path)


def _local_folder(path: str, key: str) -> Path:
    if Path(path).is_dir():
        return Path(path)
    if path.startswith((".", "/", "~")):
        raise ModelError(f"{key}: no such model folder '{path}'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"], local_files_only=True))
    except Exception:  # not in the cache (offline, or never downloaded): the hub is not asked at run time
        raise ModelError(
            f"{key}: '{path}' is neither a folder nor in the local Hugging Face cache; download its config and "
            f"safetensors first (hf download {path} --include '*.json' '*.safetensors') or give its folder"
        ) from None


def _tensor_files(folder: Path, key: str) -> dict[str, Path]:
    """Every tensor name in the folder's safetensors files -> the file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{key}: '{folder}' holds no safetensors files (opd reads the LM head from them)")
    from safetensors import safe_open

    where = {}
    for file in files:
        with safe_open(str(file), framework="pt") as opened:
            where.update({name: file for name in opened.keys()})
    return where


def _read(file: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as opened:
        return opened.get_tensor(name)
