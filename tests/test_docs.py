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
