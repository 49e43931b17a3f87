"""fbp layers: each a frozen config with init / apply / forward / backward (``LayerProtocol``).

One family per file: activations, dense, conv (Conv1D, Conv2D), pool, norm (LayerNorm),
dropout, embedding, reshape (Flatten), recurrent (SimpleRNN, GRU, LSTM), attention
(MultiHeadAttention), transformer (RMSNorm, PositionalEmbedding, TransformerBlock), and
combinators (Sequential, Residual). ``base`` states the protocol and holds the helpers
the layers share.
"""

from fbp.layers.activations import GELU, LeakyReLU, LogSoftmax, ReLU, Sigmoid, Softmax, Tanh
from fbp.layers.attention import MultiHeadAttention
from fbp.layers.base import Child, Layer, LayerProtocol, describe, split_key
from fbp.layers.combinators import Residual, Sequential
from fbp.layers.conv import Conv1D, Conv2D
from fbp.layers.dense import Dense
from fbp.layers.dropout import Dropout
from fbp.layers.embedding import Embedding
from fbp.layers.norm import LayerNorm
from fbp.layers.pool import AvgPool2D, MaxPool2D
from fbp.layers.recurrent import GRU, LSTM, SimpleRNN
from fbp.layers.reshape import Flatten
from fbp.layers.transformer import PositionalEmbedding, RMSNorm, TransformerBlock

__all__ = [
    "GELU",
    "GRU",
    "LSTM",
    "AvgPool2D",
    "Child",
    "Conv1D",
    "Conv2D",
    "Dense",
    "Dropout",
    "Embedding",
    "Flatten",
    "Layer",
    "LayerNorm",
    "LayerProtocol",
    "LeakyReLU",
    "LogSoftmax",
    "MaxPool2D",
    "MultiHeadAttention",
    "PositionalEmbedding",
    "RMSNorm",
    "ReLU",
    "Residual",
    "Sequential",
    "Sigmoid",
    "SimpleRNN",
    "Softmax",
    "Tanh",
    "TransformerBlock",
    "describe",
    "split_key",
]
