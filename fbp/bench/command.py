"""``fbp bench`` (also ``python -m benchmarks.train_step`` in a checkout): options, the run, the files written.

Everything the run writes goes under ``--out`` (default ``fbp-bench/`` in the
current folder), plus the ``--results`` file when one is named; the tables are
printed once, at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax

from fbp.bench.configs import BF16, CONFIGS, QUICK, Config
from fbp.bench.report import NOTES, environment, load_average, to_markdown, write_results
from fbp.bench.targets import evaluate_targets
from fbp.bench.timing import matmul_variant, measure, summarize
from fbp.bench.variants import build_variants, skipped_peers

DEFAULT_OUT = "fbp-bench"


def run_benchmark(configs: list[Config], *, rounds: int, round_seconds: float, peak_size: int, peers: bool = True,
                  quick: bool = False, command: str = "", log=print) -> dict:
    """Measure every config; returns the report (what ``train_step.json`` holds).

    Args:
      configs: what to measure.
      rounds, round_seconds: interleaved rounds, and the time per variant in each.
      peak_size: the side of the square matmul whose FLOP/s is the peak.
      peers: False to leave out Flax NNX, Equinox and JAX-Privacy even where installed.
      quick: a smoke run: its targets are listed but not judged.
      command: the command line, as the report records it.
      log: where progress lines and the skipped-peer lines go.
    """
    skipped = skipped_peers(peers)
    for name, reason in skipped.items():
        log(f"skipped {name}: {reason}")
    log(f"device: {jax.devices()[0]}")
    load_before = load_average()
    entries = []
    # the raw-JAX, Flax and Equinox models broadcast biases as their users write them
    with jax.numpy_rank_promotion("allow"):
        for cfg in configs:
            log(f"{cfg.name}:")
            variants, facts = build_variants(cfg, skip=set(skipped))
            results = measure([*variants, matmul_variant(cfg.compute_dtype, peak_size)], rounds, round_seconds, log=log)
            rows, peak = summarize(facts, results, peak_size)
            entries.append({"config": dataclasses.asdict(cfg), "backend": jax.default_backend(), **facts,
                            "peak": peak, "rows": rows})
    return {
        "environment": environment(),
        "command": command,
        "quick": quick,
        "rounds": rounds,
        "round_seconds": round_seconds,
        "load_average": {"before": load_before, "after": load_average()},
        "peak_size": peak_size,
        "skipped": skipped,
        "configs": entries,
        "targets": evaluate_targets(entries, judge=not quick),
    }


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser, *, default_out: str = DEFAULT_OUT) -> argparse.ArgumentParser:
    """The benchmark's options (shared by ``fbp bench`` and ``python -m benchmarks.train_step``)."""
    names = [cfg.name for cfg in (*CONFIGS, BF16)]
    parser.add_argument("--quick", action="store_true",
                        help="one tiny config, 2 short rounds: a smoke test (its targets are not judged)")
    parser.add_argument("--config", action="append", metavar="NAME", choices=names,
                        help=f"run only this config (repeatable); one of: {'; '.join(names)}")
    parser.add_argument("--bf16", action="store_true",
                        help="add the bfloat16 config (every full run has it; kept for old command lines)")
    parser.add_argument("--rounds", type=_positive(int), help="interleaved rounds (default 7; 2 with --quick)")
    parser.add_argument("--round-seconds", type=_positive(float),
                        help="time per variant per round (default 0.25; 0.01 with --quick)")
    parser.add_argument("--no-frameworks", action="store_true", help="skip Flax NNX, Equinox and JAX-Privacy")
    parser.add_argument("--out", default=default_out,
                        help=f"folder for train_step.json and train_step.md, created if needed (default: {default_out})")
    parser.add_argument("--results", metavar="PATH",
                        help=f"also write the markdown here (e.g. benchmarks/RESULTS.md), keeping its '{NOTES}' section")
    return parser


def _command_line(args: argparse.Namespace) -> str:
    """The options that shape the numbers, as a command to rerun."""
    words = ["fbp bench"]
    words += ["--quick"] * args.quick + ["--bf16"] * args.bf16 + ["--no-frameworks"] * args.no_frameworks
    words += [f"--config '{name}'" for name in args.config or ()]
    words += [f"--rounds {args.rounds}"] * (args.rounds is not None)
    words += [f"--round-seconds {args.round_seconds}"] * (args.round_seconds is not None)
    return " ".join(words)


def _fail(message: str) -> int:
    print(f"fbp bench: {message}", file=sys.stderr)
    return 1


def _writable(out: Path, results: Path | None) -> str | None:
    """Why the run could not write its files (checked before minutes of timing), or None."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"cannot create the output folder {out}: {error.strerror or error}; pass --out a folder you can write to"
    if results is not None and not results.parent.is_dir():
        return f"cannot write --results {results}: the folder {results.parent} does not exist"
    return None


def run(args: argparse.Namespace) -> int:
    """Run the benchmark as the options say; write the JSON and markdown files; print the tables once.

    Returns:
      0 on success; 1, after one line on stderr, when the files cannot be written.
    """
    out, results = Path(args.out), (Path(args.results) if args.results else None)
    problem = _writable(out, results)
    if problem:
        return _fail(problem)
    configs = [QUICK] if args.quick else list(CONFIGS)
    if args.config:
        configs = [cfg for cfg in (*CONFIGS, BF16) if cfg.name in args.config]
    elif not args.quick:
        configs.append(BF16)  # mixed precision: correctness and cost on CPU, speed on an accelerator
    report = run_benchmark(
        configs,
        rounds=args.rounds or (2 if args.quick else 7),
        round_seconds=args.round_seconds or (0.01 if args.quick else 0.25),
        peak_size=256 if args.quick else 2048 if jax.default_backend() == "cpu" else 8192,
        peers=not args.no_frameworks,
        quick=args.quick,
        command=_command_line(args),
    )
    markdown = to_markdown(report)
    written = [out / "train_step.json", out / "train_step.md"]
    try:
        written[0].write_text(json.dumps(report, indent=1))
        written[1].write_text(markdown)
        if results is not None:
            write_results(markdown, results)
            written.append(results)
    except OSError as error:
        return _fail(f"cannot write {error.filename or out}: {error.strerror or error}; "
                     "pass --out (and --results) paths you can write to")
    print()
    print(markdown)
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def main(argv: list[str] | None = None, *, prog: str = "fbp bench", default_out: str = DEFAULT_OUT) -> int:
    """Parse ``argv`` and run: the body of ``python -m benchmarks.train_step`` and ``python -m fbp.bench``."""
    import fbp.bench

    parser = argparse.ArgumentParser(prog=prog, description=fbp.bench.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return run(add_arguments(parser, default_out=default_out).parse_args(argv))
