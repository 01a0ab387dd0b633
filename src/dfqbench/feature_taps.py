"""Forward hooks that keep intermediate features of the latest forward for the feature loss terms.

Four kinds: "penultimate" (the input of the last nn.Linear, one tensor), "stages" (the output of every stage
of a staged network, a list: pytorchcv's `features.stageN`, torchvision/timm's `layerN`),
"residual_branches" (per residual unit, its branch's output before the identity is added, a list: pytorchcv's
`unitN.body`, torchvision's last BatchNorm of a BasicBlock/Bottleneck; HAST's feature alignment) and
"bn_inputs" (the input of every BatchNorm2d in execution order, a list: the order of the trainer's BN-statistics
recorder; DDAQ's layer-wise discrepancy; a student needs its BatchNorm layers, i.e. a convention without BN folding). The quantized student
is an fx.GraphModule whose forward calls leaf modules directly, so a hook on a stage container never fires
there: a stage's output is then taken from the last node inside the stage (the block's final ReLU in
these ResNets) or the activation quantizer right after it (what the next stage reads), or, for a stage that
ends in a function (a pre-activation ResNet's residual sum), from the input of the module reading it.
"""

from __future__ import annotations

import re
from collections import Counter

import torch
from torch import fx, nn

from .errors import UnsupportedModel
from .precision import as_float32
from .quant.quantizers import ActQuantizer

FEATURE_KINDS = ("penultimate", "stages", "residual_branches", "bn_inputs")
_STAGE = re.compile(r"(^|\.)(stage|layer)\d+$")


class PenultimateTap:
    """Keeps the input of a model's last nn.Linear (its penultimate feature) from the latest forward."""

    def __init__(self, model: nn.Module):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise UnsupportedModel("a feature loss needs a model whose classifier is an nn.Linear")
        self.value = None
        self.handle = linears[-1].register_forward_pre_hook(self._keep)

    def _keep(self, module, inputs):
        self.value = as_float32(inputs[0])

    def close(self) -> None:
        self.handle.remove()


def stage_names(model: nn.Module) -> list[str]:
    names = [name for name, _ in model.named_modules() if _STAGE.search(name)]
    if not names:
        raise UnsupportedModel("a stage-feature loss (e.g. 'scrm') needs a staged model: modules named "
                               "features.stageN (pytorchcv) or layerN (torchvision, timm)")
    return names


def _module_paths(node: fx.Node) -> set[str]:
    """The qualified names of the modules whose forward created `node` (fx's nn_module_stack)."""
    paths = set()
    for key, value in node.meta.get("nn_module_stack", {}).items():
        paths.add(key)
        if isinstance(value, tuple) and value and isinstance(value[0], str):
            paths.add(value[0])
    return paths


def stage_output_points(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Per stage, (module, "output") for a forward hook on the module returning the stage output, or
    (module, "input") for a pre-hook on the module that reads it (a stage ending in a function, e.g. the
    residual sum of a pre-activation ResNet), in stage order."""
    names = stage_names(model)
    if not isinstance(model, fx.GraphModule):
        return [(model.get_submodule(n), "output") for n in names]
    nodes = list(model.graph.nodes)
    calls = Counter(n.target for n in nodes if n.op == "call_module")
    points = []
    for name in names:
        inside = [n for n in nodes if name in _module_paths(n)
                  or (n.op == "call_module" and n.target.startswith(name + "."))]
        if not inside:
            raise UnsupportedModel(f"stage {name} has no node in the traced student")
        last = inside[-1]
        users = list(last.users)
        if len(users) == 1 and users[0].op == "call_module" \
                and isinstance(model.get_submodule(users[0].target), ActQuantizer):
            points.append((model.get_submodule(users[0].target), "output"))  # what the next stage reads
        elif last.op == "call_module":  # called twice (a shared ReLU): the later call is the stage output
            points.append((model.get_submodule(last.target), "output"))
        else:
            reader = next((u for u in users if u.op == "call_module" and u.args and u.args[0] is last
                           and calls[u.target] == 1), None)
            if reader is None:
                raise UnsupportedModel(f"the output of stage {name} is not read by a module: cannot tap it")
            points.append((model.get_submodule(reader.target), "input"))
    return points


class _ListTap:
    """Hooks that keep a list of tensors from the latest forward (`value`); `close` removes the hooks."""

    _values: list
    handles: list

    @property
    def value(self) -> list[torch.Tensor]:
        return list(self._values)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class StageTap(_ListTap):
    """Keeps every stage's output from the latest forward (a module called twice keeps its later output,
    which for a stage's last module is the stage output)."""

    def __init__(self, model: nn.Module):
        points = stage_output_points(model)
        self._values: list[torch.Tensor | None] = [None] * len(points)
        self.handles = [m.register_forward_hook(self._keep_output(i)) if where == "output"
                        else m.register_forward_pre_hook(self._keep_input(i))
                        for i, (m, where) in enumerate(points)]

    def _keep_output(self, i: int):
        def keep(module, inputs, output):
            self._values[i] = output
        return keep

    def _keep_input(self, i: int):
        def keep(module, inputs):
            self._values[i] = inputs[0]
        return keep


def residual_branch_points(model: nn.Module) -> list[nn.Module]:
    """Per residual unit, in forward order, the module whose output is the unit's branch before the identity
    is added. On a float model: pytorchcv's `body` (ResUnit, PreResUnit) or the last BatchNorm child of a
    torchvision/timm BasicBlock/Bottleneck. On a traced student: the module producing the first operand of each
    unit's residual addition (the branch: pytorchcv and torchvision both write `branch + identity`)."""
    if isinstance(model, fx.GraphModule):
        points = []
        for node in model.graph.nodes:
            if node.op == "call_function" and getattr(node.target, "__name__", "") in ("add", "iadd") \
                    and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
                branch = node.args[0]
                if branch.op != "call_module":
                    raise UnsupportedModel(f"the branch of residual addition {node.name} is not a module output")
                points.append(model.get_submodule(branch.target))
    else:
        points = []
        for _, m in model.named_modules():
            if isinstance(getattr(m, "body", None), nn.Module) and type(m).__name__.endswith("Unit"):
                points.append(m.body)
            elif type(m).__name__ in ("BasicBlock", "Bottleneck"):
                bns = [c for c in m.children() if isinstance(c, nn.BatchNorm2d)]
                if bns:
                    points.append(bns[-1])
    if not points:
        raise UnsupportedModel("a residual-branch feature loss (e.g. 'attention_mse') needs a residual network: "
                               "pytorchcv units with a `body`, or torchvision BasicBlock/Bottleneck blocks")
    return points


class ResidualBranchTap(StageTap):
    """Keeps every residual unit's branch output (before the identity is added) from the latest forward; a
    branch returning a tuple (pytorchcv's PreResBlock: output, pre-activation) gives its first element."""

    def __init__(self, model: nn.Module):
        points = residual_branch_points(model)
        self._values = [None] * len(points)
        self.handles = [m.register_forward_hook(self._keep_output(i)) for i, m in enumerate(points)]

    def _keep_output(self, i: int):
        def keep(module, inputs, output):
            self._values[i] = output[0] if isinstance(output, tuple) else output
        return keep


class BNInputTap(_ListTap):
    """Keeps the input of every BatchNorm2d from the latest forward, in execution order (the list restarts at each
    forward of the model, as the trainer's BNRecorder records its statistics)."""

    def __init__(self, model: nn.Module):
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not bns:
            raise UnsupportedModel(f"a BN-input feature loss (e.g. DDAQ's 'layer_discrepancy') needs BatchNorm2d "
                                   f"layers, and {type(model).__name__} has none (a quantized student keeps them "
                                   f"only under a convention with fold_bn: false)")
        self._values: list[torch.Tensor] = []
        self.handles = [model.register_forward_pre_hook(self._restart)]
        self.handles += [bn.register_forward_pre_hook(self._keep) for bn in bns]

    def _restart(self, module, inputs):
        self._values = []

    def _keep(self, module, inputs):
        self._values.append(inputs[0])


class FeatureTap:
    """The taps a run's loss terms need on one model; `value` maps each kind to its latest feature(s)."""

    def __init__(self, model: nn.Module, kinds: set[str] | frozenset[str]):
        unknown = sorted(set(kinds) - set(FEATURE_KINDS))
        if unknown:
            raise ValueError(f"unknown feature kind(s) {unknown}; valid: {list(FEATURE_KINDS)}")
        self.taps = {}
        if "penultimate" in kinds:
            self.taps["penultimate"] = PenultimateTap(model)
        if "stages" in kinds:
            self.taps["stages"] = StageTap(model)
        if "residual_branches" in kinds:
            self.taps["residual_branches"] = ResidualBranchTap(model)
        if "bn_inputs" in kinds:
            self.taps["bn_inputs"] = BNInputTap(model)

    @property
    def value(self) -> dict:
        return {kind: as_float32(tap.value) for kind, tap in self.taps.items()}  # bf16 under autocast

    def close(self) -> None:
        for tap in self.taps.values():
            tap.close()


def detach_features(features: dict | None) -> dict | None:
    if features is None:
        return None
    return {kind: [t.detach() for t in v] if isinstance(v, list) else v.detach() for kind, v in features.items()}
