"""Command-line wiring only: each command parses flags and calls a library function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from moectl.errors import TrainingStopped, UsageError, WorkerFailed, under_torchrun
from moectl.import_noise import silence_known_import_noise


class _Command(typer.core.TyperCommand):
    """Arguments in the usage line as `A B` (newer typer writes `{a} {b}`), the same on every typer."""

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                continue
            name = (param.metavar or param.name or "").upper() + ("..." if param.nargs != 1 else "")
            pieces.append(name if param.required else f"[{name}]")
        return pieces


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train Mixture-of-Experts models with pluggable parallel strategies; measure speed and check numerics.",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

Opt = typer.Option


@app.callback()
def _root() -> None:
    """Train Mixture-of-Experts models with pluggable parallel strategies; measure speed and check numerics."""


@app.command(cls=_Command, short_help="Train with one strategy; write a run directory.")
def train(
    config: Annotated[
        str | None, Opt("--config", "-c", help="Preset name (see configs/) or a YAML path. Default: tiny.")
    ] = None,
    strategy: Annotated[
        str | None, Opt(help="single, ddp, fsdp, tp, mixed, ep, a plugin name, module:Class or a .py file.")
    ] = None,
    steps: Annotated[int | None, Opt(help="Optimizer steps.")] = None,
    global_batch: Annotated[
        int | None, Opt(help="Sequences per optimizer step over all data-parallel ranks.")
    ] = None,
    micro_batch: Annotated[int | None, Opt(help="Sequences per forward/backward on one rank.")] = None,
    seq_len: Annotated[int | None, Opt(help="Tokens per sequence.")] = None,
    lr: Annotated[float | None, Opt(help="Learning rate.")] = None,
    seed: Annotated[int | None, Opt(help="Seed for initial weights and data order: 0 to 2**64-1.")] = None,
    nproc: Annotated[int | None, Opt(help="Processes per node. Default: follows from the degrees.")] = None,
    dp_size: Annotated[int | None, Opt(help="Data-parallel degree.")] = None,
    tp_size: Annotated[int | None, Opt(help="Tensor-parallel degree.")] = None,
    ep_size: Annotated[int | None, Opt(help="Expert-parallel degree.")] = None,
    nnodes: Annotated[int | None, Opt(help="Number of machines (multi-node rendezvous).")] = None,
    node_rank: Annotated[int | None, Opt(help="This machine's index among --nnodes.")] = None,
    rdzv_endpoint: Annotated[
        str | None, Opt(help="HOST:PORT on node 0 (static rendezvous), the same on every node.")
    ] = None,
    model: Annotated[
        Path | None, Opt(help="Local HF checkpoint directory (config.json + safetensors) to start from.")
    ] = None,
    data: Annotated[
        str | None,
        Opt(
            help="'synthetic', a .bin/.npy token file, or a corpus: a datasets.save_to_disk directory, a "
            ".parquet/.jsonl/.txt file or a folder of them, or a token cache (moectl data prepare)."
        ),
    ] = None,
    val_data: Annotated[
        str | None, Opt(help="A corpus held out for the validation loss (see train.eval_every).")
    ] = None,
    run_dir: Annotated[Path | None, Opt(help="Output directory. Default: runs/<time>-<strategy>.")] = None,
    checkpoint_every: Annotated[
        int | None, Opt(help="Write a resumable checkpoint every N steps (and on Ctrl-C / SIGTERM).")
    ] = None,
    resume: Annotated[
        Path | None,
        Opt(
            help="Continue RUN_DIR from its latest complete checkpoint, with its config.yaml; layout flags "
            "(--strategy, --nproc, ...) may change, and so may --steps or --lr."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        Opt(
            "--set",
            metavar="SECTION.KEY=VALUE",
            help="Override any config key: section.key=value (repeatable).",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        Opt(
            "--dry-run", help="Print the resolved config, parameter counts, flops and memory per rank; exit."
        ),
    ] = False,
) -> None:
    """Train with one strategy and write a run directory (config.yaml, metrics.jsonl, summary.json, model/)."""
    from moectl.config import flag_overrides, merge_overrides, parse_set_option
    from moectl.run.prepare import describe, prepare
    from moectl.run.report import print_run_summary
    from moectl.run.start import run
    from moectl.tables import output_console

    overrides = merge_overrides(
        parse_set_option(set_ or []),
        flag_overrides(
            strategy=strategy,
            nproc=nproc,
            dp_size=dp_size,
            tp_size=tp_size,
            ep_size=ep_size,
            nnodes=nnodes,
            node_rank=node_rank,
            rdzv_endpoint=rdzv_endpoint,
            steps=steps,
            global_batch=global_batch,
            micro_batch=micro_batch,
            seq_len=seq_len,
            lr=lr,
            seed=seed,
            model=model,
            data=data,
            val_data=val_data,
            checkpoint_every=checkpoint_every,
        ),
    )
    the_plan, run_dir = prepare(config, overrides, resume, run_dir)
    if dry_run:
        describe(the_plan, output_console())
        return
    where = run(the_plan, run_dir)
    if _is_rank0():
        print_run_summary(where, output_console())


@app.command("compare-weights", cls=_Command, short_help="Compare two checkpoints tensor by tensor.")
def compare_weights(
    a: Annotated[
        Path, typer.Argument(metavar="A", help="Checkpoint A: a .safetensors file or an HF model directory.")
    ],
    b: Annotated[
        Path, typer.Argument(metavar="B", help="Checkpoint B, the reference (the error is relative to ‖B‖).")
    ],
    rtol: Annotated[float, Opt(help="Largest global relative error ‖A−B‖₂/‖B‖₂ that still matches.")] = 1e-2,
    per_tensor_rtol: Annotated[
        float | None, Opt(help="Also require every tensor's relative error ≤ this.")
    ] = None,
    top: Annotated[int, Opt(help="Rows of the per-tensor table (worst first).")] = 20,
    json_path: Annotated[
        Path | None, Opt("--json", help="Write the whole report as JSON to this path.")
    ] = None,
) -> None:
    """Prove two checkpoints equal: exit 0 match, 1 mismatch, 2 bad input. Per-expert and fused layouts agree."""
    from moectl.compare import compare_command

    raise typer.Exit(
        compare_command(a, b, rtol=rtol, per_tensor_rtol=per_tensor_rtol, top=top, json_path=json_path)
    )


@app.command(cls=_Command, short_help="Turn a step checkpoint into a Hugging Face model directory.")
def export(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            metavar="CHECKPOINT",
            help="RUN_DIR/checkpoints/step_N of any layout, or a run directory (its latest complete checkpoint).",
        ),
    ],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="New (or empty) output directory.")],
    dtype: Annotated[
        str, Opt(help="auto (the dtype the run writes its model/ in), float32 or bfloat16.")
    ] = "auto",
    max_shard_size: Annotated[
        str, Opt(help="Largest safetensors file before the weights are sharded with an index, e.g. 5GB.")
    ] = "50GB",
    no_tokenizer: Annotated[
        bool, Opt("--no-tokenizer", help="Leave out the run's tokenizer (data.tokenizer).")
    ] = False,
) -> None:
    """Write a step checkpoint as save_pretrained would (config, safetensors, tokenizer), on the CPU, tensor by tensor."""
    from moectl.io.export import export_checkpoint

    source = export_checkpoint(checkpoint, out, dtype, max_shard_size, tokenizer=not no_tokenizer)
    print(f"exported step {source.step} of {source.run_dir} to {out}")


@app.command(cls=_Command, short_help="Time many strategies; --verify checks their weights.")
def bench(
    strategies: Annotated[
        str | None,
        Opt(help="Comma-separated names, module:Class or .py files. Default: every available strategy."),
    ] = None,
    nproc: Annotated[
        int | None, Opt(help="Processes for the parallel strategies (single: 1). Default: GPUs, or 2 on CPU.")
    ] = None,
    config: Annotated[
        str | None, Opt("--config", "-c", help="Preset name (see configs/) or a YAML path. Default: tiny.")
    ] = None,
    steps: Annotated[int | None, Opt(help="Optimizer steps per run.")] = None,
    warmup: Annotated[
        int | None, Opt(help="Steps left out of the timing (train.timing_warmup_steps).")
    ] = None,
    global_batch: Annotated[int | None, Opt(help="Sequences per optimizer step, the same for all.")] = None,
    micro_batch: Annotated[int | None, Opt(help="Sequences per forward/backward on one rank.")] = None,
    seq_len: Annotated[int | None, Opt(help="Tokens per sequence.")] = None,
    lr: Annotated[float | None, Opt(help="Learning rate, the same for every run.")] = None,
    set_: Annotated[
        list[str] | None,
        Opt(
            "--set",
            metavar="SECTION.KEY=VALUE",
            help="Config override for every run: section.key=value (repeatable).",
        ),
    ] = None,
    strategy_args: Annotated[
        str | None,
        Opt(help="Extra train flags per strategy, e.g. 'ep:--ep-size 4;mixed:--dp-size 2 --tp-size 2'."),
    ] = None,
    verify: Annotated[
        bool,
        Opt("--verify", help="Also run the reference and compare every strategy's final weights with it."),
    ] = False,
    reference: Annotated[
        str, Opt(help="auto (single when the model fits one device, else fsdp), single or fsdp.")
    ] = "auto",
    rtol: Annotated[
        float | None, Opt(help="Largest relative weight error that passes. Default: 1e-5 fp32, 1e-2 bf16.")
    ] = None,
    run_timeout: Annotated[
        float | None, Opt(help="Seconds after which one run is stopped and counted as failed.")
    ] = None,
    prune_models: Annotated[
        bool, Opt("--prune-models", help="Delete each run's model/ once compared (large models fill disks).")
    ] = False,
    out: Annotated[Path | None, Opt(help="Output directory. Default: runs/bench-<time>.")] = None,
) -> None:
    """Time every strategy on the same config and batch; with --verify, check each against the reference."""
    import time

    from moectl.bench.run_list import BenchOptions, default_nproc, default_strategies, parse_strategy_list
    from moectl.bench.runner import bench_command

    options = BenchOptions(
        strategies=parse_strategy_list(strategies) if strategies is not None else default_strategies(),
        nproc=nproc if nproc is not None else default_nproc(),
        out=out or Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}",
        config=config,
        steps=steps,
        warmup=warmup,
        global_batch=global_batch,
        micro_batch=micro_batch,
        seq_len=seq_len,
        lr=lr,
        sets=set_ or [],
        strategy_args=strategy_args,
        verify=verify,
        reference=reference,
        rtol=rtol,
        run_timeout_s=run_timeout,
        prune_models=prune_models,
    )
    raise typer.Exit(bench_command(options))


@app.command(cls=_Command, short_help="Predict speed and memory of every layout (no GPU).")
def plan(
    config: Annotated[
        str | None, Opt("--config", "-c", help="Preset name (see configs/) or a YAML path. Default: tiny.")
    ] = None,
    gpus: Annotated[int, Opt(help="GPUs per node.")] = 1,
    nodes: Annotated[int, Opt(help="Nodes (each with --gpus GPUs).")] = 1,
    gpu: Annotated[
        str, Opt(help="GPU kind: h200, h100 (H100 SXM 80 GB), a100 (A100 SXM 80 GB) or b200.")
    ] = "h200",
    gpu_mem: Annotated[float | None, Opt(help="Memory per GPU in GiB. Default: the kind's.")] = None,
    seq_len: Annotated[int | None, Opt(help="Tokens per sequence.")] = None,
    global_batch: Annotated[int | None, Opt(help="Sequences per optimizer step.")] = None,
    set_: Annotated[
        list[str] | None,
        Opt(
            "--set",
            metavar="SECTION.KEY=VALUE",
            help="Config override: section.key=value (repeatable), e.g. train.optimizer=adamw or "
            "train.precision=bf16 (default auto: mixed, as on a GPU).",
        ),
    ] = None,
    all_variants: Annotated[
        bool, Opt("--all", help="Every micro-batch / checkpointing / compile variant, not only the best.")
    ] = False,
    json_out: Annotated[bool, Opt("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Predict tokens/s, MFU and peak memory of every parallel layout, best first; no GPU needed."""
    from moectl.plan.table import plan_command

    plan_command(config, gpus, nodes, gpu, gpu_mem, seq_len, global_batch, set_ or [], all_variants, json_out)


data_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Corpora: tokenize ahead of a run.",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(data_app, name="data", short_help="Corpora: tokenize ahead of a run.")


@data_app.command("prepare", cls=_Command, short_help="Tokenize a corpus into the token cache runs read.")
def data_prepare(
    source: Annotated[
        str,
        typer.Argument(
            metavar="SRC",
            help="A datasets.save_to_disk directory, a .parquet/.jsonl/.txt file or a folder of them.",
        ),
    ],
    tokenizer: Annotated[
        Path | None, Opt(help="Local tokenizer directory (data.tokenizer). Default: byte-level.")
    ] = None,
    format_: Annotated[str, Opt("--format", help="text or chat (data.format).")] = "text",
    text_field: Annotated[str, Opt(help="format=text: the column of documents (data.text_field).")] = "text",
    messages_field: Annotated[
        str, Opt(help="format=chat: the column of conversations (data.messages_field).")
    ] = "messages",
    cache_dir: Annotated[
        Path | None, Opt(help="Where token caches go (data.cache_dir). Default: ~/.cache/moectl/tokens.")
    ] = None,
    num_proc: Annotated[int, Opt(help="Tokenizing processes (data.num_proc); 0 = every core.")] = 0,
) -> None:
    """Tokenize SRC once into a memory-mapped token cache; runs with the same source, tokenizer and
    format (and every rank of them) map it instead of tokenizing again. Prints the cache directory."""
    from moectl.data.cache import prepare_command

    prepare_command(source, tokenizer, format_, text_field, messages_field, cache_dir, num_proc)


def _is_rank0() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage errors, aborts) of click, and of the copy of click that typer >= 0.24 vendors."""
    errors = {cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException"}
    aborts = {typer.Abort}
    try:
        import click

        errors.add(click.ClickException)
        aborts.add(click.exceptions.Abort)
    except ImportError:
        pass
    return tuple(errors), tuple(aborts)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> None:
    """Console entry point: bad input is one line on stderr and exit code 2, never a traceback.

    `argv` (default: sys.argv[1:]) lets tests run the CLI in-process. Click's own usage errors (an
    unknown flag, `--steps abc`) are reduced to one line as well, instead of a boxed usage screen. A
    worker of an outside torchrun leaves without interpreter finalization once its output is out
    (`moectl.run.runtime.exit_without_finalization`).
    """
    silence_known_import_noise()
    if argv is not None or not under_torchrun():
        _main(argv)
        return
    try:
        _main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    from moectl.run.runtime import exit_without_finalization

    exit_without_finalization(code)


def _main(argv: list[str] | None) -> None:
    click_errors, aborts = _click_exception_types()
    try:
        code = app(args=argv, prog_name="moectl", standalone_mode=False)
    except click_errors as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `moectl`: the help screen is the answer
            exc.show()
            sys.exit(exc.exit_code)
        context = getattr(exc, "ctx", None)
        hint = f" (see '{context.command_path} --help')" if context is not None else ""
        print(f"error: {_one_line(exc.format_message())}{hint}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except aborts as exc:
        if isinstance(exc.__cause__, EOFError):  # click turns any EOFError into an abort: not a Ctrl-C
            raise exc.__cause__ from None
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except UsageError as exc:
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except (WorkerFailed, TrainingStopped) as exc:
        print(f"{getattr(exc, 'label', 'error')}: {_one_line(str(exc))}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        code = 130
    if code == 130:  # typer turns a KeyboardInterrupt (a second Ctrl-C) into exit code 130
        print("interrupted", file=sys.stderr)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
