"""A labelled set for the quality filters (quality.py), built from the repository's data/ and eval/dev_questions.json:
good questions with answers that quote their oracle chunk, and faults of every kind the filters are for, planted in
copies of them. Used by tests/test_quality.py and bench/quality_filters.py.

Good, two kinds: the 70 dev questions a single sentence of data/ answers (users' wording: paraphrases,
abbreviations, typos), and the eval_llama.json questions whose answer stands in exactly one chunk (plain questions,
as a teacher writes them), each with an answer that quotes its chunk. Faults, planted in copies of good questions or
in the other eval and dev questions (carriers):
- duplicates: a good question again (same chunk or another), or reworded by hand: plain questions in the same
  style (PLAIN_PARAPHRASES), users' questions in another register (USER_PARAPHRASES, the hard case);
- answers: a quote from another chunk, no <ANSWER>: part, an empty one;
- questions: a statement, one to three words, more than sixty;
- round trip: a question asked of a random chunk, a sentence of the chunk turned into a question.
"""
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from documents import load_chunks
from raft_utils import QA
from text import normalise

ROOT = Path(__file__).resolve().parent.parent

# The same question in other words, as a teacher writes a question twice about one chunk: a plain question kept as
# good -> its rewording.
PLAIN_PARAPHRASES = {
    "When did Meta release Llama 2?": "In what month and year did Meta release Llama 2?",
    "How many layers does Llama 3.1 405B have?": "What is the number of layers in Llama 3.1 405B?",
    "Which activation function do Llama models use in their feed-forward layers?":
        "What activation function is used in the feed-forward layers of Llama models?",
    "What attribution phrase does the Llama 3 licence require to be displayed?":
        "Which attribution phrase must be displayed under the Llama 3 licence?",
    "How many hazard categories are in the Llama Guard 3 taxonomy?":
        "How many categories of hazard does the Llama Guard 3 taxonomy contain?",
    "What is Prompt Guard's context window?": "How long is the context window of Prompt Guard?",
    "Who introduced Low-Rank Adaptation (LoRA), and when?": "Who proposed Low-Rank Adaptation (LoRA) and in which year?",
    "What was Meta's llama-recipes repository later renamed to?":
        "What new name was given to Meta's llama-recipes repository?",
    "What port does the vLLM server listen on by default?": "By default, which port does the vLLM server listen on?",
    "Who created llama.cpp?": "Who is the creator of llama.cpp?",
    "On which address does the Ollama REST API listen?": "Which address does Ollama's REST API listen on?",
    "How many distractor documents per example do typical RAFT setups use?":
        "How many distractor documents does a typical RAFT example contain?",
}
# A user's question reworded in another register (the hard case): a dev question kept as good -> its rewording.
USER_PARAPHRASES = {
    "full FT of the 8b, total vram needed? does one 80GB card cut it?":
        "How much GPU memory does a full fine-tune of the 8B model need, and is a single 80 GB GPU enough?",
    "if i turn on gradient checkpointing to save vram, what's the downside?":
        "What is the cost of enabling gradient checkpointing to reduce memory use?",
    "typical LR for full FT?": "What learning rate is usually used when fine-tuning all of the weights?",
    "vllm TP flag to split 70b over 4 cards?": "Which vLLM option splits the 70B model across four GPUs?",
    "how do i turn HF safetensors into something llama.cpp can load?":
        "How can a Hugging Face safetensors model be converted for use in llama.cpp?",
    "did facebook/instagram user data go into llama 2's pretraining?":
        "Was data from Facebook or Instagram users part of Llama 2's pretraining data?",
    "do i owe meta any fees if my company sells a product built on it?":
        "Must a company pay Meta to sell a product that is built on Llama?",
    "what's the diff between a jailbreak and an injection attack?":
        "How does a jailbreak differ from a prompt injection attack?",
    "# of q heads and kv heads on llama3 70b?": "How many query heads and key-value heads does Llama 3 70B have?",
    "wat id does begin_of_text have in the llama3 tokenzier?":
        "What is the token id of <|begin_of_text|> in the Llama 3 tokenizer?",
    "which nvidia generation handles 8-bit floats in hardware?":
        "Which generation of NVIDIA GPUs supports 8-bit floating point in hardware?",
    "max contxt of the origianl llama 3 release?": "What was the maximum context length of the first Llama 3 release?",
}


@dataclass(frozen=True)
class Labelled:
    qa: QA
    kind: str             # a good record's kind ("good: ..."), or the fault planted
    fault: bool


def answer_quoting(sentence: str, answer: str) -> str:
    return f"The document says ##begin_quote## {sentence} ##end_quote## so the answer follows.\n<ANSWER>: {answer}"


def sentences_of(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 6]


def build(seed: int = 0, chunk_size: int = 1000) -> tuple[list, list[Labelled]]:
    """(the chunks of data/, the labelled QAs: the good ones first, in file order, then the faults, shuffled, as
    later questions of a run would come)."""
    _, chunks, _ = load_chunks(str(ROOT / "data"), "", True, chunk_size)
    rng = random.Random(seed)
    users, teachers, carriers = good_questions(chunks)
    good = [Labelled(qa, "good: a user's wording (dev set)", False) for qa in users] + \
        [Labelled(qa, "good: a plain question (eval_llama.json)", False) for qa in teachers]
    faults = planted(users, teachers, carriers, chunks, rng)
    rng.shuffle(faults)
    return chunks, good + faults


def good_questions(chunks) -> tuple[list[QA], list[QA], list[str]]:
    """(the dev questions a single sentence answers, the eval questions whose answer stands in exactly one chunk,
    the other eval and dev questions: carriers for planted faults)."""
    dev = json.loads((ROOT / "eval" / "dev_questions.json").read_text())
    users = []
    for item in (d for d in dev if len(d["support"]) == 1 and "##" not in d["support"][0]):
        support = item["support"][0]
        index = next(i for i, c in enumerate(chunks) if normalise(support) in normalise(c.text))
        users.append(QA(index, item["question"], answer_quoting(support, item["answer"]), True))
    teachers, carriers = [], [d["question"] for d in dev if len(d["support"]) != 1]
    for item in json.loads((ROOT / "eval_llama.json").read_text()):
        wanted = normalise(item["answer"]).rstrip(".")
        hits = [i for i, c in enumerate(chunks) if wanted in normalise(c.text)]
        if len(hits) != 1:
            carriers.append(item["question"])
            continue
        sentence = next((s for s in re.split(r"(?<=[.!?])\s+|\n", chunks[hits[0]].text) if wanted in normalise(s)),
                        None)
        if sentence is None or "##" in sentence:   # across two sentences, or holding the quote markers themselves
            carriers.append(item["question"])
            continue
        teachers.append(QA(hits[0], item["question"], answer_quoting(sentence, item["answer"]), True))
    return users, teachers, carriers


def other_chunk(index: int, chunks, rng) -> int:
    """A chunk of another file than the chunk `index`."""
    return rng.choice([i for i, c in enumerate(chunks) if c.source != chunks[index].source])


def planted(good: list[QA], plain: list[QA], carriers: list[str], chunks, rng: random.Random) -> list[Labelled]:
    """Faults of every kind: duplicates of good questions, and other questions (carriers, chunk sentences) with a
    fault each."""
    faults = []
    carriers = iter(rng.sample(carriers, len(carriers)))

    def add(qa, kind):
        faults.append(Labelled(qa, kind, True))

    def any_chunk() -> tuple[int, str]:
        index = rng.randrange(len(chunks))
        return index, rng.choice(sentences_of(chunks[index].text))
    picks = rng.sample(range(len(good)), 10)
    for i in picks[:5]:
        add(good[i], "exact duplicate, same chunk")
    for i in picks[5:]:
        add(QA(other_chunk(good[i].chunk_index, chunks, rng), good[i].question, good[i].cot_answer, True),
            "exact duplicate, another chunk")
    for originals, rewordings, kind in ((plain, PLAIN_PARAPHRASES, "paraphrased duplicate, same style"),
                                        (good, USER_PARAPHRASES, "paraphrased duplicate, another register")):
        for qa in originals:
            if qa.question in rewordings:
                add(QA(qa.chunk_index, rewordings[qa.question], qa.cot_answer, True), kind)
    for _ in range(6):
        index, _ = any_chunk()
        stranger = rng.choice(sentences_of(chunks[other_chunk(index, chunks, rng)].text))
        add(QA(index, next(carriers), answer_quoting(stranger, "something"), False), "quote from another chunk")
    for _ in range(5):
        index, sentence = any_chunk()
        add(QA(index, next(carriers), f"The document says ##begin_quote## {sentence} ##end_quote##.", True),
            "no <ANSWER>:")
    for _ in range(5):
        index, sentence = any_chunk()
        add(QA(index, next(carriers), answer_quoting(sentence, ""), True), "empty answer")
    for _ in range(6):
        index, sentence = any_chunk()
        add(QA(index, sentence.rstrip(".?!") + ".", answer_quoting(sentence, "yes"), True), "not a question")
    for short in ["Why?", "Context length?", "Which one?", "How so?", "License terms?"]:
        index, sentence = any_chunk()
        add(QA(index, short, answer_quoting(sentence, "yes"), True), "too short")
    for _ in range(5):
        index, sentence = any_chunk()
        padding = " ".join(["and also, thinking about it some more, in the broader context of everything above,"] * 5)
        add(QA(index, f"{next(carriers).rstrip('?')}, {padding} what would you say?", answer_quoting(sentence, "yes"),
               True), "too long")
    for _ in range(8):
        index, sentence = any_chunk()
        add(QA(index, next(carriers), answer_quoting(sentence, "something"), True), "asked of the wrong chunk")
    for _ in range(8):
        index, sentence = any_chunk()
        sentence = sentence.rstrip(".!?")
        add(QA(index, f"Is it true that {sentence[0].lower()}{sentence[1:]}?", answer_quoting(sentence, "yes"), True),
            "copied from the chunk")
    return faults
