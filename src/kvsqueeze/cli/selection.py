"""`kvsqueeze train-predictor`: collect attention traces and train AttentionPredictor's CNN for a model."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import KVSqueezeError


def register_selection(main: click.Group) -> None:
    from ..models import DEFAULT_MODEL

    @main.command("train-predictor")
    @click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model alias, HF hub id or local directory.")
    @click.option("--text-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="Directory of .txt files to collect traces on (default: the text shipped with kvsqueeze).")
    @click.option("--n-seq", type=click.IntRange(min=2), default=16, show_default=True,
                  help="Calibration sequences (a fifth of them, from held-out texts, validate).")
    @click.option("--seq-len", type=click.IntRange(min=256), default=2048, show_default=True,
                  help="Longest sequence in tokens (lengths are drawn from seq-len/2 .. seq-len).")
    @click.option("--steps", type=click.IntRange(min=1), default=64, show_default=True,
                  help="Decode steps (teacher-forced) recorded per sequence.")
    @click.option("--copy-share", type=click.FloatRange(0.0, 1.0), default=0.3, show_default=True,
                  help="Share of sequences that are the synthetic copy task.")
    @click.option("--retrieval-share", type=click.FloatRange(0.0, 1.0), default=0.3, show_default=True,
                  help="Share of sequences that are needle-retrieval tasks (the rest: plain text windows).")
    @click.option("--epochs", type=click.IntRange(min=1), default=6, show_default=True)
    @click.option("--max-minutes", type=click.FloatRange(min=0.0), default=4.0, show_default=True,
                  help="Stop training after this long (the whole command stays under 10 minutes on 2 CPU cores; "
                       "the best validated state is kept). 0: no limit (all epochs).")
    @click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Checkpoint path (default: $KVSQUEEZE_CACHE/predictor/<model key>.safetensors).")
    @click.option("--seed", type=int, default=0, show_default=True)
    def train_predictor_cmd(model, text_dir, n_seq, seq_len, steps, copy_share, retrieval_share, epochs, max_minutes,
                            output, seed):
        """Train AttentionPredictor (the 4,833-parameter CNN) on attention traces of MODEL."""
        from ..models import load_model
        from ..selection.attention_predictor import n_parameters
        from ..training.predictor import TrainConfig, train_predictor

        texts = None
        if text_dir is not None:
            if not text_dir.is_dir():
                raise KVSqueezeError(f"text directory not found: {text_dir}")
            texts = [p.read_text(errors="replace") for p in sorted(text_dir.glob("*.txt"))]
            if not texts:
                raise KVSqueezeError(f"no .txt files in {text_dir}")
        cfg = TrainConfig(epochs=epochs, seed=seed, max_seconds=60 * max_minutes if max_minutes else None)
        if copy_share + retrieval_share > 1.0:
            raise KVSqueezeError("--copy-share + --retrieval-share must be at most 1")
        mdl, tok = load_model(model)
        res, path, times = train_predictor(mdl, tok, texts, n_seq=n_seq, seq_len=seq_len, steps=steps,
                                           copy_share=copy_share, retrieval_share=retrieval_share, cfg=cfg,
                                           path=output, seed=seed)
        r = res.val_recovery
        rp = times["replay"]
        click.echo(f"predictor: {n_parameters(res.net):,} parameters, saved to {path}")
        done = res.history[-1].get("batches", 0) if res.history else 0
        best = ("the initial state (no validated state beat it)" if res.best_step == 0
                else f"batch {res.best_step} (epoch {res.best_epoch})")
        click.echo(f"checkpoint: {best}, after {done} training batches; selection metric (decode replay recovery at "
                   f"{rp['budget']} tokens on the validation traces): learned {r['learned']:.4f}, history mean "
                   f"{r['mean']:.4f}, last row {r['last']:.4f}")
        click.echo(f"decode replay at {rp['budget']} tokens: AttentionPredictor {rp['ap_mean']:.4f}, Quest "
                   f"{rp['quest_mean']:.4f}, oracle top pages {rp['oracle_mean']:.4f}")
        click.echo(f"examples: {res.n_train_examples:,} train, {res.n_val_examples:,} val; time: traces "
                   f"{times['traces']:.0f} s, training {times['train']:.0f} s, total {times['total']:.0f} s")
