"""A synthetic two-step word-problem task in GSM8K's answer format.

Each problem has a worked solution of two arithmetic lines and a final `#### <number>` line, e.g.

    Question: Mia has 12 apples . She buys 5 more and gives away 3 . How many apples does Mia have now ?
    Answer: Mia has 12 + 5 = 17 apples .
    Mia has 17 - 3 = 14 apples .
    #### 14

Numbers stay small (results below 200), so each is a single token of the demo's word-level tokenizer
and tiny transformers can learn the task in minutes on a CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from opd.data.templates import place_context

NAMES = ["Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Eli", "Amy", "Ben", "Kim"]
PRONOUNS = {
    "Mia": "She",
    "Ava": "She",
    "Zoe": "She",
    "Ivy": "She",
    "Amy": "She",
    "Kim": "She",
    "Tom": "He",
    "Leo": "He",
    "Sam": "He",
    "Max": "He",
    "Eli": "He",
    "Ben": "He",
}
ITEMS = ["apples", "pens", "cards", "books", "coins", "shells", "stamps", "cookies"]
MAX_NUMBER = 200


def make_problem(rng: random.Random, slip: float = 0.0) -> dict[str, str]:
    """One problem as {"prompt", "answer"}; the answer's last line is `#### N`.

    With probability `slip` the last line repeats the first step's result instead of the second:
    a sloppy habit the demo's student learns from its training data and the teacher never shows.
    """
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    pronoun = PRONOUNS[name]
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        c = rng.randint(1, a + b - 1)
        first, second = a + b, a + b - c
        question = (
            f"{name} has {a} {item} . {pronoun} buys {b} more and gives away {c} . "
            f"How many {item} does {name} have now ?"
        )
        steps = [f"{name} has {a} + {b} = {first} {item} .", f"{name} has {first} - {c} = {second} {item} ."]
    elif kind == 1:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = rng.randint(1, 30)
        first, second = a * b, a * b + c
        question = (
            f"{name} buys {a} boxes with {b} {item} in each box . {pronoun} also finds {c} {item} . "
            f"How many {item} does {name} have ?"
        )
        steps = [f"The boxes hold {a} * {b} = {first} {item} .", f"{name} has {first} + {c} = {second} {item} ."]
    else:
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        c = rng.randint(2, 5)
        first, second = a - b, (a - b) * c
        question = (
            f"{name} had {a} {item} and lost {b} . Then {name} got {c} times as many as were left . "
            f"How many {item} does {name} have ?"
        )
        steps = [f"{name} kept {a} - {b} = {first} {item} .", f"{name} has {first} * {c} = {second} {item} ."]
    prompt = f"Question : {question} \n Answer :"
    final = first if slip and rng.random() < slip else second
    answer = " " + " \n ".join(steps) + f" \n #### {final}"
    return {"prompt": prompt, "answer": answer}


def vocabulary_words() -> list[str]:
    """Every word the task can produce, numbers 0..MAX_NUMBER included."""
    words = {"\n", "####", ".", "?", ":", "+", "-", "*", "="}
    templates = (
        "Question Answer has buys more and gives away How many does have now boxes with in each box also finds "
        "The hold had lost Then got times as were left kept"
    )
    words.update(templates.split())
    words.update(NAMES)
    words.update(PRONOUNS.values())
    words.update(ITEMS)
    words.update(str(n) for n in range(MAX_NUMBER + 1))
    return sorted(words)


# A hint shown before the question: the reference answer's last line, `#### N \n Question : ...`, words
# the word-level tokenizer knows, so a hinted prompt is an ordinary one, three tokens longer.
HINT_FORMAT = "{context} \n {prompt}"


def hint_of(problem: dict[str, str]) -> str:
    """The reference answer's last line, `#### N`."""
    return problem["answer"].split("\n")[-1].strip()


def hinted_prompt(problem: dict[str, str]) -> str:
    return place_context(HINT_FORMAT, hint_of(problem), problem["prompt"])


def write_split(path: Path, count: int, seed: int, hint: bool = False, hint_in_prompt: bool = False) -> None:
    """count problems as JSONL. hint: each row also carries `teacher_context`, its hint, for a teacher
    only; hint_in_prompt: the hint put into the prompt itself instead (to measure a model that sees it)."""
    rng = random.Random(seed)
    with Path(path).open("w") as handle:
        for _ in range(count):
            problem = make_problem(rng)
            if hint_in_prompt:
                problem["prompt"] = hinted_prompt(problem)
            elif hint:
                problem["teacher_context"] = hint_of(problem)
            handle.write(json.dumps(problem) + "\n")
