"""fbp: pure-function layers with hand-written backward passes, checked against JAX."""

from fbp import checkpoint, data, explain, losses, models, parallel
from fbp.check import GradientCheckError, GradientReport, LayerReport, check_gradients, check_layer
from fbp.grads import per_example_grads, value_and_grad, with_manual_vjp
from fbp.layers import (
    GELU,
    AvgPool2D,
    Conv2D,
    Dense,
    Dropout,
    Embedding,
    Flatten,
    Layer,
    LayerNorm,
    LeakyReLU,
    LogSoftmax,
    MaxPool2D,
    ReLU,
    Residual,
    Sequential,
    Sigmoid,
    Softmax,
    Tanh,
)
from fbp.losses import MSE, BinaryCrossEntropy, SoftmaxCrossEntropy
from fbp.train import TrainState, TrainStep, evaluate, make_train_step, train_epoch
from fbp.trainer import TrainConfig, fit

__version__ = "0.1.0"

__all__ = [
    "GELU",
    "MSE",
    "AvgPool2D",
    "BinaryCrossEntropy",
    "Conv2D",
    "Dense",
    "Dropout",
    "Embedding",
    "Flatten",
    "GradientCheckError",
    "GradientReport",
    "Layer",
    "LayerNorm",
    "LayerReport",
    "LeakyReLU",
    "LogSoftmax",
    "MaxPool2D",
    "ReLU",
    "Residual",
    "Sequential",
    "Sigmoid",
    "Softmax",
    "SoftmaxCrossEntropy",
    "Tanh",
    "TrainConfig",
    "TrainState",
    "TrainStep",
    "check_gradients",
    "check_layer",
    "checkpoint",
    "data",
    "evaluate",
    "explain",
    "fit",
    "losses",
    "make_train_step",
    "models",
    "parallel",
    "per_example_grads",
    "train_epoch",
    "value_and_grad",
    "with_manual_vjp",
]
