"""The Q-ASR parity driver (scripts/parity/qasr.py) without the official clone: its run-time patches on a fake
distill_data.py written here (the interface of Q-ASR's get_synthetic_data: a NeMo encoder returning (out, length,
scaling factor), conv hooks reading conv_output[0], a 32-worker noise loader, ReduceLROnPlateau(verbose=True),
.cuda() calls, a `_kl_loss` call with only `kl_loss` defined), run on the stand-in teacher: the patched official
loop must compute dfqbench's loss on the same images and, from the same initial tensor, the same trajectory."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dfqbench.archs import ARCHS
from dfqbench.synth.bn_kl import QASRSettings

pytestmark = pytest.mark.usefixtures("one_thread")

DRIVER = Path(__file__).resolve().parents[1] / "scripts" / "parity" / "qasr.py"

# A stand-in for the official file, written for this test (not Q-ASR's text): the same interface and arithmetic.
FAKE_DISTILL = '''
import torch
import torch.nn as nn
import torch.optim as optim
from torch.utils.data import Dataset, DataLoader
import nemo.utils.logging


class Noise(Dataset):
    def __init__(self, n, size):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.rand(self.size) * 0.6 - 0.3


class OutputHook(object):
    def __init__(self):
        super(OutputHook, self).__init__()
        self.outputs = None

    def hook(self, module, input, output):
        self.outputs = output

    def clear(self):
        self.outputs = None


def kl_loss(m_bn, s_bn, m, s):
    return (torch.log(s / s_bn) - 0.5 * (1 - (s_bn ** 2 + (m_bn - m) ** 2) / s ** 2)).mean()


def get_synthetic_data(teacher_model, teacher_model_decoder, batch_size, dim, seqlen, train_iter=500,
                       num_batch=1, lr=0.01):
    loader = DataLoader(Noise(1000, (dim, seqlen)), batch_size=batch_size, shuffle=False, num_workers=32)
    eps = 1e-6
    teacher_model = teacher_model.cuda().eval()
    hooks, handles, stats = [], [], []
    for conv, bn in teacher_model.convs_before_bn:
        h = OutputHook()
        hooks.append(h)
        handles.append(conv.register_forward_hook(h.hook))
        stats.append((bn.running_mean.detach().clone().cuda(),
                      torch.sqrt(bn.running_var + eps).detach().clone().cuda()))
    out = []
    for i, x in enumerate(loader):
        if i == num_batch:
            break
        x = x.cuda()
        x.requires_grad = True
        opt = optim.Adam([x], lr=lr)
        sched = optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=1e-4, verbose=True, patience=25)
        for it in range(train_iter):
            teacher_model.zero_grad()
            opt.zero_grad()
            enc, enc_len, sf = teacher_model(x, torch.tensor([seqlen] * batch_size).cuda())
            teacher_model_decoder(encoder_output=enc, encoder_output_scaling_factor=sf)
            loss = 0
            for (m_bn, s_bn), h in zip(stats, hooks):
                y = h.outputs[0]
                var = torch.var(y + eps, dim=(0, 2))
                loss += _kl_loss(m_bn, s_bn, torch.mean(y, dim=(0, 2)), torch.sqrt(var + eps))
            loss.backward()
            opt.step()
            sched.step(loss.item())
        out.append(x.detach().clone())
    for h in handles:
        h.remove()
    return out
'''

FAKE_SYNTHESIZE = '''
parser.add_argument("--num_batch", type=int, default=50, help="n")
parser.add_argument("--batch_size", type=int, default=8, help="b")
parser.add_argument("--seqlen", type=int, default=500, help="t")
parser.add_argument("--train_iter", type=int, default=200, help="i")
parser.add_argument("--lr", type=float, default=0.01, help="lr")
synthetic_data = get_synthetic_data(teacher_model.encoder, teacher_model.decoder, batch_size=args.batch_size,
        dim=64, seqlen=args.seqlen, num_batch=args.num_batch, train_iter=args.train_iter, lr=args.lr)
'''


@pytest.fixture(scope="module")
def driver():
    spec = importlib.util.spec_from_file_location("parity_qasr_driver", DRIVER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def clone(tmp_path):
    path = tmp_path / "Q-ASR" / "nemo" / "quantization" / "utils" / "distill_data.py"
    path.parent.mkdir(parents=True)
    path.write_text(FAKE_DISTILL)
    synth = tmp_path / "Q-ASR" / "examples" / "asr" / "quantization" / "synthesize.py"
    synth.parent.mkdir(parents=True)
    synth.write_text(FAKE_SYNTHESIZE)
    return tmp_path / "Q-ASR"


def _stand_in():
    torch.manual_seed(0)
    model = ARCHS["seq_conv1d_cifar10"]().eval()
    with torch.no_grad():  # BN statistics away from (0, 1), so that the loss has something to match
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features) * 0.5 + 0.05)
    return model


def test_bits_and_the_stand_in_sequence_shape(driver):
    assert driver.parse_bits("w6a6") == (6, 6) and driver.parse_bits("W4A8") == (4, 8)
    with pytest.raises(Exception, match="w<W>a<A>"):
        driver.parse_bits("6/6")
    assert driver.sequence_shape((3, 32, 32)) == (96, 32)
    x = torch.randn(2, 3, 32, 32)
    seq = x.reshape(2, *driver.sequence_shape((3, 32, 32)))
    assert torch.equal(ARCHS["seq_conv1d_cifar10"]().sequence(x), seq)  # Q1's reshape is the teacher's own


def test_conv_bn_pairs_are_the_convs_feeding_each_bn(driver):
    model = _stand_in()
    pairs = driver.conv_bn_pairs(model, (3, 32, 32))
    assert len(pairs) == 5 and model.training is False
    assert [bn for _, bn in pairs] == [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert all(isinstance(c, nn.Conv1d) and c.out_channels == bn.num_features for c, bn in pairs)
    bad = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.BatchNorm1d(8))  # a BN not fed by its conv
    with pytest.raises(ValueError, match="not fed by a Conv1d"):
        driver.conv_bn_pairs(bad, (4, 16))


def test_constants_read_from_the_official_text(driver):
    c = driver.official_constants(FAKE_DISTILL)
    assert c["init_low_high"] == pytest.approx([-0.3, 0.3]) and c["patience"] == 25
    assert c["min_lr"] == pytest.approx(1e-4) and c["eps"] == pytest.approx(1e-6) and c["default_lr"] == 0.01
    assert c["unbiased_var"] is True
    d = driver.synthesize_defaults(FAKE_SYNTHESIZE)
    assert d == {"num_batch": 50, "batch_size": 8, "seqlen": 500, "train_iter": 200, "lr": 0.01, "dim": 64}
    check = driver.settings_check(c, d, QASRSettings())
    assert all(same for _, _, same in check.values()), check
    older = driver.official_constants(FAKE_DISTILL.replace("* 0.6 - 0.3", "* 0.2 - 0.1"))
    assert driver.settings_check(older, d, QASRSettings())["init_range"][2] is False


def test_patched_official_loop_is_dfqbench_synthesis(driver, clone, monkeypatch):
    for cls in (torch.Tensor, nn.Module):  # Q7 replaces .cuda(): restored after the test
        monkeypatch.setattr(cls, "cuda", cls.cuda)
    mod, source, stubs = driver.load_official(clone)
    assert stubs[:1] == ["nemo"] and "nemo.utils.logging" in stubs
    assert not any(k == "nemo" or k.startswith("nemo.") for k in sys.modules)  # the stubs are gone again
    with pytest.raises(TypeError):  # unpatched: torch >= 2.7's ReduceLROnPlateau has no `verbose`
        torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.Adam([torch.zeros(1, requires_grad=True)]),
                                                   verbose=True)
    model = _stand_in()
    official = driver.OfficialSynthesis(mod, source, model, (3, 32, 32))
    labels = [p.split(" ")[0] for p in official.patches]
    assert labels == ["Q1", "Q2", "Q3", "Q4", "Q5", "Q6", "Q7", "Q8"]

    finals, initial, losses, _ = official.run(0, batch_size=2, num_batch=2, train_iter=4, lr=0.01)
    assert [f.shape for f in finals] == [torch.Size([2, 3, 32, 32])] * 2 and len(initial) == 2
    assert all(float(x.abs().max()) <= 0.3 for x in initial) and [len(v) for v in losses] == [4, 4]
    assert not torch.equal(finals[0], initial[0])
    again = official.run(0, batch_size=2, num_batch=2, train_iter=4, lr=0.01)
    other = official.run(1, batch_size=2, num_batch=2, train_iter=4, lr=0.01)
    assert torch.equal(again[1][1], initial[1]) and not torch.equal(other[1][0], initial[0])  # Q5: seeded

    # the same loss on the same images, in both codes (through Q1's reshape and Q3's hook)
    x = torch.randn(2, 3, 32, 32) * 0.5
    assert official.loss_of(x) == pytest.approx(driver.dfqbench_loss(model, x), rel=1e-5)
    assert losses[0][0] == pytest.approx(driver.dfqbench_loss(model, initial[0]), rel=1e-5)

    # and the same trajectory from the same initial tensor
    s = QASRSettings(batch_size=2, num_batches=2, iterations=4, lr=0.01)
    ours, our_losses = driver.dfqbench_from_initial(model, initial, s)
    assert driver.max_rel_diff(losses[0], our_losses[0]) < 1e-4 and losses[0][-1] < losses[0][0]
    torch.testing.assert_close(ours[1], finals[1], atol=1e-5, rtol=1e-4)
    assert all(p.requires_grad for p in model.parameters())  # dfqbench's loop froze the teacher, then restored it
