"""Text helpers every stage shares: the normal form used to compare questions and quotes, the stop words of
keyword search, and the two markers of a RAFT answer (##begin_quote## spans and the final <ANSWER>: line).

No project imports and no third-party ones: the cheapest module to import."""
import re
from typing import Optional


def normalise(text: str) -> str:
    """Lower case, single spaces: the form used to compare questions and quotes."""
    return " ".join(text.lower().split())


# Words that carry no content: left out of keyword search (BM25) and of the answer-support check.
STOPWORDS = frozenset("""a an and are as at be been but by can could did do does for from had has have how i if in
into is it its may might more most no not of on or our so such than that the their them then there these they this
those to was we were what when where which who whom whose why will with would yes you your""".split())


def content_words(text: str) -> list[str]:
    """Lower-case words and numbers (version numbers such as 3.1 kept whole) that are not stopwords."""
    return [w for w in re.findall(r"[a-z0-9]+(?:[.'][a-z0-9]+)*", text.lower()) if w not in STOPWORDS]


ANSWER_MARK = re.compile(r"<ANSWER>\s*:")


def final_answer(cot_answer: str) -> Optional[str]:
    """The text after '<ANSWER>:', or None when the marker or the text after it is missing."""
    match = ANSWER_MARK.search(cot_answer or "")
    answer = cot_answer[match.end():].strip() if match else ""
    return answer or None


QUOTE_OPEN, QUOTE_CLOSE = "##begin_quote##", "##end_quote##"
_QUOTE_SPAN = re.compile(re.escape(QUOTE_OPEN) + "(.*?)" + re.escape(QUOTE_CLOSE), re.S)


def quote_spans(cot_answer: str) -> Optional[list[str]]:
    """The quoted spans of an answer; None when a ##begin_quote## is left unclosed (the quotes cannot be read)."""
    spans = _QUOTE_SPAN.findall(cot_answer or "")
    return spans if (cot_answer or "").count(QUOTE_OPEN) == len(spans) else None
