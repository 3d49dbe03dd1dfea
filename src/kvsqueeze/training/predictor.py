"""Training AttentionPredictor's CNN on collected traces (see `traces.py`).

Examples: for a trace and a decode step s, the input is the H = 64 history rows before the step, the sink and
local pages cropped (as at decoding time), one example per (layer, query head); the target is the step's
page-max-pooled attention on the same pages (the paper's "blocks" are our pages). Loss: MSE (the paper's). Each
batch is one (trace, step) with a random subset of its (layer, head) series, so every example of a batch has the
same width.

Checkpoint selection: after each epoch, the attention recovery rate on the validation traces (texts no training
sequence saw): per (layer, head, step), the share of the true attention mass on sink + local + the top-k predicted
middle pages. The epoch with the best rate is kept. Two trivial predictors are measured on the same examples
for reference: the last history row ("last") and the history mean ("mean").
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..selection.attention_predictor import HISTORY, PredictorNet, n_parameters
from .traces import Trace


@dataclass
class TrainConfig:
    epochs: int = 6
    lr: float = 2e-3
    series_per_batch: int = 96  # (layer, head) series per batch, all at one (trace, step)
    step_stride: int = 2  # use every n-th decode step of a trace for training
    val_stride: int = 4
    sink: int = 64
    local: int = 64
    page: int = 16  # slots per page (the paper's block size); checkpoints before the rename stored `block`
    val_k: tuple[int, ...] = (8, 16, 32)  # middle pages selected when measuring the recovery rate
    select_k: int = 16  # the k whose recovery rate picks the checkpoint
    max_seconds: float | None = None  # stop training (not validation) after this long
    crop: int | None = 48  # train on a random window of this many middle pages (fully convolutional; cheaper)
    sparse_history: float = 0.0  # share of batches whose history imitates decoding (sparse rows, see below)
    weighted: bool = True  # scale each example's error by its history's peak (heads count alike)
    init: str = "blend"  # "blend" (start from 0.25 mean + 0.75 last row), "mean" or "random" (PyTorch's default)
    init_last: float = 0.75  # the last row's weight of the "blend" initialisation
    freeze_init: bool = True  # with "mean"/"blend": keep the heuristic's channels fixed, learn a residual on top
    loss: str = "mse"  # "mse" (the paper's) or "ce": cross-entropy of softmax(scores) against the page masses
    select_budget: int | None = 256  # pick the checkpoint by the decode replay's recovery at this token budget
    val_every: int | None = 100  # validate every this many batches (None: after each epoch)
    seed: int = 0


@dataclass
class TrainResult:
    net: PredictorNet
    best_epoch: int
    best_step: int
    val_recovery: dict[str, float]  # the selection metric: learned (best epoch), last, mean
    val_recovery_by_k: dict[str, dict]  # per k (per-head top-k, full history) and "replay" (decode replay)
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    n_train_examples: int = 0
    n_val_examples: int = 0
    config: dict = field(default_factory=dict)

    def meta(self) -> dict:
        return {"best_epoch": self.best_epoch, "best_step": self.best_step, "val_recovery": self.val_recovery,
                "val_recovery_by_k": {m: {str(k): v for k, v in d.items()} for m, d in self.val_recovery_by_k.items()},
                "train_seconds": round(self.seconds, 1), "n_train_examples": self.n_train_examples,
                "n_val_examples": self.n_val_examples, "parameters": n_parameters(self.net), "config": self.config,
                "history": self.history}


def sparse_rows(maxp: torch.Tensor, sums: torch.Tensor, first_pos: int, sink_pages: int, local_pages: int, page: int,
                k: int, n_decode: int, phase: int, every: int) -> torch.Tensor:
    """History rows (N, H, W) as decoding writes them: the last `n_decode` rows are sparse (sink + local + the
    top-k middle pages by true mass, renormalised) except every `every`-th, a full calibration row; earlier rows
    (the prompt's) stay full. Row r is position first_pos + r. The true top-k stands in for the predictor's."""
    N, H, W = maxp.shape
    cols = torch.arange(W)
    n_pages = (first_pos + torch.arange(H) + 1 + page - 1) // page  # pages seen by each row
    middle = (cols[None, :] >= sink_pages) & (cols[None, :] < (n_pages - local_pages)[:, None])  # (H, W)
    score = sums.masked_fill(~middle, -1.0)
    kk = min(k, W)
    keep = torch.zeros(N, H, W, dtype=torch.bool).scatter(2, score.topk(kk, dim=-1).indices, True) & middle
    keep |= ~middle  # sink, local (and the unseen zero columns)
    sparse = (torch.arange(H) >= H - n_decode) & ((torch.arange(H) + phase) % every != 0)
    mass = (sums * keep).sum(-1, keepdim=True).clamp_min(1e-6)
    out = torch.where(keep, maxp / mass, torch.zeros((), dtype=maxp.dtype))
    return torch.where(sparse[None, :, None], out, maxp)


def example(trace: Trace, s: int, sink_pages: int, local_pages: int, page: int, sparse: dict | None = None):
    """Inputs (L*hq, H, Wm), targets (L*hq, Wm), page sums of the target row (L*hq, n_pages) and the middle range.

    The target row sits at position p = T - S + s; its history's width is ceil(p / page) pages (the last history
    row has p keys); the middle pages are [sink_pages, W - local_pages)."""
    H = trace.history
    p = trace.n_tokens - trace.n_steps + s
    W = math.ceil(p / page)
    n_pages = math.ceil((p + 1) / page)
    lo, hi = sink_pages, W - local_pages
    L, hq = trace.maxp.shape[:2]
    if sparse is None:
        x = trace.maxp[:, :, s : s + H, lo:hi].float().reshape(L * hq, H, hi - lo)
    else:
        rows = sparse_rows(trace.maxp[:, :, s : s + H, :W].float().reshape(L * hq, H, W),
                           trace.sums[:, :, s : s + H, :W].float().reshape(L * hq, H, W), p - H, sink_pages,
                           local_pages, page, **sparse)
        x = rows[..., lo:hi].contiguous()
    y = trace.maxp[:, :, s + H, lo:hi].float().reshape(L * hq, hi - lo)
    sums = trace.sums[:, :, s + H, :n_pages].float().reshape(L * hq, n_pages)
    return x, y, sums, lo, hi


def recovery_at(scores: torch.Tensor, sums: torch.Tensor, lo: int, hi: int, k: int) -> torch.Tensor:
    """Per example: (mass on pages < lo and >= hi, plus the top-k scored middle pages) / total mass."""
    k = min(k, hi - lo)
    mid = sums[:, lo:hi]
    picked = mid.gather(1, scores.topk(k, dim=-1).indices).sum(1)
    fixed = sums[:, :lo].sum(1) + sums[:, hi:].sum(1)
    return (fixed + picked) / sums.sum(1).clamp_min(1e-12)


@torch.no_grad()
def evaluate(net: PredictorNet | None, traces: list[Trace], cfg: TrainConfig, kind: str = "learned"
             ) -> dict[int, float]:
    """Mean recovery rate over the validation examples, per k, of the CNN (or 'last' / 'mean')."""
    sink_pages, local_pages = cfg.sink // cfg.page, cfg.local // cfg.page
    tot = {k: 0.0 for k in cfg.val_k}
    count = 0
    for tr in traces:
        for s in range(0, tr.n_steps, cfg.val_stride):
            x, _, sums, lo, hi = example(tr, s, sink_pages, local_pages, cfg.page)
            if hi - lo < 3:
                continue
            if kind == "last":
                scores = x[:, -1]
            elif kind == "mean":
                scores = x.mean(1)
            else:
                scores = net(x)
            for k in cfg.val_k:
                tot[k] += float(recovery_at(scores, sums, lo, hi, k).sum())
            count += x.shape[0]
    return {k: v / max(1, count) for k, v in tot.items()}


def freeze_heuristic(net: PredictorNet, channels: int = 3) -> None:
    """Zero the gradients of the weights that carry the initial heuristic (`init_blend`: channels 0-2 of both
    convolutions and their conv3 weights), so training learns a residual correction with the other channels
    instead of breaking the heuristic's exact cancellations (the "last row" path is ill-conditioned: a small change
    of its conv1 weights no longer telescopes)."""

    def mask_of(p, fn):
        m = torch.ones_like(p)
        fn(m)
        return m

    masks = {
        net.conv1.weight: mask_of(net.conv1.weight, lambda m: m[:channels].zero_()),
        net.conv1.bias: mask_of(net.conv1.bias, lambda m: m[:channels].zero_()),
        net.conv2.weight: mask_of(net.conv2.weight, lambda m: (m[:channels].zero_(), m[:, :channels].zero_())),
        net.conv2.bias: mask_of(net.conv2.bias, lambda m: m[:channels].zero_()),
        net.conv3.weight: mask_of(net.conv3.weight, lambda m: m[:, :channels].zero_()),
    }
    for p, m in masks.items():
        p.register_hook(lambda g, m=m: g * m)


def n_examples(traces: list[Trace], stride: int) -> int:
    return sum(len(range(0, t.n_steps, stride)) * t.maxp.shape[0] * t.maxp.shape[1] for t in traces)


def train(train_traces: list[Trace], val_traces: list[Trace], cfg: TrainConfig | None = None,
          progress: bool = True, net: PredictorNet | None = None) -> TrainResult:
    """Train the CNN with MSE on the next step's pooled attention; keep the epoch with the best recovery rate."""
    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    net = net or PredictorNet()
    if cfg.init == "mean":
        net.init_history_mean(seed=cfg.seed)
    elif cfg.init == "blend":
        net.init_blend(cfg.init_last, history=HISTORY, seed=cfg.seed)
    if cfg.init in ("mean", "blend") and cfg.freeze_init:
        freeze_heuristic(net)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sink_pages, local_pages = cfg.sink // cfg.page, cfg.local // cfg.page
    combos = [(ti, s) for ti, tr in enumerate(train_traces) for s in range(0, tr.n_steps, cfg.step_stride)
              if math.ceil((tr.n_tokens - tr.n_steps + s) / cfg.page) - local_pages - sink_pages >= 3]
    n_series = max(1, min(cfg.series_per_batch, *(t.maxp.shape[0] * t.maxp.shape[1] for t in train_traces)))
    total_batches = cfg.epochs * len(combos)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_batches, desc="training predictor", unit="batch")
    t0 = time.perf_counter()
    key = "replay" if cfg.select_budget else cfg.select_k

    def validate(predictor, kind="learned"):
        v = evaluate(predictor, val_traces, cfg, kind)
        if cfg.select_budget:
            v["replay"] = simulate(val_traces, cfg.select_budget, predictor if kind == "learned" else kind,
                                   with_quest=False)["ap_mean"]
        return v

    baseline = {m: validate(None, m) for m in ("last", "mean")}
    best = validate(net)
    best_state, best_epoch = copy.deepcopy(net.state_dict()), 0
    history = [{"epoch": 0, "loss": None, "val": best}]
    stop = False
    done = best_step = 0

    def checkpoint(epoch, loss, n_b):
        nonlocal best, best_state, best_epoch, best_step
        net.eval()
        val = validate(net)
        history.append({"epoch": epoch, "batches": done, "loss": loss / max(1, n_b), "val": val})
        if val[key] > best[key]:
            best, best_state, best_epoch, best_step = val, copy.deepcopy(net.state_dict()), epoch, done
        net.train()

    for epoch in range(1, cfg.epochs + 1):
        rng.shuffle(combos)
        net.train()
        loss_sum, n_b = 0.0, 0
        for ti, s in combos:
            sp = None
            if cfg.sparse_history and rng.random() < cfg.sparse_history:
                sp = {"k": rng.choice([8, 16, 24, 32, 56]), "n_decode": rng.randint(1, HISTORY),
                      "phase": rng.randrange(5), "every": 5}
            x, y, sums, lo, hi = example(train_traces[ti], s, sink_pages, local_pages, cfg.page, sp)
            pick = torch.tensor(rng.sample(range(x.shape[0]), n_series))
            x, y = x[pick], y[pick]
            if cfg.loss == "ce":  # the target: the next step's attention mass per page
                y = sums[pick][:, lo:hi]
            keep = slice(None)
            w = x.shape[-1]
            if cfg.crop is not None and w > cfg.crop:  # a window of columns; its cut edges (not the real
                a = rng.randrange(0, w - cfg.crop + 1)  # sink / local edges) are left out of the loss
                x, y = x[..., a : a + cfg.crop], y[..., a : a + cfg.crop]
                keep = slice(0 if a == 0 else 2, cfg.crop if a + cfg.crop == w else cfg.crop - 2)
            if cfg.loss == "ce":
                t = y[..., keep]
                t = t / t.sum(-1, keepdim=True).clamp_min(1e-9)
                loss = -(t * torch.log_softmax(net(x)[..., keep], -1)).sum(-1).mean()
            else:
                err = net(x)[..., keep] - y[..., keep]
                if cfg.weighted:
                    err = err / (x.amax((1, 2)) + 1e-3)[:, None]
                loss = err.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach())
            n_b += 1
            done += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss_sum / n_b:.2e}", best=f"{best[key]:.3f}")
            if cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds:
                stop = True
                break
            if cfg.val_every and done % cfg.val_every == 0:
                checkpoint(epoch, loss_sum, n_b)
        if stop or not cfg.val_every:
            checkpoint(epoch, loss_sum, n_b)
        if stop:
            break
    if bar is not None:
        bar.close()
    net.load_state_dict(best_state)
    net.eval()
    by_k = {"learned": best, **baseline}
    return TrainResult(
        net=net, best_epoch=best_epoch, best_step=best_step,
        val_recovery={m: d[key] for m, d in by_k.items()},
        val_recovery_by_k=by_k,
        history=[{**h, "loss": h["loss"] and float(f"{h['loss']:.3e}"),
                  "val": {str(k): round(v, 4) for k, v in h["val"].items()}} for h in history],
        seconds=time.perf_counter() - t0,
        n_train_examples=n_examples(train_traces, cfg.step_stride),
        n_val_examples=n_examples(val_traces, cfg.val_stride),
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
    )


def collect_traces(model, sequences: list[tuple[str, list[int]]], *, history: int = HISTORY, steps: int = 64,
                   page: int = 16, progress: bool = True, desc: str = "collecting traces") -> list[Trace]:
    from .traces import collect_trace

    it = sequences
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(sequences, desc=desc, unit="seq")
    return [collect_trace(model, ids, history=history, steps=steps, page=page, kind=kind) for kind, ids in it]


def train_predictor(model, tokenizer, texts: list[str] | None = None, *, n_seq: int = 16, seq_len: int = 2048,
                    steps: int = 64, copy_share: float = 0.3, retrieval_share: float = 0.3,
                    cfg: TrainConfig | None = None, progress: bool = True,
                    path=None, seed: int = 0) -> tuple[TrainResult, Path, dict]:
    """Collect traces on `texts` (default: the calibration text shipped with kvsqueeze), train, save safetensors.

    Returns the result, the checkpoint path and timings (seconds for traces, training, total)."""
    from ..runtime.calibration import default_calibration_texts
    from ..selection.attention_predictor import predictor_path, save_predictor
    from .traces import calibration_sequences

    cfg = cfg or TrainConfig(seed=seed)
    t0 = time.perf_counter()
    texts = texts or ["\n\n".join(default_calibration_texts())]
    train_seqs, val_seqs = calibration_sequences(tokenizer, texts, n_seq, seq_len, copy_share=copy_share,
                                                 retrieval_share=retrieval_share, steps=steps, seed=seed)
    train_tr = collect_traces(model, train_seqs, steps=steps, page=cfg.page, progress=progress,
                              desc="traces (train)")
    val_tr = collect_traces(model, val_seqs, steps=steps, page=cfg.page, progress=progress, desc="traces (val)")
    t_traces = time.perf_counter() - t0
    res = train(train_tr, val_tr, cfg, progress=progress)
    budget = cfg.select_budget or 256  # (with select_budget set, the rules' replay is res.val_recovery's)
    replay = {"budget": budget, **{k: v for k, v in simulate(val_tr, budget, res.net).items() if k.endswith("_mean")}}
    total = time.perf_counter() - t0
    meta = {**res.meta(), "trace_seconds": round(t_traces, 1), "total_seconds": round(total, 1),
            "model": str(getattr(model.config, "_name_or_path", "")), "n_seq": n_seq, "seq_len": seq_len,
            "steps": steps, "copy_share": copy_share, "retrieval_share": retrieval_share, "history": HISTORY,
            "trace_kinds": [k for k, _ in train_seqs + val_seqs], "val_replay": replay}
    out = save_predictor(res.net, path or predictor_path(model), meta)
    return res, out, {"traces": t_traces, "train": res.seconds, "total": total, "replay": replay}


@torch.no_grad()
def simulate(traces: list[Trace], budget: int, predictor=None, *, sink: int | None = None, local: int | None = None,
             calibration_every: int = 5, page: int = 16, with_quest: bool = True) -> dict:
    """Decoding replayed offline on traces, at page level: the recovery rate per layer of AttentionPredictor
    (its real selector code: history from the prompt rows, sparse rows + a full row every M steps, GQA max),
    of Quest (page bounds stored in the trace; softmax estimates, GQA max) and of the oracle (the true top pages
    per kv head, the same number of pages as Quest).

    predictor: a PredictorNet, or "last" / "mean" (heuristics). Returns {"ap": {layer: r}, "quest": ..., "oracle": ...}.
    """
    from ..selection.attention_predictor import AttentionPredictor, HistoryMean, IncrementalCNN, LastRow

    net = {"last": LastRow(), "mean": HistoryMean()}.get(predictor, predictor) if isinstance(predictor, str) else predictor
    sel = AttentionPredictor(budget, predictor=net, sink=sink, local=local, calibration_every=calibration_every,
                             page=page)
    sel.net = net.eval()
    sel._incremental = IncrementalCNN(net) if isinstance(net, PredictorNet) else None
    sink_pages, local_pages, k = sel.sink // page, sel.local // page, sel.k_pages
    kq = budget // page
    acc = {m: {} for m in ("ap", "quest", "oracle")}

    def add(m, layers, r):  # r: (L,) mean over heads
        for li, v in zip(layers, r.tolist()):
            s_, c_ = acc[m].get(li, (0.0, 0))
            acc[m][li] = (s_ + v, c_ + 1)

    for tr in traces:
        L, hq = tr.maxp.shape[:2]
        hk = tr.kv_heads
        g = hq // hk
        H, S, T = tr.history, tr.n_steps, tr.n_tokens
        st: dict = {}
        sel._push(st, tr.maxp[:, :, :H].float())
        for s in range(S):
            r, p = H + s, T - S + s
            n_pages = math.ceil((p + 1) / page)
            sums = tr.sums[:, :, r, :n_pages].float()
            total = sums.sum(-1).clamp_min(1e-12)
            if n_pages <= sink_pages + local_pages + k:
                mask = torch.ones(L, hq, n_pages, dtype=torch.bool)
            else:
                pred = sel.predict(st["hist"], n_pages, st if sel._incremental is not None else None)
                agg = pred.view(L, hk, g, -1).amax(2)
                top = agg.topk(k, dim=-1).indices + sink_pages
                m = torch.zeros(L, hk, n_pages, dtype=torch.bool).scatter(2, top, True)
                m[..., :sink_pages] = True
                m[..., n_pages - local_pages :] = True
                mask = m.repeat_interleave(g, 1)
            add("ap", tr.layers, ((sums * mask).sum(-1) / total).mean(1))
            if (s + 1) % calibration_every == 0 or bool(mask.all()):
                row = tr.maxp[:, :, r, :n_pages].float()
            else:
                row = tr.maxp[:, :, r, :n_pages].float() * mask / (sums * mask).sum(-1, keepdim=True).clamp_min(1e-12)
            sel._push(st, row[:, :, None])
            if n_pages <= kq:
                add("quest", tr.layers, torch.ones(L))
                add("oracle", tr.layers, torch.ones(L))
                continue
            if with_quest and tr.quest is not None:
                u = tr.quest[:, :, s, :n_pages].float()
                est = torch.softmax(u.masked_fill(torch.isinf(u), float("-inf")), -1).nan_to_num(0.0)
                agg = est.view(L, hk, g, n_pages).amax(2)
                agg[..., n_pages - 1] = float("inf")
                m = torch.zeros(L, hk, n_pages, dtype=torch.bool).scatter(2, agg.topk(kq, dim=-1).indices, True)
                add("quest", tr.layers, ((sums * m.repeat_interleave(g, 1)).sum(-1) / total).mean(1))
            mass = sums.view(L, hk, g, n_pages).sum(2)
            mass[..., n_pages - 1] = float("inf")
            m = torch.zeros(L, hk, n_pages, dtype=torch.bool).scatter(2, mass.topk(kq, dim=-1).indices, True)
            add("oracle", tr.layers, ((sums * m.repeat_interleave(g, 1)).sum(-1) / total).mean(1))
    out = {m: {li: s_ / c_ for li, (s_, c_) in sorted(d.items())} for m, d in acc.items() if d}
    for m, d in list(out.items()):
        out[m + "_mean"] = sum(d.values()) / len(d)
    return out
