# Two commands: `make demo` and `make test`. Everything installs into .venv with pip
# (uv/poetry don't see the local CPU torch wheel). A second `make setup` reinstalls nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed
EXTRAS := $(VENV)/.installed-extras
TORCH_STACK := torch==2.13.0 fbgemm-gpu-cpu==1.8.0

.PHONY: setup demo test lint typecheck protos clean mlflow-ui

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_STACK)
	$(PIP) install -q -r requirements/cpu.txt
	@# torchrec's metadata asks for the CUDA fbgemm-gpu (and an old torchmetrics): install it last,
	@# alone, without dependencies; fbgemm-gpu-cpu above provides its kernels.
	$(PIP) install -q --no-deps torchrec==1.8.0
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(VENV)/bin/ranker demo --workdir .demo

# The MLflow UI over the project's store (.mlflow/, or MLFLOW_TRACKING_URI) on 127.0.0.1:5000 (MLFLOW_UI_PORT);
# a port in use or a missing store is one error line and a non-zero exit, before any server starts.
mlflow-ui: setup
	@$(PY) -m pipelines.ui

# The optional engines the tests exercise (Ray Data, the PostgreSQL driver), on top of the default
# install and pinned by it (requirements/cpu.txt as constraints: nothing installed moves).
$(EXTRAS): $(STAMP)
	$(PIP) install -q -c requirements/cpu.txt --no-build-isolation -e ".[ray,postgres]"
	touch $(EXTRAS)

test: setup $(EXTRAS)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy features ranking serving pipelines
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

typecheck: setup
	$(VENV)/bin/mypy features ranking serving pipelines

protos: setup
	PYTHON=$(PY) protos/generate.sh

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache .mypy_cache
