"""Insert weight and activation fake-quantizers into a float model according to a Convention."""

from __future__ import annotations

from torch import fx, nn

from .bn_fold import NORM_TYPES, fold_batchnorm
from ..convention import Convention
from .graph import insert_after, is_layer, is_passthrough, layer_nodes, layers_fed_by, module_of, relu_kind, trace
from .ops import op_kind, op_output_sites
from ..quantizers import ActQuantizer, WeightQuantizer, is_quant_layer, quant_class_for


def quantize_model(model: nn.Module, convention: Convention, wbit: int, abit: int) -> fx.GraphModule:
    """Return a traced copy-in-place of `model` with quantizers; the float parameters are shared, not copied."""
    gm = fold_batchnorm(model, convention.fold_scope) if convention.fold_bn else trace(model)
    layers = layer_nodes(gm)
    if not layers:
        raise ValueError("the model has no Conv1d/Conv2d/Linear layer to quantize")
    first, last = layers[0], layers[-1]
    bits = convention.layers

    for node in layers:
        w_bits = bits.first_wbit if node is first and bits.first_wbit else wbit
        w_bits = bits.last_wbit if node is last and bits.last_wbit else w_bits
        _swap_layer(gm, node, _weight_quantizer(convention, w_bits))

    second = layers[1] if len(layers) > 1 else None
    # each_layer_input: the edges (producer -> layer) found before any quantizer is inserted
    edges = [(node.args[0], node) for node in layers] if convention.act.sites == "each_layer_input" else []
    sites = _act_sites(gm, convention)
    for i, site in enumerate(sites):
        fed = layers_fed_by(gm, site)
        a_bits = abit
        if site.op == "placeholder":
            a_bits = bits.input_abit
        elif bits.norm_abit is not None and isinstance(module_of(gm, site), NORM_TYPES):
            a_bits = bits.norm_abit  # an unfolded BatchNorm's output (only a layer_outputs site: validate())
        elif second is not None and bits.second_abit and (
                second in fed or (convention.act.sites == "layer_outputs" and site is first)):
            a_bits = bits.second_abit
        if last in fed and bits.last_abit and site.op != "placeholder":
            a_bits = bits.last_abit
        if site is last and bits.logits_abit:
            a_bits = bits.logits_abit
        quantizer = _act_quantizer(convention, a_bits)
        if site.op == "placeholder" and convention.layers.input_range == "pixels" and convention.pixel_range:
            quantizer.fix_range(*convention.pixel_range)
        insert_after(gm, site, f"act_quant_{i}", quantizer)
    edges = [(src, node) for src, node in edges if src.op != "placeholder"]  # the image: input_abit alone
    for i, (src, node) in enumerate(edges, start=len(sites)):
        a_bits = abit
        if node is second and bits.second_abit:
            a_bits = bits.second_abit
        if node is last and bits.last_abit:
            a_bits = bits.last_abit
        _insert_on_edge(gm, src, node, f"act_quant_{i}", _act_quantizer(convention, a_bits))
    if convention.act.add_inputs:
        _quantize_add_inputs(gm, convention, abit, start=len(sites) + len(edges))
    if convention.bias == "int32":
        _link_bias_inputs(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _link_bias_inputs(gm: fx.GraphModule) -> None:
    """Give each quantized layer of an integer group, input from an activation quantizer and output (through a
    ReLU) read by activation quantizers only, its input quantizer: its bias grid is input scale x weight scale.
    Any other layer keeps a float bias, as ONNX Runtime does (measured: a conv feeding a float residual sum or a
    Gemm behind a Flatten keeps its float bias)."""
    def is_act_quant(node) -> bool:
        return isinstance(node, fx.Node) and isinstance(module_of(gm, node), ActQuantizer)

    for node in gm.graph.nodes:
        if not is_quant_layer(module_of(gm, node)) or not node.args or not is_act_quant(node.args[0]):
            continue
        readers = list(node.users)
        if len(readers) == 1 and relu_kind(gm, readers[0]):
            readers = list(readers[0].users)
        if readers and all(is_act_quant(r) for r in readers):
            object.__setattr__(module_of(gm, node), "bias_input", module_of(gm, node.args[0]))


def _quantize_add_inputs(gm: fx.GraphModule, convention: Convention, abit: int, start: int) -> None:
    """A quantizer on each operand of every sum of two activations (a learned parameter such as a position
    embedding is not one) that is not already a quantizer's output, on the edge into the sum: the operand's other
    readers keep what they read (each_layer_input: the float tensor, as the DFQ code's own operand quantizers)."""
    memo: dict = {}
    adds = [n for n in gm.graph.nodes if op_kind(gm, n, memo) == "add"]
    i = start
    for add in adds:
        for operand in dict.fromkeys(a for a in add.args[:2] if isinstance(a, fx.Node)):
            if operand.op == "get_attr" or isinstance(module_of(gm, operand), ActQuantizer):
                continue
            _insert_on_edge(gm, operand, add, f"act_quant_{i}", _act_quantizer(convention, abit))
            i += 1


def _act_quantizer(convention: Convention, bits: int) -> ActQuantizer:
    spec = convention.act
    return ActQuantizer(bits, symmetric=spec.symmetric, estimator=spec.estimator, lp=spec.lp,
                        percentile=spec.percentile, per_channel=spec.granularity == "per_channel", ste=spec.ste,
                        symmetric_grid=spec.symmetric_grid)


def _insert_on_edge(gm: fx.GraphModule, src: fx.Node, user: fx.Node, name: str, module: nn.Module) -> None:
    """Insert `module` between `src` and one reader `user` only; the other readers keep `src`."""
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(user):
        new = gm.graph.call_module(name, (src,))
    user.replace_input_with(src, new)


def _weight_quantizer(convention: Convention, bits: int) -> WeightQuantizer:
    spec = convention.weight
    return WeightQuantizer(bits, per_channel=spec.granularity == "per_channel", symmetric=spec.symmetric,
                           estimator=spec.estimator, lp=spec.lp, symmetric_grid=spec.symmetric_grid)


def _swap_layer(gm: fx.GraphModule, node: fx.Node, wq: WeightQuantizer) -> None:
    mod = module_of(gm, node)
    qmod = quant_class_for(mod).from_float(mod, wq)
    parent_name, _, child = node.target.rpartition(".")
    setattr(gm.get_submodule(parent_name) if parent_name else gm, child, qmod)


def _act_sites(gm: fx.GraphModule, convention: Convention) -> list[fx.Node]:
    """The nodes whose output gets an activation quantizer, in graph order."""
    sites: list[fx.Node] = []
    if convention.layers.input_abit:
        sites += [n for n in gm.graph.nodes if n.op == "placeholder"][:1]  # the image (not e.g. timm's attn_mask)
    if convention.act.sites == "each_layer_input":  # inserted per edge, not per tensor (quantize_model)
        return sites
    if convention.act.sites == "after_relu":
        sites += [n for n in gm.graph.nodes if relu_kind(gm, n)]
    elif convention.act.sites == "layer_outputs":
        norms = convention.layers.norm_abit is not None
        sites += [n for n in gm.graph.nodes if is_layer(gm, n) or (norms and isinstance(module_of(gm, n), NORM_TYPES))]
    elif convention.act.sites == "op_outputs":
        sites += [n for n in op_output_sites(gm, convention.act.ops) if n not in sites]
    else:  # layer_inputs: the tensor each layer reads, shared with every other reader (e.g. a residual identity)
        for node in layer_nodes(gm):
            src = node.args[0]
            while is_passthrough(gm, src):  # BRECQ/QDrop quantize the block output, then pool/flatten in float
                src = src.args[0]
            if src.op != "placeholder" and src not in sites:
                sites.append(src)
    return sites


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def weight_quantizers(model: nn.Module) -> list[WeightQuantizer]:
    return [m for m in model.modules() if isinstance(m, WeightQuantizer)]


def quant_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_quant_layer(m)]
