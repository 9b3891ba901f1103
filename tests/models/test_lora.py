"""LoRA students through peft: frozen base, trained adapters, exact resume, a merged final/ that loads
as a plain model, adapters that every forward of opd goes through (the LM head's included)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from opd.config.files import validate
from opd.errors import ConfigError
from opd.ops.forward import completion_hidden_states, logits_from_hidden
from opd.rollout.decoding import HFDecoder, make_decoder
from opd.train.setup import prepare
from opd.train.step import train_step
from opd.train.trainer import train

from conftest import make_tiny_model

pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "lm_head"]  # the LM head too: a loss that read lm_head.weight would miss it


def lora_config(tiny_config, output_dir: Path, steps: int, **run) -> dict:
    return {
        **tiny_config,
        "run": {**tiny_config["run"], "output_dir": str(output_dir), "max_steps": steps, **run},
        "student": {**tiny_config["student"], "lora": {"r": 4, "alpha": 8, "target_modules": TARGETS}},
        "data": {**tiny_config["data"], "eval": None},
        "optim": {"lr": 1e-2, "schedule": "constant"},
    }


def test_base_weights_stay_and_adapters_move_through_every_forward(tiny_config, tmp_path):
    config = validate(lora_config(tiny_config, tmp_path / "run", 3))
    session = prepare(config, resume=False, log=lambda *_: None)
    model = session.student.model
    base = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" not in name}
    adapters = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
    assert adapters and all(not p.requires_grad for name, p in model.named_parameters() if "lora_" not in name)
    assert isinstance(make_decoder(model), HFDecoder)  # the lean step would read the base weights only
    for step in (1, 2):
        metrics, _ = train_step(session, step)
    assert metrics["ratio/max_abs_log"] < 2e-5  # the sampler and the update saw the same adapted model
    for name, value in model.named_parameters():
        if "lora_" in name:
            continue
        assert torch.equal(value, base[name]), name
    trained = {name: p.detach() for name, p in model.named_parameters()}
    assert max(float((trained[n] - v).abs().max()) for n, v in adapters.items()) > 1e-4
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    with torch.no_grad():  # opd's hidden states + LM head as a module == peft's own forward
        mine = logits_from_hidden(model, completion_hidden_states(model, ids, mask, 2), session.student.vocab_size)
        theirs = session.student.adapter(input_ids=ids).logits[:, 2:4, : session.student.vocab_size]
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_resume_is_exact_and_final_is_a_merged_model_with_the_adapters_beside_it(tiny_config, tmp_path):
    from peft import PeftModel

    straight = train(validate(lora_config(tiny_config, tmp_path / "straight", 4)), log=lambda *_: None)
    parted = lora_config(tiny_config, tmp_path / "parted", 2, save_every=1)
    train(validate(parted), log=lambda *_: None)
    checkpoint = tmp_path / "parted" / "checkpoints" / "step-2"
    from conftest import checkpoint_state

    saved = checkpoint_state(checkpoint)["model"]
    assert saved and all("lora_" in name for name in saved)  # the adapters alone
    resumed = train(
        validate(lora_config(tiny_config, tmp_path / "parted", 4, save_every=1)), resume=True, log=lambda *_: None
    )
    assert resumed.steps_run == 2
    merged = load_file(straight.output_dir / "final" / "model.safetensors")
    assert merged.keys() == load_file(Path(tiny_config["student"]["path"]) / "model.safetensors").keys()
    for name, value in load_file(tmp_path / "parted" / "final" / "model.safetensors").items():
        assert torch.equal(value, merged[name]), name

    from opd.io.export import export_checkpoint

    exported = export_checkpoint(tmp_path / "parted" / "checkpoints" / "step-4", tmp_path / "exported")
    for name, value in load_file(exported / "model.safetensors").items():  # merged, as final/ is
        assert torch.equal(value, merged[name]), name
    assert (exported / "adapter" / "adapter_model.safetensors").is_file()

    final = straight.output_dir / "final"
    plain = AutoModelForCausalLM.from_pretrained(final).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_config["student"]["path"]), final / "adapter"
    ).eval()
    ids = torch.tensor([[3, 14, 15, 9, 26, 5]])
    with torch.no_grad():
        torch.testing.assert_close(
            plain(input_ids=ids).logits.log_softmax(-1),
            adapted(input_ids=ids).logits.log_softmax(-1),
            atol=1e-5,
            rtol=1e-5,
        )


def test_lora_bad_input_is_one_line_before_any_weight_loads(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr("opd.train.setup.load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    raw = lora_config(tiny_config, tmp_path / "run", 2)
    raw["student"]["lora"]["target_modules"] = ["q_proj", "qkv", "mlp_in"]
    with pytest.raises(ConfigError, match=r"student.lora.target_modules: \['qkv', 'mlp_in'\] not in .*q_proj"):
        prepare(validate(raw), resume=False, log=lambda *_: None)
    tied = make_tiny_model(tmp_path / "tied", tied=True)  # its head's delta would land on the embeddings too
    raw["student"]["lora"]["target_modules"] = TARGETS
    with pytest.raises(
        ConfigError,
        match=r"^student.lora.target_modules: lm_head: lm_head and embed_tokens are one "
        r"tensor in \S+tied \(tie_word_embeddings\).*; leave it out$",
    ):
        prepare(validate({**raw, "student": {**raw["student"], "path": str(tied)}}), resume=False, log=lambda *_: None)
    raw["student"]["lora"] = {"dropout": 0.1}
    with pytest.raises(ConfigError, match="student.lora.dropout=0.1"):
        validate(raw)
    assert not (tmp_path / "run").exists()
