"""Named LoRA adapters on one frozen base model, with exactly one (or none) active per call.

By default the weaver and the trigger are adapters on the reasoner's own weights: one copy of the
base in memory. PEFT injects the adapters; switching which one a call uses goes through each LoRA
layer's active-adapter state directly, because PEFT's `set_adapter` also rewrites `requires_grad`,
and memgen decides what trains (`MemGenModel.set_trainable`). With no adapter active the base
computes exactly the frozen model, so the reasoner's calls see no LoRA at all.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F

from memgen.layer_stack import text_config


def tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    """The LoRA-bearing layers of `model` (a walk over every module: callers in a loop keep the list)."""
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def adapter_names(model: nn.Module) -> set[str]:
    """The names of the adapters in `model`'s tuner layers, whoever added them (PEFT, transformers' `add_adapter` or
    `load_adapter`, memgen)."""
    return {name for layer in tuner_layers(model) for name in _names_in(layer)}


def _names_in(layer: BaseTunerLayer) -> set[str]:
    return {name for attr in layer.adapter_layer_names for name in getattr(layer, attr, {}).keys()}


def _delete(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer of `model` that carries it (a layer left with no adapter is its base
    layer again), and from the model's PEFT config."""
    for path, layer in list(model.named_modules()):
        if isinstance(layer, BaseTunerLayer) and name in _names_in(layer):
            layer.delete_adapter(name)
            if not _names_in(layer):
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent), child, layer.get_base_layer())
    configs = getattr(model, "peft_config", None)
    if configs is not None:
        configs.pop(name, None)
        if not configs:  # (made by the injection)
            del model.peft_config


def _linear_names(model: nn.Module) -> list[str]:
    """The distinct names (last component) of `model`'s linear layers, for an error that must suggest targets."""
    return sorted({path.rsplit(".", 1)[-1] for path, module in model.named_modules() if isinstance(module, nn.Linear)})


def add_lora_adapter(model: nn.Module, name: str, settings: dict[str, Any]) -> None:
    """Inject LoRA adapter `name` into `model` in place (float32 weights), leaving adapters off. In a multimodal
    model only its language decoder gets adapters (its vision tower has attention projections of the same names,
    which memgen never runs)."""
    no_match = ValueError(f"{name}_lora['target_modules'] = {settings['target_modules']} match no module of "
                          f"{type(model).__name__}; name modules that exist in the model (its linear layers: "
                          f"{', '.join(_linear_names(model))})")
    outside = _outside_the_decoder(model)
    if outside and settings.get("exclude_modules") is None:
        settings = {**settings, "exclude_modules": outside}
    with warnings.catch_warnings():
        # a second adapter on a shared base is the point here, not an accident
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        try:
            inject_adapter_in_model(LoraConfig(**settings), model, adapter_name=name)
        except ValueError as err:
            if "not found in the base model" in str(err):
                raise no_match from err
            raise
    not_linear = [path for path, layer in model.named_modules() if isinstance(layer, BaseTunerLayer)
                  and name in _names_in(layer) and name not in getattr(layer, "lora_A", {})]
    if not_linear:
        _delete(model, name)  # leave the model as it was given
        raise ValueError(f"{name}_lora['target_modules'] = {settings['target_modules']} names layers that are not "
                         f"linear ({', '.join(not_linear)}): memgen's adapters go on linear layers only (its calls "
                         "reuse the token embeddings the reasoner makes, so an adapter on an embedding would not run)")
    layers = tuner_layers(model)
    carrying = [layer for layer in layers if name in getattr(layer, "lora_A", {})]
    if not carrying:
        raise no_match
    for layer in carrying:  # (another adapter, the trigger's say, may sit on other layers)
        for module_dict_name in ("lora_A", "lora_B"):
            module = getattr(layer, module_dict_name)[name]
            module.to(torch.float32)  # trainable parts stay float32 under a bfloat16 base
    for layer in layers:
        if not hasattr(layer, "_active_adapter") or not hasattr(layer, "_disable_adapters"):
            raise RuntimeError("this PEFT version keeps adapter state elsewhere; memgen supports peft>=0.15")
    _set_active(layers, None)


def _outside_the_decoder(model: nn.Module) -> list[str] | None:
    """A multimodal model's linear layers outside its language decoder (qualified names), None for a text model."""
    if text_config(model) is model.config:
        return None
    inside = {id(module) for module in model.get_decoder().modules()}
    return [path for path, module in model.named_modules() if isinstance(module, nn.Linear) and id(module) not in inside
            and module is not model.get_output_embeddings()] or None


def _set_active(layers: list[BaseTunerLayer], name: str | None) -> None:
    for layer in layers:
        layer._disable_adapters = name is None
        if name is not None:
            layer._active_adapter = [name]


@contextlib.contextmanager
def active_adapter(model: nn.Module, name: str | None, layers: list[BaseTunerLayer] | None = None) -> Iterator[None]:
    """Run the enclosed calls of `model` with only adapter `name` (None: the bare base).

    layers: `tuner_layers(model)`, when the caller keeps it (the decoding loop does).
    """
    layers = tuner_layers(model) if layers is None else layers
    saved = [(layer._disable_adapters, layer._active_adapter) for layer in layers]
    _set_active(layers, name)
    try:
        yield
    finally:
        for layer, (disabled, active) in zip(layers, saved):
            layer._disable_adapters, layer._active_adapter = disabled, active


def adapter_state_context(layers: list[BaseTunerLayer]):
    """A `context_fn` for `torch.utils.checkpoint` (non-reentrant): it records which adapter the layers run
    when a checkpointed block runs forward and restores that during the block's recomputation. The weaver's
    adapter is switched on only inside its calls, so without this the backward pass would recompute the
    weaver's layers with the adapter off (and the reasoner's with it on, were they interleaved)."""
    def context_fn():
        saved = [(layer._disable_adapters, layer._active_adapter) for layer in layers]

        @contextlib.contextmanager
        def as_in_forward() -> Iterator[None]:
            current = [(layer._disable_adapters, layer._active_adapter) for layer in layers]
            for layer, (disabled, active) in zip(layers, saved):
                layer._disable_adapters, layer._active_adapter = disabled, active
            try:
                yield
            finally:
                for layer, (disabled, active) in zip(layers, current):
                    layer._disable_adapters, layer._active_adapter = disabled, active

        return contextlib.nullcontext(), as_in_forward()

    return context_fn


class BareBase:
    """Runs a model's calls on its bare base modules: each LoRA layer is swapped, for the duration of
    `with bare():`, for the layer it wraps. PEFT's disabled path computes the same thing but costs a
    Python call per wrapped layer per step (about 8% of a one-token step of a 16-layer model on a
    CPU); the decoding engine's reasoner calls, made millions of times, skip it.
    """

    def __init__(self, model: nn.Module) -> None:
        sites = _tuner_sites(model)
        self.swap = _Swap(sites, [layer.get_base_layer() for _, _, layer in sites])

    def __call__(self) -> contextlib.AbstractContextManager[None]:
        return self.swap


def _tuner_sites(model: nn.Module) -> list[tuple[nn.Module, str, BaseTunerLayer]]:
    """(parent, attribute name, LoRA layer) for every LoRA layer of `model`."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, BaseTunerLayer)]


class _Swap:
    """A reusable `with` block in which each site's LoRA layer is replaced by its swap, put back on exit (also on
    an error). The swaps go straight into the parents' `_modules`, where `nn.Module` looks its children up: the
    sites are registered children already, and `setattr` checks each name against the parent's parameters and
    buffers on the way in and out. For the 32 sites of the `small` preset that took 55 us a call on a CPU, against
    2 us this way (timed alone, ad hoc)."""

    def __init__(self, sites: list[tuple[nn.Module, str, BaseTunerLayer]], swaps: list[nn.Module]) -> None:
        self.children = [(parent._modules, name) for parent, name, _ in sites]
        self.layers = [layer for _, _, layer in sites]
        self.swaps = swaps

    def __enter__(self) -> None:
        for (children, name), swap in zip(self.children, self.swaps):
            children[name] = swap

    def __exit__(self, *exc_info) -> None:
        for (children, name), layer in zip(self.children, self.layers):
            children[name] = layer


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The parameters of adapter `name`, keyed by their names in `model` (PEFT's layout)."""
    return {n: p for n, p in model.named_parameters() if f".{name}." in n and (".lora_A." in n or ".lora_B." in n)}


def _power_of_two(scaling: float) -> bool:
    """Whether multiplying by `scaling` commutes with rounding (a power of two: only the exponent changes)."""
    return scaling > 0 and math.frexp(scaling)[0] == 0.5


class _Siblings:
    """One adapter's LoRA layers that read the same input tensor in one forward of their parent module (an
    attention block's q, k and v projections; an MLP's gate and up projections): their updates come from two
    matrix products for all of them, x A^T with the A matrices stacked and then h B^T with the B matrices on a
    block diagonal, instead of two products, a multiply and a cast for each. Where a layer's scaling is a power
    of two it is folded into its B block (exact); otherwise the product's columns are scaled as PEFT scales them.
    The stacked weights are copies made once per `SplitBatch` (the engine makes one per generate call, under
    no_grad), in its first call that uses them: the products agree with the separate ones to rounding, not
    bitwise (another matrix shape).
    """

    def __init__(self, adapters: list[tuple[nn.Module, nn.Module, float]]) -> None:
        self.adapters = adapters
        bounds = torch.tensor([0] + [lora_B.out_features for _, lora_B, _ in adapters]).cumsum(0).tolist()
        self.columns = list(zip(bounds, bounds[1:]))
        # the stacked weights (and the columns' scales where one is not a power of two), made in the first call
        # that uses them
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.x: torch.Tensor | None = None  # the input of the last product, while its call lasts
        self.product: torch.Tensor | None = None

    def _stack(self) -> None:
        """The stacked weights, from the weights as a forward sees them (whole, where a sharded model gathers them
        for its forward)."""
        adapters = self.adapters
        with torch.no_grad():
            self.a = torch.cat([lora_A.weight for lora_A, _, _ in adapters])  # [sum r, in]
            self.b = torch.block_diag(*[lora_B.weight * scaling if _power_of_two(scaling) else lora_B.weight
                                        for _, lora_B, scaling in adapters])  # [sum out, sum r]
            if not all(_power_of_two(scaling) for _, _, scaling in adapters):
                self.scale = torch.cat([torch.full((lora_B.weight.shape[0],), 1.0 if _power_of_two(s) else s,
                                                   dtype=torch.float32)
                                        for _, lora_B, s in adapters]).to(self.b)

    def update(self, member: int, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Member `member`'s scaled update of rows [start, end) of x, from the product over x when it is the last
        one's input (the same forward of the parent), else from a new one."""
        if self.x is not x:
            if self.a is None:
                self._stack()
            product = F.linear(F.linear(x[start:end].to(self.a.dtype), self.a), self.b)
            self.product = product if self.scale is None else product.mul_(self.scale)
            self.x = x
        lo, hi = self.columns[member]
        return self.product[..., lo:hi]

    def release(self) -> None:
        self.x = self.product = None


class _SplitLoRA(nn.Module):
    """A plain LoRA layer computing its base for every batch row and adding each of its adapters' updates to
    that adapter's rows (a range of batch rows per adapter): the arithmetic of PEFT's `Linear.forward` with only
    that adapter active, per row. An adapter whose layer has siblings (`_Siblings`) takes its update from their
    shared products, when nothing needs gradients and its dropout is off (as in generation)."""

    def __init__(self, layer: BaseTunerLayer, names: list[str], indices: list[int]) -> None:
        super().__init__()
        # plain attributes, not submodules: the swapped-in module must not re-register the layer's parameters
        self.__dict__.update(base=layer.get_base_layer(), adapters=[
            (layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name], layer.scaling[name]) for name in names])
        self.indices = indices  # each adapter's place in SplitBatch's names
        self.ranges = [(0, 0)] * len(names)
        self.siblings: list[tuple[_Siblings, int] | None] = [None] * len(names)  # per adapter: (group, place in it)
        # while SplitBatch looks for siblings (its first call): the id of this layer's input (0: not called yet)
        self.input_id: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.input_id is not None:
            self.input_id = id(x)
        shared = not torch.is_grad_enabled()
        for (lora_A, lora_B, dropout, scaling), (start, end), sibling in zip(self.adapters, self.ranges,
                                                                             self.siblings):
            if end <= start:
                continue
            if sibling is not None and shared and not dropout.training:
                update = sibling[0].update(sibling[1], x, start, end)
            else:
                part = x[start:end].to(lora_A.weight.dtype)
                if dropout.training:  # nn.Dropout or nn.Identity: the identity in eval mode
                    part = dropout(part)
                update = F.linear(F.linear(part, lora_A.weight, lora_A.bias), lora_B.weight, lora_B.bias) * scaling
            result[start:end].add_(update)  # summed in float32, rounded to result's dtype, as PEFT's `+`
        return result


class SplitBatch:
    """Runs a model's calls with the bare base on the leading batch rows and each of adapters `names` on a range
    of rows after them: several adapters' calls in one pass over the shared base (the decoding engine reads the
    reasoner's tokens, the `lora` trigger's and the weaver's items together). Like `BareBase`, it swaps each LoRA
    layer for the duration of `with split(*starts):`.

    Its first call also finds which LoRA layers of one parent module read the same input tensor (by identity:
    what the model's code passes them, not a guess from their names); from the second call on, their adapters'
    updates are computed together (`_Siblings`).
    """

    def __init__(self, model: nn.Module, *names: str) -> None:
        sites = _tuner_sites(model)
        self.names = names
        swaps = []
        for _, _, layer in sites:
            here = [i for i, name in enumerate(names) if name in getattr(layer, "lora_A", {})]
            swaps.append(_SplitLoRA(layer, [names[i] for i in here], here) if here else layer.get_base_layer())
        self.split = [swap for swap in swaps if isinstance(swap, _SplitLoRA)]
        self.parents = [id(parent) for (parent, _, _), swap in zip(sites, swaps) if isinstance(swap, _SplitLoRA)]
        self.swap = _Swap(sites, swaps)
        self.groups: list[_Siblings] | None = None  # None until the first call has shown which layers share inputs
        for swap in self.split:
            swap.input_id = 0

    @staticmethod
    def supported(model: nn.Module, name: str) -> bool:
        """Whether every layer carrying adapter `name` is a plain, unmerged LoRA `Linear` (no DoRA or other
        variant), the arithmetic `_SplitLoRA` reproduces."""
        from peft.tuners.lora import Linear

        carrying = [layer for layer in tuner_layers(model) if name in getattr(layer, "lora_A", {})]
        return bool(carrying) and all(type(layer) is Linear and not layer.merged
                                      and name not in getattr(layer, "lora_variant", {}) for layer in carrying)

    def __call__(self, *starts: int) -> contextlib.AbstractContextManager[None]:
        """Adapter names[i] runs on batch rows [starts[i], starts[i + 1]) (the last one on every row from its
        start on), the bare base on the rows before starts[0]. One non-decreasing start per name."""
        if len(starts) != len(self.names) or any(b < a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"SplitBatch over {self.names} takes one non-decreasing start per adapter, got {starts}")
        bounds = [*starts, 2**62]
        for swap in self.split:
            swap.ranges = [(bounds[i], bounds[i + 1]) for i in swap.indices]
        return self._calling()

    @contextlib.contextmanager
    def _calling(self) -> Iterator[None]:
        try:
            with self.swap:
                yield
        finally:
            for group in self.groups or ():  # the call's inputs and products, no longer needed
                group.release()
        if self.groups is None:  # the first call ran to its end
            self._find_siblings()

    def _find_siblings(self) -> None:
        """After the first call: group each adapter's layers that read one input in one parent (bias-free LoRA
        only, whose arithmetic `_Siblings` reproduces)."""
        readers: dict[tuple[int, int], list[_SplitLoRA]] = {}
        for swap, parent in zip(self.split, self.parents):
            if swap.input_id:  # the layer ran (the parent's forward holds its input while the siblings read it)
                readers.setdefault((parent, swap.input_id), []).append(swap)
            swap.input_id = None
        self.groups = []
        for members in readers.values():
            for index in range(len(self.names)):
                carrying = [(swap, swap.indices.index(index)) for swap in members if index in swap.indices]
                carrying = [(swap, at) for swap, at in carrying
                            if swap.adapters[at][0].bias is None and swap.adapters[at][1].bias is None]
                if len(carrying) < 2:
                    continue
                group = _Siblings([(swap.adapters[at][0], swap.adapters[at][1], swap.adapters[at][3])
                                   for swap, at in carrying])
                for place, (swap, at) in enumerate(carrying):
                    swap.siblings[at] = (group, place)
                self.groups.append(group)
