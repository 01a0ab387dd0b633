"""Layer-wise data and independent per-layer reconstruction: the stage of the `layerwise` method, a
RECONSTRUCTION of Horton, Jin, Farhadi, Rastegari, "Layer-Wise Data-Free CNN Compression" (ICPR 2022; abstract
only: every choice is listed in conf/method/layerwise.yaml's `source.inferred`).

No image is synthesized. For every conv/linear layer L of a wrapped model whose BatchNorms are folded:

* its *source* is the tensor L's input is computed from through ReLUs, activation quantizers and shape-only ops
  (pooling, flatten): the output of the (BN-folded) layer before it, a residual sum, a concatenation, or the
  image; its one-layer *block* is the chain of nodes from the source to L (`layer_block`);
* its *layer-wise data* are `num_samples` tensors of the source's shape whose elements are independent
  N(mean_c, std_c^2) draws per channel c, (mean, std) the source's BatchNorm-derived statistics
  (`transforms.bn_stats.BNStatistics`: a folded BN's (beta, |gamma|), residual sums add means and variances,
  the image N(0, 1)); the chain then applies the ReLU (and pooling) itself (`layer_data`);
* the block is reconstructed on that data alone (`reconstruct.reconstruct_block`: AdaRound rounding, learned
  weight step, LSQ steps of the block's activation quantizers, QDrop), the target being the float layer's output
  on the same data: each layer is fitted independently of every other (the quantized input is the data itself,
  not the output of the quantized layers before it).
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ...errors import UnsupportedModel
from ..quantizers.learned import float_mode
from ..transforms.bn_stats import BNStatistics, Gaussian
from ..transforms.graph import is_passthrough, layer_nodes, relu_kind
from .blocks import Block
from .reconstruct import ReconstructSettings, model_params_frozen, reconstruct_block


def layer_source(gm: fx.GraphModule, layer: fx.Node) -> fx.Node:
    """The node L's input comes from through ReLUs, activation quantizers and shape-only ops."""
    src = layer.args[0]
    while isinstance(src, fx.Node) and (relu_kind(gm, src) or is_passthrough(gm, src)):
        src = src.args[0]
    if not isinstance(src, fx.Node):
        raise UnsupportedModel(f"layer {layer.name!r}: its input is not a tensor of the graph")
    return src


def layer_block(gm: fx.GraphModule, layer: fx.Node) -> Block:
    """The one-layer block source -> [ReLU, quantizer, pooling, ...] -> L, in graph order."""
    src = layer_source(gm, layer)
    nodes, stack = set(), [layer]
    while stack:
        node = stack.pop()
        if node in nodes:
            continue
        nodes.add(node)
        for arg in node.all_input_nodes:
            if arg is src or arg.op == "get_attr":
                continue
            if arg.op == "placeholder":
                raise UnsupportedModel(f"layer {layer.name!r} reads more than its source {src.name!r}: the layer-wise "
                                       f"data cannot be sampled for it")
            stack.append(arg)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return Block(src, sorted(nodes, key=order.__getitem__), layer.name)


def node_shapes(gm: fx.GraphModule, input_shape) -> dict[fx.Node, tuple[int, ...]]:
    """Each node's output shape (batch of 1) from one float forward."""
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    with torch.no_grad(), float_mode(gm):
        ShapeProp(gm).propagate(torch.zeros((1, *input_shape), device=device))
    return {n: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
            if isinstance(n.meta.get("tensor_meta"), TensorMetadata)}


def sample_gaussian(g: Gaussian, shape: tuple[int, ...], num_samples: int,
                    generator: torch.Generator) -> torch.Tensor:
    """`num_samples` tensors of `shape` (without the batch dim), element (c, ...) ~ N(mean_c, std_c^2)
    independently; per-tensor statistics ([1]) apply to every channel."""
    channels = shape[0] if shape else 1
    if g.mean.numel() not in (1, channels):
        raise UnsupportedModel(f"statistics of {g.mean.numel()} channels for a tensor of shape {list(shape)}")
    view = [1, -1] + [1] * (len(shape) - 1)
    z = torch.randn((num_samples, *shape), generator=generator)
    return g.mean.reshape(view) + g.std.reshape(view) * z


def layer_data(gm: fx.GraphModule, block: Block, stats: BNStatistics, shapes: dict, num_samples: int,
               generator: torch.Generator) -> torch.Tensor:
    """Layer-wise data at the block's source: per-channel Gaussians of its BN-derived statistics."""
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    x = sample_gaussian(stats.of(block.input), shapes[block.input][1:], num_samples, generator).to(device)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def fit_layers(gm: fx.GraphModule, input_shape, num_samples: int, settings: ReconstructSettings, seed: int = 0,
               progress: bool = False) -> list[dict]:
    """Reconstruct every layer of `gm` (from quantize_model, BatchNorm folded) on its own layer-wise data, in
    place; returns per-layer facts."""
    gm.eval()
    stats = BNStatistics(gm)
    shapes = node_shapes(gm, input_shape)
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    sampler = torch.Generator().manual_seed(seed)  # the layer-wise data (drawn on the CPU)
    generator = torch.Generator(device=device).manual_seed(seed)  # batches, QDrop masks (as `reconstruct`)
    report = []
    with model_params_frozen(gm):
        layers = layer_nodes(gm)
        for k, layer in enumerate(layers):
            block = layer_block(gm, layer)
            x = layer_data(gm, block, stats, shapes, num_samples, sampler)
            facts, _, _ = reconstruct_block(gm, block, x, x, settings, generator,
                                            desc=f"layer {k + 1}/{len(layers)} ({layer.name})", progress=progress)
            facts["source"] = block.input.name
            report.append(facts)
    return report
