"""README and docs: the first screen holds what a newcomer needs, links resolve, and quoted numbers are records'."""

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def test_the_first_screen_holds_set_up_main_job_tests_and_results():
    first = "\n".join((REPO / "README.md").read_text().splitlines()[:60])
    for needle in ("make run", "make test", "results/README.md", "results/baselines.md", "docs/"):
        assert needle in first, needle


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    missing = [target for target, _ in _LINK.findall(page.read_text())
               if "://" not in target and not (page.parent / target).exists()]
    assert not missing, f"{page.name}: {missing}"


def test_the_readme_example_is_a_committed_record():
    text = (REPO / "README.md").read_text()
    folder = re.search(r"`(results/sweeps/[^`]+/)`", text).group(1)
    record = json.loads((REPO / folder / "record.json").read_text())
    shown = re.search(r"FP32 top-1 ([\d.]+)\s+quantized top-1 ([\d.]+)\s+drop ([\d.]+)\s+\(top-5 ([\d.]+)", text)
    assert [float(x) for x in shown.groups()] == [record["fp32_top1"], record["top1"], record["drop"],
                                                    record["top5"]]
    assert f"{record['method']} {record['model']}/{record['dataset']} W{record['wbit']}A{record['abit']} " \
           f"[{record['quant']}] seed {record['seed']}" in text


def test_no_accuracy_is_typed_into_the_docs():
    """Accuracies live in the generated tables (results/); a docs page that quotes one goes stale."""
    quoted = {p.name: re.findall(r"\b\d{2}\.\d{1,2} ± \d+\.\d+", p.read_text()) for p in PAGES}
    assert not any(quoted.values()), quoted


@pytest.mark.parametrize("group", ["method", "model", "dataset", "quant", "schedule", "paths", "experiment", "logger"])
def test_the_config_table_lists_every_option_of_each_group(group):
    """docs/running.md's table of config groups is where a newcomer looks up what `group=` takes: an option added
    to conf/<group>/ without a line there is invisible."""
    row = next(line for line in (REPO / "docs" / "running.md").read_text().splitlines()
               if line.startswith(f"| `{group}` |"))
    listed = set(re.findall(r"`([a-z0-9_]+)`", row.split("|")[2]))
    options = {p.stem for p in (REPO / "conf" / group).glob("*.yaml")}
    assert options - listed == set(), f"conf/{group}/ options missing from docs/running.md: {options - listed}"
    assert listed - options == set(), f"docs/running.md lists {group} options that conf/{group}/ lacks: {listed - options}"


def test_the_readme_quotes_the_committed_sweep_cost_estimate():
    """README's 'How long a table takes' and results/bench/sweep_cost.md (scripts/sweep_cost.py) say the same."""
    readme = (REPO / "README.md").read_text()
    cost = (REPO / "results" / "bench" / "sweep_cost.md").read_text()
    cpu, paper = cost.split("## schedule=paper")
    cells = re.search(r"^(\d+) cells", cpu, re.M).group(1)
    cpu_hours = re.search(r"one 2-core CPU machine, one cell after another \| (\d+) \|", cpu).group(1)
    gpu_hours = re.search(r"one H100, one cell after another \| (\d+) \|", paper).group(1)
    array_hours = re.search(r"SLURM array of 64 H100 jobs at once \| \d+ \| [\d.]+ h \| >= ([\d.]+) h", paper).group(1)
    done, left_cpu, left_gpu = re.search(r"\): (\d+) have a record \(any device\); the \d+ left take about (\d+) h "
                                         r"on the CPU machine or (\d+) h on one H100", cpu).groups()
    said = " ".join(readme.split())
    for phrase in (f"{cells} cells", f"about {cpu_hours} hours", f"about {gpu_hours} H100-hours",
                   f"at least {array_hours} h on a SLURM array of 64 GPUs", f"{done} of the {cells} cells",
                   f"about {left_cpu} h on that machine or {left_gpu} h on one H100"):
        assert phrase in said, phrase


def test_the_sweep_cost_estimate_is_not_older_than_the_records_it_lacks():
    """A method sweep_cost.md estimated from the family's median ('no CPU record') must still have no CPU record on
    the teacher in results/summary.csv: once one is committed, re-run scripts/sweep_cost.py."""
    import pandas as pd
    cost = (REPO / "results" / "bench" / "sweep_cost.md").read_text()
    model = "resnet20_cifar10"
    summary = pd.read_csv(REPO / "results" / "summary.csv", keep_default_na=False)
    runs = summary[(summary.source == "reproduced") & (summary.model == model) & (summary.device == "cpu")
                   & (pd.to_numeric(summary.wall_s, errors="coerce").notna())]
    lacking = set(re.findall(r"^- (\w+): no CPU record", cost, re.M))
    stale = sorted(lacking & set(runs.config))
    assert not stale, f"sweep_cost.md says {stale} have no CPU record; results/summary.csv has one: re-run it"
