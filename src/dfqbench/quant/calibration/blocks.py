"""Split a wrapped fx graph into reconstruction blocks (BRECQ): residual blocks and single layers outside them.

A cut is a node after which the graph carries only that one tensor (nothing computed earlier is read later):
the input, the output of every residual block (its `add`, or the ReLU after it), the tensors between
sequential layers. The segments between consecutive cuts that hold a conv/linear layer seed the blocks; the
layer-free segments between two of them (BN, ReLU, pooling, flatten) join the block before, except that an
activation quantizer and what follows it open the next block, so that a block owns the quantizers of its
input (shared with the residual identity) as BRECQ/Genie do. In ResNet-20: the first conv + BN + ReLU, each
of the nine residual blocks, and the final quantizer + pooling + FC.
"""

from __future__ import annotations

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


def find_blocks(gm: fx.GraphModule) -> list[Block]:
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
    return blocks


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
