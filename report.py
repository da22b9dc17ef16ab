"""The evaluation's readable outputs: report.md (the judge's calibration, tables with intervals, comparisons in
words, plots, disagreements) and the PNG plots it shows.

Input is what raft_eval.py writes to metrics.json and questions.jsonl, so a report can be rebuilt from them.
"""
from pathlib import Path

import matplotlib
matplotlib.use("Agg")                 # files only: no display on a server
import matplotlib.pyplot as plt       # noqa: E402

# (metrics.json key, plot title, file name); the report embeds them in this order.
PLOTS = (("judge_score", "LLM judge score (share of YES)", "judge_score.png"),
         ("refusal_rate", "Refusal rate", "refusals.png"),
         ("precision", "Precision = judge score / (1 - refusal rate)", "precision.png"),
         ("token_f1", "Token F1 against the gold answer", "token_f1.png"),
         ("groundedness", "Groundedness (claims the given chunks support)", "groundedness.png"),
         ("quote_support", "Quote support (quotes found in the given chunks)", "quote_support.png"))
MAX_DISAGREEMENTS = 20     # per condition, in the report; questions.jsonl has them all
SNIPPET = 160              # characters of an answer shown in the report
# The metrics shown with their 95% intervals, in the printed summary and the report: first those that compare an
# answer with its gold answer (no LLM), then those of the judge and of the sources.
AGAINST_GOLD = (("exact_match", "exact match"), ("token_f1", "token F1"), ("rougeL", "ROUGE-L"),
                ("similarity", "similarity"))
JUDGED = (("judge_score", "judge"), ("precision", "precision"), ("refusal_rate", "refusals"),
          ("groundedness", "groundedness"), ("quote_support", "quote support"))
TABLES = (AGAINST_GOLD, JUDGED)


def condition_label(condition: str) -> str:
    return "no RAG" if condition == "no_rag" else f"RAG top-{condition.removeprefix('rag_top')}"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def with_interval(value, interval) -> str:
    """0.650 [0.45, 0.82]"""
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def _rate(rate, interval, count: int, total: int) -> str:
    return "n/a" if rate is None else f"{count} of {total}, {rate:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def calibration_lines(calibration, judge_model: str) -> list[str]:
    """The judge's calibration in a few lines, its warnings first (markdown bold, plain once ** is removed)."""
    if not calibration:
        return ["judge calibration: off (judge_calibration: false in the config): nothing tells whether the "
                "judge's verdicts can be believed"]
    c = calibration
    lines = [f"**WARNING: {warning}.**" for warning in c["warnings"]]
    lines += [f"judge calibration ({judge_model}, {c['right_controls'] + c['wrong_controls']} control answers "
              "whose verdict is known):",
              f"- true-positive rate (YES to a question's own gold answer): "
              f"{_rate(c['true_positive_rate'], c['true_positive_interval'], c['accepted_right'], c['right_controls'])}",
              f"- true-negative rate (NO to another question's gold answer or to the refusal): "
              f"{_rate(c['true_negative_rate'], c['true_negative_interval'], c['rejected_wrong'], c['wrong_controls'])}",
              f"- unparseable verdicts: {_rate(c['unparseable_rate'], c['unparseable_interval'], c['unparseable'], c['right_controls'] + c['wrong_controls'])}",
              *_leniency_lines(c)]
    if c.get("hard_controls_pass"):
        lines.append(f"- every rate is at least {c['threshold']:.2f} and every leniency at most "
                     f"{1 - c['threshold']:.2f}, near misses included: the judge's scores can be read as accuracy")
    else:
        lines.append("- the hard controls (near misses, fabricated additions) did not pass or were not run: read the "
                     "judge's scores as its agreement with the gold answers, not as accuracy")
    return lines


def _leniency_lines(c: dict) -> list[str]:
    lines = []
    for key, what in (("near_miss_leniency", "YES to a near miss, the gold answer with one number, month or name "
                                             "changed"),
                      ("addition_leniency", "a fabricated sentence added to the gold answer not marked unsupported "
                                            "by the groundedness judge")):
        measured = c.get(key) or {}
        if measured.get("total"):
            low, high = measured["interval"]
            lines.append(f"- leniency ({what}): {measured['count']} of {measured['total']}, {measured['rate']:.2f} "
                         f"[{low:.2f}, {high:.2f}]")
    return lines


def comparison_sentence(c: dict) -> str:
    """raft-8b vs 70B at RAG top-7: +1.4 points [-6.9, +9.7], not significant at 5% ..."""
    low, high = c["interval"] if c["interval"] else (0.0, 0.0)
    verdict = "significant at 5%" if c["significant"] else "not significant at 5%"
    adjusted = (f", {c['mcnemar_p_holm']:.3g} after Holm's adjustment for {c['comparisons']} comparisons"
                if c.get("comparisons", 1) > 1 else "")
    sentence = (f"{c['system']} vs {c['baseline']} at {condition_label(c['condition'])}: "
                f"{100 * c['difference']:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}], {verdict} "
                f"(exact McNemar p = {c['mcnemar_p']:.3g}{adjusted}; right only for {c['system']}: "
                f"{c['only_first_right']}, only for {c['baseline']}: {c['only_second_right']}, of {c['questions']} "
                "questions)")
    if c["questions_needed"]:
        sentence += (f"; a difference of {100 * abs(c['difference']):.1f} points needs about "
                     f"{c['questions_needed']:,} questions to be found at 5% with 80% power")
    return sentence


def overlap_line(overlap: dict) -> str:
    found = overlap["found_in_training"]
    if not found:
        return f"training data ({', '.join(overlap['files'])}): none of the {overlap['eval_questions']} eval questions is in it"
    return (f"WARNING: {found} of {overlap['eval_questions']} eval questions are also in the training data "
            f"({', '.join(overlap['files'])}), e.g. {overlap['examples'][0]!r}: their scores measure memory, not "
            "generalisation (raft_eval.py --draft_from writes training data without them)")


def plot_metric(systems: dict, key: str, title: str, path: Path):
    """Grouped bars: one group per system, one bar per condition (no RAG, then each top-k)."""
    names = list(systems)
    conditions = list(next(iter(systems.values())))
    width = 0.8 / len(conditions)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(names) * len(conditions) ** 0.5), 3.6))
    for c, condition in enumerate(conditions):
        values = [systems[name][condition][key] for name in names]
        intervals = [systems[name][condition].get("intervals", {}).get(key) for name in names]
        # Error bars: the 95% bootstrap interval (none where there is no value).
        errors = [[(v - i[0]) if v is not None and i else 0.0 for v, i in zip(values, intervals)],
                  [(i[1] - v) if v is not None and i else 0.0 for v, i in zip(values, intervals)]]
        xs = [i + (c - (len(conditions) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(xs, [v or 0.0 for v in values], width, label=condition_label(condition),
                      yerr=errors, capsize=3, error_kw={"elinewidth": 0.8})
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(0, 1.3)                     # head room for the legend above bars that reach 1.0
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_title(f"{title}, 95% intervals", fontsize=10)
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


def _metrics_table(systems: dict, columns, counts: tuple) -> list[str]:
    """One row per system and condition: `columns` with their intervals, then the `counts` (key, title)."""
    lines = ["| system | condition | " + " | ".join(title for _, title in columns + counts) + " |",
             "|---|---|" + "---|" * (len(columns) + len(counts))]
    for name, conditions in systems.items():
        for condition, m in conditions.items():
            lines.append(f"| {name} | {condition_label(condition)} | "
                         + " | ".join(with_interval(m.get(key), m.get("intervals", {}).get(key)) for key, _ in columns)
                         + "".join(f" | {_fmt(m.get(key))}" for key, _ in counts) + " |")
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
             "## Can the judge be trusted?", "",
             *calibration_lines(metrics.get("judge_calibration"), settings["judge_model"]), "",
             "The judge also graded answers whose verdict is known: each question's own gold answer (it should say "
             "YES) and a wrong one (another question's gold answer, the refusal: it should say NO). A judge that "
             "says YES to wrong answers inflates every judge score below; `calibration.jsonl` has each control "
             "with the judge's reply.", ""]
    if metrics.get("training_overlap"):
        lines += [overlap_line(metrics["training_overlap"]), ""]
    lines += ["## Systems", "",
              "Brackets: 95% bootstrap interval over the questions "
              f"({settings.get('bootstrap_resamples', 'n/a')} resamples): with few questions they are wide, and "
              "two systems whose intervals overlap may not differ at all.", "",
              "**Against the gold answer, no LLM.** Each compares the text after `<ANSWER>:` (or the whole reply) "
              "with the gold answer: exact match after SQuAD's normalisation; token F1, SQuAD's overlap of the "
              "normalised words; ROUGE-L, the longest common word sequence; similarity, the cosine of the two in the "
              "retriever's embedding model (`embedding_model`).", "",
              *_metrics_table(systems, AGAINST_GOLD, (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"),
                                                      ("truncated", "cut at max_tokens"),
                                                      ("failed_requests", "failed requests"))), "",
              "**The judge and the sources.** judge = share of answers the judge called correct; precision = share "
              "of correct answers among those that did not decline and were judged (the tutorial's judge / (1 - "
              "refusals)); refusals = share of answers that declined; groundedness = share of an answer's claims "
              "that the chunks it was given support, by the judge (answers with retrieval; refusals and answers "
              "without claims left out, their count beside it); quote support = share of an answer's "
              "`##begin_quote##` spans found word for word in the chunks it was given (no LLM; answers without a "
              "quote left out, their count beside it).", "",
              *_metrics_table(systems, JUDGED, (("answers_with_claims", "answers with claims"),
                                                ("answers_with_quotes", "answers with quotes"),
                                                ("judge_unparseable", "unparseable verdicts"))), ""]
    if metrics.get("comparisons"):
        lines += ["## Is the difference real?", "",
                  "Each comparison is paired: the same questions, answered by both systems. The interval is the "
                  "paired bootstrap interval of the judge-score difference; the p-value is the exact McNemar test "
                  "on the questions exactly one of the two got right. With several comparisons the p-values are "
                  "Holm-adjusted (the chance of any false finding stays at 5%), and significance goes by the "
                  "adjusted value.", "",
                  *[f"- {comparison_sentence(c)}" for c in metrics["comparisons"]], ""]
    lines += [f"![{title}]({name})" for _, title, name in PLOTS] + [""]
    if len(systems) > 1:
        lines += _disagreement_section(log, conditions)
    lines += ["## Retrieval without an LLM: answer-support recall@k", "",
              "Share of questions whose retrieved top-k chunks contain most of the gold answer's content words.", "",
              *_retrieval_table(metrics["retrieval"]), ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
