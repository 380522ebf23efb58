"""Generated labelled text for the encoder recipes: exact labels, any size, nothing downloaded.

Every generator is a pure function of ``(n, seed)`` and draws from the closed word lists below, so a
config-built model can use a word-level tokenizer over :func:`vocabulary` (no unknown words) while a
pretrained model reads the same sentences through its own tokenizer.

* :func:`reviews`: short reviews with a sentiment label (negative / neutral / positive, in chosen
  proportions: imbalanced by default) and a named-entity tag per word (person / city / other).
  Negatives include negated praise ("was not great"), which a bag of words alone cannot tell apart.
* :func:`qa`: a context of several facts, a question about one of them, and the answer's word span.
"""
from __future__ import annotations

import random
from typing import Sequence

SENTIMENTS = ("negative", "neutral", "positive")
TAGS = ("O", "PER", "LOC")

PERSONS = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar",
           "peggy", "rupert", "sybil", "trent", "victor", "walter")
CITIES = ("paris", "berlin", "madrid", "rome", "vienna", "lisbon", "oslo", "prague", "dublin", "warsaw", "athens",
          "zurich", "tokyo", "lima", "cairo", "boston")
SUBJECTS = ("the movie", "the food", "the hotel", "the service", "the book", "the concert", "the staff", "the room",
            "the museum", "the train", "the coffee", "the show")
POSITIVE = ("great", "excellent", "wonderful", "delightful", "fantastic", "superb", "lovely", "brilliant")
NEGATIVE = ("terrible", "awful", "horrible", "dreadful", "disappointing", "poor", "useless", "boring")
ADVERBS = ("really", "quite", "truly", "very", "rather")
NEUTRAL = ("opened at nine", "was on the second floor", "lasted two hours", "was booked in advance",
           "had a blue door", "changed its schedule", "was near the station", "took cash and cards")
VERBS = ("said", "wrote", "thought", "told us")

# QA facts: (template with {p} and {a}, question with {p}, answers)
FACTS = (
    ("{p} lives in {a}", "where does {p} live ?", CITIES),
    ("{p} works as a {a}", "what is the job of {p} ?", ("teacher", "pilot", "baker", "nurse", "lawyer", "chef",
                                                         "farmer", "painter")),
    ("{p} plays the {a}", "which instrument does {p} play ?", ("piano", "violin", "guitar", "drums", "flute",
                                                                "cello", "trumpet", "harp")),
    ("{p} drives a {a} car", "what color is the car of {p} ?", ("red", "green", "yellow", "black", "white", "silver",
                                                                 "orange", "purple")),
)


def vocabulary() -> list[str]:
    """Every word the generators can produce (sorted): the word-level tokenizer of config-built encoders."""
    words = set(PERSONS) | set(CITIES) | set(POSITIVE) | set(NEGATIVE) | set(ADVERBS) | {"was", "not", "in", "and"}
    for phrase in SUBJECTS + NEUTRAL + VERBS:
        words.update(phrase.split())
    for statement, question, answers in FACTS:
        words.update(w for w in (statement + " " + question).split() if "{" not in w)
        words.update(answers)
    words.add(".")
    return sorted(words)


def _check(n: int, proportions: Sequence[float]) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"the number of examples must be a non-negative int, got {n!r}")
    if len(proportions) != len(SENTIMENTS) or any(p < 0 for p in proportions) or sum(proportions) <= 0:
        raise ValueError(f"class proportions must be {len(SENTIMENTS)} non-negative numbers with a positive sum "
                         f"({', '.join(SENTIMENTS)}), got {list(proportions)!r}")


def reviews(n: int, seed: int, proportions: Sequence[float] = (0.1, 0.3, 0.6)) -> list[dict]:
    """``n`` reviews ``{"words", "label", "tags"}``: ``label`` indexes SENTIMENTS, ``tags`` TAGS per word."""
    _check(n, proportions)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choices(range(len(SENTIMENTS)), weights=proportions)[0]
        person, city = rng.choice(PERSONS), rng.choice(CITIES)
        speaker = [(person, "PER"), *((w, "O") for w in rng.choice(VERBS).split())]
        subject = [(w, "O") for w in rng.choice(SUBJECTS).split()]
        place = [("in", "O"), (city, "LOC")]
        # the place moves around, so position alone does not give the tags away
        head = speaker + subject + place if rng.random() < 0.5 else place + speaker + subject
        if SENTIMENTS[label] == "neutral":
            tail = rng.choice(NEUTRAL).split()
        else:
            adverb = [rng.choice(ADVERBS)] if rng.random() < 0.5 else []
            if SENTIMENTS[label] == "positive":
                tail = ["was", *adverb, rng.choice(POSITIVE)]
            elif rng.random() < 0.5:  # negated praise
                tail = ["was", "not", *adverb, rng.choice(POSITIVE)]
            else:
                tail = ["was", *adverb, rng.choice(NEGATIVE)]
        words = [w for w, _ in head] + tail
        tags = [TAGS.index(t) for _, t in head] + [0] * len(tail)
        out.append({"words": words, "label": label, "tags": tags})
    return out


def qa(n: int, seed: int, facts_per_context: int = 3) -> list[dict]:
    """``n`` examples ``{"context", "question", "answer", "answer_start"}`` (words; answer_start indexes the
    context's words). Each context states ``facts_per_context`` facts about different people; the
    question asks one of them, so the model has to match the person, not only the kind of answer."""
    if facts_per_context < 1:
        raise ValueError(f"facts_per_context must be >= 1, got {facts_per_context!r}")
    _check(n, (1, 1, 1))
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        people = rng.sample(PERSONS, facts_per_context)
        kinds = [rng.randrange(len(FACTS)) for _ in people]
        context, spans = [], []
        for person, kind in zip(people, kinds):
            statement, _, answers = FACTS[kind]
            answer = rng.choice(answers)
            words = statement.format(p=person, a=answer).split()
            spans.append((len(context) + words.index(answer), answer))
            context += words + ["."]
        asked = rng.randrange(facts_per_context)
        question = FACTS[kinds[asked]][1].format(p=people[asked]).split()
        start, answer = spans[asked]
        out.append({"context": context, "question": question, "answer": answer, "answer_start": start})
    return out
