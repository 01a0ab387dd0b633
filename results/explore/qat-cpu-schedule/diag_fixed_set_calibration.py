"""Diagnostic (not a benchmark run): how well a fixed synthetic set calibrates GDFQ's EMA activation ranges.

    python results/explore/qat-cpu-schedule/diag_fixed_set_calibration.py INTRAQ_CACHE.pt HAST_CACHE.pt

Loads two cached synthetic sets (.cache/dfqbench/calib/<source>-<key>.pt), prints their pixel statistics and the
W4A4 (gdfq) student's top-1 on 1,000 test images after 60 EMA-calibration batches of 64 augmented images.
"""
import sys, torch
sys.path.insert(0, 'tests')
torch.set_num_threads(1)
from test_dsg import _teacher
from dfqbench.quant import quantize_model, Convention
from dfqbench.train.ema import EMARangeObserver
from dfqbench.synth.augment import crop_flip
from omegaconf import OmegaConf
import glob
t = _teacher('../shared/models/resnet20_cifar10.pt')
conv = Convention.from_dict(OmegaConf.to_container(OmegaConf.load('conf/quant/gdfq.yaml')))
# test slice
from torchvision import datasets, transforms
ds = datasets.ImageFolder('../shared/data/cifar10-jpeg/test', transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.4914,0.4822,0.4465],[0.247,0.2435,0.2616])]))
idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:1000]
X = torch.stack([ds[i][0] for i in idx]); Y = torch.tensor([ds[i][1] for i in idx])
def acc(m):
    with torch.inference_mode(): return (m(X).argmax(1)==Y).float().mean().item()*100
print('fp32', acc(t))
for name in ['intraq','hast']:
    imgs = torch.cat(torch.load(sys.argv[1 if name == 'intraq' else 2]))
    with torch.no_grad():
        p = torch.softmax(t(imgs),1)
    print(name, 'img std', imgs.std().item(), 'absmax', imgs.abs().max().item(), 'teacher maxprob', p.max(1).values.mean().item())
    s = quantize_model(t, conv, 4, 4)
    obs = EMARangeObserver(s, 0.9, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(60):
            b = imgs[torch.randint(len(imgs),(64,),generator=g)]
            s(crop_flip(b, g))
    obs.close()
    print(name, 'calibrated W4A4 acc', acc(s))
