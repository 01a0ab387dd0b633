# dfqbench: `make run` sets up and runs a real quantization job, `make test` sets up and runs the tests.
# Offline (data and checkpoints on disk), export first:
#   DFQ_CIFAR10_ROOT=../shared/data/cifar10-jpeg DFQ_MODELS_DIR=../shared/models
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup run test test-slow tables reported bench bench-ptq bench-qat baselines baselines-ptq baselines-qat unseen-teacher reproduce-cifar10 clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

run: setup  ## ZeroQ W4A4 on the ResNet-20 CIFAR-10 teacher, full test set (ARGS=... to override)
	$(PY) -m dfqbench method=zeroq model=resnet20_cifar10 dataset=cifar10 dataset.download=true quant=gdfq wbit=4 abit=4 $(ARGS)

test: setup  ## the default (fast) suite
	$(PY) -m pytest -q $(ARGS)

test-slow: setup  ## long end-to-end checks on the full test set
	$(PY) -m pytest -q -m slow $(ARGS)

RESULTS ?= results
tables: setup  ## RESULTS/**/record.json (default results/; RESULTS=dir for your own runs) + the papers' numbers in results/ -> RESULTS/{runs,summary}.csv, baselines.md, README.md, plots/
	$(PY) -m dfqbench.tables $(RESULTS) --results $(RESULTS) --reported results $(ARGS)

reported: setup  ## re-read the papers' numbers from the seed document
	$(PY) -m dfqbench.reported ../shared/seeds/data-free-quantization-papers-and-baselines.md results/reported.csv

OFFICIAL_ZEROQ ?=
bench: setup  ## fake-quant kernels vs copy bandwidth, W4A4 vs FP32 eval, ZeroQ and PSAQ-ViT synthesis (OFFICIAL_ZEROQ=clone: its time too) -> results/bench/
	$(PY) scripts/bench_fakequant.py --out results/bench/fakequant_cpu.md $(ARGS)
	$(PY) scripts/bench_zeroq.py --steps 500,300 --precisions fp32,bf16 --repeats 3 --out results/bench/bench_zeroq.md $(if $(OFFICIAL_ZEROQ),--official $(OFFICIAL_ZEROQ)) $(ARGS)
	$(PY) scripts/bench_psaqvit.py --out results/bench/bench_psaqvit.md $(ARGS)

bench-ptq: setup  ## every post-training method: seconds to quantize ResNet-20 and its W4A4 top-1, one run
	$(PY) scripts/bench_ptq.py --out results/bench/bench_ptq.md $(ARGS)

bench-qat: setup  ## trainer iterations/s beside a plain FP32 forward+backward of the same batch
	$(PY) scripts/bench_qat.py $(ARGS)

baselines-ptq: setup  ## recompute the post-training family's records (skips finished runs), then the tables
	PY=$(PY) scripts/run_ptq_baselines.sh
	$(PY) -m dfqbench.tables

baselines-qat: setup  ## recompute the training family's records, cpu schedule, two lanes (skips finished runs)
	PY=$(PY) scripts/run_qat_baselines.sh
	$(PY) -m dfqbench.tables

unseen-teacher: setup  ## every training method on a preresnet20 teacher trained here (results/explore/unseen-teacher)
	PY=$(PY) scripts/check_unseen_teacher.sh

baselines: setup  ## recompute the committed foundation baselines (skips finished runs), then the tables
	PY=$(PY) scripts/run_baselines.sh
	$(PY) -m dfqbench.tables

reproduce-cifar10: setup  ## experiment=cifar10_resnet20 into results/ (finished runs skipped), then the tables
	$(PY) -m dfqbench -m experiment=cifar10_resnet20 paths.output_dir=results progress=false $(ARGS); \
	status=$$?; $(PY) -m dfqbench.tables; exit $$status

.PHONY: parity
# make parity OFFICIAL_<METHOD>=<the user's clone of its official repository> ...: each driver runs that clone on the
# shared teacher and test set beside dfqbench (scripts/parity/<method>.py, results/parity/, results/parity.csv)
PARITY_ARGS ?=
PARITY_DRIVERS = SQUANT ACIQ OCS DFQ ZEROQ DSG GDFQ QIMERA CLUSTERQ PSAQVIT QASR ADVKD DFED ZAQ_Z8 ZAQ
PARITY_CMD_SQUANT = squant.py --bits 4 6 8 --dfqbench --quant official_squant squant
PARITY_CMD_ACIQ = aciq.py --dfqbench --quant official_aciq aciq
PARITY_CMD_OCS = ocs.py --dfqbench --quant official_ocs ocs
PARITY_CMD_DFQ = dfq.py --dfqbench --quant official_dfq dfq
PARITY_CMD_ZEROQ = zeroq.py --dfqbench
PARITY_CMD_DSG = dsg.py --dfqbench
PARITY_CMD_GDFQ = gdfq.py --dfqbench --resume
PARITY_CMD_QIMERA = gdfq.py --method qimera --seeds 0 1 2 --dfqbench --resume
PARITY_CMD_CLUSTERQ = clusterq.py --dfqbench --resume
PARITY_CMD_PSAQVIT = psaqvit.py --modes 0 1 --bits w4a8 w8a8 w4a4 --seeds 0 1 2 --dfqbench --resume
PARITY_CMD_QASR = qasr.py --bits w6a6 w4a4 --seeds 0 1 2 --dfqbench --resume
PARITY_CMD_ADVKD = advkd.py --schedule cpu --seeds 0 1 2 --dfqbench --resume
PARITY_CMD_DFED = dfed.py --schedule cpu --seeds 0 1 2 --dfqbench --resume
# ZAQ: the committed cells are --alpha 0 (no SCRM, as zaq.yaml), the Z8 placement ablation first (the plain
# cell's row quotes it); the same clone runs both
OFFICIAL_ZAQ_Z8 ?= $(OFFICIAL_ZAQ)
PARITY_CMD_ZAQ_Z8 = zaq.py --schedule cpu --seeds 0 1 2 --alpha 0 --relu-per-use --dfqbench --dfqbench-in-sweeps --resume
PARITY_CMD_ZAQ = zaq.py --schedule cpu --seeds 0 1 2 --alpha 0 --dfqbench --dfqbench-in-sweeps --resume
parity: setup  ## official code beside dfqbench -> results/parity/, results/parity.csv (OFFICIAL_SQUANT=clone OFFICIAL_ACIQ=clone OFFICIAL_OCS= OFFICIAL_DFQ= OFFICIAL_ZEROQ= OFFICIAL_DSG= OFFICIAL_GDFQ= OFFICIAL_CLUSTERQ= OFFICIAL_PSAQVIT=)
	@test -n "$(strip $(foreach d,$(PARITY_DRIVERS),$(OFFICIAL_$(d))))" || { echo "make parity: set at least one of $(foreach d,$(PARITY_DRIVERS),OFFICIAL_$(d)=<clone>) (the repositories: results/parity/README.md)" >&2; exit 2; }
	$(foreach d,$(PARITY_DRIVERS),$(if $(OFFICIAL_$(d)),$(PY) scripts/parity/$(word 1,$(PARITY_CMD_$(d))) --official $(OFFICIAL_$(d)) $(wordlist 2,99,$(PARITY_CMD_$(d))) $(PARITY_ARGS) &&)) true

clean:
	rm -rf outputs .cache .pytest_cache
