"""Split a wrapped fx graph into reconstruction blocks (BRECQ): residual blocks and single layers outside them.

A cut is a node after which the graph carries only that one tensor (nothing computed earlier is read later):
the input, the output of every residual block (its `add`, or the ReLU after it), the tensors between
sequential layers. The segments between consecutive cuts that hold a conv/linear layer seed the blocks; the
layer-free segments between two of them (BN, ReLU, pooling, flatten) join the block before, except that an
activation quantizer and what follows it open the next block, so that a block owns the quantizers of its
input (shared with the residual identity) as BRECQ/Genie do. In ResNet-20: the first conv + BN + ReLU, each
of the nine residual blocks, and the final quantizer + pooling + FC.

`units` (class names, e.g. Genie's code's BasicBlock, InvertedResidual) merges consecutive blocks whose layers all
lie in one instance of such a module (the outermost one around each layer, from torch.fx's nn_module_stack): the
official codes reconstruct a module-defined unit whole, and a MobileNetV2 unit without a residual, cut after each
of its three layers by the graph rule, becomes one block again. Blocks are merged, never split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import fx, nn

from ...errors import UnsupportedModel
from ..transforms.graph import is_layer, module_of
from ..quantizers import ActQuantizer


@dataclass
class Block:
    input: fx.Node  # the one tensor the block reads
    nodes: list[fx.Node]  # in graph order; the last one is the block's output
    name: str

    @property
    def output(self) -> fx.Node:
        return self.nodes[-1]


def cut_nodes(graph: fx.Graph) -> list[fx.Node]:
    """Nodes at which exactly one computed tensor is alive (constants from get_attr do not count)."""
    order = list(graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    last_use = {n: max((index[u] for u in n.users), default=-1) for n in order}
    live: set[fx.Node] = set()
    cuts = []
    for i, node in enumerate(order):
        if node.op == "output":
            break
        if node.op != "get_attr" and last_use[node] > i:
            live.add(node)
        live = {n for n in live if last_use[n] > i}
        if live == {node}:
            cuts.append(node)
    return cuts


def find_blocks(gm: fx.GraphModule, units: Sequence[str] = ()) -> list[Block]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModel(f"block reconstruction needs a model with one input, not {len(placeholders)}")
    cuts = cut_nodes(gm.graph)
    result = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if result is not cuts[-1]:
        raise UnsupportedModel("block reconstruction needs a model whose output is one tensor")
    order = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    segments = [order[index[a] + 1:index[b] + 1] for a, b in zip(cuts, cuts[1:])]

    def has_layer(seg):
        return any(is_layer(gm, n) for n in seg)

    def has_act_quantizer(seg):
        return any(isinstance(module_of(gm, n), ActQuantizer) for n in seg)

    groups: list[list[list[fx.Node]]] = []
    pending: list[list[fx.Node]] = []
    for seg in segments:
        if not has_layer(seg):
            pending.append(seg)
            continue
        if not groups:
            groups.append(pending + [seg])
        else:
            split = next((i for i, s in enumerate(pending) if has_act_quantizer(s)), len(pending))
            groups[-1] += pending[:split]
            groups.append(pending[split:] + [seg])
        pending = []
    if groups:
        groups[-1] += pending
    blocks = []
    for group in groups:
        nodes = [n for seg in group for n in seg]
        start = cuts[0] if not blocks else blocks[-1].output
        blocks.append(Block(start, nodes, nodes[-1].name))
    return _merge_units(gm, blocks, units) if units else blocks


def unit_of(node: fx.Node, units: Sequence[str]) -> str | None:
    """The qualified name of the outermost module around `node` whose class is named in `units`, else None."""
    for path, kind in (node.meta.get("nn_module_stack") or {}).values():
        name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
        if name.rsplit(".", 1)[-1] in units:
            return path
    return None


def _merge_units(gm: fx.GraphModule, blocks: list[Block], units: Sequence[str]) -> list[Block]:
    merged: list[Block] = []
    previous = None
    for block in blocks:
        owners = {unit_of(n, units) for n in block.nodes if is_layer(gm, n)}
        unit = owners.pop() if len(owners) == 1 else None
        if unit is not None and unit == previous:
            head = merged[-1]
            merged[-1] = Block(head.input, head.nodes + block.nodes, block.name)
        else:
            merged.append(block)
        previous = unit
    return merged


def block_module(gm: fx.GraphModule, block: Block) -> fx.GraphModule:
    """A GraphModule computing the block's output from its input; it calls gm's own submodules (shared)."""
    graph = fx.Graph()
    env = {block.input: graph.placeholder("x")}

    def arg(node: fx.Node) -> fx.Node:
        if node not in env and node.op == "get_attr":
            env[node] = graph.node_copy(node)
        return env[node]

    for node in block.nodes:
        env[node] = graph.node_copy(node, arg)
    graph.output(env[block.output])
    return fx.GraphModule(gm, graph)


def block_layers(gm: fx.GraphModule, block: Block) -> list[nn.Module]:
    return [module_of(gm, n) for n in block.nodes if is_layer(gm, n)]


def block_act_quantizers(gm: fx.GraphModule, block: Block) -> list[ActQuantizer]:
    return [module_of(gm, n) for n in block.nodes if isinstance(module_of(gm, n), ActQuantizer)]
