"""Small synthetic data sets for the task examples that ../shared/data has none for: summaries,
questions and answers, dialogues and semantic roles. Each is learnable by a small model in a few
minutes on a CPU, and each has a trivial baseline a trained model must beat (lead sentences, the
most frequent answer or reply, the most frequent role of each word).

    python examples/tasks/make_data.py [DIR]     # default: examples/tasks/data
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi"]
PLACES = ["Paris", "Rome", "Lima", "Oslo", "Cairo", "Quito", "Delhi", "Tokyo"]
THINGS = ["bread", "a lamp", "shoes", "a book", "tea", "a map", "flowers", "a clock"]
FILLER = ["The weather was mild .", "Nobody expected the news .", "It had rained all week .",
          "The streets were busy .", "Prices went up again .", "The trains ran late .",
          "A band played in the square .", "The market opened early ."]


def summaries(n: int, seed: int) -> list[dict[str, str]]:
    """A document of filler sentences and two facts; its summary joins the facts. The facts are
    never the first sentence, so the lead is a weak summary."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, place, thing = rng.choice(NAMES), rng.choice(PLACES), rng.choice(THINGS)
        facts = [f"{name} travelled to {place} .", f"{name} bought {thing} there ."]
        sentences = rng.sample(FILLER, 3)
        sentences.insert(1 + rng.randrange(2), facts[0])
        sentences.insert(3 + rng.randrange(2), facts[1])
        rows.append({"document": " ".join(sentences), "summary": f"{name} bought {thing} in {place} ."})
    return rows


def answers(n: int, seed: int) -> list[dict[str, str]]:
    """Who lives where: a context of three people and their cities, a question about one of them."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        people = rng.sample(NAMES, 3)
        cities = [rng.choice(PLACES) for _ in people]
        context = " ".join(f"{p} lives in {c} ." for p, c in zip(people, cities, strict=True))
        asked = rng.randrange(3)
        rows.append({"question": f"where does {people[asked]} live ? {context}", "answer": cities[asked]})
    return rows


INTENTS = {"hello": "hi there", "how are you": "fine thanks", "bye": "see you soon", "thanks": "you are welcome",
           "what is your name": "i am a bot", "good morning": "morning to you"}


def dialogues(n: int, seed: int) -> list[dict[str, list[dict[str, str]]]]:
    """One- or two-turn conversations: the reply depends on what the user said last."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = []
        for _ in range(rng.randint(1, 2)):
            said = rng.choice(list(INTENTS))
            messages += [{"role": "user", "content": said}, {"role": "assistant", "content": INTENTS[said]}]
        rows.append({"messages": messages})
    return rows


VERBS = [("saw", "seen"), ("met", "met"), ("called", "called"), ("helped", "helped")]


def roles(n: int, seed: int) -> list[list[tuple[str, str]]]:
    """Semantic roles as tags (PropBank's ARG0 agent, ARG1 patient, V, ARGM-TMP): active and
    passive sentences, so a name is ARG0 or ARG1 by its place, not by itself."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        agent, patient = rng.sample(NAMES, 2)
        verb, participle = rng.choice(VERBS)
        if rng.random() < 0.5:
            words = [(agent, "B-ARG0"), (verb, "B-V"), (patient, "B-ARG1")]
        else:
            words = [(patient, "B-ARG1"), ("was", "O"), (participle, "B-V"), ("by", "O"), (agent, "B-ARG0")]
        if rng.random() < 0.4:
            words += [("last", "B-ARGM-TMP"), (rng.choice(["week", "night", "year"]), "I-ARGM-TMP")]
        sentences.append(words)
    return sentences


def write(directory: Path, seed: int = 0, scale: float = 1.0) -> Path:
    """Every data set, as the example plans read them; `scale`: of their sizes (the tests' are smaller)."""
    directory.mkdir(parents=True, exist_ok=True)

    def n(size: int) -> int:
        return max(20, int(size * scale))

    for name, rows in (("summaries", summaries(n(2000), seed)), ("answers", answers(n(2000), seed)),
                       ("dialogues", dialogues(n(600), seed))):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    conll = "\n".join("".join(f"{w} {t}\n" for w, t in s) for s in roles(n(1200), seed))
    (directory / "roles.conll").write_text(conll, encoding="utf-8")
    return directory


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "data"
    print(f"written to {write(out)}")
