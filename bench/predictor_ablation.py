"""AttentionPredictor ablation (issue 4): what the learned CNN adds over fixed rules, by decode replay.

    nice python bench/predictor_ablation.py --minutes 2 [--out bench/results/predictor_ablation.json]

Collects the calibration traces once (the same sequences `kvsqueeze train-predictor` uses), then trains the CNN
under several set-ups with the same time budget each, and replays decoding on the held-out validation traces
(`training.simulate`: the real selector code, prompt-initialised history, sparse rows + a full row every 5 steps,
GQA max) at budgets 256 / 512 / 1024. Rows: the fixed rules (last history row, history mean, the 0.25 / 0.75 blend
the default initialisation represents), each training set-up, Quest and the oracle (true top pages per kv head).
Numbers are recovery rates: the share of the true attention mass on the selected tokens, mean of layers 2..

Caveat: the validation traces also pick each set-up's checkpoint (the best validated state), so the learned rows
are slightly optimistic; `bench/selection_eval.py` is the independent, end-to-end test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SETUPS = {  # name -> TrainConfig overrides
    "random init (PyTorch default), MSE": {"init": "random", "freeze_init": False},
    "mean init, free": {"init": "mean", "freeze_init": False},
    "blend init, free": {"init": "blend", "freeze_init": False},
    "blend init, frozen + residual (default)": {"init": "blend", "freeze_init": True},
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--minutes", type=float, default=2.0, help="Training time per set-up.")
    ap.add_argument("--budgets", default="256,512,1024")
    ap.add_argument("--setups", default=",".join(str(i) for i in range(len(SETUPS))),
                    help="Indices of the set-ups to train (default: all).")
    ap.add_argument("--out", default="bench/results/predictor_ablation.json")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    import kvsqueeze as kq
    from kvsqueeze.runtime.calibration import default_calibration_texts
    from kvsqueeze.training.predictor import TrainConfig, collect_traces, simulate, train
    from kvsqueeze.training.traces import calibration_sequences

    torch.set_grad_enabled(False)
    model, tok = kq.load_model(a.model)
    t0 = time.perf_counter()
    texts = ["\n\n".join(default_calibration_texts())]
    tr_seqs, va_seqs = calibration_sequences(tok, texts, 16, 2048, copy_share=0.3, retrieval_share=0.3, steps=64,
                                             seed=0)
    train_tr = collect_traces(model, tr_seqs, desc="traces (train)")
    val_tr = collect_traces(model, va_seqs, desc="traces (val)")
    print(f"traces: {len(train_tr)} train, {len(val_tr)} val, {time.perf_counter() - t0:.0f} s", flush=True)
    budgets = [int(b) for b in a.budgets.split(",")]

    rows = {}
    from kvsqueeze.selection.attention_predictor import PredictorNet

    blend = PredictorNet().init_blend(0.75, noise=0.0)  # exactly the rule the default initialisation computes
    for name, pred in (("rule: last row", "last"), ("rule: history mean", "mean"),
                       ("rule: 0.25 mean + 0.75 last", blend)):
        rows[name] = {b: simulate(val_tr, b, pred, with_quest=False)["ap_mean"] for b in budgets}
        print(name, rows[name], flush=True)
    names = list(SETUPS)
    for i in (int(x) for x in a.setups.split(",")):
        name = names[i]
        torch.set_grad_enabled(True)
        cfg = TrainConfig(max_seconds=60 * a.minutes, **SETUPS[name])
        res = train(train_tr, val_tr, cfg, progress=False)
        torch.set_grad_enabled(False)
        rows[name] = {b: simulate(val_tr, b, res.net, with_quest=False)["ap_mean"] for b in budgets}
        rows[name]["trained_batches"] = res.history[-1].get("batches", 0)
        rows[name]["best_step"] = res.best_step
        print(name, rows[name], flush=True)
    ref = {b: simulate(val_tr, b, "last") for b in budgets}
    rows["Quest"] = {b: ref[b]["quest_mean"] for b in budgets}
    rows["oracle (true top pages, Quest's count)"] = {b: ref[b]["oracle_mean"] for b in budgets}

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"minutes_per_setup": a.minutes, "rows": rows}, indent=1))
    print(f"\ndecode replay on the validation traces, recovery rate (layers 2..), {a.minutes:g} min training each\n")
    print("| selector | " + " | ".join(f"B={b}" for b in budgets) + " | note |")
    print("|---|" + "---|" * len(budgets) + "---|")
    for name, r in rows.items():
        note = (f"best state at batch {r['best_step']} of {r['trained_batches']}"
                if "trained_batches" in r else "")
        print(f"| {name} | " + " | ".join(f"{r[b]:.4f}" for b in budgets) + f" | {note} |")


if __name__ == "__main__":
    main()
