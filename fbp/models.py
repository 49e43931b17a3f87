"""Model specs: a short string (``"mlp:128,128"``, ``"cnn"``) -> an fbp Sequential.

    model = fbp.models.build("mlp:128,128", input_shape=(8, 8, 1), num_outputs=10)
    # Sequential([Flatten(), Dense(128), ReLU(), Dense(128), ReLU(), Dense(10)])

Specs:
  ``mlp[:W1,W2,...]``: Dense layers of those widths with ReLU between, then a
    Dense to the outputs; image inputs are flattened first. Default widths 128,128.
  ``cnn[:C1,C2,...]``: for each C, Conv2D(C, 3) + ReLU + MaxPool2D(2); then Flatten
    and a Dense to the outputs. Needs image inputs ``(H, W, C)``. Default 16,32.
"""

from __future__ import annotations

from fbp.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential

DEFAULT_WIDTHS = {"mlp": (128, 128), "cnn": (16, 32)}


def parse(spec: str) -> tuple[str, tuple[int, ...]]:
    """``"mlp:128,64"`` -> ``("mlp", (128, 64))``; a bare kind takes its default widths."""
    kind, _, widths = spec.strip().partition(":")
    if kind not in DEFAULT_WIDTHS:
        raise ValueError(f"model spec {spec!r}: expected mlp[:W1,W2,...] or cnn[:C1,C2,...], got kind {kind!r}")
    if not widths:
        return kind, DEFAULT_WIDTHS[kind]
    try:
        sizes = tuple(int(w) for w in widths.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(w < 1 for w in sizes):
        raise ValueError(f"model spec {spec!r}: expected positive integer widths after ':', e.g. {kind}:128,128")
    return kind, sizes


def build(spec: str, input_shape: tuple[int, ...], num_outputs: int) -> Sequential:
    """Build the model that ``spec`` names for inputs of ``input_shape`` (no batch axis).

    Args:
      spec: ``"mlp[:W1,...]"`` or ``"cnn[:C1,...]"`` (see the module docstring).
      input_shape: one example's shape, e.g. ``(8, 8, 1)`` or ``(20,)``.
      num_outputs: logits (classes) or regression targets per example.

    Returns:
      A Sequential whose output is ``(batch, num_outputs)``.
    """
    kind, widths = parse(spec)
    input_shape = tuple(input_shape)
    layers: list = []
    if kind == "mlp":
        if len(input_shape) > 1:
            layers.append(Flatten(num_axes=len(input_shape)))
        for width in widths:
            layers += [Dense(width, weight_init="he"), ReLU()]
    else:
        if len(input_shape) != 3:
            raise ValueError(
                f"model {spec!r}: a cnn needs image inputs (H, W, C), got examples of shape {input_shape}; "
                "use an mlp for vector data"
            )
        height, width = input_shape[:2]
        for channels in widths:
            if min(height, width) < 2:
                raise ValueError(
                    f"model {spec!r}: {len(widths)} conv blocks halve {input_shape[:2]} below 2x2; use fewer blocks"
                )
            layers += [Conv2D(channels, 3), ReLU(), MaxPool2D(2)]
            height, width = height // 2, width // 2
        layers.append(Flatten())
    layers.append(Dense(num_outputs))
    return Sequential(tuple(layers))
