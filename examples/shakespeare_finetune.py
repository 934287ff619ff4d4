"""Fine-tuning on Shakespeare (the book's chapters 6 and 7, and appendix E), end to end on a CPU.

There are no pretrained GPT-2 weights offline, so the script first pretrains a small GPT-2-shaped
base model with `build-llm train` on the plays that are not held out (a 4096-id byte-level BPE
trained on the same text: about 3 characters a token, a speaker's name 1 to 4 tokens, and the end
token instruction tuning needs). Then, with whole plays held out for testing (the same plays in both parts):

1. Classification: passages labelled comedy / tragedy / history by their play (First Folio genres;
   Pericles, absent from the Folio, as a comedy). The script writes train.csv and test.csv, fine-tunes
   with `build-llm finetune classify` (every weight trainable by default here, `FT_CLS_TRAINABLE`;
   `last-block` is the book's recipe), and prints its held-out accuracy beside the majority class and
   a scikit-learn TF-IDF + logistic-regression baseline on the same split.
2. Instructions with exactly checkable answers, built from the text: four questions in turn about a
   window of 2 to 4 speeches (QUESTIONS: who speaks first, how many speeches, whether a question is
   asked, which genre). Exact match on the held-out plays, over all and by question, before
   fine-tuning, after a full fine-tune and after LoRA (rank 8 on the attention projections, and the
   end token's row; trained 4 times as many steps), with each run's wall time and share of trainable
   parameters.

Needs ../shared/data/shakespeare.txt (beside the repository); skips with a reason when it is absent.
Settings come from environment variables (FT_*, see SETTINGS); FT_PARTS=classify or instruct runs one
part. The base model (1.8M tokens) takes about 10 minutes of training on 2 idle cores, the fine-tunes
about 35 minutes (more on a busy machine). Rerunning reuses the base model in $FT_OUT/base.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from build_llm.store.fsio import remove_dir

ROOT = Path(__file__).resolve().parents[1]
TEXT = Path(os.environ.get("FT_TEXT", ROOT.parent / "shared" / "data" / "shakespeare.txt"))
OUT = Path(os.environ.get("FT_OUT", ROOT / "runs" / "shakespeare-finetune"))
SETTINGS = {  # name: default
    "FT_VOCAB": 4096, "FT_CONTEXT": 256, "FT_EMB": 192, "FT_LAYERS": 4, "FT_HEADS": 6,
    "FT_PRETRAIN_STEPS": 450, "FT_PRETRAIN_BATCH": 16, "FT_PRETRAIN_LR": 2e-3,
    "FT_PASSAGES_PER_PLAY": 60, "FT_PASSAGE_CHARS": 400, "FT_CLS_EPOCHS": 2, "FT_CLS_LR": 3e-4,
    "FT_CLS_TRAINABLE": "all",
    "FT_QA_PER_PLAY": 150, "FT_QA_TEST": 200, "FT_QA_STEPS": 400, "FT_QA_LR": 1e-3,
    "FT_LORA_STEPS": 1600, "FT_LORA_LR": 3e-3,
}
S = {k: type(v)(os.environ.get(k, v)) for k, v in SETTINGS.items()}

HISTORIES = {"KING HENRY IV, THE FIRST PART", "KING HENRY IV, SECOND PART", "THE LIFE OF KING HENRY V",
             "KING HENRY VI, FIRST PART", "HISTORY OF KING HENRY THE SIXTH, SECOND PART",
             "THE HISTORY OF KING HENRY THE SIXTH, THIRD PART", "THE LIFE OF HENRY THE EIGHTH", "KING JOHN",
             "THE TRAGEDY OF KING RICHARD THE SECOND", "THE LIFE AND DEATH OF KING RICHARD III"}
TRAGEDIES = {"ANTONY AND CLEOPATRA", "THE TRAGEDY OF CORIOLANUS", "CYMBELINE", "HAMLET, PRINCE OF DENMARK",
             "JULIUS CAESAR", "THE TRAGEDY OF KING LEAR", "MACBETH", "OTHELLO, THE MOOR OF VENICE",
             "ROMEO AND JULIET", "THE LIFE OF TIMON OF ATHENS", "THE TRAGEDY OF TITUS ANDRONICUS",
             "THE HISTORY OF TROILUS AND CRESSIDA"}
SPEAKER = re.compile(r"^[A-Z][A-Za-z' .&-]{0,30}\.?$")  # "HAMLET.", "Ber.", "Sampson.", "THESEUS"
DIVISION = re.compile(r"^(ACT|Act|SCENE|Scene)\b")


def genre(title: str) -> str:
    return "history" if title in HISTORIES else "tragedy" if title in TRAGEDIES else "comedy"


def is_speaker(line: str) -> bool:
    return (bool(SPEAKER.match(line)) and len(line.split()) <= 4 and not DIVISION.match(line)
            and (line.isupper() or line.endswith(".")))


def parse_plays(text: str) -> list[dict]:
    """Each play: title, genre, and its speeches as (speaker, [lines]) in order. A speaker heading is
    a short line after a blank line ("HAMLET.", "Ber.", "THESEUS"); the cast list before the first
    act or scene and the stage directions are left out."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "by William Shakespeare"]
    plays = []
    for n, start in enumerate(starts):
        title_at = next(j for j in range(start - 1, -1, -1) if lines[j].strip())
        title = lines[title_at].strip()
        end = starts[n + 1] - 2 if n + 1 < len(starts) else len(lines)
        first = next(i for i in range(start, end) if DIVISION.match(lines[i].strip()))
        speeches, speaker, body, previous = [], None, [], ""
        for line in lines[first:end]:
            stripped = line.strip()
            if not stripped or stripped.startswith("[") or DIVISION.match(stripped):
                if speaker and body:
                    speeches.append((speaker, body))
                speaker, body = None, []
            elif not previous and is_speaker(stripped):
                speaker, body = stripped.rstrip("."), []
            elif speaker:
                body.append(stripped)
            previous = stripped
        plays.append({"title": title, "genre": genre(title), "speeches": speeches,
                      "text": "\n".join(lines[title_at:end]) + "\n"})
    return plays


def split_plays(plays: list[dict]) -> tuple[list[dict], list[dict]]:
    """About a quarter of each genre's plays (every fourth, alphabetically) held out for testing."""
    test = set()
    for g in ("comedy", "tragedy", "history"):
        titles = sorted(p["title"] for p in plays if p["genre"] == g)
        test.update(titles[1::4])
    return [p for p in plays if p["title"] not in test], [p for p in plays if p["title"] in test]


def build_llm(*args: str, **kw) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("build-llm")), *map(str, args)]
    print("$ build-llm " + " ".join(map(str, args)), flush=True)
    proc = subprocess.run(cmd, text=True, capture_output=True, **kw)
    if proc.returncode != 0:
        sys.exit(f"build-llm {args[0]} failed:\n{proc.stderr[-3000:]}")
    return proc


def timed(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = build_llm(*args)
    return proc, time.perf_counter() - t0


# --- 0. the base model -----------------------------------------------------------------------------
def pretrain(train_plays: list[dict]) -> Path:
    """A GPT-2-shaped model (fused QKV, tied head) pretrained on the training plays' full text only:
    the held-out plays stay unseen until they are tested."""
    base = OUT / "base"
    if (base / "checkpoint" / "model.safetensors").exists():
        print(f"reusing the base model in {base}")
        print(base_summary(base))
        return base
    OUT.mkdir(parents=True, exist_ok=True)
    corpus = OUT / "train_plays.txt"
    corpus.write_text("\n\n".join(p["text"] for p in train_plays), encoding="utf-8")
    build_llm("tokenizer", "train", "--data", corpus, "--vocab-size", S["FT_VOCAB"], "--out", OUT / "tokenizer.json")
    steps = S["FT_PRETRAIN_STEPS"]
    _, seconds = timed("train", "--data", corpus, "--tokenizer", OUT / "tokenizer.json", "--preset", "gpt2-small",
                       "--context-length", S["FT_CONTEXT"], "--emb-dim", S["FT_EMB"], "--n-layers", S["FT_LAYERS"],
                       "--n-heads", S["FT_HEADS"], "--drop-rate", "0.0", "--steps", steps,
                       "--batch-size", S["FT_PRETRAIN_BATCH"], "--lr", S["FT_PRETRAIN_LR"],
                       "--warmup-steps", max(1, steps // 10), "--eval-every", max(1, steps // 6), "--out", base)
    print(f"pretrained in {seconds:.0f} s (with tokenizing the text); {base_summary(base)}")
    sample = build_llm("generate", "--checkpoint", base, "--prompt", "ROMEO.\n", "--max-new-tokens", 120,
                       "--temperature", "0.8", "--top-k", 40, "--seed", 1).stdout
    print(f"a sample of the base model:\n{sample.strip()}\n")
    return base


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def base_summary(base: Path) -> str:
    rows = [r for r in metrics(base) if "val_loss" in r]
    curve = ", ".join(f"{r['step']}: {r['val_loss']:.3f}" for r in rows)
    last = rows[-1]
    return (f"base: {last['step']} steps, {last['tokens_seen']:,} tokens, {last['elapsed_s']:.0f} s of training; "
            f"validation loss per token by step: {curve} ({last['val_bits_per_char']:.2f} bits per character)")


# --- 1. classification -----------------------------------------------------------------------------
def passages(play: dict, limit: int, size: int = 400) -> list[str]:
    """Consecutive speech lines (no speaker names) cut into passages of about `size` characters,
    evenly spread over the play, at most `limit`."""
    chunks, current = [], ""
    for _, body in play["speeches"]:
        for line in body:
            current = f"{current} {line}".strip()
            if len(current) >= size:
                chunks.append(current)
                current = ""
    step = max(1, len(chunks) // limit)
    return chunks[::step][:limit]


def classification(base: Path, train_plays: list[dict], test_plays: list[dict]) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    d = OUT / "classify"
    d.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, plays in (("train", train_plays), ("test", test_plays)):
        rows = [(text, p["genre"]) for p in plays
                for text in passages(p, S["FT_PASSAGES_PER_PLAY"], S["FT_PASSAGE_CHARS"])]
        with open(d / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(rows)
        splits[name] = rows
    (train_x, train_y), (test_x, test_y) = (zip(*splits["train"]), zip(*splits["test"]))
    print(f"classification: {len(train_x)} training passages from {len(train_plays)} plays, {len(test_x)} test "
          f"passages from {len(test_plays)} held-out plays ({dict(Counter(test_y))})")

    majority = Counter(train_y).most_common(1)[0][0]
    majority_acc = sum(y == majority for y in test_y) / len(test_y)
    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
    clf = LogisticRegression(max_iter=2000, C=10.0).fit(vec.fit_transform(train_x), train_y)
    tfidf_acc = float((clf.predict(vec.transform(test_x)) == list(test_y)).mean())

    run = d / "run"
    if run.exists():
        remove_dir(run)  # the script's own output from an earlier run (fsio refuses anything else)
    _, seconds = timed("finetune", "classify", "--init-from", base, "--data", d / "train.csv", "--val-data",
                       d / "test.csv", "--out", run, "--epochs", S["FT_CLS_EPOCHS"], "--lr", S["FT_CLS_LR"],
                       "--batch-size", 16, "--trainable", S["FT_CLS_TRAINABLE"])
    rows = metrics(run)
    ours = rows[-1]["val_accuracy"]
    print(f"\nheld-out accuracy on {len(test_x)} passages of {len(test_plays)} unseen plays:")
    print(f"  majority class ({majority})     {majority_acc:.3f}")
    print(f"  TF-IDF + logistic regression  {tfidf_acc:.3f}")
    print(f"  fine-tuned GPT (ours)         {ours:.3f}   ({ours - tfidf_acc:+.3f} vs TF-IDF; {seconds:.0f} s)")
    return {"majority": majority_acc, "tfidf": tfidf_acc, "finetuned": ours, "seconds": seconds,
            "n_test": len(test_x), "n_train": len(train_x), "curve": [r["val_accuracy"] for r in rows]}


# --- 2. instructions with exact answers --------------------------------------------------------------
WORDS = {2: "two", 3: "three", 4: "four"}
QUESTIONS = {  # question: its answer, from the window of speeches shown and the play
    "Who speaks first in this passage?": lambda window, play: window[0][0],
    "How many speeches are in this passage?": lambda window, play: WORDS[len(window)],
    "Is a question asked in this passage?": lambda window, play: "yes" if any("?" in line for _, line in window) else "no",
    "Is this passage from a comedy, a tragedy or a history?": lambda window, play: play["genre"],
}


def qa_records(play: dict, limit: int) -> list[dict]:
    """Windows of 2, 3 or 4 consecutive speeches (the first line of each, at most 48 characters) with
    one question each, in turn; every answer is exact: a speaker's name as the passage shows it, a
    number, yes or no, a genre."""
    sp = play["speeches"]
    records = []
    stride = max(1, len(sp) // limit)
    for n, i in enumerate(range(0, len(sp) - 4, stride)):
        k = 2 + (n // len(QUESTIONS)) % 3  # every question on 2, 3 and 4 speeches
        window = [(who, body[0][:48]) for who, body in sp[i:i + k]]
        passage = "\n\n".join(f"{who}.\n{line}" for who, line in window)
        question = list(QUESTIONS)[n % len(QUESTIONS)]
        records.append({"instruction": question, "input": passage, "output": QUESTIONS[question](window, play)})
    return records[:limit]


@functools.lru_cache(maxsize=1)
def base_tokenizer(base: Path):
    from build_llm.data.tokenizer import load_tokenizer

    return load_tokenizer(base / "checkpoint" / "tokenizer.json")


ANSWER_TOKENS = 16  # generated per question; every answer (and its end token) is shorter


def fits(base: Path, record: dict) -> bool:
    """The prompt, the answer and its end token fit the context (a record cut by it would lose its answer)."""
    from build_llm.data.instruct import encode_conversation, entry_to_messages

    tok = base_tokenizer(base)
    ids, _ = encode_conversation(entry_to_messages(record)[:1], tok, tok.eos_id, add_generation_prompt=True)
    answer = len(tok.encode(record["output"])) + 1
    return answer <= ANSWER_TOKENS and len(ids) + ANSWER_TOKENS <= S["FT_CONTEXT"]


def exact_match(checkpoint: Path, records: list[dict]) -> dict[str, float]:
    """The share of exact answers, over all the records and by question."""
    from build_llm.infer.chat import load_chat_model
    from build_llm.infer.chat import respond
    from build_llm.data.instruct import entry_to_messages

    model, tok, _ = load_chat_model(str(checkpoint))
    hits = [respond(model, tok, entry_to_messages(r)[:1], ANSWER_TOKENS).strip() == r["output"] for r in records]
    shares = {"all": sum(hits) / len(hits)}
    for q in QUESTIONS:
        mine = [hit for hit, r in zip(hits, records) if r["instruction"] == q]
        shares[q] = sum(mine) / max(1, len(mine))
    return shares


def by_question(shares: dict[str, float]) -> str:
    return "; ".join(f"{shares[q]:.3f}" for q in QUESTIONS)


def instructions(base: Path, train_plays: list[dict], test_plays: list[dict]) -> dict:
    d = OUT / "instruct"
    d.mkdir(parents=True, exist_ok=True)
    train = [r for p in train_plays for r in qa_records(p, S["FT_QA_PER_PLAY"])]
    train = [r for r in train if fits(base, r)]
    test = [r for p in test_plays for r in qa_records(p, S["FT_QA_PER_PLAY"])]
    test = [r for r in test if fits(base, r)]
    test = test[::max(1, len(test) // S["FT_QA_TEST"])][:S["FT_QA_TEST"]]
    if not train or not test:
        raise SystemExit(f"no instruction record fits a context of {S['FT_CONTEXT']} tokens: raise FT_CONTEXT")
    (d / "train.json").write_text(json.dumps(train, indent=1))
    (d / "test.json").write_text(json.dumps(test, indent=1))
    print(f"\ninstructions: {len(train)} training records from {len(train_plays)} plays, {len(test)} test records "
          f"from {len(test_plays)} held-out plays; e.g.\n{json.dumps(test[0], indent=1)}")
    result = {"before": exact_match(base, test), "n_test": len(test)}
    # LoRA's rank-8 update learns more slowly than a full fine-tune, which overfits past 400 steps
    arms = {"full": (S["FT_QA_STEPS"], ["--lr", S["FT_QA_LR"]]),
            "lora": (S["FT_LORA_STEPS"], ["--lr", S["FT_LORA_LR"], "--lora-rank", 8, "--lora-alpha", 16,
                                          "--lora-targets", "attn"])}
    for name, (steps, flags) in arms.items():
        run = d / name
        if run.exists():
            remove_dir(run)  # the script's own output from an earlier run (fsio refuses anything else)
        proc, seconds = timed("finetune", "instruct", "--init-from", base, "--data", d / "train.json", "--val-data",
                              d / "test.json", "--out", run, "--steps", steps, "--batch-size", 16,
                              "--eval-every", max(1, steps // 4), "--grad-clip", 1.0, *flags)
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        curve = {r["step"]: round(r["val_loss"], 4) for r in metrics(run) if "val_loss" in r}
        result[name] = {"exact_match": exact_match(run, test), "seconds": seconds, "val_loss": curve,
                        "trainable": summary["trainable_parameters"], "parameters": summary["parameters"]}
        print(f"{name}: validation loss per answer token by step {curve}")
    print(f"\nexact match on {len(test)} questions about {len(test_plays)} unseen plays (all; by question):")
    print(f"  before fine-tuning             {result['before']['all']:.3f} ({by_question(result['before'])})")
    for name in arms:
        r = result[name]
        print(f"  {name:<4} fine-tune ({r['trainable']:>9,} of {r['parameters']:,} parameters trainable, "
              f"{100 * r['trainable'] / r['parameters']:.2f}%)  {r['exact_match']['all']:.3f} "
              f"({by_question(r['exact_match'])})   {r['seconds']:.0f} s")
    ratio = result["lora"]["exact_match"]["all"] / max(result["full"]["exact_match"]["all"], 1e-9)
    print(f"  LoRA / full                    {ratio:.3f}")
    return result


def main() -> None:
    if not TEXT.is_file():
        print(f"skipped: {TEXT} is absent (the Shakespeare text this example fine-tunes on)")
        return
    print("settings: " + ", ".join(f"{k}={v}" for k, v in S.items()))
    plays = parse_plays(TEXT.read_text(encoding="utf-8"))
    train_plays, test_plays = split_plays(plays)
    print(f"{len(plays)} plays; held out: {', '.join(p['title'].title() for p in test_plays)}")
    base = pretrain(train_plays)
    parts = os.environ.get("FT_PARTS", "classify,instruct").split(",")
    results = {}
    if "classify" in parts:
        results["classification"] = classification(base, train_plays, test_plays)
    if "instruct" in parts:
        results["instructions"] = instructions(base, train_plays, test_plays)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nresults in {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
