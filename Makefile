# mnv3: `make install` then `make test`. Everything runs inside .venv.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# Quiet pip: the local index mirrors print a warning per package they do not hold.
PIP_FLAGS := --quiet --disable-pip-version-check --constraint constraints.txt

.PHONY: install wheel test lint format bench train train-detect train-segment search clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python  ## create .venv and install mnv3 with its dev tools (pinned torch 2.14.1 / torchvision 0.29.1)
	@echo "installing mnv3 and its pinned dependencies into $(VENV) (log: $(VENV)/pip-install.log)"
	@$(PIP) install $(PIP_FLAGS) -e ".[dev,slurm,deploy,medical]" > $(VENV)/pip-install.log 2>&1 \
		|| { grep -v "^WARNING: Location" $(VENV)/pip-install.log; echo "pip install failed"; exit 1; }
	$(BIN)/python -c "import torch, torchvision, mnv3; print('mnv3 ready: torch', torch.__version__, 'torchvision', torchvision.__version__)"

wheel:  ## build dist/mnv3-*.whl (code, every conf/ yaml as mnv3.conf, console scripts) to pip install elsewhere
	rm -rf build  # setuptools never prunes build/lib: a deleted module would still ship
	$(PIP) wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w dist .

test:  ## run the test suite (CPU only, a few minutes)
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

lint:  ## ruff lint and format check
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format:  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

train:  ## the default experiment: MobileNetV3-Small on generated textures, CPU (measured time and result: README)
	$(BIN)/python -m mnv3.train experiment=textures_quick $(ARGS)

train-detect:  ## SSDLite (MobileNetV3-Small, reduced tail) on generated COCO-layout shapes, CPU (measured time and result: README)
	$(BIN)/python -m mnv3.train experiment=shapes_detect_quick $(ARGS)

train-segment:  ## LR-ASPP (MobileNetV3-Small, reduced tail) on generated Cityscapes-layout streets, CPU (measured time and result: README)
	$(BIN)/python -m mnv3.train experiment=shapes_segment_quick $(ARGS)

search:  ## NetAdapt from MobileNetV3-Small to 75 % of its latency on this CPU, generated textures (measured time and result: README); docs/search.md
	$(BIN)/python -m mnv3.search experiment=netadapt_small_quick $(ARGS)

bench:  ## benchmarks vs torchvision: models, SSDLite / LR-ASPP (params, MAdds, latency), training step, data loading, deployment paths (bench/results/)
	$(BIN)/python bench/bench_models.py --out bench/results
	$(BIN)/python bench/bench_dense.py --out bench/results
	$(BIN)/python bench/bench_train.py --out bench/results
	$(BIN)/python bench/bench_data.py --out bench/results
	$(BIN)/python bench/bench_deploy.py --out bench/results $(DEPLOY_ARGS)

clean:  ## remove caches and build leftovers (keeps .venv and data/)
	rm -rf .pytest_cache .ruff_cache build dist src/*.egg-info
	find . -name __pycache__ -type d -not -path './.venv/*' -prune -exec rm -rf {} +
