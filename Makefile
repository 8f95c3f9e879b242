# cl_runner — every target installs what it needs into $(VENV) on first use and reuses it after.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cl_runner-installed
ARGS   ?=
SHARED_DATA := $(abspath ../shared/data)
PORT   ?= 5000

.PHONY: install run test test-full test-cluster ui bench clean

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

# sweeps on real clusters: a Ray head and a one-node SLURM (scripts/slurm.sh; root on Debian), each started and
# stopped by tests/test_clusters.py. Installs the [ray] extra into $(VENV) (it holds cloudpickle < 3, which the
# main install does not need) and, as root, Debian's slurm-wlm slurmdbd munge mariadb-server
CLUSTER_STAMP := $(VENV)/.cl_runner-cluster-installed
test-cluster: $(CLUSTER_STAMP)  ## slow: 2-seed sweeps through launcher=ray and launcher=slurm on local clusters (~5 min)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -q -s -m slow tests/test_clusters.py

$(CLUSTER_STAMP): $(STAMP)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[test,ray]'
	bash scripts/slurm.sh install
	@touch $@

# the database cl-run writes by default: $CL_RUNNER_OUTPUTS/mlflow.db, else outputs/mlflow.db. cl-run's last line
# gives a run's address there, in the UI's "Model training" view (?workflowType=machine_learning)
UI_OUTPUTS = $(abspath $(or $(CL_RUNNER_OUTPUTS),outputs))
ui: install             ## browse runs at http://127.0.0.1:$(PORT)
	@mkdir -p $(UI_OUTPUTS)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(UI_OUTPUTS)/mlflow.db --host 127.0.0.1 --port $(PORT)

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
	-@test ! -d outputs/slurm || bash scripts/slurm.sh stop  # the test SLURM's daemons, before their folder goes
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

# The baselines' tables: van de Ven & Tolias 2019 (Table 4; SpaceNet's Tables 2-3 quote it) in both split-MNIST
# scenarios and class-IL split Fashion-MNIST, then SpaceNet's and Static-SparseNN's own rows, SEEDS each: one
# multirun per experiment into $(BASELINES_DIR)/<experiment>/ (a job per core; a relaunch skips the finished
# jobs, found by config hash under paths.outputs), then one table beside the papers' numbers, its CSV and the
# accuracy-after-each-task figure. Lists are comma-separated: make reproduce-baselines BASELINES=ewc,si SEEDS=0,1
comma := ,
empty :=
space := $(empty) $(empty)
BASELINES ?= finetune,ewc,online_ewc,si,mas,lwf,er,icarl,dgr,dgr_distill,joint
# task-IL: the same without iCaRL (a class-IL method)
BASELINES_TIL ?= $(subst $(space),$(comma),$(filter-out icarl,$(subst $(comma),$(space),$(BASELINES))))
SEEDS ?= 0,1,2,3,4
SPARSE_PROTOCOLS ?= spacenet_split_mnist static_sparse_split_mnist spacenet_split_fmnist static_sparse_split_fmnist
# under paths.outputs ($$CL_RUNNER_OUTPUTS, else outputs), where skip_finished looks
BASELINES_DIR ?= $${CL_RUNNER_OUTPUTS:-outputs}/reproduce-baselines
.PHONY: reproduce-baselines
reproduce-baselines: install  ## the papers' baselines (3 protocols) + SpaceNet / Static-SparseNN, 5 seeds each, vs the papers
	@set -e; export CL_RUNNER_DATA=$${CL_RUNNER_DATA:-$(SHARED_DATA)}; out=$(BASELINES_DIR); \
	run() { echo "== $$1 $$2"; $(BIN)/cl-run -m +experiment=$$1 $$2 seed=$(SEEDS) launcher=local_parallel tracking=local \
	          hardware=cpu progress=off hydra.sweep.dir=$$out/$$1 $(ARGS); }; \
	test -z "$(BASELINES)" || run vdv_split_mnist method=$(BASELINES); \
	test -z "$(BASELINES_TIL)" || run vdv_split_mnist_til method=$(BASELINES_TIL); \
	test -z "$(BASELINES)" || run vdv_split_fmnist method=$(BASELINES); \
	for e in $(SPARSE_PROTOCOLS); do run $$e; done; \
	$(BIN)/cl-report $$out --ref --plot $$out/accuracy.png --csv $$out/table.csv
