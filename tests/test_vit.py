"""Vision transformers on ImageNet and in the tables: the timm presets (conf/model/deit_*.yaml, swin_*.yaml) load a
local checkpoint through dfqbench's loader (no download: random weights saved to a temporary file), PSAQ-ViT's
placement (quant=psaqvit) on the real DeiT-T and Swin-T graphs, and the transformer sections of `make tables`."""

import collections
import json
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from omegaconf import OmegaConf

from conftest import compose_cfg
from dfqbench import tables
from dfqbench.models import load_model
from dfqbench.quant import Convention, act_quantizers, quantize_model, weight_quantizers
from dfqbench.quant.transforms.ops import op_kind
from dfqbench.results.names import METHOD_LABELS, TEACHER_TITLES

REPO = Path(__file__).resolve().parents[1]

# preset -> the timm architecture (= the model name records and reported rows use)
PRESETS = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224",
           "deit_base": "deit_base_patch16_224", "swin_tiny": "swin_tiny_patch4_window7_224",
           "swin_small": "swin_small_patch4_window7_224"}


def psaqvit_convention(abit: int = 8) -> Convention:
    data = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(REPO / "conf/quant/psaqvit.yaml"),
                                                  {"abit": abit}), resolve=True)
    data.pop("abit")
    return Convention.from_dict(data)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_imagenet_transformer_presets_name_their_timm_arch(preset):
    cfg = compose_cfg(f"model={preset}", "dataset=imagenet", "method=psaqvit", "quant=psaqvit")
    assert (cfg.model.name, cfg.model.arch, cfg.model.source) == (PRESETS[preset], PRESETS[preset], "timm")
    assert cfg.model.dataset == "imagenet" and cfg.model.num_classes == 1000 and cfg.model.pretrained
    assert cfg.model.checkpoint is None  # <models_dir>/<arch>.pt, else timm's download


@pytest.mark.parametrize("preset", ["deit_tiny", "deit_small", "swin_tiny"])
def test_imagenet_transformer_preset_loads_a_local_checkpoint(tmp_path, preset, one_thread):
    torch.manual_seed(0)
    reference = timm.create_model(PRESETS[preset], pretrained=False, num_classes=1000)
    path = tmp_path / f"{PRESETS[preset]}.pt"
    torch.save(reference.state_dict(), path)
    cfg = compose_cfg(f"model={preset}", "dataset=imagenet", f"model.checkpoint={path}")
    loaded = load_model(cfg.model)
    assert loaded.weights == "checkpoint" and loaded.checkpoint == str(path) and len(loaded.sha256) == 64
    got = loaded.model.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(value, got[key]), key


def _quantized(arch: str):
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=1000).eval()
    return quantize_model(model, psaqvit_convention(), 4, 8)


def test_deit_tiny_gets_psaqvit_placement(one_thread):
    """The official DeiT-T quant model's 10 D + 7 activation and 4 D + 2 weight quantizers, D = 12 blocks."""
    gm = _quantized(PRESETS["deit_tiny"])
    depth = 12
    assert len(act_quantizers(gm)) == 10 * depth + 7 == 127
    assert len(weight_quantizers(gm)) == 4 * depth + 2 == 50
    with torch.no_grad():
        assert gm(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def _site_kinds(gm) -> collections.Counter:
    """How many activation quantizers sit after each op kind (walking back over reshapes and slices)."""
    kinds = collections.Counter()
    for node in gm.graph.nodes:
        if node.op != "call_module" or "act_quant" not in str(node.target):
            continue
        src = node.args[0]
        kind = {"placeholder": "input", "get_attr": "param"}.get(src.op) or op_kind(gm, src)
        while kind is None and src.all_input_nodes:
            src = src.all_input_nodes[0]
            kind = "param" if src.op == "get_attr" else op_kind(gm, src)
        kinds[kind] += 1
    return kinds


def test_swin_tiny_traces_and_quantizes(one_thread):
    """timm's Swin-T traces with torch.fx (the window partitions, shifts and masks are static at 224 px) and
    quant=psaqvit places PSAQ-ViT's swin_quant.py quantizers: 53 weight quantizers (the patch conv, 4 per block x
    12, 3 patch-merging reductions, the head) and 156 activation quantizers, among them the 12 relative-position-
    bias tables (official `qact_table`: a parameter reaching its add through an index and reshapes) and the
    average-pool output (`qact3`), while the shifted-window attention mask (a constant torch.fx bakes in) is added
    in float: 36 sums, not 41."""
    gm = _quantized(PRESETS["swin_tiny"])
    assert len(weight_quantizers(gm)) == 1 + 4 * 12 + 3 + 1 == 53
    assert len(act_quantizers(gm)) == 156
    assert _site_kinds(gm) == {"input": 1, "layer": 41, "add": 36, "norm": 29, "matmul": 24, "activation": 12,
                               "param": 12, "pool": 1}
    with torch.no_grad():
        assert gm(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


# ---- the transformer sections of `make tables` -------------------------------------------------------------------

def _record(root: Path, name: str, **fields):
    base = {"status": "done", "model": "vit_cifar10", "dataset": "cifar10", "method": "psaqvit", "quant": "psaqvit",
            "wbit": 4, "abit": 8, "seed": 0, "fp32_top1": 80.0, "top1": 70.0, "top5": 95.0, "n_test": 10000,
            "checkpoint_sha256": "abc", "config_hash": name, "device": "cpu", "wall_time_s": 10.0,
            "quantize_time_s": 5.0, "info": {}, "fidelity": "reproduction"}
    base.update(fields)
    base["drop"] = round(base["fp32_top1"] - base["top1"], 4)
    path = root / name / "record.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(base))


def test_vit_records_get_the_transformer_title_and_method_labels(tmp_path):
    runs, ref, out = tmp_path / "runs", tmp_path / "ref", tmp_path / "out"
    _record(runs, "p0")
    _record(runs, "g0", method="gaussian_calib", top1=60.0)
    _record(runs, "m0", method="minmax_calib-real", top1=75.0)
    ref.mkdir()  # the committed transformer rows only (every teacher's figures would take 15 s)
    committed = pd.read_csv(REPO / "results" / "reported_extra.csv", keep_default_na=False)
    committed[committed.method.str.startswith("psaqvit")].to_csv(ref / "reported_extra.csv", index=False)
    tables.main([str(runs), "--results", str(out), "--reported", str(ref)])
    title = TEACHER_TITLES[("vit_cifar10", "cifar10")]
    assert title == "ViT (CIFAR-10, transformer teacher trained here)"
    for page in ("baselines.md", "README.md"):
        md = (out / page).read_text()
        heading = f"## {title}: `vit_cifar10` / `cifar10`"
        assert heading in md, page
        section = md[md.index(heading):].split("\n## ", 1)[0]
        legend = next(line for line in section.splitlines() if line.startswith("Methods: "))
        for method in ("gaussian_calib", "minmax_calib", "psaqvit"):
            assert f"`{method}` = {METHOD_LABELS[method]}" in legend, (page, method)
        assert "NOT data-free" in legend and "psaqvit2" not in legend
    md = (out / "baselines.md").read_text()
    assert "### Reproduced: convention `psaqvit`, post-training" in md
    # the papers' transformer rows: a section per ImageNet teacher, apart from the CNNs', PSAQ-ViT V2 labelled
    swin_s = md[md.index("## Swin-S (ImageNet Classification, transformer): `swin_small_patch4_window7_224`"):]
    swin_s = swin_s.split("\n## ", 1)[0]
    assert "`psaqvit2` = " + METHOD_LABELS["psaqvit2"] in swin_s
    assert "| reported | psaqvit2 " in swin_s and "82.13" in swin_s
    for preset in ("deit_tiny", "deit_small", "deit_base", "swin_tiny"):
        assert f"`{PRESETS[preset]}` / `imagenet`" in md


def test_psaqvit_reported_rows_are_the_readme_table():
    from dfqbench.results.entries import load_reported_rows, reported
    entries = reported(load_reported_rows(REPO / "results"))
    psaq = entries[entries.method == "psaqvit"]
    assert set(psaq.model) == set(PRESETS.values()) and set(psaq.dataset) == {"imagenet"}
    assert sorted(zip(psaq.wbit, psaq.abit)) == [(4, 8)] * 5 + [(8, 8)] * 5
    deit_t = psaq[psaq.model == "deit_tiny_patch16_224"].set_index("wbit")
    assert (deit_t.loc[4, "top1_mean"], deit_t.loc[8, "top1_mean"], deit_t.loc[4, "fp32_top1"]) == \
        (65.57, 71.56, 72.21)
    v2 = entries[entries.method == "psaqvit2"]
    assert list(zip(v2.model, v2.wbit, v2.abit, v2.top1_mean)) == [("swin_small_patch4_window7_224", 8, 8, 82.13)]


def test_timm_names_with_a_pretrained_tag_are_valid_architectures():
    import timm

    from dfqbench.errors import ConfigError
    from dfqbench.models import _check_arch

    known = timm.list_models()
    _check_arch("swin_small_patch4_window7_224.ms_in1k", known, "timm")
    with pytest.raises(ConfigError, match="'swin_smol.ms_in1k' is not a timm architecture"):
        _check_arch("swin_smol.ms_in1k", known, "timm")
