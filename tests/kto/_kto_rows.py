"""Hand-written unpaired rows for the KTO tests: standard, conversational, paired, and a JSON Lines writer."""

import json

QUESTIONS = ["What is two plus two?", "Name a primary colour.", "How do I keep bread fresh?", "Say hello in French.",
             "What is the capital of Italy?", "Give me a synonym of quick.", "Is the sea salty?", "Count to three."]
GOOD = [" Four.", " Red is one.", " In a paper bag at room temperature, away from the sun.", " Bonjour!", " Rome.",
        " Fast, or rapid.", " Yes, mostly from dissolved minerals.", " One, two, three."]
BAD = [" Five, I think.", " Grass.", " Put it in water.", " Hola, amigo!", " Paris, of course.", " Slow.",
       " No, it is fresh water.", " Three, two."]
# both classes in each group of 4, unequal overall (5 desirable, 3 undesirable): the weights matter
LABELS = [True, False, True, True, False, True, True, False]


def standard(labels=LABELS):
    return [{"prompt": q, "completion": (g if label else b), "label": label}
            for q, g, b, label in zip(QUESTIONS, GOOD, BAD, labels)]


def conversational(labels=LABELS):
    return [{"prompt": [{"role": "user", "content": row["prompt"]}],
             "completion": [{"role": "assistant", "content": row["completion"].strip()}], "label": row["label"]}
            for row in standard(labels)]


def paired(n=5):
    return [{"prompt": q, "chosen": g, "rejected": b} for q, g, b in zip(QUESTIONS[:n], GOOD, BAD)]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
