"""GSM8K answer checking: extraction order, numeric comparison, and every real gold answer."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from opd.data.tasks.gsm8k import extract_answer, gold_answer, is_correct
from opd.demo.tokenizer import build_tokenizer


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("She has 3 + 4 = 7 apples.\n#### 7", Fraction(7)),
        ("#### 12 is wrong, the answer is\n#### 15", Fraction(15)),  # the last #### line wins
        ("The total is \\boxed{42}. Checking 7 * 6 = 42 again: 43", Fraction(42)),  # boxed beats last number
        ("#### 5 and also \\boxed{6}", Fraction(5)),  # #### beats boxed
        ("So 2 + 2 = 4, then 4 * 3 = 12 cookies", Fraction(12)),  # else the last number
        ("#### 1,000", Fraction(1000)),
        ("#### $1,234.50", Fraction("1234.5")),
        ("#### -3", Fraction(-3)),
        ("The answer is 18.", Fraction(18)),
        ("no digits here", None),
    ],
)
def test_extraction_order_and_number_parsing(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    "completion", ["#### 1000", "#### 1,000", "#### $1000", "#### 1000.0", "#### 1000.00", "\\boxed{1,000}"]
)
def test_numeric_comparison_ignores_commas_dollars_and_trailing_zeros(completion):
    assert is_correct(completion, "work\n#### 1,000") is True


def test_wrong_and_uncheckable_answers():
    assert is_correct("#### 999", "work\n#### 1000") is False
    assert is_correct("nothing", "work\n#### 1000") is False
    assert is_correct("#### 5", "a reference without a final line") is None


def test_every_gsm8k_test_gold_answer_parses_to_its_number(gsm8k_dir):
    rows = [json.loads(line) for line in (gsm8k_dir / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 1319
    for row in rows:
        final_line = row["answer"].strip().splitlines()[-1]
        assert final_line.startswith("####")
        expected = Fraction(final_line.removeprefix("####").strip().replace(",", ""))
        assert gold_answer(row["answer"]) == expected, final_line
        # The reference solution itself is judged correct against itself.
        assert is_correct(row["answer"], row["answer"]) is True


def _chat_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ 'The' if m['role'] == 'system' else 'Question' }} : {{ m['content'] }} \n "
        "{% endfor %}"
        "{% if add_generation_prompt %}Answer : {% endif %}"
    )
    return tokenizer


def _byte_tokenizer():
    """Byte-level BPE without merges: decoding gives back exactly the text that was encoded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<eos>": 0, **{symbol: index + 1 for index, symbol in enumerate(sorted(alphabet))}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")


def test_gsm8k_rows_go_through_the_chat_template_with_the_system_prompt(tmp_path):
    from opd.data.prompts import load_prompts

    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps({"question": "Mia has 3 apples .", "answer": "3 + 0 = 3\n#### 3"}) + "\n")
    tokenizer = _chat_tokenizer()
    prompts = load_prompts(str(path), "data.train", tokenizer, 64, system_prompt="Then")
    text = tokenizer.decode(prompts.token_ids[0])
    assert text == "The : Then \n Question : Mia has 3 apples . \n Answer :"
    assert prompts.answers == ["3 + 0 = 3\n#### 3"]
    plain_tokenizer = _byte_tokenizer()  # no chat template: plain "Question: ...\nAnswer:" text
    plain = load_prompts(str(path), "data.train", plain_tokenizer, 64)
    assert plain_tokenizer.decode(plain.token_ids[0]) == "Question: Mia has 3 apples .\nAnswer:"
    with_system = load_prompts(str(path), "data.train", plain_tokenizer, 64, system_prompt="Be brief.")
    assert plain_tokenizer.decode(with_system.token_ids[0]) == "Be brief.\n\nQuestion: Mia has 3 apples .\nAnswer:"


def test_real_gsm8k_file_loads_as_prompts(gsm8k_dir):
    from opd.data.prompts import load_prompts

    prompts = load_prompts(str(gsm8k_dir / "test.jsonl"), "data.eval", _chat_tokenizer(), 100_000)
    assert len(prompts) == 1319 and all(gold_answer(answer) is not None for answer in prompts.answers)


def test_hub_source_is_read_through_datasets(monkeypatch, tmp_path):
    """`hf:openai/gsm8k:main:test` calls datasets.load_dataset(name, config, split=...) (a stand-in here: no
    network)."""
    import sys
    import types

    from opd.data.rows import read_rows
    from opd.errors import DataError

    calls = []
    fake = types.ModuleType("datasets")

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"question": "Tom has 2 pens .", "answer": "#### 2"}]

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    rows = read_rows("hf:openai/gsm8k:main:test", "data.eval")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert rows[0].question == "Tom has 2 pens ." and rows[0].answer == "#### 2"
    assert read_rows("hf:someone/data:train", "data.train")[0].question
    assert calls[-1] == ("someone/data", None, "train")
    with pytest.raises(DataError, match="data.train: 'hf:only-a-name' should read hf:NAME"):
        read_rows("hf:only-a-name", "data.train")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match=r"needs the `datasets` package"):
        read_rows("hf:openai/gsm8k:main:test", "data.eval")


def test_chat_template_kwargs_reach_the_template(tmp_path):
    """e.g. Qwen3's enable_thinking=False; here a variable that adds a word to the generation prompt."""
    from opd.data.prompts import load_prompts

    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "Tom has 2 pens ."}) + "\n")
    tokenizer = _chat_tokenizer()
    tokenizer.chat_template += "{% if add_word %}Then{% endif %}"
    plain = tokenizer.decode(load_prompts(str(path), "data.train", tokenizer, 64).token_ids[0])
    extra = tokenizer.decode(
        load_prompts(str(path), "data.train", tokenizer, 64, template_kwargs={"add_word": True}).token_ids[0]
    )
    assert extra == plain + " Then"
