# The toolkit's entry points. Each target can be re-run; setup skips what is already there.
#   make setup      .venv for the toolkit, llama.cpp's llama-server built in .venv-teacher, and the model
#   make teacher    only the second half of setup: llama-server in .venv-teacher and the model
#   make generate   RAFT data from data/ with the local teacher (SmolLM2 on llama.cpp), into output/
#                   (RAFT_ARGS="-t 2 --max_chunks 10" for a quick look)
#   make demo       the whole recipe on this CPU: data, fine-tune, convert, serve, evaluate, report (6 to 15 min
#                   after setup by CPU: docs/demo.md; DEMO_ARGS=--quick: about 4)
#   make test       the test suite (what CI runs): setup, and Debian's chromium for the browser test if missing
#   make bench      the benchmarks: retrieval, fine-tuning (CPU), generation
#   make embeddings the retriever's embedding model tuned on data/ itself (no LLM; 6-15 min on 2 cores), into
#                   models/minilm-docs: set embedding_model to it in raft_eval_config.yaml
#   make reranker   a cross-encoder reranker trained on data/ itself (no LLM), into models/minilm-reranker; set
#                   reranker to it only if bench/rerank.py says it wins (on data/ it did not: docs/retrieval.md)
#   make raft-effect  does RAFT beat fine-tuning without distractors and the base model? The paper's ablation on
#                   data/ with SmolLM2 (bench/raft_effect.py; docs/raft_effect.md), into output/raft_effect
PY := .venv/bin/python
TEACHER_PORT ?= 8001
RAFT_ARGS ?= -t 4
DEMO_ARGS ?=
export HF_HUB_OFFLINE := 1

.PHONY: setup teacher chromium generate demo test bench embeddings reranker raft-effect

# The two environments do not depend on each other: made side by side, the toolkit's pip installs (mostly waiting
# on the disk and the network) overlap llama.cpp's compile instead of adding to it.
SETUP_PARTS := .venv/done teacher
setup:
	$(MAKE) --no-print-directory -j2 --output-sync=line $(SETUP_PARTS)

teacher:
	scripts/teacher.sh setup

# pip -qq: errors only; a pip whose config names absent package folders otherwise warns once per package.
.venv/done: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -qq --upgrade pip
	.venv/bin/pip install -qq torch==2.13.0
	.venv/bin/pip install -qq -r requirements.txt
	touch $@

generate: setup
	TEACHER_PORT=$(TEACHER_PORT) scripts/teacher.sh start
	$(PY) raft.py -u http://127.0.0.1:$(TEACHER_PORT)/v1 -k EMPTY $(RAFT_ARGS); status=$$?; \
	  TEACHER_PORT=$(TEACHER_PORT) scripts/teacher.sh stop; exit $$status

demo: setup
	scripts/demo.sh $(DEMO_ARGS)

# Chromium's apt install (network and disk) too runs beside llama.cpp's compile; --durations: where the time went.
test:
	$(MAKE) --no-print-directory -j3 --output-sync=line $(SETUP_PARTS) chromium
	$(PY) -m pytest -q tests --durations=20

chromium:
	scripts/install_chromium.sh

bench: setup
	$(PY) bench/retrieval.py
	$(PY) bench/finetune.py
	$(PY) bench/generation.py

embeddings: setup
	$(PY) finetune/embeddings.py --documents data --output models/minilm-docs

reranker: setup
	$(PY) finetune/reranker.py --documents data --output models/minilm-reranker

raft-effect: setup
	$(PY) bench/raft_effect.py
