# The two commands of the README: `make demo` and `make test`. Both create/use a venv in .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-poly demo-cub test install bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q

# PRECISION=no gives the fp32 demo; auto is bf16 where the hardware runs it natively.
PRECISION ?= auto
demo: $(STAMP)
	@set -e; \
	out=$$($(BIN)/python launch/train.py --config configs/demo.yaml train.mixed_precision=$(PRECISION)); run=$$(echo "$$out" | tail -n 1 | cut -d' ' -f2); \
	$(BIN)/python launch/evaluate.py --run $$run; \
	echo "demo run: $$run  (config.yaml, metrics.jsonl, images/, model/, eval.json, report.md)"

# FUSION=mopoe|poe picks another joint posterior (configs/demo_poly.yaml: moe).
demo-poly: $(STAMP)
	@set -e; \
	out=$$($(BIN)/python launch/train.py --config configs/demo_poly.yaml $(if $(FUSION),model.fusion=$(FUSION))); run=$$(echo "$$out" | tail -n 1 | cut -d' ' -f2); \
	$(BIN)/python launch/evaluate.py --run $$run; \
	echo "five-modality demo run: $$run  (config.yaml, metrics.jsonl, images/, eval.json, report.md)"

demo-cub: $(STAMP)
	@set -e; \
	out=$$($(BIN)/python launch/train.py --config configs/demo_cub.yaml); run=$$(echo "$$out" | tail -n 1 | cut -d' ' -f2); \
	$(BIN)/python launch/evaluate.py --run $$run; \
	echo "caption demo run: $$run  (images/*_pairs.png, images/*.txt, eval.json, report.md)"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

clean:
	rm -rf runs wandb .pytest_cache
