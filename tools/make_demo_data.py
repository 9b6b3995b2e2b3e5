#!/usr/bin/env python
"""Generate the bundled demo corpus (data/demo/): medical-flavoured text written by this script
from a small hand-made fact table, in MedicalGPT's formats. Deterministic (fixed seed).

    python tools/make_demo_data.py --output_dir data/demo

pretrain/*.txt (one document per line), sft/*.jsonl (sharegpt `conversations`),
reward/*.jsonl (`conversations`, `chosen`, `rejected`), grpo/*.jsonl (`question`, `answer`).
Educational toy content, not medical advice.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medgpt_ds.errors import main_boundary  # noqa: E402

# condition: (symptoms, cause, first-line care, warning sign, specialist)
FACTS = {
    "influenza": ("fever, cough and muscle aches", "an influenza virus", "rest, fluids and antiviral drugs when started early",
                  "shortness of breath", "a general practitioner"),
    "the common cold": ("a runny nose, sneezing and a sore throat", "rhinoviruses", "rest, fluids and time",
                        "a fever lasting more than three days", "a general practitioner"),
    "type 2 diabetes": ("thirst, frequent urination and tiredness", "insulin resistance", "diet, exercise and metformin",
                        "confusion or very high blood sugar", "an endocrinologist"),
    "hypertension": ("often no symptoms at all", "narrowed or stiff arteries", "less salt, exercise and blood pressure drugs",
                     "a severe headache with chest pain", "a cardiologist"),
    "asthma": ("wheezing, chest tightness and cough", "inflamed airways", "inhaled steroids and a reliever inhaler",
               "lips turning blue", "a pulmonologist"),
    "migraine": ("a throbbing headache with nausea", "changes in brain activity", "rest in a dark room and pain relief",
                 "sudden weakness on one side", "a neurologist"),
    "gastritis": ("upper stomach pain and bloating", "Helicobacter pylori or painkillers", "acid-reducing drugs",
                  "black stools or vomiting blood", "a gastroenterologist"),
    "pneumonia": ("fever, cough with phlegm and chest pain", "bacteria or viruses in the lungs", "antibiotics when bacterial",
                  "rapid breathing", "a pulmonologist"),
    "anemia": ("tiredness, pale skin and dizziness", "low iron or low vitamin B12", "iron or vitamin supplements",
               "fainting", "a haematologist"),
    "urinary tract infection": ("burning when passing urine", "bacteria in the bladder", "a short course of antibiotics",
                                "back pain with fever", "a urologist"),
    "eczema": ("dry, itchy and red skin", "a weak skin barrier", "moisturisers and steroid creams",
               "oozing or crusted skin", "a dermatologist"),
    "depression": ("low mood and loss of interest", "a mix of genes, stress and life events", "talking therapy and antidepressants",
                   "thoughts of self-harm", "a psychiatrist"),
}
CHOICES = "ABCD"


def pretrain_docs(rng: random.Random, n: int) -> list[str]:
    tmpl = [
        "{C} is a common condition. Typical symptoms are {s}. It is usually caused by {c}. "
        "Treatment includes {t}. Patients should seek urgent care if they notice {w}.",
        "Doctors diagnose {c2} by asking about {s} and by examining the patient. The usual care is {t}, "
        "and a referral to {sp} may help.",
        "A patient with {c2} often reports {s}. The underlying cause is {c}. Most people recover well with {t}.",
        "Warning signs matter: in {c2}, {w} needs urgent attention. Otherwise, {t} is the standard approach.",
    ]
    out = []
    names = list(FACTS)
    for _ in range(n):
        name = rng.choice(names)
        s, c, t, w, sp = FACTS[name]
        doc = rng.choice(tmpl).format(C=name[0].upper() + name[1:], c2=name, s=s, c=c, t=t, w=w, sp=sp)
        if rng.random() < 0.5:
            other = rng.choice(names)
            s2, c2, t2, _, _ = FACTS[other]
            doc += f" By contrast, {other} presents with {s2} and is treated with {t2}."
        out.append(doc)
    return out


def qa_pairs(name: str) -> list[tuple[str, str]]:
    s, c, t, w, sp = FACTS[name]
    return [
        (f"What are the symptoms of {name}?", f"Common symptoms of {name} are {s}."),
        (f"What causes {name}?", f"{name[0].upper() + name[1:]} is usually caused by {c}."),
        (f"How is {name} treated?", f"Treatment of {name} includes {t}."),
        (f"When should someone with {name} see a doctor urgently?", f"Seek urgent care if there is {w}."),
        (f"Which specialist treats {name}?", f"{name[0].upper() + name[1:]} is managed by {sp}."),
    ]


def sft_records(rng: random.Random) -> list[dict]:
    recs = []
    for name in FACTS:
        pairs = qa_pairs(name)
        for q, a in pairs:
            recs.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
        # multi-turn: two follow-up questions in one conversation
        (q1, a1), (q2, a2) = rng.sample(pairs, 2)
        recs.append({"conversations": [
            {"from": "system", "value": "You are a careful medical assistant."},
            {"from": "human", "value": q1}, {"from": "gpt", "value": a1},
            {"from": "human", "value": q2}, {"from": "gpt", "value": a2}]})
    rng.shuffle(recs)
    return recs


def reward_records(rng: random.Random) -> list[dict]:
    recs = []
    names = list(FACTS)
    for name in names:
        for q, a in qa_pairs(name):
            other = rng.choice([n for n in names if n != name])
            wrong = dict(qa_pairs(other))
            bad = rng.choice([
                "I am not sure, maybe ask someone else.",
                next(iter(wrong.values())),
                "It does not matter, just ignore it.",
            ])
            recs.append({"conversations": [{"from": "human", "value": q}], "chosen": a, "rejected": bad})
    rng.shuffle(recs)
    return recs


def grpo_records(rng: random.Random) -> list[dict]:
    recs = []
    names = list(FACTS)
    for name in names:
        specialist = FACTS[name][4]
        options = [specialist] + rng.sample(sorted({FACTS[n][4] for n in names} - {specialist}), 3)
        rng.shuffle(options)
        letter = CHOICES[options.index(specialist)]
        opts = " ".join(f"{CHOICES[i]}. {o}" for i, o in enumerate(options))
        recs.append({"question": f"Which specialist usually manages {name}? {opts} Answer with the letter.",
                     "answer": letter})
    return recs


def write_jsonl(path: str, recs: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


@main_boundary
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output_dir", default="data/demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num_pretrain_docs", type=int, default=1200)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    for sub in ("pretrain", "sft", "reward", "grpo"):
        os.makedirs(os.path.join(args.output_dir, sub), exist_ok=True)
    docs = pretrain_docs(rng, args.num_pretrain_docs)
    with open(os.path.join(args.output_dir, "pretrain", "medical_notes.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(docs) + "\n")
    sft = sft_records(rng)
    write_jsonl(os.path.join(args.output_dir, "sft", "train.jsonl"), sft)
    write_jsonl(os.path.join(args.output_dir, "reward", "train.jsonl"), reward_records(rng))
    write_jsonl(os.path.join(args.output_dir, "grpo", "train.jsonl"), grpo_records(rng))
    print(f"wrote demo data to {args.output_dir}: {len(docs)} documents, {len(sft)} conversations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
