"""Does RAFT work? The RAFT paper's ablation in miniature, on the documents in data/ (or any folder).

  HF_HUB_OFFLINE=1 .venv/bin/python bench/raft_effect.py                       # 2 CPU cores (bench/raft_effect.yaml)
  HF_HUB_OFFLINE=1 .venv/bin/python bench/raft_effect.py -c bench/raft_effect_gpu.yaml

From the same questions (cut from the documents without an LLM: bench/cloze.py), the student (SmolLM2-135M-Instruct
by default) is fine-tuned three ways for the same steps on the same answers:
  raft      RAFT as the recipe builds it: the oracle among num_distract_docs distractors, in oracle_probability of
            the rows; the rest with distractors only; a chain-of-thought answer that quotes the oracle
  raft_d0   RAFT with no distractors (the paper's second ablation)
  dsf       the questions and answers with no documents (the paper's domain-specific fine-tuning)
Each, and the base model, answers the test questions (from held-out chunks) without retrieval and with the top 1, 3
and 5 chunks of the project's retriever (raft_eval.py against llama.cpp servers). Scored by exact match of the
answer span, token F1 and quote support first, the 135M judge last; paired comparisons on the same questions.

Stages: data, base, train x3, convert x3, test questions, evaluate, report. Each prints its progress; a finished
stage is reused when the script runs again with the same settings (an interrupted one resumes: training from its
last checkpoint, the evaluation from its reply cache). Prints numbers; asserts nothing. Writes
<output>/raft_effect.md (the table, the comparisons, what the answers got wrong) and raft_effect.png.
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))      # after the project: bench/finetune.py is not finetune/

from cloze import BLANK, blanks  # noqa: E402
from config import Key, load_config_with_flags, non_negative, positive, positive_ints, probability  # noqa: E402
from documents import load_chunks  # noqa: E402
import format as formats  # noqa: E402
from generation import free_port  # noqa: E402
from errors import InputError  # noqa: E402
from raft_utils import AssemblySettings, assemble, instruction  # noqa: E402

SCHEMA = {
    "documents": Key(str), "chunk_size": Key(int, positive), "held_out_share": Key(float, probability),
    "blanks_per_chunk": Key(int, positive), "train_questions": Key(int, non_negative),
    "test_questions": Key(int, non_negative), "num_distract_docs": Key(int, positive),
    "oracle_probability": Key(float, probability), "recipe": Key(str), "processes": Key(int, positive),
    "rows_per_step": Key(int, positive), "epochs": Key(int, positive), "lr": Key(float, positive),
    "rag_topk": Key(list, positive_ints),
    "answer_tokens": Key(int, positive), "seed": Key(int), "output": Key(str),
}
BASE_NAME = "base"
SPLIT_KEYS = ("documents", "chunk_size", "held_out_share", "blanks_per_chunk", "seed")     # chunks, split, questions
QUESTION_KEYS = (*SPLIT_KEYS, "train_questions", "num_distract_docs", "oracle_probability")
TRAINING_KEYS = ("recipe", "processes", "rows_per_step", "epochs", "lr", "seed")
SAVE_EVERY = 25          # optimizer steps between checkpoints: a stopped training loses at most these
TESTING_KEYS = ("rag_topk", "answer_tokens", "documents", "chunk_size", "seed")
BASE_OUTTYPE = "q8_0"    # every model is served at the same quantization as the trained ones (convert_checkpoint)
VARIANTS = ("raft", "raft_d0", "dsf")          # the model under test first, then the baselines
PY = sys.executable


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default=str(ROOT / "bench" / "raft_effect.yaml"))
    for name, key in SCHEMA.items():
        p.add_argument(f"--{name}", type=int if key.kind is list else key.kind, nargs="+" if key.kind is list else None)
    p.add_argument("--base_model", help="the student's starting point (default: the recipe's model_name)")
    return p.parse_args(argv)


class Stages:
    """Run each stage once: a stage is skipped when it finished before with the same settings and no earlier stage
    ran again in this run (its stamp, <output>/stages/<name>.done, holds the settings)."""

    def __init__(self, folder: Path, total: int):
        self.folder, self.total, self.number, self.upstream_ran = folder / "stages", total, 0, False
        self.folder.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, settings: dict, work) -> None:
        self.number += 1
        stamp, wanted = self.folder / f"{name}.done", json.dumps(settings, sort_keys=True)
        if not self.upstream_ran and stamp.exists() and stamp.read_text() == wanted:
            print(f"[raft_effect] {self.number}/{self.total} {name}: reused (finished before with these settings)")
            return
        print(f"[raft_effect] {self.number}/{self.total} {name} ...", flush=True)
        started = time.monotonic()
        stamp.unlink(missing_ok=True)
        work()
        stamp.write_text(wanted)
        self.upstream_ran = True
        print(f"[raft_effect]   done in {time.monotonic() - started:.0f} s", flush=True)


# ---- data --------------------------------------------------------------------------------------------------------
def split_chunks(count: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """(training chunks, held-out chunks): a seeded share of the chunks held out whole."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    held = max(1, round(count * share))
    return sorted(order[held:]), sorted(order[:held])


def capped(items: list, limit: int, seed: int) -> list:
    return items if not limit or len(items) <= limit else random.Random(seed).sample(items, limit)


@dataclass
class Split:
    """The documents' chunks, split into training and held-out chunks, and the questions cut from each part."""
    chunks: list
    train_ids: list[int]
    held_ids: list[int]
    train: list          # training questions (bench/cloze.Cloze), capped at train_questions
    test: list           # test questions, capped at test_questions


def split_questions(cfg: dict) -> Split:
    """The same split and questions every time for the same settings (seeded): the data and the test stages each
    make it, so a new number of test questions does not retrain the models."""
    _, chunks, _ = load_chunks(cfg["documents"], "", True, cfg["chunk_size"])
    texts = [c.text for c in chunks]
    train_ids, held_ids = split_chunks(len(chunks), cfg["held_out_share"], cfg["seed"])
    train = capped(blanks(texts, train_ids, cfg["blanks_per_chunk"], cfg["seed"]), cfg["train_questions"], cfg["seed"])
    # Chunks overlap a little: a held-out sentence also found whole in a training chunk is no test question.
    unseen = [c for c in blanks(texts, held_ids, cfg["blanks_per_chunk"], cfg["seed"])
              if not any(c.sentence in texts[i] for i in train_ids)]
    test = capped(unseen, cfg["test_questions"], cfg["seed"])
    if len(train_ids) < cfg["num_distract_docs"] + 2 or not train or not test:
        raise InputError(f"{cfg['documents']}: {len(chunks)} chunks give {len(train)} training and {len(test)} test "
                         "questions: give more documents or a smaller chunk_size")
    return Split(chunks, train_ids, held_ids, train, test)


def build_training(cfg: dict, folder: Path) -> None:
    """raft.jsonl, raft_d0.jsonl and dsf.jsonl: the same training questions three ways."""
    split = split_questions(cfg)
    # Distractors come from the training chunks only: no held-out chunk is ever read in training.
    train_chunks = [split.chunks[i] for i in split.train_ids]
    position = {chunk: n for n, chunk in enumerate(split.train_ids)}
    qas = [cloze.qa(position[cloze.chunk_index]) for cloze in split.train]
    folder.mkdir(parents=True, exist_ok=True)
    for name, distractors in (("raft", cfg["num_distract_docs"]), ("raft_d0", 0)):
        settings = AssemblySettings(distractors, cfg["oracle_probability"], 0.0, "")
        formats.write(assemble(qas, train_chunks, settings, cfg["seed"]), str(folder / f"{name}.jsonl"))
    formats.write([{"question": qa.question, "instruction": instruction([], qa.question),
                   "cot_answer": qa.cot_answer} for qa in qas], str(folder / "dsf.jsonl"))
    print(f"[raft_effect]   {len(split.chunks)} chunks ({len(split.train_ids)} for training, {len(split.held_ids)} "
          f"held out): {len(split.train)} training questions")


def build_test(cfg: dict, folder: Path) -> None:
    """test.json (question, gold answer, the sentence it was cut from) and data_card.md."""
    split = split_questions(cfg)
    (folder / "test.json").write_text(json.dumps([{"question": c.question, "answer": c.term, "sentence": c.sentence}
                                                       for c in split.test], indent=1))
    (folder / "data_card.md").write_text(data_card(cfg, split))
    print(f"[raft_effect]   {len(split.test)} test questions from {len({c.chunk_index for c in split.test})} "
          "held-out chunks")


def data_card(cfg, split: Split) -> str:
    train, test, example = split.train, split.test, split.train[0]
    return "\n".join([
        "# The experiment's data", "",
        f"Documents: `{cfg['documents']}`, {len(split.chunks)} chunks of {cfg['chunk_size']} characters; "
        f"{len(split.held_ids)} held out whole (seed {cfg['seed']}), {len(split.train_ids)} for training.", "",
        "Questions are cut from the documents without an LLM (bench/cloze.py): a whole sentence of a chunk with its "
        "rarest term blanked out. The gold answer is the term; the training answer quotes the sentence, so it quotes "
        "its oracle chunk exactly.", "",
        "| set | questions | from chunks |", "|---|---|---|",
        f"| training | {len(train)} | {len({c.chunk_index for c in train})} |",
        f"| test | {len(test)} | {len({c.chunk_index for c in test})} |", "",
        f"Training rows, the same questions and answers three ways: `raft` (the oracle among "
        f"{cfg['num_distract_docs']} distractors in {cfg['oracle_probability']:.0%} of the rows, distractors only in "
        "the rest), `raft_d0` (the oracle alone, or one distractor, in the same shares), `dsf` (no documents).", "",
        "An example:", "", f"- question: {example.question}", f"- answer: {example.cot_answer}", ""])


# ---- train and convert -------------------------------------------------------------------------------------------
def checksum(path: Path) -> str:
    import hashlib
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def kept_for(folder: Path, identity: dict) -> None:
    """Keep what an interrupted stage left in `folder` (a checkpoint, a reply cache) only if it was made from the
    same inputs (`identity`, recorded there as experiment.json); clear it otherwise."""
    import shutil
    record = folder / "experiment.json"
    if folder.exists() and (not record.exists() or json.loads(record.read_text()) != identity):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(identity, indent=1, sort_keys=True))


def run_logged(cmd: list[str], log: Path) -> None:
    """Run a stage's command with its output in `log`; a failure names the log and shows its end. The command runs
    in a process group of its own, stopped whole if this script stops (torchrun's workers with it)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait()
        except BaseException:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            raise
    if returncode:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"[raft_effect] {log.stem} failed (exit {returncode}); the end of {log}:\n" + "\n".join(tail))


def unpack_base(gguf: str, models: Path) -> None:
    """The base GGUF as a Hugging Face folder (dequantized), read once here instead of by each of the three
    trainings (reading a GGUF's tokenizer and tensors costs seconds to minutes); and that folder back as a GGUF of
    the trained models' type, so the base model is served as they are (the shipped Q4_1 file is also about 1.5
    times slower to read a prompt with on an AVX2 CPU)."""
    import shutil
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from finetune.checkpoint_converter import to_gguf
    folder = models / "base-hf"
    shutil.rmtree(folder, ignore_errors=True)        # nothing of an earlier base stays behind
    source = {"pretrained_model_name_or_path": str(Path(gguf).parent), "gguf_file": Path(gguf).name}
    AutoTokenizer.from_pretrained(**source).save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(**source, quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(folder)
    to_gguf(folder, str(models / f"{BASE_NAME}.gguf"), BASE_OUTTYPE)


def accumulation_steps(cfg: dict) -> int:
    """Batches whose gradients make one optimizer step, so that a step takes rows_per_step rows however many
    processes share it (the same steps and the same mean gradient on 1 process as on 2)."""
    from config import FINETUNE_SCHEMA, load_recipe
    per_batch = cfg["processes"] * load_recipe(cfg["recipe"], FINETUNE_SCHEMA, {})["batch_size_training"]
    if cfg["rows_per_step"] % per_batch:
        raise InputError(f"rows_per_step {cfg['rows_per_step']} is not a multiple of processes x the recipe's "
                         f"batch_size_training ({per_batch}): change one of them")
    return cfg["rows_per_step"] // per_batch


def training_settings(cfg: dict, base: str) -> dict:
    """What a training depends on besides its rows: the training keys, the base model, the recipe's content."""
    return {**{k: cfg[k] for k in TRAINING_KEYS}, "base": base, "recipe content": checksum(Path(cfg["recipe"]))}


def train(cfg: dict, variant: str, out: Path, base: str) -> None:
    """torchrun finetune/finetuning.py with the recipe, on this variant's rows; --resume continues a stopped run.
    FSDP only with more than one process: on one it would shard nothing and only cost time."""
    rows = out / "data" / f"{variant}.jsonl"
    identity = {**training_settings(cfg, base), "rows": checksum(rows)}
    kept_for(out / "checkpoints" / variant, identity)
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg["processes"]),
           str(ROOT / "finetune" / "finetuning.py"), "--config", cfg["recipe"],
           "--data_path", str(rows), "--num_epochs", str(cfg["epochs"]),
           "--max_steps", "0", "--lr", str(cfg["lr"]), "--seed", str(cfg["seed"]), "--resume", "true",
           "--gradient_accumulation_steps", str(accumulation_steps(cfg)),
           "--enable_fsdp", str(cfg["processes"] > 1).lower(),
           "--save_every", str(SAVE_EVERY),
           "--dist_checkpoint_root_folder", str(out / "checkpoints"), "--dist_checkpoint_folder", variant,
           "--model_name", str(out / "models" / "base-hf")]
    run_logged(cmd, out / "logs" / f"train_{variant}.log")
    epochs = json.loads((out / "checkpoints" / variant / "metrics.json").read_text())["epochs"]
    print(f"[raft_effect]   {variant}: " + "; ".join(
        f"epoch {e['epoch']} training loss {e['train_loss']:.3f}"
        + (f", validation {e['val_loss']:.3f}" if e.get("val_loss") is not None else "") for e in epochs))


def convert(variant: str, out: Path) -> None:
    run_logged([PY, str(ROOT / "finetune" / "checkpoint_converter.py"),
                "--fsdp_checkpoint_path", str(out / "checkpoints" / variant),
                "--consolidated_model_path", str(out / "models" / f"{variant}-hf"),
                "--gguf", str(out / "models" / f"{variant}.gguf"), "--gguf_outtype", "q8_0"],
               out / "logs" / f"convert_{variant}.log")


# ---- evaluate ----------------------------------------------------------------------------------------------------
class Servers:
    """A llama.cpp server per model (scripts/teacher.sh), stopped however the block ends."""

    def __init__(self, models: dict[str, str]):
        self.models, self.urls, self.ports = models, {}, []

    def __enter__(self):
        try:
            return self._start()
        except BaseException:
            self.__exit__()
            raise

    def _start(self) -> dict[str, str]:
        for name, gguf in self.models.items():
            port = free_port()
            env = {**os.environ, "TEACHER_PORT": str(port), "TEACHER_MODEL": gguf, "TEACHER_ALIAS": name}
            self.ports.append(port)
            done = subprocess.run([str(ROOT / "scripts" / "teacher.sh"), "start"], cwd=ROOT, env=env,
                                  capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"[raft_effect] llama.cpp did not start for {name} ({gguf}):\n{done.stderr[-1500:]}")
            self.urls[name] = f"http://127.0.0.1:{port}/v1"
        return self.urls

    def __exit__(self, *exc):
        for port in self.ports:
            subprocess.run([str(ROOT / "scripts" / "teacher.sh"), "stop"], cwd=ROOT, capture_output=True,
                           env={**os.environ, "TEACHER_PORT": str(port)})


def eval_config(out: Path) -> Path:
    """raft_eval_config.yaml as shipped, but no groundedness pass (a judge call per answer that a 135M judge cannot
    make count) and the index cache in the experiment's folder."""
    import yaml
    cfg = yaml.safe_load((ROOT / "raft_eval_config.yaml").read_text())
    cfg.update(groundedness=False, index_cache=str(out / "index_cache"), raft_run="")
    path = out / "eval_config.yaml"
    path.write_text("# written by bench/raft_effect.py from raft_eval_config.yaml\n" + yaml.safe_dump(cfg))
    return path


def evaluate(cfg: dict, out: Path, models: dict[str, str]) -> None:
    """raft_eval.py: raft under test, the others as baselines, the base model as judge. Its reply cache resumes an
    interrupted run, and is cleared when a model changed (a retrained model is served from the same path)."""
    checksums = {name: checksum(Path(path)) for name, path in models.items()}
    kept_for(out / "eval", checksums)
    with Servers(models) as urls:
        cmd = [PY, str(ROOT / "raft_eval.py"), "-c", str(eval_config(out)), "-m", VARIANTS[0],
               "-u", urls[VARIANTS[0]], "-j", urls[BASE_NAME], "--judge_model", BASE_NAME,
               "-r", *map(str, cfg["rag_topk"]),
               "--eval_file", str(out / "data" / "test.json"), "--data_dir", cfg["documents"], "--xml_path", "",
               "--chunk_size", str(cfg["chunk_size"]), "--max_tokens", str(cfg["answer_tokens"]),
               "--seed", str(cfg["seed"]), "--model_revision", checksums[VARIANTS[0]], "-o", str(out / "eval")]
        for name in (*VARIANTS[1:], BASE_NAME):
            cmd += ["--baseline", f"{name}={urls[name]}"]
        run_logged(cmd, out / "logs" / "evaluate.log")


# ---- report ------------------------------------------------------------------------------------------------------
MEASURES = (("exact_match", "exact match"), ("token_f1", "token F1"), ("quote_support", "quote support"),
            ("judge_score", "judge (135M)"))
PAIRS = (("raft", "dsf"), ("raft", BASE_NAME), ("dsf", BASE_NAME))    # at every condition
ABLATION = ("raft", "raft_d0")                                         # at every top-k
OUTCOMES = ("right", "declined", "quoted its sentence, answered wrong", "quoted another passage", "quoted nothing")


def outcome(row: dict, sentence: str) -> str:
    """What became of one answer: right, declined, or wrong after quoting the sentence that holds the answer,
    another passage, or nothing."""
    from text import normalise, quote_spans
    if row["exact_match"]:
        return OUTCOMES[0]
    if row["refusal"]:
        return OUTCOMES[1]
    # A quote counts as the sentence when it holds 4 words or more of it (the question's copy, blank and all,
    # included: the words around the blank are the sentence's).
    spans = [[normalise(part) for part in s.split(BLANK)] for s in quote_spans(row["reply"] or "") or [] if s.strip()]
    if not spans:
        return OUTCOMES[4]
    target = normalise(sentence)
    near = any(sum(len(part.split()) for part in parts) >= 4 and all(part in target for part in parts)
               for parts in spans)
    return OUTCOMES[2] if near else OUTCOMES[3]


def f1_difference(first: list[dict], second: list[dict], resamples) -> dict:
    """Mean token-F1 difference (first - second) over the same questions, with its paired-bootstrap 95% interval."""
    import numpy as np
    diff = np.array([(a["token_f1"] or 0.0) - (b["token_f1"] or 0.0) for a, b in zip(first, second)])
    low, high = np.percentile(diff[resamples].mean(axis=1), [2.5, 97.5])
    return {"difference": float(diff.mean()), "interval": [float(low), float(high)]}


def comparisons(log: list[dict], conditions: list[str], resamples) -> list[dict]:
    """Every planned comparison: exact match (paired bootstrap, exact McNemar, Holm-adjusted over all of them)
    and token F1 (paired bootstrap)."""
    import metrics
    planned = [(a, b, c) for c in conditions for a, b in PAIRS] + [(*ABLATION, c) for c in conditions if c != "no_rag"]
    found = []
    for first, second, condition in planned:
        rows_a = [q["systems"][first][condition] for q in log]
        rows_b = [q["systems"][second][condition] for q in log]
        found.append({"first": first, "second": second, "condition": condition,
                      "exact_match": metrics.paired_comparison(rows_a, rows_b, resamples, metric="exact_match"),
                      "token_f1": f1_difference(rows_a, rows_b, resamples)})
    for c, adjusted in zip(found, metrics.holm([c["exact_match"]["mcnemar_p"] for c in found])):
        c["exact_match"]["holm_p"] = adjusted
    return found


def comparison_line(c: dict) -> str:
    from report import condition_label
    em, f1 = c["exact_match"], c["token_f1"]
    return (f"{c['first']} vs {c['second']}, {condition_label(c['condition'])}: exact match "
            f"{100 * em['difference']:+.1f} points [{100 * em['interval'][0]:+.1f}, {100 * em['interval'][1]:+.1f}], "
            f"Holm p = {em['holm_p']:.3g} ({'significant' if em['holm_p'] < 0.05 else 'not significant'} at 5%; "
            f"{em['only_first_right']} right only for {c['first']}, {em['only_second_right']} only for "
            f"{c['second']}; a difference this size needs about {em['questions_needed'] or 'n/a'} questions); "
            f"token F1 {f1['difference']:+.3f} [{f1['interval'][0]:+.3f}, {f1['interval'][1]:+.3f}]")


def result_table(systems: dict) -> list[str]:
    from report import condition_label, with_interval
    lines = ["| model | condition | " + " | ".join(label for _, label in MEASURES) + " |",
             "|---|---|" + "---|" * len(MEASURES)]
    for name, conditions in systems.items():
        for condition, m in conditions.items():
            cells = [with_interval(m[key], m.get("intervals", {}).get(key)) for key, _ in MEASURES]
            lines.append(f"| {name} | {condition_label(condition)} | " + " | ".join(cells) + " |")
    return lines


def outcome_table(log: list[dict], sentences: list[str], systems: dict) -> list[str]:
    from report import condition_label
    lines = ["| model | condition | " + " | ".join(OUTCOMES) + " |", "|---|---|" + "---|" * len(OUTCOMES)]
    for name, conditions in systems.items():
        for condition in conditions:
            counts = [outcome(q["systems"][name][condition], s) for q, s in zip(log, sentences)]
            lines.append(f"| {name} | {condition_label(condition)} | "
                         + " | ".join(str(counts.count(o)) for o in OUTCOMES) + " |")
    return lines


def write_result(cfg: dict, out: Path) -> None:
    """raft_effect.md, raft_effect.json and raft_effect.png from the evaluation's metrics and per-question log."""
    import metrics
    from report import calibration_lines, plot_metric
    evaluated = json.loads((out / "eval" / "metrics.json").read_text())
    log = [json.loads(line) for line in open(out / "eval" / "questions.jsonl", encoding="utf-8")]
    sentences = [item["sentence"] for item in json.loads((out / "data" / "test.json").read_text())]
    systems = evaluated["systems"]
    conditions = list(next(iter(systems.values())))
    found = comparisons(log, conditions, metrics.resample_indices(len(log), 2000, cfg["seed"]))
    plot_metric(systems, "exact_match", "Exact match of the answer span", out / "raft_effect.png")
    lines = ["# Does RAFT work? The experiment's result", "",
             f"{len(log)} test questions from held-out chunks ({out / 'data' / 'data_card.md'}); every model answered "
             "each without retrieval and with the top-k chunks of the hybrid retriever. Brackets: 95% bootstrap "
             "intervals.", "", *result_table(systems), "",
             "## Comparisons (paired, on the same questions)", "", *[f"- {comparison_line(c)}" for c in found], "",
             "## What became of the answers", "", *outcome_table(log, sentences, systems), "",
             "![exact match](raft_effect.png)", "",
             "## The judge, last", "", *calibration_lines(evaluated.get("judge_calibration"), BASE_NAME), ""]
    (out / "raft_effect.md").write_text("\n".join(lines), encoding="utf-8")
    (out / "raft_effect.json").write_text(json.dumps({"settings": cfg, "systems": systems, "comparisons": found},
                                                     indent=1))
    print("\n".join(result_table(systems)))
    print("\n".join(f"- {comparison_line(c)}" for c in found))
    print(f"[raft_effect] wrote {out / 'raft_effect.md'}, {out / 'raft_effect.json'}, {out / 'raft_effect.png'}")


# ---- the stages --------------------------------------------------------------------------------------------------
def base_gguf(cfg: dict, base_model: str | None) -> str:
    """The student's GGUF: --base_model (from here), or the recipe's model_name (from the repository, where the
    trainer runs)."""
    from config import FINETUNE_SCHEMA, load_recipe
    model = str(Path(base_model).resolve()) if base_model else \
        str(ROOT / load_recipe(cfg["recipe"], FINETUNE_SCHEMA, {})["model_name"])
    if not model.endswith(".gguf"):
        raise InputError(f"the base model {model!r} is not a .gguf file: llama.cpp serves the models here, so give "
                         "a GGUF (--base_model, or the recipe's model_name)")
    return model


def main(argv=None) -> int:
    # A stop (kill, Ctrl-C) unwinds like an error, so the servers this script started are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("[raft_effect] stopped: run it again to go on where it stopped"))
    args = parse_args(argv)
    try:
        cfg = load_config_with_flags(args.config, SCHEMA, args)
        # The stages run in the repository: the paths a user gives are read from where the script was started.
        cfg.update({key: str(Path(cfg[key]).resolve()) for key in ("documents", "output", "recipe")})
        base = base_gguf(cfg, args.base_model)
        accumulation_steps(cfg)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(cfg["output"])
    stages = Stages(out, 5 + 2 * len(VARIANTS))
    stages.run("data", {k: cfg[k] for k in QUESTION_KEYS}, lambda: build_training(cfg, out / "data"))
    stages.run("base", {"base": base, "served as": BASE_OUTTYPE}, lambda: unpack_base(base, out / "models"))
    for variant in VARIANTS:
        stages.run(f"train {variant}", training_settings(cfg, base), lambda v=variant: train(cfg, v, out, base))
    for variant in VARIANTS:
        stages.run(f"convert {variant}", {}, lambda v=variant: convert(v, out))
    stages.run("test questions", {k: cfg[k] for k in (*SPLIT_KEYS, "test_questions")},
               lambda: build_test(cfg, out / "data"))
    models = {name: str(out / "models" / f"{name}.gguf") for name in (*VARIANTS, BASE_NAME)}
    testing = {k: cfg[k] for k in TESTING_KEYS}
    stages.run("evaluate", testing, lambda: evaluate(cfg, out, models))
    stages.run("report", {}, lambda: write_result(cfg, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
