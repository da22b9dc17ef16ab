"""Does an answer decline? The refusal detector of the evaluation (refusal rate, precision) and of the chatbot (its
hand-off to a person).

A refusal is raft.yaml's refusal answer, which the student is trained to say, or an answer whose first sentence says
that the speaker cannot answer or that the sources do not say. No project imports: the chat's faces and the
evaluation both use it.
"""
import re

# A refusal is an answer whose first sentence declines: the speaker cannot answer, or the sources do not say it.
# Only the first sentence counts (after a lead-in such as "Sorry," or "According to the documents," or "Regarding
# X,", and after sentences that only apologise or restate the question), so that "Llama Guard stores no information
# about the user" or "The licence does not contain a patent grant" (statements about the subject) are answers; and a
# decline followed by "but", "however", ";" or a dash and an answer of three words or more is an answer. Measured on
# three labelled sets in tests/fixtures (tests/test_metrics.py), two of them written apart from these rules.
_DOC_NOUN = (r"(?:documents?|docs|documentation|context(?! (?:window|length|size))|passages?|texts?|sources?|"
             r"materials?|excerpts?|sections?|pages?|articles?|handbook|manuals?|guides?|knowledge base|"
             r"references?|api reference|faqs?|wiki|records|notes|files|corpus|search results|information|info|"
             r"templates?|library)")
_QUALIFIER = (r"(?: (?:that )?(?:i|we) (?:have|was given|were given|retrieved|can see|have access to)| available to "
              r"(?:me|us)| provided| given| above| retrieved)")
# What the bot answers from: a document noun, anything "provided" or that "I have", or the bot's own ("our FAQ").
_SOURCE = (rf"(?:(?:(?:the|these|this|those|any|its|all of the|all the) )?(?:[\w-]+ ){{0,2}}?{_DOC_NOUN}"
           rf"{_QUALIFIER}?|(?:the|these|this|those) (?:[\w-]+ ){{0,2}}?[\w-]+{_QUALIFIER}|(?:my|our) (?:[\w-]+ )"
           r"{0,2}?[\w-]+|what (?:i|we) (?:was|were|have been) given|what (?:i|we) have)")
_TELL = (r"(?:say|mention|contain|cover|discuss|address|state|include|answer|talk about|describe|specify|provide|"
         r"give|tell|list|explain|go into|document|have|show)")
_SAID = (r"(?:present|found|available|stated|mentioned|covered|given|provided|included|specified|described|"
         r"addressed|discussed|known|documented|listed|explained)")
_CANT = (r"(?:do not|don't|dont|did not|didn't|cannot|can't|cant|can not|could not|couldn't|couldnt|unable to|"
         r"not able to|was not able to|wasn't able to|wasnt able to|was unable to|won't be able to|failed to|"
         r"have no|lack|not in a position to)")
_ASK_VERB = (r"(?:know|answer|help|find|determine|tell|say|provide|confirm|locate|access|have|give|guess|walk you|"
             r"advise|look up|see|check|view)")
_NOT_A_CONDITION = r"(?!(?:if|when|whenever|unless|once|because|since|although|while|after|before)\b)"
_DECLINES = re.compile("|".join([
    # the speaker cannot answer
    rf"^(?:(?:i|we)(?:'m|'re| am| are)?(?: really| simply| honestly| currently)? )?{_CANT} {_ASK_VERB}\b"
    r"(?! it better| more| for sure:| of any)",
    r"^(?:i|we) have no (?:idea|information|knowledge|answer|data|clue|details|record)\b",
    r"^i(?:'m| am) not (?:\w+ )?(?:sure|certain)\b",
    r"\b(?:i|we) (?:can |am able to |are able to )?only (?:answer|help|respond|assist|handle|cover|deal with)\b",
    r"\b(?:is|are|that's|it's) (?:outside|beyond) (?:that|this|my|our|the scope|what)\b",
    r"^(?:i|we)(?:'ve| have)? (?:looked|searched|checked|gone|went|been|read|reviewed|scanned)\b[^.]*\b(?:but|and)\b"
    r"[^.]*?(?:couldn't|could not|can't|cannot|didn't|did not|wasn't able to|was unable to|found no|found nothing|"
    r"none of (?:it|them)|there(?:'s| is) (?:nothing|no)\b)",
    rf"\bso (?:i|we)(?:'m| am| are)? {_CANT} (?:answer|say|tell|help|give|determine|provide|walk you)\b",
    # the sources do not say it
    rf"(?:^|: ){_NOT_A_CONDITION}(?:[\w']+\W+){{0,3}}?{_SOURCE}\b[^.]*?\b(?:(?:do|does|did)(?: not|n't) {_TELL}|"
    rf"{_TELL}s? nothing|has no (?:entry|information|mention|section)|has nothing|(?:is|are) silent|"
    rf"(?:is|are|was|were)(?: not|n't) {_SAID})\b",
    rf"(?:\bnot|n't) (?:something |anything )?(?:{_SAID}|in)(?: anywhere)? (?:in|by) {_SOURCE}",
    rf"^(?:the answer|it|this|that|the information|this information|that information) (?:is|was)(?: not|n't) "
    rf"(?:in {_SOURCE}|{_SAID}(?: *$| (?:in|by) {_SOURCE}))",
    rf"\b(?:nothing|no part) (?:in|of) {_SOURCE}",
    rf"(?:\bnot|n't) (?:something|anything) (?:that )?{_SOURCE} {_TELL}s?\b",
    rf"^not (?:\w+ )?(?:in|from|covered by) {_SOURCE}",
    rf"^none of (?:{_SOURCE}|it|them|these|those)\b[^.]*?\b{_TELL}s?\b",
    rf"\b(?:falls?|lies|is|are) (?:outside|beyond)\b[^.]*\b{_SOURCE}",
    rf"^(?:that's|that is|this is|it's|it is) (?:beyond|outside)\b[^.]*\b{_SOURCE}",
    # there is nothing to answer with
    r"^(?:there(?: is|'s| are| was| were) )?(?:no|not enough|insufficient) (?:relevant |matching |specific |such |"
    r"available |further |additional )?(?:(?:information|answer|details?|data|context|documentation|documents?|"
    r"passages?|results?|entr(?:y|ies)|match(?:es)?|guidance|records?|policy|policies|info|content)\b(?: *$| (?:is |was |were |"
    rf"are )?(?:{_SAID}|retrieved|matches|matched|exists?|to answer)\b| (?:about|on|regarding|for|of) [^.]*\b"
    rf"(?:in|from) {_SOURCE}| (?:in|from) {_SOURCE}| (?:about|on|regarding) (?:this|that|it|the question)\b| to "
    r"(?:this|that|the|your) question)|mention\b)",
    r"^there(?: is|'s) nothing (?:in|about|on|regarding)\b",
    r"^no (?:relevant|matching) [\w-]+(?: [\w-]+)?(?: (?:was|were))? (?:found|retrieved|available)\b|"
    r"^no (?:relevant|matching) [\w-]+ *$",
    r"^no (?:answer|information|documentation|results?) (?:can|could) be found\b",
    r"^(?:answer )?not (?:found|known|stated|specified|mentioned|answerable)(?: in\b| *$| *[(\u2014\u2013-])",
    r"^(?:it |this |that |the answer |this question |the question )?(?:cannot|can't|can not|could not|couldn't) "
    r"be (?:answered|determined|found|known|inferred|deduced)\b",
    r"^(?:unknown|unanswerable|no idea|no answer(?: available| found)?|n/?a|insufficient (?:context|information)|"
    r"not covered|not in scope|can't say|cannot say|don't know)"
    r"(?: *$| *[(\u2014\u2013-]| from\b| with\b)",
]))
# What may follow a decline without making it an answer: advice on where to look or how to ask again.
_SUGGESTION = re.compile(r"^(?:please|try|you (?:may|might|could|can|should|would)|i (?:would|'d) (?:suggest|"
                         r"recommend)|consider|check|see|consult|contact|refer|ask|maybe|perhaps)\b")
# A source that only covers part of the ground declines only if what follows declines too ("My documents only
# cover the 2022 handbook; there's nothing about 2024").
_ONLY_COVERS = re.compile(rf"^{_SOURCE} (?:only|just) (?:covers?|goes? up to|describes?|includes?|contains?|"
                          r"mentions?|deals? with)\b")
_LEAD_IN = re.compile(r"^(?:(?:hmm+|well|ok|okay|alas|honestly|good question|great question|thanks|thank you|"
                      r"(?:i'm |i am )?(?:really |so |very |truly )?sorry|unfortunately|regrettably|"
                      r"i (?:sincerely |truly )?apologi[sz]e|i'm afraid|i am afraid|answer|note|result|a)\b"
                      r"[\s,:!.\u2014\u2013-]*(?:but\b\s*)?|"
                      r"(?:based on|according to|from|given|looking at|in|after) [^,]*,\s*|"
                      r"(?:regarding|as for|about|concerning|as to) [^,:]*[,:]\s*)+")
# Sentences that only apologise, sympathise or restate the question: the next sentence is the one that counts.
_PREAMBLE = re.compile(rf"^(?:{_SOURCE} (?:covers?|includes?|describes?|deals? with|has)\b|"
                       r"you(?: asked| are asking|'re asking| want to know)|your question|i (?:sincerely |truly )?"
                       r"apologi[sz]e|(?:i'm |i am )?(?:really |so |very )?sorry|i know this|i understand|"
                       r"thanks|thank you|good question|great question)\b")
_AND_YET = re.compile(r"(?:\b(?:but|however|though|although)\b|;|\u2014|\u2013| - )")


def _declines(sentence: str) -> bool:
    """Whether a sentence (lower case, lead-in removed) declines, and what follows a "but", "however", ";" or dash
    after the decline is not an answer of three words or more (it is short, a suggestion, or declines too)."""
    declined = _DECLINES.search(sentence) or _ONLY_COVERS.match(sentence)
    if not declined:
        return False
    turn = _AND_YET.search(sentence, declined.end())
    rest = _LEAD_IN.sub("", sentence[turn.end():].strip(" ,:")) if turn else ""
    if declined.re is _ONLY_COVERS:
        return bool(rest) and _declines(rest)
    return len(rest.split()) < 3 or bool(_SUGGESTION.match(rest)) or _declines(rest)


def is_refusal(answer: str, refusal_answer: str = "") -> bool:
    """True when an answer declines: raft.yaml's refusal answer (what the student was trained to say), or a first
    sentence that says the speaker cannot answer or the sources do not say (see _DECLINES). Pass the answer part
    (answer_text), not the reasoning: reasoning often says that some document does not contain the answer on its
    way to one that does."""
    lines = [line for line in answer.splitlines() if not line.lstrip().startswith("#")]     # markdown headings
    text = " ".join(re.sub(r"[*_`]", "", " ".join(lines)).replace("\u2019", "'").split())
    text = re.sub(r"(?<=\d)\.(?=\d)", "\u00b7", text)          # "version 6.0" is not the end of a sentence
    if not text:
        return False
    if refusal_answer and " ".join(refusal_answer.split()).lower() in text.lower():
        return True
    for sentence in re.split(r"(?<=[.!?])\s+", text.lower())[:3]:
        sentence = sentence.strip(" \"'")
        content = _LEAD_IN.sub("", sentence).strip(" .!?")
        declined = bool(content) and _declines(content)
        if content and (declined or not _PREAMBLE.match(sentence)):
            return declined
    return False
