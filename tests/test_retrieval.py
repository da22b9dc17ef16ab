"""The retrievers on a corpus where the relevant chunk of each question is known; the embedding cache."""
import json
import time

import numpy as np
import pytest

from documents import Chunk, load_documents, split_documents
from errors import InputError
from tests.conftest import ROOT
from retrieval import (EmbeddingCache, QueryRewriter, SearchSettings, abbreviations, build_retrievers,
                       reciprocal_rank_fusion, search_terms, title_of, vector_index)

TOPICS = {
    "volcano.md": "Stratovolcanoes are built from alternating layers of lava and ash. When magma rich in silica "
                  "rises, pressure builds until an explosive eruption throws pumice and ash high into the sky.",
    "bread.md": "A sourdough starter is a culture of wild yeast and lactic acid bacteria. Bakers feed it flour "
                "and water every day; the dough then rises slowly overnight, which gives the loaf its sour taste.",
    "chess.md": "The Sicilian Defence begins 1.e4 c5. Black fights for the centre from the side and accepts an "
                "unbalanced position, which is why aggressive players choose it against the king's pawn.",
    "tides.md": "Tide pools form on rocky shores when the sea retreats at low tide. Anemones, crabs and starfish "
                "survive there in the trapped seawater until the ocean returns a few hours later.",
    "gpu.md": "Training a model needs GPU memory for the weights, the gradients and the optimizer state. Adam "
              "keeps two extra numbers per parameter, so full fine-tuning takes about sixteen bytes per weight.",
    "bike.md": "A bicycle's derailleur moves the chain between sprockets of the cassette. Low gears make hills "
               "easier to climb; high gears let the rider go faster on flat roads with each turn of the pedals.",
}
# (question, the file that answers it): some share words with the text, some only its meaning.
QUESTIONS = [
    ("What makes an explosive eruption happen?", "volcano.md"),
    ("How do I keep the wild yeast culture for my loaf alive?", "bread.md"),
    ("Which opening answers the king's pawn with c5?", "chess.md"),
    ("Where can you find starfish and crabs when the sea goes out?", "tides.md"),
    ("How much memory does fine-tuning need per parameter?", "gpu.md"),
    ("Which gears help me cycle up a steep hill?", "bike.md"),
]


@pytest.fixture(scope="module")
def topic_chunks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("topics")
    for name, text in TOPICS.items():
        (folder / name).write_text(text)
    chunks, _ = split_documents(load_documents(str(folder), "").documents, 1000)
    assert len(chunks) == len(TOPICS)
    return chunks


@pytest.fixture(scope="module")
def data_chunks():
    """The chunks of the repository's data/."""
    chunks, _ = split_documents(load_documents(str(ROOT / "data"), "").documents, 1000)
    return chunks


@pytest.mark.parametrize("kind", ["dense", "bm25", "hybrid"])
def test_each_kind_finds_the_relevant_chunk(topic_chunks, tmp_path, kind):
    retriever = build_retrievers(topic_chunks, [kind], cache_dir=str(tmp_path))[kind]
    rankings = retriever.rank([q for q, _ in QUESTIONS], depth=3)
    for (question, source), ranking in zip(QUESTIONS, rankings):
        assert len(ranking) == 3 and len(set(ranking)) == 3
        assert topic_chunks[ranking[0]].source.endswith(source), (kind, question)


def test_depth_larger_than_the_corpus_returns_every_chunk_once(topic_chunks, tmp_path):
    for kind, retriever in build_retrievers(topic_chunks, ["dense", "bm25", "hybrid"], cache_dir=str(tmp_path)).items():
        assert sorted(retriever.rank(["eruption"], depth=50)[0]) == list(range(len(topic_chunks))), kind


def dense_index(chunks, cache_dir):
    """The dense index itself, not wrapped in the query rewriter."""
    return build_retrievers(chunks, ["dense"], cache_dir=str(cache_dir), settings=SearchSettings(query_rewrite=False))["dense"]


def test_dense_scores_are_cosine(topic_chunks, tmp_path):
    dense = dense_index(topic_chunks, tmp_path)
    vectors = dense.index.reconstruct_n(0, dense.index.ntotal)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)   # unit vectors: inner product = cosine


def test_a_second_build_reads_the_cache_and_a_foreign_file_is_never_unpickled(topic_chunks, tmp_path):
    first = dense_index(topic_chunks, tmp_path)
    second = dense_index(topic_chunks, tmp_path)
    assert not first.from_cache and second.from_cache
    assert np.array_equal(first.index.reconstruct_n(0, 6), second.index.reconstruct_n(0, 6))

    header = next(tmp_path.glob("*.json"))
    key = header.stem
    np.save(tmp_path / f"{key}.npy", np.array([{"not": "vectors"}], dtype=object), allow_pickle=True)
    assert EmbeddingCache(str(tmp_path)).load(key, len(topic_chunks)) is None   # an object array is refused
    third = dense_index(topic_chunks, tmp_path)
    assert not third.from_cache                                                 # embedded again, cache rewritten
    header.write_text(json.dumps({"key": "someone else's"}))
    assert EmbeddingCache(str(tmp_path)).load(key, len(topic_chunks)) is None


def test_other_chunks_or_model_get_another_cache_entry(topic_chunks, tmp_path):
    build_retrievers(topic_chunks, ["dense"], cache_dir=str(tmp_path))
    build_retrievers(topic_chunks[:4], ["dense"], cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("*.npy"))) == 2
    assert EmbeddingCache.key("model-a", ["x"]) != EmbeddingCache.key("model-b", ["x"])


def test_bad_input(tmp_path):
    with pytest.raises(InputError, match="no chunks"):
        build_retrievers([], ["bm25"])
    with pytest.raises(InputError, match="unknown retriever kind"):
        build_retrievers([Chunk("some text " * 20, "a.md")], ["tfidf"])
    with pytest.raises(InputError, match="no/such-model' could not be loaded"):
        build_retrievers([Chunk("some text " * 20, "a.md")], ["dense"], embedding_model=str(tmp_path / "no/such-model"))


def test_a_hub_model_name_offline_is_a_clear_error_at_once(monkeypatch):
    """It used to take about 70 s: the hub client retried before failing."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    for name in ("acme/not-downloaded", "all-mpnet-base-v2"):
        with pytest.raises(InputError, match=f"embedding model '{name}' could not be loaded .*HF_HUB_OFFLINE"):
            build_retrievers([Chunk("some text " * 20, "a.md")], ["dense"], embedding_model=name)
    assert time.monotonic() - started < 10


def test_bfloat16_embeddings_match_float32(topic_chunks):
    from retrieval import Embedder
    texts = [c.text for c in topic_chunks]
    full, half = Embedder("all-MiniLM-L6-v2", dtype="float32"), Embedder("all-MiniLM-L6-v2", dtype="bfloat16")
    a, b = full.embed(texts), half.embed(texts)
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert (a * b).sum(axis=1).min() > 0.99                  # the same directions, to bf16 precision



# ---- the levers ---------------------------------------------------------------------------------------------------
def test_search_terms_split_identifiers_and_stem_on_request():
    assert search_terms("Set tensor_parallel_size and maxModelLen", False) == \
        ["set", "tensor", "parallel", "size", "max", "model", "len"]
    assert search_terms("quantized models quantization", True) == ["quantiz", "model", "quantiz"]
    assert title_of("data/guides/serving_llama.html") == "serving llama"


def test_weighted_fusion_by_hand():
    # weights 0.8 / 0.2, k = 60: a = 0.8/61 + 0.2/62, b = 0.8/62 + 0.2/61 -> a first; with 0.2 / 0.8, b first
    assert reciprocal_rank_fusion([["a", "b"], ["b", "a"]], weights=(0.8, 0.2)) == ["a", "b"]
    assert reciprocal_rank_fusion([["a", "b"], ["b", "a"]], weights=(0.2, 0.8)) == ["b", "a"]


def test_the_query_rewrite_learns_abbreviations_and_words_from_the_corpus():
    texts = ["Llama 3 uses grouped-query attention (GQA) in every size.",
             "Reinforcement Learning from Human Feedback (RLHF) aligns the chat models.",
             "Quantization shrinks the weights; tensor parallelism (TP) splits them."]
    assert abbreviations(texts) == {"gqa": "grouped-query attention", "rlhf": "Reinforcement Learning from Human Feedback",
                                    "tp": "tensor parallelism"}
    rewriter = QueryRewriter(texts)
    assert rewriter.rewrite("does it use gqa?") == "does it use gqa? grouped-query attention"
    assert rewriter.rewrite("how does quantizaton work") == "how does quantization work"
    assert rewriter.rewrite("what is llama") == "what is llama"               # known or short words stay


def test_the_rewriters_shortlist_finds_what_difflib_over_every_word_finds(data_chunks):
    """The trigram shortlist is a speed-up, not another answer: on typos of the corpus's own words it corrects them
    exactly as difflib over every word of about their length does."""
    import difflib
    import random
    rewriter = QueryRewriter([c.text for c in data_chunks])
    rng = random.Random(0)
    words = sorted(w for w in rewriter.known if len(w) >= 6)
    typos = {w[:i] + c + w[i + 1:] for w in rng.sample(words, 150)
             for i, c in [(rng.randrange(len(w)), rng.choice("aeioustr"))]} - rewriter.known
    for typo in sorted(typos):
        candidates = [w for w in rewriter.words if abs(len(w) - len(typo)) <= 2]
        exhaustive = difflib.get_close_matches(typo, candidates, n=1, cutoff=0.85)
        assert rewriter.correct(typo) == (exhaustive[0] if exhaustive else None), typo


def test_a_question_of_unknown_words_has_at_most_a_bounded_number_corrected(data_chunks):
    rewriter = QueryRewriter([c.text for c in data_chunks])
    letters = "bcdfghjklmnpqrstvwxz"
    flood = " ".join("zq" + "".join(letters[n // 20 ** i % 20] for i in range(4)) for n in range(1000))
    rewriter.rewrite(flood)
    assert len(rewriter.corrections) == QueryRewriter.MAX_CORRECTIONS


def test_each_lever_keeps_the_retrievers_right_on_the_topic_corpus(topic_chunks, tmp_path):
    settings = SearchSettings(dense_weight=0.3, bm25_k1=1.2, bm25_b=0.5, stemming=True, source_titles=True,
                              query_rewrite=True)
    retrievers = build_retrievers(topic_chunks, ["dense", "bm25", "hybrid"], cache_dir=str(tmp_path), settings=settings)
    for kind, retriever in retrievers.items():
        for (question, source), ranking in zip(QUESTIONS, retriever.rank([q for q, _ in QUESTIONS], depth=2)):
            assert topic_chunks[ranking[0]].source.endswith(source), (kind, question)


def test_above_the_threshold_the_index_is_approximate_and_finds_the_same_neighbours():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    exact, approximate = vector_index(vectors, approximate_above=5000), vector_index(vectors, approximate_above=2999)
    assert type(exact).__name__ == "IndexFlatIP" and type(approximate).__name__ == "IndexHNSWFlat"
    queries = vectors[:50] + 0.05 * rng.normal(size=(50, 32)).astype(np.float32)
    same = [len(set(a) & set(e)) for a, e in zip(approximate.search(queries, 5)[1], exact.search(queries, 5)[1])]
    assert sum(same) / (5 * 50) > 0.9


# ---- the dev set ----------------------------------------------------------------------------------------------------
def test_the_dev_set_is_hard_checked_and_well_formed():
    """eval/dev_questions.json: written by hand as users ask; every supporting quote is in the documents, and the
    questions share at most half as many words with their passages as eval_llama.json's do."""
    from documents import load_chunks
    from text import content_words
    items = json.loads((ROOT / "eval" / "dev_questions.json").read_text())
    _, chunks, _ = load_chunks(str(ROOT / "data"), "", True, 1000)
    texts = [" ".join(c.text.lower().split()) for c in chunks]
    kinds = [i["kind"] for i in items]
    assert len(items) >= 80 and all(i["question"].strip() and i["answer"].strip() for i in items)
    assert 0.08 <= kinds.count("unanswerable") / len(items) <= 0.13
    assert min(kinds.count(k) for k in ("multi", "abbreviation", "typo")) >= 8
    overlaps = []
    for item in items:
        holders = [{n for n, t in enumerate(texts) if " ".join(q.lower().split()) in t} for q in item["support"]]
        assert all(holders), item["question"]
        if item["kind"] == "multi":
            assert len(set().union(*holders)) >= 2, item["question"]
        if item["kind"] != "unanswerable":
            words = set(content_words(item["question"]))
            passage = set(content_words(" ".join(chunks[min(h)].text for h in holders)))
            overlaps.append(len(words & passage) / len(words))
    recipe = json.loads((ROOT / "eval_llama.json").read_text())
    recipe_overlaps = []
    for item in recipe:
        answer, words = set(content_words(item["answer"])), set(content_words(item["question"]))
        best = max(chunks, key=lambda c: (len(answer & set(content_words(c.text))), len(words & set(content_words(c.text)))))
        recipe_overlaps.append(len(words & set(content_words(best.text))) / max(1, len(words)))
    assert np.mean(overlaps) <= 0.5 * np.mean(recipe_overlaps), (np.mean(overlaps), np.mean(recipe_overlaps))
