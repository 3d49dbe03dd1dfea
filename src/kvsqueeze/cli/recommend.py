"""`kvsqueeze recommend`: the configuration with the best measured score at a byte budget (the logic lives in
`kvsqueeze.evaluation.recommend`)."""

from __future__ import annotations

import json

from ..errors import KVSqueezeError
from ..evaluation.recommend import (  # the logic; this module is the command
    DEFAULT_METHODS, DEFAULT_QUANTS, DEFAULT_RATIOS, DEFAULT_TASKS, _mine, calibrate, candidates, config_dict,
    describe, factor_bound, generate_line, line, meets, parse_bytes, parse_target, pick, safe_name,
)

# --- the command ------------------------------------------------------------------------------------------------
def register_recommend(main) -> None:
    """Add `kvsqueeze recommend` to the main command group."""
    import sys
    from pathlib import Path

    import click

    from ..devices import device_options
    from ..models import DEFAULT_MODEL
    from .options import _floats, _quants

    @click.command("recommend")
    @click.option("--model", default=DEFAULT_MODEL, show_default=True,
                  help="Model alias, HF hub id or local directory.")
    @click.option("--target", default=None,
                  help="Compression factor to reach: full 16-bit KV bytes / bytes held, e.g. 8x.")
    @click.option("--max-bytes", default=None,
                  help="Or: the most 16-bit KV bytes the cache may hold per calibration sample (512K, 2M, ...).")
    @click.option("--methods", default=DEFAULT_METHODS, show_default=True,
                  help="Candidate methods, comma-separated ('full' with --quant: quantization only); parameters in "
                       "parentheses: 'kvmerger(threshold=0.5)'.")
    @click.option("--compression-ratios", "--ratios", "compression_ratios", default=DEFAULT_RATIOS, show_default=True,
                  help="Candidate fractions of tokens removed (kvpress's compression_ratio).")
    @click.option("--quant", "quant", default=DEFAULT_QUANTS, show_default=True,
                  help="Candidate storage schemes, comma-separated ('none': full precision).")
    @click.option("--tasks", default=DEFAULT_TASKS, show_default=True,
                  help="Calibration tasks (generated ones; see `kvsqueeze sweep --help`).")
    @click.option("--length", type=click.IntRange(min=64), default=1024, show_default=True,
                  help="Tokens per calibration sample.")
    @click.option("--samples", type=click.IntRange(min=1), default=2, show_default=True,
                  help="Calibration samples per task.")
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration tasks.")
    @click.option("--tolerance", type=click.FloatRange(0.0, 0.5), default=0.01, show_default=True,
                  help="Relative slack on the target (rounding of kept tokens, quantization scales).")
    @click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="SQLite results file (default: $KVSQUEEZE_CACHE/recommend/<model>.sqlite; reruns resume).")
    @click.option("--config", "config_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Write the pick as JSON for `kvsqueeze generate --config FILE`.")
    @click.option("--verify-seed", type=int, default=None,
                  help="Then score the pick and the best eviction-only configuration on fresh samples of this "
                       "seed (same tasks and length; rows in the same store).")
    @click.option("--verify-samples", type=click.IntRange(min=1), default=5, show_default=True,
                  help="Samples per task for --verify-seed.")
    @click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                  help="Answers of one sample decoded for this many caches at once.")
    @click.option("--code-version", default=None, help="Override the code version in the result keys.")
    @click.option("--quiet", is_flag=True, help="No progress bar.")
    @device_options
    def recommend_cmd(model, target, max_bytes, methods, compression_ratios, quant, tasks, length, samples, seed,
                      tolerance, results, config_out, verify_seed, verify_samples, batch_size, code_version, quiet,
                      device="cpu", dtype="auto", attn_implementation="sdpa"):
        """Pick the configuration with the best measured score at a byte budget (short calibration sweep)."""
        from ..methods import ALL, METHODS, split_methods
        from ..models import cache_dir, load_model
        from ..tasks import TaskConfig, build_samples, expand_tasks
        from ..evaluation.store import ResultStore, code_version as auto_version
        from ..evaluation.sweep import make_pairs

        if target is None and max_bytes is None:
            raise KVSqueezeError("give a target: --target FACTOR (e.g. 8x) or --max-bytes SIZE (e.g. 2M)")
        if verify_seed is not None and verify_seed == seed:
            raise KVSqueezeError(f"--verify-seed must differ from the calibration --seed ({seed})")
        tgt = parse_target(target) if target is not None else None
        mb = parse_bytes(max_bytes) if max_bytes is not None else None
        names = list(ALL) if methods.strip() == "all" else split_methods(methods)
        if not names:
            raise KVSqueezeError("--methods is empty")
        rs = _floats(compression_ratios, "--compression-ratios", 0.0, 1.0, True)
        quants = _quants(quant)
        task_names = expand_tasks(tasks)
        if "ppl" in task_names:
            raise KVSqueezeError("recommend ranks string-match tasks; leave 'ppl' out of --tasks")
        skipped: list[str] = []
        pairs = make_pairs(names, rs, quants=quants, skipped=skipped)
        if not pairs:
            raise KVSqueezeError(f"no candidate configuration composes ({', '.join(skipped)})")
        if skipped and not quiet:
            click.echo(f"note: skipped {len(skipped)} method + storage combination(s) that do not compose: "
                       f"{', '.join(skipped)}")
        if tgt is not None:  # analytic pruning: an optimistic bound below the target cannot meet it
            bounds = [factor_bound(p.compression_ratio, p.quant, p.method.budget) for p in pairs]
            keep = [p for p, b in zip(pairs, bounds) if b >= tgt * (1.0 - tolerance)]
            if not keep:
                raise KVSqueezeError(f"no candidate configuration can reach {tgt:g}x: the largest factor available "
                                     f"is at most {max(bounds):.2f}x; add higher --compression-ratios or lower-bit "
                                     "--quant schemes")
            if not quiet:
                click.echo(f"{len(keep)} of {len(pairs)} candidates can reach {tgt:g}x (bound: "
                           "1/(1-compression_ratio) x 16/bits)", err=True)
            pairs = keep
        path = results or cache_dir() / "recommend" / f"{safe_name(model)}.sqlite"
        version = code_version or auto_version()
        try:
            store = ResultStore(path)
        except OSError as e:
            raise KVSqueezeError(f"cannot open results file {path}: {e}") from None
        from ..devices import resolve_attn, resolve_device, resolve_dtype

        dev = resolve_device(device)
        mdl, tok = load_model(model, dtype=resolve_dtype(dtype, dev), device=str(dev),
                              attn_implementation=resolve_attn(attn_implementation))
        smp = build_samples(tok, task_names, TaskConfig(length=length, samples=samples, seed=seed))
        if not quiet:
            click.echo(f"calibration: {len(smp)} samples ({', '.join(task_names)}, {length} tokens, seed {seed}) x "
                       f"{len(pairs)} configurations on {model}; code {version}; results -> {path}", err=True)
        log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
        try:
            rows, kept = calibrate(mdl, tok, smp, pairs, store, model_name=model, seed=seed, code_version=version,
                                   target=tgt, max_bytes=mb, tolerance=tolerance, progress=not quiet,
                                   batch_size=batch_size, log=log)
        except KeyboardInterrupt:
            click.echo(f"interrupted: {store.count()} rows are stored in {path}; run the same command to resume",
                       err=True)
            sys.exit(130)
        finally:
            store.close()
        rec = pick(rows, tgt, mb, tolerance)
        by_key = {(p.name, p.params_json, float(p.compression_ratio)): p for p in pairs}
        want = " and ".join(([f"{tgt:g}x"] if tgt is not None else []) +
                            ([f"<= {mb} bytes"] if mb is not None else []))
        n_ok = int(rec.table.meets.sum())
        click.echo(f"target {want}: {n_ok} of {len(rec.table)} measured configurations meet it "
                   f"(score: mean over {len(task_names)} tasks of string match in [0, 1])")
        click.echo("pick:      " + line(rec.best))
        click.echo("runner-up: " + (line(rec.runner_up) if rec.runner_up is not None else "none"))
        if rec.eviction_only is not None and rec.eviction_only is not rec.best:
            click.echo("best eviction-only: " + line(rec.eviction_only))
        best_pair = by_key[(rec.best["method"], rec.best["params_json"], float(rec.best["compression_ratio"]))]
        info = {"target": tgt, "max_bytes": mb, "tasks": task_names, "length": length, "samples": samples,
                "seed": seed, "code_version": version, "results": str(path)}
        if rec.runner_up is not None:
            info["runner_up"] = describe(rec.runner_up)
        cfg = config_dict(best_pair, model, rec.best, info)
        click.echo(generate_line(cfg))
        if verify_seed is not None:
            chosen = [best_pair]
            if rec.eviction_only is not None and rec.eviction_only is not rec.best:
                e = rec.eviction_only
                chosen.append(by_key[(e["method"], e["params_json"], float(e["compression_ratio"]))])
            fresh = build_samples(tok, task_names, TaskConfig(length=length, samples=verify_samples,
                                                              seed=verify_seed))
            store = ResultStore(path)
            try:
                from ..evaluation.sweep import run_sweep

                run_sweep(mdl, tok, fresh, chosen, store, model_name=model, seed=verify_seed, code_version=version,
                          progress=not quiet, batch_size=batch_size)
                vrows = _mine(store.frame(), chosen, fresh, model, verify_seed, version)
            finally:
                store.close()
            vt = candidates(vrows)
            click.echo(f"fresh samples (seed {verify_seed}, {verify_samples} per task):")
            for who, p in zip(("pick", "eviction-only"), chosen):
                r = vt[(vt.method == p.name) & (vt.params_json == p.params_json)
                       & (vt.compression_ratio == float(p.compression_ratio))]
                if not r.empty:
                    click.echo(f"  {who}: " + line(r.iloc[0].to_dict()))
            if len(chosen) == 1:
                click.echo("  (no eviction-only configuration meets the target)" if rec.eviction_only is None
                           else "  (the pick is eviction-only)")
        if config_out is not None:
            try:
                config_out.parent.mkdir(parents=True, exist_ok=True)
                config_out.write_text(json.dumps(cfg, indent=2) + "\n")
            except OSError as e:
                raise KVSqueezeError(f"cannot write {config_out}: {e}") from None
            click.echo(f"config written to {config_out} (kvsqueeze generate --config {config_out} ...)")

    main.add_command(recommend_cmd, "recommend")
