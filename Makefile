# cl_runner — every target installs what it needs into $(VENV) on first use and reuses it after.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cl_runner-installed
ARGS   ?=
SHARED_DATA := $(abspath ../shared/data)
PORT   ?= 5000

.PHONY: install run test test-full ui bench clean

install: $(STAMP)

# re-installs when pyproject.toml changes; the package itself is editable (live code and conf/)
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[test]'
	@touch $(STAMP)

run: install            ## the default experiment (finetune on the bundled digits; offline, seconds)
	$(BIN)/cl-run $(ARGS)

test: install           ## fast tier: synthetic / bundled data, a few minutes on 2 cores
	$(BIN)/python -m pytest -q

test-full: install      ## + the slow tier: real MNIST / Fashion-MNIST (../shared/data or $$CL_RUNNER_DATA)
	CL_RUNNER_SHARED_DATA=$${CL_RUNNER_DATA:-$(SHARED_DATA)} $(BIN)/python -m pytest -q -m ""

ui: install             ## browse runs at http://127.0.0.1:$(PORT)
	@mkdir -p outputs
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath outputs)/mlflow.db --host 127.0.0.1 --port $(PORT)

# a shared tracking server: PostgreSQL (installed from Debian's packages if missing) + MLflow, data under
# $(SERVER_DIR); see scripts/server.sh for its settings and the README ("A shared tracking server")
SERVER_DIR ?= outputs/server
SERVER_STAMP := $(VENV)/.cl_runner-server-installed
.PHONY: server server-stop
server: $(SERVER_STAMP) ## MLflow server on http://127.0.0.1:$(PORT), PostgreSQL backend, data in $(SERVER_DIR)
	@SERVER_DIR=$(SERVER_DIR) PORT=$(PORT) MLFLOW=$(BIN)/mlflow bash scripts/server.sh start

$(SERVER_STAMP): $(STAMP)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[server]'
	@touch $@

server-stop:            ## stop the MLflow server and its PostgreSQL
	@SERVER_DIR=$(SERVER_DIR) bash scripts/server.sh stop

bench: install          ## time the split-MNIST finetune protocol; appends to BENCHMARKS.md
	CL_RUNNER_DATA=$${CL_RUNNER_DATA:-$(SHARED_DATA)} $(BIN)/python scripts/bench.py $(ARGS)

clean:                  ## run folders, MLflow database/artifacts, caches (keeps the venv)
	-@test ! -d $(SERVER_DIR) || SERVER_DIR=$(SERVER_DIR) bash scripts/server.sh stop  # its data goes too
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
	rm -rf multirun .pytest_cache

# SpaceNet paper protocols (Tables 2-3): 10 seeds each on real split MNIST / Fashion-MNIST, one multirun per
# protocol into outputs/reproduce-spacenet/, then the mean ± std table beside the paper's numbers.
SPACENET_PROTOCOLS ?= spacenet_split_mnist static_sparse_split_mnist spacenet_rehearsal_split_mnist \
                      spacenet_split_fmnist static_sparse_split_fmnist spacenet_rehearsal_split_fmnist
.PHONY: reproduce-spacenet
reproduce-spacenet: install  ## SpaceNet / Static-SparseNN / SpaceNet-Rehearsal, 10 seeds each, vs the paper
	@for e in $(SPACENET_PROTOCOLS); do \
	  CL_RUNNER_DATA=$${CL_RUNNER_DATA:-$(SHARED_DATA)} $(BIN)/cl-run -m +experiment=$$e seed=0,1,2,3,4,5,6,7,8,9 \
	    tracking=local hardware=cpu progress=off hydra.sweep.dir=outputs/reproduce-spacenet/$$e $(ARGS) || exit 1; \
	done
	$(BIN)/cl-report outputs/reproduce-spacenet --ref
