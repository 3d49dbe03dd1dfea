"""`kvsqueeze eval`, `kvsqueeze sweep` and `kvsqueeze report` (registered on the main CLI group by `register`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import KVSqueezeError
from ..models import DEFAULT_MODEL
from .options import _floats, _quants, build_method, method_options, offload_option, select_spec

DEFAULT_RESULTS = "results/kvsqueeze.sqlite"


def _ints(text: str | None, what: str) -> list[int] | None:
    if not text:
        return None
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KVSqueezeError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 64:
        raise KVSqueezeError(f"{what} must be integers >= 64, got {text!r}")
    return vals


def _given_on_command_line(param: str) -> bool:
    """Whether the running click command got `param` from the command line (not its default or a config)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return False
    return ctx.get_parameter_source(param) == click.core.ParameterSource.COMMANDLINE


def _selects(select: str, budgets: str) -> list[tuple[str | None, int | None]]:
    """--select x --select-budget: (selector, budget) pairs; 'none' once, whatever the budgets."""
    from ..selection import get_selector, split_selectors

    names = split_selectors(select)
    if not names:
        raise KVSqueezeError("--select is empty (use 'none' for dense attention)")
    names = [select_spec(n) for n in names]  # one key per configuration, however it was typed
    try:
        bs = [int(x) for x in budgets.split(",") if x.strip()]
    except ValueError:
        raise KVSqueezeError(f"--select-budget must be comma-separated integers, got {budgets!r}") from None
    if not bs or min(bs) < 32:
        raise KVSqueezeError(f"--select-budget must be integers >= 32, got {budgets!r}")
    if set(names) == {"none"} and _given_on_command_line("select_budget"):
        raise KVSqueezeError("--select-budget is the budget of --select (quest, attention_predictor, leoam): give "
                             "--select "
                             "too, or drop --select-budget")
    out: list[tuple[str | None, int | None]] = []
    for n in names:
        out += [(None, None)] if n == "none" else [(n, b) for b in bs]
    for n, b in out:  # an option the selector does not take, or a bad value: one line now, before any model
        if n is not None:
            get_selector(n, b)
    return list(dict.fromkeys(out))


def task_options(f):
    from ..devices import device_map_option, device_options

    opts = [
        click.option("--model", default=DEFAULT_MODEL, show_default=True,
                     help="Model alias, HF hub id or local directory."),
        click.option("--tasks", default="passkey,niah", show_default=True,
                     help="Comma-separated: passkey, niah, niah_single, niah_multikey, niah_multivalue, "
                          "niah_multiquery, vt, cwe, fwe, ppl; groups 'ruler' and 'suite'; or data: jsonl:PATH, "
                          "hf:ORG/NAME[:DIR], longbench[:SUBSET], ruler-hub[:LEN]."),
        click.option("--length", type=click.IntRange(min=64), default=2048, show_default=True,
                     help="Tokens per sample (prompt + answer budget), in the model's tokenizer."),
        click.option("--samples", type=click.IntRange(min=1), default=5, show_default=True,
                     help="Samples per task (NIAH spreads them over its grid, at least one per cell)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated tasks."),
        click.option("--haystack-dir", type=click.Path(path_type=Path), default=None,
                     help="Directory of .txt files for the essay haystack (default: a procedural haystack)."),
        click.option("--niah-lengths", default=None, help="NIAH grid lengths, comma-separated (default: --length)."),
        click.option("--niah-depths", default="0,0.25,0.5,0.75,1", show_default=True, help="NIAH grid depths."),
        click.option("--ppl-tokens", type=click.IntRange(min=1), default=64, show_default=True,
                     help="Tokens scored by the capped-cache perplexity task."),
        click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_RESULTS,
                     show_default=True, help="SQLite results file (created; reruns resume it)."),
        click.option("--query-aware", is_flag=True, help="Compress context and question together."),
        click.option("--chunk-size", type=click.IntRange(min=1), default=None,
                     help="Chunked prefill (then every pair re-runs its own prefill)."),
        click.option("--no-share-prefill", is_flag=True,
                     help="Re-run the prefill for every (method, compression_ratio) pair (the slow reference)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Answers of one sample decoded for this many (method, compression_ratio) caches at once "
                          "(1: one by one)."),
        click.option("--quant", "quant", default="none", show_default=True,
                     help="Comma-separated storage schemes crossed with every (method, compression_ratio): none (full "
                          "precision), kivi-2, kivi-4, gear-4, mikv-8-2, zipcache-4-2 (see `kvsqueeze generate`)."),
        click.option("--select", "select", default="none", show_default=True,
                     help="Comma-separated decode-time selectors crossed with the grid: none, quest, "
                          "attention_predictor (needs `kvsqueeze train-predictor`), leoam (LeoAM's variable-sized "
                          "chunks of pages judged by min/max key abstracts); options as NAME(option=value, ...), "
                          "e.g. 'leoam(max_chunk=4,refine=4)'. They keep the whole cache."),
        click.option("--select-budget", default="512", show_default=True,
                     help="Comma-separated token budgets per decoding step for --select, in whole pages of 16 "
                          "consecutive tokens (rounded down to a multiple of 16; each >= 32)."),
        click.option("--code-version", default=None,
                     help="Override the code version in the result keys (default: package version + git commit)."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
        offload_option,  # --offload
        device_options,  # --device, --dtype, --attn-implementation
        device_map_option,  # --device-map
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _run(pairs, *, model, tasks, length, samples, seed, haystack_dir, niah_lengths, niah_depths, ppl_tokens,
         results, query_aware, chunk_size, no_share_prefill, batch_size, code_version, quiet, quant=None,
         select=None, select_budget=None, device="cpu", dtype="auto", attn_implementation="sdpa", offload=None,
         device_map="none"):
    from ..devices import device_map_device, resolve_attn, resolve_device, resolve_device_map, resolve_dtype
    from ..tasks import TaskConfig, expand_tasks
    from ..evaluation.distributed import init_distributed, world_from_env
    from ..evaluation.store import code_version as auto_version

    task_names = expand_tasks(tasks)
    cfg = TaskConfig(length=length, samples=samples, seed=seed,
                     haystack_dir=str(haystack_dir) if haystack_dir else None,
                     niah_lengths=_ints(niah_lengths, "--niah-lengths"),
                     niah_depths=_floats(niah_depths, "--niah-depths", 0.0, 1.0, False), ppl_tokens=ppl_tokens)
    version = code_version or auto_version()
    dmap = resolve_device_map(device_map, device)
    if dmap is not None and world_from_env()[1] > 1:
        raise KVSqueezeError("--device-map splits one model over the GPUs; under torchrun each rank holds a model of "
                             "its own (--device cuda): drop one of them")
    dev = resolve_device(device) if dmap is None else device_map_device(dmap)
    dt = resolve_dtype(dtype, dev)
    attn = resolve_attn(attn_implementation)
    dist = init_distributed(dev)  # torchrun (WORLD_SIZE > 1): this rank's device, process group joined
    try:
        _run_ranked(pairs, dist, model=model, task_names=task_names, cfg=cfg, version=version, dt=dt,
                    results=results, seed=seed, chunk_size=chunk_size, no_share_prefill=no_share_prefill,
                    batch_size=batch_size, quiet=quiet, attn=attn, device_map=dmap)
    finally:
        dist.close()


def _run_ranked(pairs, dist, *, model, task_names, cfg, version, dt, results, seed, chunk_size, no_share_prefill,
                batch_size, quiet, attn="sdpa", device_map=None):
    """The rest of `_run` on one rank (the only one when not distributed): rank 0 creates the store before the
    others open it; after the sweep, a barrier, then rank 0 prints the summary with counts summed over ranks."""
    from ..models import load_model
    from ..tasks import build_samples
    from ..evaluation.store import ResultStore, error_notes, summary_table
    from ..evaluation.sweep import run_sweep

    if dist.active and not dist.is_main:
        dist.barrier()  # rank 0 creates the file (and its WAL) first
    try:
        store = ResultStore(results)
    except OSError as e:
        raise KVSqueezeError(f"cannot open results file {results}: {e}") from None
    finally:
        if dist.active and dist.is_main:
            dist.barrier()
    if device_map is None:
        mdl, tok = load_model(model, dtype=dt, device=str(dist.device), attn_implementation=attn)
    else:  # one model split over the devices (not distributed: `_run` refuses both)
        mdl, tok = load_model(model, dtype=dt, attn_implementation=attn, device_map=device_map)
    smp = build_samples(tok, task_names, cfg)
    if not quiet and dist.is_main:
        ranks = f"; {dist.world} ranks ({dist.backend}), samples dealt round-robin" if dist.active else ""
        where = dist.device if device_map is None else f"device_map {device_map}"
        click.echo(f"{len(smp)} samples x {len(pairs)} configurations on {model} ({where}, "
                   f"{str(dt).replace('torch.', '')}); code {version}; results -> {results}{ranks}", err=True)
    try:
        res = run_sweep(mdl, tok, smp, pairs, store, model_name=model, seed=seed, code_version=version,
                        share_prefill=not no_share_prefill, chunk_size=chunk_size,
                        progress=not quiet and dist.is_main, batch_size=batch_size, dist=dist)
    except KeyboardInterrupt:
        click.echo(f"interrupted: {store.count()} rows are stored in {results}; run the same command to resume",
                   err=True)
        sys.exit(130)
    if dist.active:
        dist.barrier()  # every rank's rows are committed
        res.added, res.prefills = (int(x) for x in dist.reduce([res.added, res.prefills]))
        res.seconds = dist.reduce([res.seconds], op="max")[0]  # the ranks ran side by side: the slowest one's time
        if not dist.is_main:
            store.close()
            return
    df = store.frame()
    keys = {(p.name, p.params_json, p.compression_ratio) for p in pairs}
    ids = {(s.task, s.sample_id) for s in smp}
    import numpy as np

    sel = np.array([(m, pj, r) in keys and (t, i) in ids for m, pj, r, t, i in
                    zip(df.method, df.params_json, df.compression_ratio, df.task, df.sample_id)], dtype=bool)
    mine = df[sel & (df.model == model).to_numpy() & (df.code_version == version).to_numpy()
              & (df.seed == seed).to_numpy()]
    click.echo(f"{res.added} rows added, {res.skipped} already stored; {res.prefills} shared prefills; "
               f"{res.seconds:.1f} s")
    if not mine.empty:
        import pandas as pd

        with pd.option_context("display.width", 200, "display.max_columns", 100, "display.float_format",
                               "{:.3f}".format):
            click.echo("mean score (string match in [0, 1]; ppl = perplexity, lower is better):")
            click.echo(summary_table(mine).to_string())
            for line in error_notes(mine):
                click.echo(line)
    store.close()


def register(main: click.Group) -> None:
    """Add `eval`, `sweep` and `report` to the main command group (`cli` calls this; this module never imports
    `cli`: the options both use live in `kvsqueeze.cli.options`)."""

    @click.command("eval")
    @method_options
    @click.option("--reference/--no-reference", default=True, show_default=True,
                  help="Also run the uncompressed reference (method 'full'); it shares the prefill, so it is cheap.")
    @task_options
    def eval_cmd(method, compression_ratio, budget, exempt_layers, compression_interval, reference, **kw):
        """Evaluate one method on the task suite; rows go to the results store (resumable)."""
        from ..evaluation.sweep import make_pairs

        m = build_method(method, compression_ratio, budget, exempt_layers, compression_interval)
        quants, selects = _quants(kw["quant"]), _selects(kw["select"], kw["select_budget"])
        pairs = make_pairs([m], [compression_ratio], query_aware=kw["query_aware"], quants=quants,
                           selects=selects, offload=kw["offload"])
        if reference and (m.name != "full" or quants != [None] or selects != [(None, None)]):
            ref = make_pairs(["full"], [0.0], query_aware=kw["query_aware"])
            pairs = ref + [p for p in pairs if p.params_json != ref[0].params_json or p.name != "full"]
        _run(pairs, **kw)


    @click.command("sweep")
    @click.option("--methods", default="all", show_default=True,
                  help="Comma-separated method names, or 'all' (see `kvsqueeze methods`). 'full' runs once. A method's "
                       "parameters go in parentheses (commas inside them do not split): "
                       "'kvmerger,kvmerger(threshold=0.5)' runs the default and the tuned one as two configurations.")
    @click.option("--compression-ratios", "--ratios", "compression_ratios", default="0.5,0.75,0.875",
                  show_default=True, help="Comma-separated fractions of tokens removed (kvpress's compression_ratio).")
    @click.option("--exempt-layers", default="", help="Comma-separated layer indices never compressed.")
    @click.option("--compression-interval", type=click.IntRange(min=0), default=0, show_default=True,
                  help="Also compress every N decoding steps (such pairs re-run their prefill).")
    @task_options
    def sweep_cmd(methods, compression_ratios, exempt_layers, compression_interval, **kw):
        """Evaluate a grid of methods x compression_ratios x tasks x samples, one prefill per sample (resumable)."""
        from ..methods import ALL, METHODS, split_methods
        from ..evaluation.sweep import make_pairs

        names = list(ALL) if methods.strip() == "all" else split_methods(methods)
        if not names:
            raise KVSqueezeError("--methods is empty")
        rs = _floats(compression_ratios, "--compression-ratios", 0.0, 1.0, True)
        built = [build_method(n, rs[0], None, exempt_layers, compression_interval) for n in names]  # validates names
        skipped: list[str] = []
        pairs = make_pairs([b for b in built], rs, query_aware=kw["query_aware"], quants=_quants(kw["quant"]),
                           selects=_selects(kw["select"], kw["select_budget"]), skipped=skipped,
                           offload=kw["offload"])
        if skipped:
            if not pairs:
                raise KVSqueezeError(f"no configuration of the grid composes ({', '.join(skipped)}): see "
                                     "`kvsqueeze methods` for which methods take which --quant")
            click.echo(f"note: skipped {len(skipped)} method + storage combination(s) that do not compose: "
                       f"{', '.join(skipped)}", err=True)
        _run(pairs, **kw)


    @click.command("report")
    @click.argument("results", type=click.Path(path_type=Path))
    @click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("report.html"),
                  show_default=True, help="The HTML file to write.")
    @click.option("--title", default="kvsqueeze evaluation report", show_default=True)
    @click.option("--markdown", is_flag=True, help="Also print the mean-score table as Markdown.")
    @click.option("--model", default=None, help="With --markdown: the model whose table is printed.")
    @click.option("--bootstrap", type=click.IntRange(min=0), default=0, show_default=True,
                  help="Add a 95% bootstrap interval (this many resamples of the samples, seeded) to every cell.")
    def report_cmd(results, output, title, markdown, model, bootstrap):
        """Write one static HTML page (plots embedded, no server) from a results file."""
        from ..evaluation.report import load_results, markdown_table, write_report

        n = write_report(results, output, title=title, bootstrap=bootstrap)
        click.echo(f"{output}: {n} plots")
        if markdown:
            click.echo(markdown_table(load_results(results), model, bootstrap=bootstrap))

    @click.command("frontier")
    @click.argument("results", type=click.Path(path_type=Path))
    @click.option("--task", default=None, help="Only this task (default: every task, then the overall mean).")
    @click.option("--metric", default=None,
                  help="Score every row by this metric of its metrics_json (e.g. string_match_part; default: "
                       "each task's primary metric).")
    @click.option("--model", default=None, help="Only this model.")
    @click.option("--bootstrap", type=click.IntRange(min=0), default=0, show_default=True,
                  help="Add a 95% bootstrap interval per point (this many resamples, seeded).")
    @click.option("--all", "show_all", is_flag=True, help="Also list the dominated configurations.")
    def frontier_cmd(results, task, metric, model, bootstrap, show_all):
        """Print the Pareto frontier of score against 16-bit KV bytes, per task and overall."""
        import pandas as pd

        from ..evaluation.frontier import frontier, frontier_tables
        from ..evaluation.report import load_results

        df = load_results(results)
        if model is not None:
            if model not in set(df.model):
                raise KVSqueezeError(f"no results for model {model!r} in {results}")
            df = df[df.model == model]
        pts = frontier(df, task=task, metric=metric, bootstrap=bootstrap)
        click.echo("factor = full 16-bit KV bytes / KV bytes held (16-bit-normalised); +-1 sample = how much one "
                   "sample moves the score; attends = tokens per decoding step (selectors keep the whole cache)")
        with pd.option_context("display.width", 250, "display.max_columns", 50, "display.max_colwidth", 60):
            for head, table in frontier_tables(pts, all_points=show_all):
                click.echo("")
                click.echo(head)
                click.echo(table.to_string(index=False))

    main.add_command(eval_cmd, "eval")
    main.add_command(sweep_cmd, "sweep")
    main.add_command(report_cmd, "report")
    main.add_command(frontier_cmd, "frontier")
