"""The results model behind `make tables`: reported numbers parsed from the seed document, method / variant
names, and the tables built from a tiny results folder (computed values asserted)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from dfqbench import tables
from dfqbench.results import entries
from dfqbench.reported import load_reported, method_key, parse_seed
from dfqbench.results.names import split_reported, split_run_method
from dfqbench.results.parity import agrees

REPO = Path(__file__).resolve().parents[1]
SEED = REPO.parent / "shared" / "seeds" / "data-free-quantization-papers-and-baselines.md"


def _seed_rows(text: str) -> int:
    body = text.split("# Baselines", 1)[1]
    rows = [l for l in body.splitlines() if l.startswith("| ") and not l.startswith("| Method")]
    return len([r for r in rows if not set(r.replace("|", "").strip()) <= {"-", ":", " "}])


def test_every_seed_baseline_row_is_in_the_reported_file():
    if not SEED.exists():
        pytest.skip("seed document not found")
    text = SEED.read_text()
    parsed = parse_seed(text)
    assert len(parsed) == _seed_rows(text) == 146
    committed = pd.read_csv(REPO / "results" / "reported.csv", keep_default_na=False)
    assert len(committed) == len(parsed)
    row = parsed[(parsed.model == "resnet20_cifar10") & (parsed.method == "qimera") & (parsed.wbit == 4)].iloc[0]
    assert (row.fp32_top1, row.top1, row.dataset) == (93.89, 91.26, "cifar10")
    aciq = parsed[(parsed.method == "aciq") & (parsed.model == "resnet18")].iloc[0]
    assert aciq.mixed_precision and aciq.wbit == 4


def test_method_keys():
    assert [method_key(m) for m in ("GDFQ", "AAC+ABN", "AutoReCon")] == ["gdfq", "aac_abn", "autorecon"]


def test_committed_reported_files_load():
    df = load_reported(REPO / "results")
    assert {"zeroq", "gdfq", "qimera", "dfq"} <= set(df.method)


@pytest.mark.parametrize("name, split", [
    ("qimera_ait", ("qimera", "ait")), ("arc_ait", ("arc", "ait")), ("ait", ("gdfq", "ait")),
    ("crossdomain-other_domain", ("crossdomain", "other_domain")), ("zeroq_recon", ("zeroq", "recon")),
    ("zeroq", ("zeroq", "")), ("fp32", ("fp32", ""))])
def test_run_names_split_into_method_and_variant(name, split):
    assert split_run_method(name) == split


@pytest.mark.parametrize("method, notes, split", [
    ("ait", "GDFQ + AIT", ("gdfq", "ait")), ("ait", "Qimera + AIT", ("qimera", "ait")),
    ("ait", "ARC + AIT", ("arc", "ait")), ("acq", "ACQ + AIT", ("acq", "ait")), ("acq", "", ("acq", "")),
    ("aac_abn", "IntraQ + AAC+ABN", ("intraq", "aac_abn")),
    ("qimera_ait", "Qimera + AIT (AIT's table; the seed lists it as ait)", ("qimera", "ait")),
    ("ocs", "OCS + Best Clip, expand ratio = 0.05", ("ocs", "")), ("autorecon", "", ("arc", "")),
    ("zeroq", "ZeroQ PTQ re-run by AIT", ("zeroq", ""))])
def test_reported_rows_are_filed_under_their_own_method(method, notes, split):
    assert split_reported(method, notes) == split


def test_no_committed_reported_row_is_filed_under_ait_or_autorecon():
    from dfqbench.results.entries import load_reported_rows, reported
    entries = reported(load_reported_rows(REPO / "results"))
    assert not {"ait", "autorecon", "qimera_ait", "arc_ait"} & set(entries.method)
    acq = entries[(entries.model == "resnet20_cifar100") & (entries.method == "acq") & (entries.wbit == 4)]
    assert sorted(zip(acq.variant, acq.top1_mean)) == [("", 65.61), ("ait", 65.93)]


def test_agreement_band():
    nan = float("nan")
    assert agrees(85.3, 85.0, nan, nan)            # within the 0.3 floor
    assert not agrees(85.31, 85.0, 0.0, 0.1)       # 0.31 > max(0.3, 0.2)
    assert agrees(86.0, 85.0, 0.5, 0.2)            # 1.0 <= 2 x 0.5
    assert not agrees(86.0, 85.0, 0.4, 0.2)


# ---- a tiny results folder: 3 zeroq seeds (2 CPU, 1 CUDA), a variant, an FP32 run, a failed run ----

FP32_OURS, FP32_PAPER = 90.5, 93.0  # not the committed teachers' numbers: the tables must read these


def _record(root: Path, name: str, **fields):
    base = {"status": "done", "model": "resnet20_cifar10", "dataset": "cifar10", "method": "zeroq",
            "quant": "gdfq", "wbit": 4, "abit": 4, "seed": 0, "fp32_top1": FP32_OURS, "top1": 80.0,
            "top5": 99.0, "n_test": 10000, "checkpoint_sha256": "abc", "config_hash": name, "device": "cpu",
            "wall_time_s": 10.0, "quantize_time_s": 5.0, "info": {}}
    base.update(fields)
    base["drop"] = round(base["fp32_top1"] - base["top1"], 4)
    path = root / name / "record.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(base))


REPORTED = """model,dataset,table,method,method_label,venue,wbit,abit,mixed_precision,fp32_top1,top1,notes,source
resnet20_cifar10,cifar10,ResNet-20 (CIFAR-10 Classification),zeroq,ZeroQ,CVPR 2020,4,4,False,93.0,80.0,,seed:x.md
resnet20_cifar10,cifar10,ResNet-20 (CIFAR-10 Classification),ait,AIT,CVPR 2022,4,4,False,93.0,91.0,Qimera + AIT,seed:x.md
resnet20_cifar10,cifar10,ResNet-20 (CIFAR-10 Classification),acq,ACQ,arXiv,4,4,False,93.0,90.0,,seed:x.md
resnet20_cifar10,cifar10,ResNet-20 (CIFAR-10 Classification),acq,ACQ,arXiv,4,4,False,93.0,89.0,,seed:x.md
resnet18,imagenet,ResNet-18 (ImageNet Classification),zeroq,ZeroQ,CVPR 2020,4,4,True,70.0,60.0,UNVERIFIED recall,seed:x.md
"""
PARITY = """method,quant,schedule,wbit,abit,n_seeds,official_top1_mean,official_top1_std,dfqbench_top1_mean,\
dfqbench_top1_std,official_s,dfqbench_s,official_repo,official_commit,note,model,dataset
zeroq,gdfq,,4,4,3,81.2,0.2,81.0,1.41,100,10,amirgholami/ZeroQ,0123456789abcdef,,resnet20_cifar10,cifar10
qimera_ait,gdfq,cpu,4,4,1,80.0,,82.0,,300,30,iamkanghyunchoi/ait,fedcba9876543210,lr differs,resnet20_cifar10,cifar10
"""


@pytest.fixture
def built(tmp_path):
    runs, ref, out = tmp_path / "runs", tmp_path / "ref", tmp_path / "out"
    _record(runs, "fp32", method="fp32", wbit=32, abit=32, top1=FP32_OURS)
    _record(runs, "z0", seed=0, top1=80.0)
    _record(runs, "z1", seed=1, top1=82.0)
    _record(runs, "z2", seed=2, top1=84.0, device="cuda", wall_time_s=2.0)
    _record(runs, "qa0", method="qimera_ait", seed=0, top1=86.0, info={"schedule": "cpu"})
    _record(runs, "failed", seed=3, top1=10.0, status="failed")
    ref.mkdir()
    (ref / "reported.csv").write_text(REPORTED)
    (ref / "parity.csv").write_text(PARITY)
    tables.main([str(runs), "--results", str(out), "--reported", str(ref)])
    return out


def _md_tables(md: str, heading: str) -> list[dict]:
    """The rows of the first markdown table at or after the line starting with `heading`, as dicts."""
    lines = md.split("\n")
    start = next(i for i, l in enumerate(lines) if l.startswith(heading))
    block = []
    for line in lines[start:]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            break
    cells = [[c.strip() for c in l.strip("|").split("|")] for l in block]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def test_summary_keeps_devices_variants_and_schedules_apart(built):
    s = pd.read_csv(built / "summary.csv", keep_default_na=False)
    got = {(r.method, r.variant, r.config, r.schedule, r.device): (r.n_seeds, r.top1_mean, r.top1_std, r.drop_mean)
           for r in s.itertuples()}  # top1_std: "" where one seed gives no std
    assert got[("zeroq", "", "zeroq", "", "cpu")] == (2, 81.0, "1.4142", 9.5)
    assert got[("zeroq", "", "zeroq", "", "cuda")] == (1, 84.0, "", 6.5)
    assert got[("qimera", "ait", "qimera_ait", "cpu", "cpu")] == (1, 86.0, "", 4.5)
    assert set(s.source) == {"reproduced"} and len(s) == 4  # fp32, zeroq cpu, zeroq cuda, qimera + ait
    assert len(pd.read_csv(built / "runs.csv")) == 5  # the failed run is left out


def test_baselines_rows_say_source_seeds_and_device(built):
    md = (built / "baselines.md").read_text()
    ptq = _md_tables(md, "### Reproduced: convention `gdfq`, post-training")
    rows = {(r["Method"], r["Device"]): r for r in ptq}
    assert set(rows) == {("fp32", "cpu"), ("zeroq", "cpu"), ("zeroq", "cuda")}
    cpu = rows[("zeroq", "cpu")]
    assert (cpu["Source"], cpu["Seeds"], cpu["FP32"], cpu["Top-1"], cpu["Drop"], cpu["W"], cpu["A"]) == \
        ("reproduced", "2", "90.50", "81.00 ± 1.41", "9.50 ± 1.41", "4", "4")
    assert cpu["Records"] == "[z0](../runs/z0/record.json) [z1](../runs/z1/record.json)"
    assert (rows[("zeroq", "cuda")]["Top-1"], rows[("zeroq", "cuda")]["Seeds"]) == ("84.00", "1")
    trained = _md_tables(md, "### Reproduced: convention `gdfq`, schedule `cpu`")
    assert [(r["Method"], r["Variant"], r["Top-1"]) for r in trained] == [("qimera", "ait", "86.00")]
    # the cpu schedule's tables say what budget they are, in both pages; a post-training table has no such line
    for page in (md, (built / "README.md").read_text()):
        after = page.split("schedule `cpu`", 1)[1].split("|", 1)[0]
        assert "Schedule `cpu`: a smoke budget: 600 iterations" in after
    assert "Schedule `" not in md.split("### Reproduced: convention `gdfq`, post-training", 1)[1].split("|", 1)[0]


def test_reported_rows_keep_their_notes_and_stay_apart(built):
    md = (built / "baselines.md").read_text()
    section = md[md.index("`resnet20_cifar10` / `cifar10`"):]
    papers = _md_tables(section, "### Reported by the papers")
    got = [(r["Source"], r["Method"], r["Variant"], r["Top-1"], r["Device"], r["Seeds"]) for r in papers]
    assert got == [("reported", "acq", "", "90.00", "not stated", "not stated"),  # in the CSV's order
                   ("reported", "acq", "", "89.00", "not stated", "not stated"),
                   ("reported", "qimera", "ait", "91.00", "not stated", "not stated"),
                   ("reported", "zeroq", "", "80.00", "not stated", "not stated")]
    assert papers[2]["Notes"] == "Qimera + AIT" and papers[2]["Row"] == "reported.csv:3"
    assert papers[0]["Notes"].startswith("one of 2 rows this paper gives for this cell with no note")
    # no paper number in a reproduced table, no variant under `ait`
    for table in re.findall(r"### Reproduced[^\n]*\n\n((?:\|[^\n]*\n)+)", md):
        assert "reported" not in table
    assert not re.search(r"^\| (reported \| )?ait ", md, re.M)  # no row's Method is `ait`
    beside = _md_tables(md, "## Our drops beside the papers")
    zeroq = [r for r in beside if r["Method"] == "zeroq"]
    assert [(r["Paper's notes"], r["Paper's drop (their teacher)"]) for r in zeroq] == [
        ("", "resnet20_cifar10 13.00"), ("mixed precision; UNVERIFIED recall", "resnet18 10.00")]
    assert zeroq[0]["Our drop (convention [schedule] on device: mean ± std, seeds)"] == \
        "gdfq on cpu: 9.50 ± 1.41 (2 seeds); gdfq on cuda: 6.50 (1 seed)"


def test_fp32_comes_from_the_data(built):
    md = (built / "baselines.md").read_text()
    teachers = {r["Teacher"]: r for r in _md_tables(md, "| Teacher")}
    assert teachers["resnet20_cifar10"]["FP32 top-1, our teacher (records)"] == "90.50"
    assert teachers["resnet20_cifar10"]["FP32 top-1, the papers' teachers (reported rows)"] == "93.00"
    assert teachers["resnet18"]["FP32 top-1, our teacher (records)"] == "no runs"
    for constant in ("87.66", "93.89", "94.03"):
        assert constant not in md
    for path in [REPO / "src/dfqbench/tables.py", REPO / "src/dfqbench/plots.py",
                 *(REPO / "src/dfqbench/results").glob("*.py")]:
        assert not re.search(r"\b[5-9]\d\.\d\d\b", path.read_text()), f"an accuracy constant in {path.name}"


def test_official_rows_and_parity_page(built):
    parity = {r["Method"]: r for r in _md_tables((built / "parity.md").read_text(), "| Method")}
    assert parity["zeroq"]["Agrees"] == "yes"  # |81.0 - 81.2| <= max(0.3, 2 x 1.41)
    assert parity["qimera + ait"]["Agrees"] == f"no: gap +2.00 (note {parity['qimera + ait']['Row']})"
    notes = (built / "parity.md").read_text().split("## Notes of the rows that do not agree", 1)[1]
    assert f"- **{parity['qimera + ait']['Row']}** (qimera + ait, gdfq, W4A4): lr differs" in notes
    assert "zeroq" not in notes  # an agreeing row's note stays in the CSV
    assert parity["zeroq"]["Official top-1"] == "81.20 ± 0.20" and parity["zeroq"]["Seeds"] == "3"
    md = (built / "baselines.md").read_text()
    official = _md_tables(md, "### Official code run here")
    assert [(r["Source"], r["Method"], r["Variant"], r["Top-1"], r["Code"]) for r in official] == [
        ("official", "qimera", "ait", "80.00", "iamkanghyunchoi/ait@fedcba9876"),
        ("official", "zeroq", "", "81.20 ± 0.20", "amirgholami/ZeroQ@0123456789")]


def test_leaderboard_bolds_the_best_of_each_column(built):
    readme = (built / "README.md").read_text()
    grid = _md_tables(readme, "### Convention `gdfq`, post-training")
    assert [(r["Method"], r["Device"], r["W4A4"]) for r in grid] == [
        ("zeroq", "cpu", "81.00 ± 1.41 (2)"), ("zeroq", "cuda", "**84.00 (1)**")]
    assert "](plots/resnet20_cifar10-cifar10.png)" in readme
    assert "](plots/resnet20_cifar10-cifar10-time.png)" in readme
    assert (built / "plots" / "resnet20_cifar10-cifar10-time.png").exists()


def test_a_deterministic_methods_cell_says_det_and_shows_no_std(tmp_path):
    """A method that takes no seed (record `stochastic` false) is one run for every seed: '(det.)', no ± 0.00, even
    where seeds 0-2 were run; a seeded method's one run stays '(1)'; a record without the key counts as seeded."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    for seed in range(3):
        _record(runs, f"rtn{seed}", method="rtn", seed=seed, top1=84.0, stochastic=False)
    _record(runs, "sq0", method="squant", top1=86.0, stochastic=False)
    _record(runs, "z0", seed=0, top1=80.0, stochastic=True)
    _record(runs, "dsg0", method="dsg", seed=0, top1=81.0)  # an old record, no `stochastic`
    tables.main([str(runs), "--results", str(out), "--reported", str(tmp_path / "none")])
    grid = {r["Method"]: r["W4A4"] for r in _md_tables((out / "README.md").read_text(), "### Convention `gdfq`")}
    assert grid == {"dsg": "81.00 (1)", "rtn": "84.00 (det.)", "squant": "**86.00 (det.)**", "zeroq": "80.00 (1)"}
    md = (out / "baselines.md").read_text()
    rows = {r["Method"]: r for r in _md_tables(md, "### Reproduced: convention `gdfq`, post-training")}
    assert (rows["rtn"]["Seeds"], rows["rtn"]["Top-1"], rows["rtn"]["Drop"]) == ("det.", "84.00", "6.50")
    assert (rows["zeroq"]["Seeds"], rows["dsg"]["Seeds"]) == ("1", "1")
    s = pd.read_csv(out / "summary.csv").set_index("method")
    assert s.deterministic.to_dict() == {"dsg": False, "rtn": True, "squant": True, "zeroq": False}
    assert s.n_seeds["rtn"] == 3


def test_each_teacher_opens_with_its_headline_cell_ranked_per_family_with_the_official_number(built):
    readme = (built / "README.md").read_text()
    section = readme.split("`resnet20_cifar10` / `cifar10`", 1)[1]
    assert section.index("**Post-training, W4A4") < section.index("**Training, W4A4") < section.index("![")
    ptq = _md_tables(section, "**Post-training, W4A4, convention `gdfq`, no training**: the best 2 of 2.")
    # ranked by top-1; the parity row (no device named) stands beside both devices' rows of its cell
    assert [(r["#"], r["Method"], r["Device"], r["Top-1"], r["Seeds"], r["Official code, run here"]) for r in ptq] == [
        ("1", "zeroq", "cuda", "84.00", "1", "81.20 ± 0.20 (agrees)"),
        ("2", "zeroq", "cpu", "81.00 ± 1.41", "2", "81.20 ± 0.20 (agrees)")]
    trained = _md_tables(section, "**Training, W4A4, convention `gdfq`, schedule `cpu`**")
    assert [(r["Method"], r["Official code, run here"]) for r in trained] == [
        ("qimera + ait", "80.00 (gap +2.00, see parity.md)")]


def test_headline_bits_are_the_pair_below_8_bits_most_methods_ran():
    from dfqbench.results.glance import headline_bits
    rows = pd.DataFrame({"method": ["a", "b", "c", "a", "b", "a", "b"], "variant": [""] * 7,
                         "wbit": [8, 8, 8, 4, 4, 3, 3], "abit": [8, 8, 8, 4, 4, 3, 3]})
    assert headline_bits(rows) == (3, 3)  # W8A8 left out; W4A4 and W3A3 tie at two methods: the fewer bits
    assert headline_bits(rows.iloc[:5]) == (4, 4)
    assert headline_bits(rows.iloc[:3]) is None
    parity = pd.DataFrame({"wbit": [4], "abit": [4]})  # a tie goes to the pair the official code was run at
    assert headline_bits(rows, parity) == (4, 4)


def test_results_dir_of_ones_own_gets_the_paper_tables(tmp_path):
    """`make tables RESULTS=dir`: records from dir, the papers' numbers from results/."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    out = subprocess.run(["make", "-n", "tables", f"RESULTS={tmp_path}"], cwd=REPO, capture_output=True, text=True)
    assert f"-m dfqbench.tables {tmp_path} --results {tmp_path} --reported results" in out.stdout
    _record(tmp_path, "mine", top1=85.0)
    tables.main([str(tmp_path), "--results", str(tmp_path), "--reported", str(REPO / "results")])
    md = (tmp_path / "baselines.md").read_text()
    papers = _md_tables(md[md.index("`resnet20_cifar10` / `cifar10`"):], "### Reported by the papers")
    assert any(r["Method"] == "qimera" and r["Variant"] == "ait" for r in papers)


def test_superseded_records_are_left_out_of_the_tables(tmp_path):
    from dfqbench.results.entries import collect_runs
    _record(tmp_path, "kept", top1=81.0)
    _record(tmp_path / "superseded" / "2026-12-03", "old", top1=42.0)
    runs = collect_runs([tmp_path])
    assert runs["top1"].tolist() == [81.0]


def test_a_reconstruction_says_so_beside_its_name_in_every_table(tmp_path):
    """A method built from an abstract (yaml `source.fidelity: reconstruction`) is never shown as a
    reproduction: baselines.md and the README grid name it."""
    _record(tmp_path, "g0", method="gznq", top1=70.0, fidelity="reconstruction")
    _record(tmp_path, "p0", method="pnmq-cr8", wbit=8, abit=32, top1=86.0, info={"mixed_precision": True})
    _record(tmp_path, "z0", top1=80.0)  # an old record without the field: a reproduction
    out = tmp_path / "out"
    tables.main([str(tmp_path), "--results", str(out), "--reported", str(tmp_path / "none")])
    rows = _md_tables((out / "baselines.md").read_text(), "### Reproduced: convention `gdfq`, post-training")
    assert sorted(r["Method"] for r in rows) == [
        "gznq (reconstruction from the abstract, not a reproduction)", "pnmq", "zeroq"]
    assert {r["Method"]: r["W"] for r in rows}["pnmq"] == "<=8 (MP)"  # mixed precision: wbit is the largest
    grid = _md_tables((out / "README.md").read_text(), "### Convention `gdfq`, post-training")
    assert sorted(r["Method"] for r in grid) == [
        "gznq (reconstruction from the abstract, not a reproduction)", "pnmq-cr8", "zeroq"]
    assert any(r.get("W8A32", "").endswith("(MP)") for r in grid)


@pytest.mark.parametrize("source, message", [
    ("x", "must be a mapping"),
    ({"paper": "p", "code": "none", "fidelity": "guess", "inferred": []}, "fidelity='guess' is not valid"),
    ({"paper": "p", "code": "none", "fidelity": "reconstruction"}, "missing keys ['inferred']"),
    ({"paper": "p", "code": "none", "fidelity": "reconstruction", "inferred": [], "url": 1}, "unknown keys ['url']"),
])
def test_bad_method_source_block_is_a_one_line_error(source, message):
    from dfqbench.methods.base import Method
    with pytest.raises(ValueError, match=re.escape(message)):
        Method("m", source=source)
    assert Method("m", source={"paper": "p", "code": "none", "fidelity": "reconstruction",
                               "inferred": ["lr"]}).fidelity == "reconstruction"
    assert Method("m").fidelity == "reproduction"


def test_diverged_runs_are_listed_under_the_tables(tmp_path):
    """A failed record of a diverged training is a result (listed, with where it diverged); a run that failed for
    another reason, and a diverged one under superseded/, are not."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    _record(runs, "z0", seed=0, top1=80.0)
    cfg = {"schedule": {"name": "cpu"}}
    _record(runs, "iq1", method="intraq", seed=1, status="failed", config=cfg,
            error="TrainingDiverged: training diverged: student loss term 'kd' is nan at epoch 8/10, iteration "
                  "35/60; the last good checkpoint is kept: /x/checkpoint.pt")
    _record(runs, "iq2", method="intraq", seed=2, status="failed", config=cfg, error="ValueError: bad")
    _record(runs, "superseded/iq0", method="intraq", seed=0, status="failed", config=cfg,
            error="TrainingDiverged: training diverged: generator loss term 'ce' is inf at epoch 1/10, iteration 1/60")
    diverged = entries.collect_diverged([runs])
    assert diverged[["method", "seed", "schedule"]].values.tolist() == [["intraq", 1, "cpu"]]
    tables.main([str(runs), "--results", str(out), "--reported", str(tmp_path / "none")])
    text = (out / "baselines.md").read_text()
    section = text.split("## Runs whose training diverged", 1)[1]
    row = next(line for line in section.splitlines() if "| intraq" in line)
    assert "student loss term 'kd' is nan at epoch 8/10, iteration 35/60 |" in row
    assert "checkpoint" not in row and "[record](../runs/iq1/record.json)" in row
    assert "ValueError" not in text and "epoch 1/10" not in text


def test_no_diverged_section_without_diverged_runs(built):
    assert "## Runs whose training diverged" not in (built / "baselines.md").read_text()


def test_parity_row_whose_dfqbench_seeds_diverged(tmp_path):
    """parity.csv's optional dfqbench_diverged: every seed diverged -> no top-1, the verdict says so with the
    note; some diverged -> the mean of the others and how many more diverged."""
    ref = tmp_path / "ref"
    ref.mkdir()
    header = PARITY.splitlines()[0].rstrip() + ",dfqbench_diverged"
    (ref / "parity.csv").write_text("\n".join([
        header,
        "intraq,gdfq,cpu,4,4,3,9.97,0.06,,,198,,zysxmu/IntraQ,5228f76,official collapses too,resnet20_cifar10,"
        "cifar10,3",
        "hast,gdfq,cpu,4,4,3,85.61,0.35,86.0,0.3,427,722,lihuantong/HAST,83dfc16,,resnet20_cifar10,cifar10,1",
        "gdfq,gdfq,cpu,4,4,3,83.57,0.62,83.93,0.45,1,1,xushoukai/GDFQ,0123,,resnet20_cifar10,cifar10,"]) + "\n")
    _record(tmp_path / "runs", "z0")
    tables.main([str(tmp_path / "runs"), "--results", str(tmp_path / "out"), "--reported", str(ref)])
    rows = {line.split("|")[1].strip(): line for line in (tmp_path / "out" / "parity.md").read_text().splitlines()
            if line.startswith("| ") and "Method" not in line}
    assert re.search(r"\| diverged \(3 seeds\) +\|", rows["intraq"])
    assert "dfqbench diverged in every seed (note parity.csv:" in rows["intraq"]
    assert "official collapses too" not in rows["intraq"]
    notes = (tmp_path / "out" / "parity.md").read_text().split("## Notes of the rows that do not agree", 1)[1]
    assert "(intraq, gdfq, W4A4): official collapses too" in notes and "hast" not in notes
    assert "86.00 ± 0.30, 1 more diverged" in rows["hast"] and "| yes " in rows["hast"]
    assert "diverged" not in rows["gdfq"]


def test_a_cell_whose_seeds_ran_different_settings_is_listed_with_the_keys(tmp_path):
    from dfqbench.results.entries import collect_runs, mixed_settings

    def config(seed, iterations, out):
        return {"seed": seed, "method": {"name": "zeroq", "iterations": iterations}, "paths": {"output_dir": out}}
    _record(tmp_path / "runs", "z0", seed=0, top1=80.0, config=config(0, 500, "a"))
    _record(tmp_path / "runs", "z1", seed=1, top1=81.0, config=config(1, 500, "b"))  # paths: not a setting
    _record(tmp_path / "runs", "z2", seed=2, top1=70.0, config=config(2, 100, "a"))  # a variant, same name
    mixed = mixed_settings(collect_runs([tmp_path / "runs"]))
    assert len(mixed) == 1 and mixed.iloc[0]["keys"] == ["method.iterations"]
    assert len(mixed.iloc[0]["records"]) == 3
    (tmp_path / "runs" / "z2").rename(tmp_path / "z2-elsewhere")
    assert mixed_settings(collect_runs([tmp_path / "runs"])).empty  # seeds and paths differ only
    (tmp_path / "z2-elsewhere").rename(tmp_path / "runs" / "z2")
    out = tmp_path / "out"
    tables.main([str(tmp_path / "runs"), "--results", str(out), "--reported", str(tmp_path / "none")])
    rows = _md_tables((out / "baselines.md").read_text(), "## Cells whose seeds ran with different settings")
    assert [(r["Method"], r["Records"], r["Settings that differ"]) for r in rows] == \
        [("zeroq", "3", "`method.iterations`")]


def test_every_schedule_short_of_a_papers_budget_is_labelled_under_its_tables():
    """A table of a schedule that is not a paper's (`paper*.yaml`) says what its budget is: a newcomer must not
    read a smoke or probe budget as a baseline. A schedule added without a note fails here."""
    from dfqbench.results.names import SCHEDULE_NOTES, schedule_note

    names = {p.stem for p in (REPO / "conf" / "schedule").glob("*.yaml")}
    probes = {n for n in names if not n.startswith("paper")} | {"paper_first10"}
    assert {"cpu", "cpu_long", "quick", "smoke", "paper_first10"} <= probes
    assert sorted(probes - set(SCHEDULE_NOTES)) == []
    assert schedule_note("cpu_long")[0].startswith("Schedule `cpu_long`: the cpu schedule's warm-up with 6x")
    assert schedule_note("paper") == []


def test_a_gap_that_a_sibling_row_closes_names_it(tmp_path):
    """A row that does not agree names the row of the same cell that does, with one side the same runs: a dfqbench
    preset (OCS) or an ablation of the official code (ZAQ's). Other bits, a row that does not agree either, or
    both sides changed do not count."""
    ref = tmp_path / "ref"
    ref.mkdir()
    cell = "resnet20_cifar10,cifar10"
    (ref / "parity.csv").write_text("\n".join([
        PARITY.splitlines()[0] + PARITY.splitlines()[1],
        f"ocs,official_ocs,,4,4,3,50.15,3.04,52.51,1.98,8,5,cornell-zhang/dnn-quant-ocs,ca3a,,{cell}",
        f"ocs,ocs,,4,4,3,50.15,3.04,84.64,0.0,8,0,cornell-zhang/dnn-quant-ocs,ca3a,preset,{cell}",
        f"ocs,ocs,,5,5,3,60.0,0.1,84.0,0.1,8,0,cornell-zhang/dnn-quant-ocs,ca3a,other bits,{cell}",
        f"zaq-alpha0,gdfq,cpu,4,4,3,58.17,2.07,69.31,2.89,2519,2006,FLHonker/ZAQ-code,e7e9,plain,{cell}",
        f"zaq-alpha0-both,gdfq,cpu,4,4,3,66.0,0.9,67.0,0.5,1,1,FLHonker/ZAQ-code,e7e9,both changed,{cell}",
        f"zaq-alpha0-relu_per_use,gdfq,cpu,4,4,3,66.85,0.93,69.31,2.89,2473,2006,FLHonker/ZAQ-code,e7e9,z8,{cell}",
        f"dfq,dfq,,4,4,3,45.11,0.0,84.72,0.0,3,0,jakc4103/DFQ,6f15,no sibling agrees,{cell}",
        f"dfq,official_dfq,,4,4,3,45.11,0.0,84.83,0.0,3,0,jakc4103/DFQ,6f15,no sibling agrees,{cell}"]) + "\n")
    _record(tmp_path / "runs", "z0")
    tables.main([str(tmp_path / "runs"), "--results", str(tmp_path / "out"), "--reported", str(ref)])
    agrees = [line.split("|")[-4].strip() for line in (tmp_path / "out" / "parity.md").read_text().splitlines()
              if line.startswith("| ") and "Method" not in line and "---" not in line]
    assert agrees[0] == "yes"
    assert agrees[1] == ("no: gap +34.49; closed by ocs official_ocs (dfqbench changed, parity.csv:2: agrees) "
                         "(note parity.csv:3)")
    assert agrees[2] == "no: gap +24.00 (note parity.csv:4)"
    assert agrees[3] == ("no: gap +11.14; closed by zaq-alpha0-relu_per_use gdfq (official code changed, "
                         "parity.csv:7: agrees) (note parity.csv:5)")
    assert agrees[4] == "yes" and agrees[5] == "yes"
    assert agrees[6] == "no: gap +39.61 (note parity.csv:8)"
    glance = ("8 rows over 3 methods: 3 agree within noise, 2 differ with the cause measured (a row of the same cell "
              "that agrees closes the gap), 3 differ with no such row (parity.csv:4, parity.csv:8, parity.csv:9).")
    assert f"**At a glance:** {glance}" in (tmp_path / "out" / "parity.md").read_text()
    assert glance in (tmp_path / "out" / "README.md").read_text()  # the leaderboard's opening says it too


def test_the_teacher_with_the_most_cells_heads_the_pages():
    """results/README.md and baselines.md open with the shared teacher, not the alphabet's first; teachers with
    the papers' numbers only come last."""
    import pandas as pd
    from dfqbench.results.entries import teachers_most_run_first
    rows = [("reproduced", "resnet20_cifar10", "cifar10")] * 3 + [("reproduced", "mobilenetv2_cifar10", "cifar10")] \
        + [("reported", "bn_vgg16", "imagenet"), ("reported", "resnet20_cifar10", "cifar10"),
           ("reproduced", "alexnet_cifar10", "cifar10"), ("reported", "", "")]
    entries = pd.DataFrame(rows, columns=["source", "model", "dataset"])
    assert teachers_most_run_first(entries) == [("resnet20_cifar10", "cifar10"), ("alexnet_cifar10", "cifar10"),
                                                ("mobilenetv2_cifar10", "cifar10"), ("bn_vgg16", "imagenet")]
