"""fbp layers: each a frozen config with init / apply / forward / backward."""

from fbp.layers.activations import GELU, LeakyReLU, LogSoftmax, ReLU, Sigmoid, Softmax, Tanh
from fbp.layers.base import Layer, describe
from fbp.layers.combinators import Residual, Sequential
from fbp.layers.conv import AvgPool2D, Conv2D, MaxPool2D
from fbp.layers.dense import Dense
from fbp.layers.misc import Dropout, Embedding, Flatten, LayerNorm

__all__ = [
    "GELU",
    "AvgPool2D",
    "Conv2D",
    "Dense",
    "Dropout",
    "Embedding",
    "Flatten",
    "Layer",
    "LayerNorm",
    "LeakyReLU",
    "LogSoftmax",
    "MaxPool2D",
    "ReLU",
    "Residual",
    "Sequential",
    "Sigmoid",
    "Softmax",
    "Tanh",
    "describe",
]
