"""The chatbot as a web page (Gradio), for the people who will try the bot.

  python chat.py -u http://localhost:8000/v1 --web                    # http://127.0.0.1:7860
  python chat.py --model_path output/demo/raft-smollm2-hf --raft_run output/demo/data --web --port 7861

The answer streams in as it is written, only its answer part unless "show reasoning" is ticked; the chunks it was
given are listed, with their file and rank, under "Sources of the last answer". A reply that declines is shown
as a hand-off ("This needs a person") and appended to --handoff_log (JSONL: time, question, sources, model) for a
support team. The thumbs under an answer append it to --feedback_log in the eval file's format plus the verdict
({"question", "answer", "verdict": "up" or "down", ...}): the thumbs-up lines, checked, are new eval questions.
A failing model server shows an error in the conversation and the page keeps working. `concurrency` answers are
written at once (Gradio's queue) and `queue_size` people wait in line (raft_eval_config.yaml); Gradio tells one
more that the queue is full. The page listens on 127.0.0.1 unless --host says otherwise; Gradio's public share link
only with --share; either of those needs a login (--web_login or RAG_WEB_LOGIN) unless
--allow_unauthenticated_network_access says otherwise.
"""
import os
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")      # no calls home: the page may serve private documents
import gradio as gr  # noqa: E402

from assistant import Assistant, append_jsonl  # noqa: E402
from errors import LLMFatalError  # noqa: E402

HANDOFF_TEXT = ("**This needs a person.** The documents do not answer this question, so it has been passed to "
                "the support team.")
WAITING = "…"
UNQUOTED_NOTE = "_Nothing of this answer is quoted from its sources: check it against them below._"


def sources_markdown(sources: list[dict]) -> str:
    if not sources:
        return "No documents were retrieved for this answer."
    return "\n\n".join(f"**[{s['rank']}] {os.path.basename(s['source'])}** ({s['source']})\n\n> "
                       + " ".join(s["text"].split()) for s in sources)


class WebChat:
    def __init__(self, assistant: Assistant, model, args):
        self.assistant, self.model, self.args = assistant, model, args

    def respond(self, question: str, history: list, show_reasoning: bool, turns: dict):
        """Stream one answer into the conversation; yields (textbox, conversation, sources, turns)."""
        question = (question or "").strip()
        if not question:
            yield "", history, gr.skip(), turns
            return
        history = history + [{"role": "user", "content": question}, {"role": "assistant", "content": WAITING}]
        index = len(history) - 1
        yield "", history, gr.skip(), turns
        try:
            turn = self.assistant.start(question)
            sources = sources_markdown(turn.sources)
            for _ in self.assistant.stream(turn, self.model):
                history[index] = {"role": "assistant", "content": turn.visible(show_reasoning) or WAITING}
                yield "", history, sources, turns
        except LLMFatalError as e:
            history[index] = {"role": "assistant", "content": f"⚠️ The model server failed: {e}. Please try again."}
            yield "", history, gr.skip(), turns
            return
        result = self.assistant.finish(turn)
        if result["handoff"]:
            history[index] = {"role": "assistant", "content": HANDOFF_TEXT}
            append_jsonl(self.args.handoff_log, {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "question": question,
                                                 "model": self.model.name, "sources": result["sources"]})
        else:
            note = f"\n\n{UNQUOTED_NOTE}" if result["unquoted"] else ""
            history[index] = {"role": "assistant", "content": turn.visible(show_reasoning, finished=True) + note}
        turns = {**turns, index: result}
        yield "", history, sources, turns

    def feedback(self, turns: dict, like: gr.LikeData):
        """A thumbs up or down on an answer: one line of the feedback log."""
        index = like.index[0] if isinstance(like.index, (list, tuple)) else like.index
        result = turns.get(index)
        if result is None:          # an error message or one still being written: nothing to record
            return
        append_jsonl(self.args.feedback_log, {
            "question": result["question"], "answer": result["answer"], "verdict": "up" if like.liked else "down",
            "handoff": result["handoff"], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": self.model.name,
            "sources": [s["source"] for s in result["sources"]], "reply": result["reply"]})
        gr.Info("Thank you: your feedback was saved.")

    def page(self) -> gr.Blocks:
        with gr.Blocks(title=f"RAFT chat: {self.model.name}") as page:
            gr.Markdown(f"## Ask about the documents\n{self.model.name} ({self.model.where}; "
                        f"{self.assistant.describe()})")
            conversation = gr.Chatbot(height=460, label="conversation", elem_id="conversation",
                                      feedback_options=("Like", "Dislike"))
            with gr.Row():
                question = gr.Textbox(placeholder="Type a question and press Enter", show_label=False, scale=8,
                                      elem_id="question")
                send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            show_reasoning = gr.Checkbox(label="show reasoning (the model's chain of thought and quotes)",
                                         value=False, elem_id="show-reasoning")
            with gr.Accordion("Sources of the last answer", open=False, elem_id="sources"):
                sources = gr.Markdown("No question asked yet.", elem_id="sources-text")
            turns = gr.State({})         # per visitor: message index -> the finished answer, for the feedback
            for trigger in (question.submit, send.click):
                trigger(self.respond, [question, conversation, show_reasoning, turns],
                        [question, conversation, sources, turns])
            conversation.like(self.feedback, [turns], None)
        return page


def serve(assistant: Assistant, model, args, cfg: dict, login) -> int:
    """The page, `concurrency` answers written at once and `queue_size` people in line (Gradio tells one more that
    the queue is full); `login` is (user, password) or None (chat.who_may_call decides when one is needed)."""
    port = args.port or 7860
    page = WebChat(assistant, model, args).page()
    page.queue(default_concurrency_limit=cfg["concurrency"], max_size=cfg["queue_size"])
    print(f"web chat with {model.name} ({model.where}; {assistant.describe()}) at http://{args.host}:{port}"
          + (" (login required)" if login else "") + f"; hand-offs to {args.handoff_log}, feedback to "
          f"{args.feedback_log}; Ctrl-C stops it", flush=True)
    page.launch(server_name=args.host, server_port=port, share=args.share, quiet=True, footer_links=[], auth=login)
    return 0
