"""Mean loss and accuracy over a data set, in jitted batches."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fbp.grads import check_batch
from fbp.losses import MSE, SoftmaxCrossEntropy


def default_loss(y):
    return SoftmaxCrossEntropy() if jnp.issubdtype(jnp.result_type(y), jnp.integer) else MSE()


def _hits(pred, y):
    """Elementwise correct predictions: one per label (per example, or per step of a sequence)."""
    if jnp.issubdtype(y.dtype, jnp.integer):
        if pred.shape == y.shape:  # one logit per binary target
            return (pred > 0) == (y > 0)
        return jnp.argmax(pred, -1) == y
    if pred.shape[-1] > 1:  # one-hot / probabilities
        return jnp.argmax(pred, -1) == jnp.argmax(y, -1)
    return (pred > 0) == (y > 0.5)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_sums(model, loss, params, x, y):
    """(loss summed over examples, correct labels, labels) of one batch; compiled once per model, loss, shape."""
    pred = model.apply(params, x)
    hits = _hits(pred, y)
    return loss(pred, y) * x.shape[0], jnp.sum(hits), hits.size


def evaluate(model, params, x, y, *, loss=None, metrics=("loss", "accuracy"), batch_size: int = 1024) -> dict:
    """Mean loss and accuracy over a data set, in jitted batches.

    Args:
      model: the layer.
      params: its parameters.
      x: ``(n, ...)`` inputs. y: ``(n, ...)`` targets.
      loss: defaults to SoftmaxCrossEntropy for integer labels, else MSE.
      metrics: any of ``"loss"``, ``"accuracy"`` (argmax vs label; sign for one logit; with a label
        per sequence step, the fraction of steps right).
      batch_size: examples per compiled batch (the tail runs as one smaller batch).

    Returns:
      {name: float}.
    """
    check_batch(model, x, y)
    unknown = set(metrics) - {"loss", "accuracy"}
    if unknown:
        raise ValueError(f"evaluate: unknown metrics {sorted(unknown)}; choose from ['accuracy', 'loss']")
    loss = default_loss(y) if loss is None else loss
    n = jnp.shape(x)[0]
    total_loss, correct, labels = 0.0, 0, 0
    for start in range(0, n, batch_size):
        batch_loss, batch_correct, batch_labels = _eval_sums(
            model, loss, params, x[start : start + batch_size], y[start : start + batch_size]
        )
        total_loss += float(batch_loss)
        correct += int(batch_correct)
        labels += int(batch_labels)
    out = {"loss": total_loss / n, "accuracy": correct / max(labels, 1)}
    return {name: out[name] for name in metrics}
