"""Train-step benchmark: fbp against a raw-JAX step, Flax NNX and Equinox (and DP-SGD's clipping against
JAX-Privacy), in one process.

    fbp bench                    # every config: a few minutes on a 2-core CPU; files in ./fbp-bench/
    fbp bench --quick            # one tiny config in seconds: a smoke test, judges no target
    fbp bench --out DIR --results benchmarks/RESULTS.md   # files in DIR; also rewrite RESULTS.md

Method. Every variant of a config is built, compiled (the first call, timed:
trace + compile + one step) and warmed up; then rounds run the variants in
turn (A B C, B C A, C A B, ...), so drift of the machine hits all alike. One
measurement is ``n`` calls dispatched back to back, then
``jax.block_until_ready``, with ``n`` calibrated to about ``--round-seconds``.
Reported per variant: the median time per step over rounds and its spread
(min and max as a percentage of the median); ratios as the median over rounds
of the ratio within each round; temporary memory from
``jit(...).lower(...).compile().memory_analysis()``; achieved FLOP/s, the
matmul and convolution FLOPs of the raw-JAX gradient (counted in its jaxpr)
over the time, as a fraction of the FLOP/s of a large matmul that runs in the
same rounds.

Every step trains with Adam on softmax cross-entropy. The raw-JAX step is the
floor: ``jax.value_and_grad`` + optax, returning the loss and the gradient norm
as fbp's step does; fbp steps run with ``skip_nonfinite=False`` (the guarded
default is its own row). Flax NNX and Equinox steps are written as their docs
do (``nnx.jit``, ``eqx.filter_jit``) and return the loss; where one is not
installed, the run says so and goes on without it. DP-SGD: fbp's clipped step
against JAX-Privacy's ``clipped_grad`` on the same model and batches, their
clipped gradients compared once before timing (``fbp.bench.variants``).

The rooms: ``configs`` (what is measured, and each model four ways),
``variants`` (one way each to run a step), ``timing`` (rounds, FLOPs, memory,
the peak), ``targets`` (what is judged), ``report`` (environment, markdown,
RESULTS.md), ``command`` (options, the run, the files).
"""

from fbp.bench.command import DEFAULT_OUT, add_arguments, main, run, run_benchmark
from fbp.bench.configs import BF16, CONFIGS, QUICK, Config
from fbp.bench.report import NOTES, to_markdown, write_results
from fbp.bench.targets import evaluate_targets
from fbp.bench.timing import Variant, matmul_flops, measure
from fbp.bench.variants import PEERS, build_variants, skipped_peers

__all__ = [
    "BF16",
    "CONFIGS",
    "DEFAULT_OUT",
    "NOTES",
    "PEERS",
    "QUICK",
    "Config",
    "Variant",
    "add_arguments",
    "build_variants",
    "evaluate_targets",
    "main",
    "matmul_flops",
    "measure",
    "run",
    "run_benchmark",
    "skipped_peers",
    "to_markdown",
    "write_results",
]
