"""The evaluation's readable outputs: report.md (tables, plots, disagreements) and the PNG plots it shows.

Input is what raft_eval.py writes to metrics.json and questions.jsonl, so a report can be rebuilt from them.
"""
from pathlib import Path

import matplotlib
matplotlib.use("Agg")                 # files only: no display on a server
import matplotlib.pyplot as plt       # noqa: E402

# (metrics.json key, plot title, file name); the report embeds them in this order.
PLOTS = (("judge_score", "LLM judge score (share of YES)", "judge_score.png"),
         ("refusal_rate", "Refusal rate", "refusals.png"),
         ("precision", "Precision = judge score / (1 - refusal rate)", "precision.png"))
MAX_DISAGREEMENTS = 20     # per condition, in the report; questions.jsonl has them all
SNIPPET = 160              # characters of an answer shown in the report


def condition_label(condition: str) -> str:
    return "no RAG" if condition == "no_rag" else f"RAG top-{condition.removeprefix('rag_top')}"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def plot_metric(systems: dict, key: str, title: str, path: Path):
    """Grouped bars: one group per system, one bar per condition (no RAG, then each top-k)."""
    names = list(systems)
    conditions = list(next(iter(systems.values())))
    width = 0.8 / len(conditions)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(names) * len(conditions) ** 0.5), 3.6))
    for c, condition in enumerate(conditions):
        values = [systems[name][condition][key] for name in names]
        xs = [i + (c - (len(conditions) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(xs, [v or 0.0 for v in values], width, label=condition_label(condition))
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(0, 1.3)                     # head room for the legend above bars that reach 1.0
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", ncols=min(4, len(conditions)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(systems: dict, folder: Path) -> list[Path]:
    paths = []
    for key, title, name in PLOTS:
        plot_metric(systems, key, title, folder / name)
        paths.append(folder / name)
    return paths


def _metrics_table(systems: dict) -> list[str]:
    lines = ["| system | condition | judge | precision | refusals | exact match | ROUGE-1 | ROUGE-2 | ROUGE-L "
             "| unparseable verdicts | failed requests |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, conditions in systems.items():
        for condition, m in conditions.items():
            lines.append(f"| {name} | {condition_label(condition)} | {_fmt(m['judge_score'])} | {_fmt(m['precision'])} "
                         f"| {_fmt(m['refusal_rate'])} | {_fmt(m['exact_match'])} | {_fmt(m['rouge1'])} "
                         f"| {_fmt(m['rouge2'])} | {_fmt(m['rougeL'])} | {m['judge_unparseable']} "
                         f"| {m['failed_requests']} |")
    return lines


def _retrieval_table(retrieval: dict) -> list[str]:
    ks = list(next(iter(retrieval.values())))
    lines = ["| retriever | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks)]
    lines += [f"| {kind} | " + " | ".join(_fmt(v) for v in recalls.values()) + " |"
              for kind, recalls in retrieval.items()]
    return lines


def _verdict(entry: dict) -> str:
    return "failed" if entry["failed"] else {True: "YES", False: "NO", None: "unparseable"}[entry["verdict"]]


def disagreements(log: list[dict], condition: str) -> list[dict]:
    """Questions on which the systems' judge verdicts differ under one condition."""
    return [row for row in log
            if len({_verdict(answers[condition]) for answers in row["systems"].values()}) > 1]


def _disagreement_section(log: list[dict], conditions: list[str]) -> list[str]:
    lines = ["## Questions on which the systems disagree", ""]
    for condition in conditions:
        rows = disagreements(log, condition)
        lines += [f"### {condition_label(condition)}: {len(rows)} question(s)", ""]
        for row in rows[:MAX_DISAGREEMENTS]:
            lines += [f"**Q:** {row['question']}  ", f"**gold:** {row['answer']}", ""]
            for name, answers in row["systems"].items():
                entry = answers[condition]
                text = " ".join(entry["answer"].split())
                text = text if len(text) <= SNIPPET else text[:SNIPPET] + "…"
                lines.append(f"- {name} ({_verdict(entry)}): {text}")
            lines.append("")
        if len(rows) > MAX_DISAGREEMENTS:
            lines += [f"... and {len(rows) - MAX_DISAGREEMENTS} more in questions.jsonl", ""]
    return lines


def write_report(folder: Path, metrics: dict, log: list[dict]) -> Path:
    systems, settings = metrics["systems"], metrics["settings"]
    conditions = list(next(iter(systems.values())))
    lines = ["# RAFT evaluation report", "",
             f"{settings['questions']} questions from `{settings['eval_file']}`; {settings['chunks']} chunks from "
             f"`{settings['sources']}` (chunk size {settings['chunk_size']}), {settings['retriever']} retrieval; "
             f"judge: {settings['judge_model']}.", "",
             "judge = share of answers the judge called correct; refusals = share of answers that declined; "
             "precision = judge / (1 - refusals), the accuracy of the answers a system dared to give. "
             "Exact match and ROUGE compare the text after `<ANSWER>:` (or the whole reply) with the gold answer.", "",
             "## Systems", "", *_metrics_table(systems), ""]
    lines += [f"![{title}]({name})" for _, title, name in PLOTS] + [""]
    if len(systems) > 1:
        lines += _disagreement_section(log, conditions)
    lines += ["## Retrieval without an LLM: answer-support recall@k", "",
              "Share of questions whose retrieved top-k chunks contain most of the gold answer's content words.", "",
              *_retrieval_table(metrics["retrieval"]), ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
