"""Textbook names and formulas: what ``fbp explain`` calls each value and how it writes each layer's math.

Layer l computes ``Z[l] = A[l-1] @ W[l] + b[l]`` and ``A[l] = g(Z[l])``, with
``A[0] = X``; ``dZ[l]`` is dL/dZ[l]. Every table here is keyed by layer or loss
class, and its strings use ``{z}``, ``{a}``, ``{dz}``, ``{da}`` (or ``{x}``,
``{y}``, ``{p}``, ``{n}``) for the names filled in per layer.
"""

from __future__ import annotations

from fbp.layers import GELU, Dense, LeakyReLU, ReLU, Sequential, Sigmoid, Tanh, describe
from fbp.losses import MSE, BinaryCrossEntropy, SoftmaxCrossEntropy

ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid, "leaky_relu": LeakyReLU, "gelu": GELU}

# (forward, backward) formulas of each activation, with {z}, {a}, {dz}, {da} for the value names.
ACTIVATION_FORMULAS = {
    ReLU: ("{a} = max({z}, 0)", "{dz} = {da} * ({z} > 0)"),
    LeakyReLU: ("{a} = {z} if {z} > 0 else slope * {z}", "{dz} = {da} * (1 if {z} > 0 else slope)"),
    Tanh: ("{a} = tanh({z})", "{dz} = {da} * (1 - {a}^2)"),
    Sigmoid: ("{a} = sigmoid({z})", "{dz} = {da} * {a} * (1 - {a})"),
    GELU: ("{a} = gelu({z})", "{dz} = {da} * gelu'({z})"),
}

# What each layer's cache holds and why that is enough for its backward pass ({x}: input, {y}: output).
CACHE_REASONS = {
    Dense: "{x}, the input: d{W} = {x}^T @ d{y}",
    ReLU: "the mask {x} > 0: d{x} = d{y} where {x} > 0, else 0",
    LeakyReLU: "the mask {x} > 0, which picks the slope",
    Tanh: "{y}, the output: tanh' = 1 - {y}^2",
    Sigmoid: "{y}, the output: sigmoid' = {y} (1 - {y})",
    GELU: "{x} and tanh(u), the two factors of gelu'",
}

# (forward, backward) formulas of each loss, with {p} for the prediction's name and {n} for the divisor.
LOSS_FORMULAS = {
    MSE: ("L = mean(({p} - Y)^2)", "d{p} = 2 ({p} - Y) / {n}"),
    SoftmaxCrossEntropy: ("L = mean(-sum(Y * log softmax({p})))", "d{p} = (softmax({p}) - Y) / {n}"),
    BinaryCrossEntropy: ("L = mean(BCE(sigmoid({p}), Y))", "d{p} = (sigmoid({p}) - Y) / {n}"),
}


def check_model(model) -> None:
    """Raise TypeError unless ``model`` is a Sequential of Dense layers and the activations named here."""
    if not isinstance(model, Sequential):
        raise TypeError(f"explain: expected a Sequential of Dense layers and activations, got {describe(model)}")
    for i, layer in enumerate(model.layers):
        if not isinstance(layer, (Dense, *ACTIVATION_FORMULAS)):
            raise TypeError(
                f"explain: layer [{i}] is {describe(layer)}; explain handles Dense and the activations "
                f"{', '.join(cls.__name__ for cls in ACTIVATION_FORMULAS)}"
            )


def textbook_names(model) -> list[tuple[str, str, dict]]:
    """Per layer: (input name, output name, param names), e.g. ``("A[0]", "Z[1]", {"W": "W[1]", "b": "b[1]"})``."""
    names, current, depth = [], "A[0]", 0
    for layer in model.layers:
        if isinstance(layer, Dense):
            depth += 1
            out = f"Z[{depth}]"
            params = {"W": f"W[{depth}]", "b": f"b[{depth}]"} if layer.use_bias else {"W": f"W[{depth}]"}
        else:
            out = f"A[{depth}]" if current.startswith("Z") else current + "'"
            params = {}
        names.append((current, out, params))
        current = out
    return names


def forward_formula(layer, x_name: str, y_name: str, params: dict) -> str:
    """What ``layer`` computes, in names: ``Z[1] = A[0] @ W[1] + b[1]``."""
    if isinstance(layer, Dense):
        bias = f" + {params['b']}" if "b" in params else ""
        return f"{y_name} = {x_name} @ {params['W']}{bias}"
    return ACTIVATION_FORMULAS[type(layer)][0].format(z=x_name, a=y_name)


def cache_reason(layer, x_name: str, y_name: str, params: dict) -> str:
    """What ``layer``'s cache holds and why that is enough, in names."""
    return CACHE_REASONS[type(layer)].format(x=x_name, y=y_name, W=params.get("W"))


def backward_lines(layer, x_name: str, y_name: str, params: dict, dparams, dx):
    """(formulas, names, values) of what one layer's backward produced, e.g. ``dW[2] = A[1]^T @ dZ[2]``."""
    dy_name, dx_name = "d" + y_name, "d" + x_name
    if isinstance(layer, Dense):
        lines = [(f"d{params['W']} = {x_name}^T @ {dy_name}", "d" + params["W"], dparams["W"])]
        if "b" in params:
            lines.append((f"d{params['b']} = sum over the batch of {dy_name}", "d" + params["b"], dparams["b"]))
        lines.append((f"{dx_name} = {dy_name} @ {params['W']}^T", dx_name, dx))
    else:
        formula = ACTIVATION_FORMULAS[type(layer)][1].format(z=x_name, a=y_name, dz=dx_name, da=dy_name)
        lines = [(formula, dx_name, dx)]
    formulas, names, values = zip(*lines)
    return formulas, names, values


def loss_formulas(loss, pred_name: str, pred) -> tuple[str, str]:
    """(L, dL/d(prediction)) in names; ``pred`` gives the divisor of the mean."""
    forward, backward = LOSS_FORMULAS.get(type(loss), ("L = loss({p}, Y)", "d{p} = dL/d{p}"))
    n = pred.shape[0] if isinstance(loss, SoftmaxCrossEntropy) else pred.size
    return forward.format(p=pred_name), backward.format(p=pred_name, n=n)
