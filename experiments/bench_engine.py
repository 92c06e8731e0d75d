"""Engine benchmark: the engine's kernel settings against each other and against Hugging Face
transformers' ``generate``, in one process, on the same checkpoint and device.

    python -m experiments.bench_engine                                  # CPU: tiny; GPU: Llama-3.2-1B shape, bf16
    python -m experiments.bench_engine tune.n_trials=6 tune.only=true   # tune the engine's shapes first (GPU)
    python -m experiments.bench_engine 'backends=[triton,hf]' 'workload.online.rates=[4]'

The checkpoint is a random-init one with the model config's dimensions, written once by the
engine's checkpoint maker under ``checkpoint_root`` (nothing is downloaded). Backends:
- ``triton``: every operator on a Triton family with the best-config cache's configs (``config_cache``;
  nearest cached shape, else the default), decode steps replayed as CUDA graphs on a GPU;
- ``triton-default``: the same with every family's default config (what tuning buys);
- ``torch``: the engine's PyTorch operators, eager (its attention reads lengths on the host);
- ``hf``: ``AutoModelForCausalLM.generate``, greedy, static batches of left-padded prompts.
Workloads (``conf/workload``): random token ids, EOS ignored so that every request yields exactly
its output length, a fixed seed; every engine backend serves the same requests, and returns token
ids without decoding them to text (``detokenize=False``), as HF ``generate`` does.
- ``offline``: ``num_requests`` requests with prompt and output lengths uniform in the ranges,
  all submitted at once; output tokens/s over the wall time. The Triton backends serve them once
  untimed first, so that the timed pass does not include Triton compiling kernels (the engine has no
  prefix cache: the second pass recomputes everything). HF generates each batch up to its
  longest request and only the requested tokens count; to bound its time it runs one batch of the
  first b requests for each b of ``hf.batch_sizes`` and its best rate stands for the workload (the
  ``requests`` and ``note`` columns say so);
- ``batch_sweep``: b requests of prompt_len tokens generating output_len each, at once; tokens/s =
  b x output_len / wall. Engine: ms per decode step = median of the steps in which all b sequences
  decode, TTFT p50, median over ``repeats``. HF: (wall - wall of a 1-token run) / (output_len - 1);
- ``online`` (engine): Poisson arrivals at each rate, served through ``add_request``/``step``:
  TTFT, TPOT and inter-token latency at p50 and p99.
While it runs, results_partial.csv holds the rows of the backends done so far (a run cut off by a
time limit keeps them; a finished run replaces it by results.csv).
Besides results.csv and the figures of :mod:`experiments.plots` (plus engine_offline.png), the run
writes the device's ceilings and the targets (targets.csv: offline speedup over HF, tuned over
default-config Triton, batch-1 decode step over the weight-streaming floor = decode weight bytes /
copy bandwidth, tuned Triton against PyTorch on every workload) and the per-kernel breakdown of a
prefill step and of decode steps of the ``triton`` backend (kernel_breakdown.csv and .png,
:mod:`engine.profile`; kernel_breakdown_triton-default.* for the default-config backend; with CUDA
graphs also *_graph_timeline.csv, the decode graphs' kernels as their replays run them), all logged
to W&B too. ``tune.n_trials`` > 0 first tunes the triton backend's shape set (the engine's warm-up,
``autotune.tune`` per shape) into the config cache.
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from engine import LLM, SamplingParams
from experiments.context import Run, fail, pick, start
from experiments.measure import Ceilings, measure_ceilings
from kernels.family import torch_dtype

# backend -> (LLM kernels, kernel_configs); "hf" is transformers.
ENGINE_BACKENDS = {"triton": ("triton", "tuned"), "triton-default": ("triton", "default"), "torch": ("torch", "tuned")}
BACKENDS = (*ENGINE_BACKENDS, "hf")
# The engine backends on Triton kernels: compiled on first use, and profiled kernel by kernel.
TRITON_BACKENDS = tuple(b for b, (kernels, _) in ENGINE_BACKENDS.items() if kernels == "triton")
DIMS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "tie_word_embeddings")


def ensure_checkpoint(cfg: DictConfig, model: DictConfig, dtype: str) -> Path:
    """The checkpoint folder: ``checkpoint_dir`` if given, else a random-init one with the model
    config's dimensions (the preset's other settings: RoPE, norms, tokenizer) in ``dtype``, written
    once into a folder named by those dimensions."""
    if cfg.checkpoint_dir is not None:
        path = Path(cfg.checkpoint_dir)
        if not (path / "config.json").is_file():
            fail(f"checkpoint_dir={path} holds no config.json")
        return path
    dims = {k: model[k] for k in DIMS}
    digest = hashlib.sha256(json.dumps(dims, sort_keys=True).encode()).hexdigest()[:8]
    path = Path(cfg.checkpoint_root) / f"{model.name}-{dtype}-{digest}"
    if not (path / "config.json").is_file():
        from engine.checkpoint import make_checkpoint

        print(f"bench_engine: writing a random-init {model.name} checkpoint to {path}")
        make_checkpoint(path, str(model.preset), dtype=dtype, overrides=dims)
    return path


# --- requests ---------------------------------------------------------------------------------------
@dataclass
class Request:
    prompt: list[int]
    output_len: int
    arrival_s: float = 0.0  # seconds after the start of the run


def _lengths(rng: torch.Generator, lo_hi: Any, n: int) -> list[int]:
    return torch.randint(int(lo_hi[0]), int(lo_hi[1]) + 1, (n,), generator=rng).tolist()


def make_requests(spec: DictConfig, vocab: int, rng: torch.Generator, rate: float | None = None) -> list[Request]:
    """``spec.num_requests`` requests of random tokens, lengths uniform in the spec's ranges; with a
    ``rate``, Poisson arrivals (exponential gaps of mean 1 / rate seconds)."""
    n = int(spec.num_requests)
    plens, olens = _lengths(rng, spec.prompt_len, n), _lengths(rng, spec.output_len, n)
    arrivals = [0.0] * n
    if rate is not None:
        gaps = torch.empty(n).exponential_(float(rate), generator=rng).tolist()
        arrivals = list(np.cumsum(gaps))
    return [Request(torch.randint(1, vocab, (p,), generator=rng).tolist(), o, a)
            for p, o, a in zip(plens, olens, arrivals)]


def max_model_len(wl: DictConfig) -> int:
    """The longest sequence any workload makes: prompt plus output."""
    s = wl.batch_sweep
    return max(int(s.prompt_len) + int(s.output_len),
               *(int(w.prompt_len[1]) + int(w.output_len[1]) for w in (wl.offline, wl.online)))


# --- the engine -------------------------------------------------------------------------------------
@dataclass
class Trace:
    """What serving a request set took: per request its arrival and token times (seconds from the
    start), and per step that only decoded, its sequences and seconds."""

    wall_s: float
    arrivals: list[float]
    token_times: list[list[float]]
    decode_steps: list[tuple[int, float]]

    @property
    def output_tokens(self) -> int:
        return sum(len(t) for t in self.token_times)

    def ttft_ms(self) -> list[float]:
        return [(t[0] - a) * 1e3 for a, t in zip(self.arrivals, self.token_times) if t]

    def tpot_ms(self) -> list[float]:
        return [(t[-1] - t[0]) / (len(t) - 1) * 1e3 for t in self.token_times if len(t) > 1]

    def itl_ms(self) -> list[float]:
        return [g * 1e3 for t in self.token_times for g in np.diff(t)]


def serve(llm: LLM, requests: list[Request]) -> Trace:
    """Serve ``requests`` through add_request/step, each added once its arrival time has passed."""
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    times: list[list[float]] = [[] for _ in requests]
    index: dict[int, int] = {}
    decode_steps: list[tuple[int, float]] = []
    nxt = 0
    t0 = time.perf_counter()
    while nxt < len(order) or llm.has_unfinished():
        now = time.perf_counter() - t0
        while nxt < len(order) and requests[order[nxt]].arrival_s <= now:
            r = requests[order[nxt]]
            # Token ids out, as HF generate gives: no per-token text decoding on either side.
            params = SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True, detokenize=False)
            index[llm.add_request(r.prompt, params, index=order[nxt]).seq_id] = order[nxt]
            nxt += 1
        if not llm.has_unfinished():
            time.sleep(max(0.0, requests[order[nxt]].arrival_s - now))
            continue
        start = time.perf_counter()
        advanced = llm.step()  # returns after the sampled tokens reached the host
        end = time.perf_counter()
        batch = llm.last_batch
        if batch.seqs and all(n == 1 for n in batch.num_new_tokens):
            # A multi-step window of k decode steps counts as k steps of its mean time.
            decode_steps += [(len(batch.seqs), (end - start) / batch.num_steps)] * batch.num_steps
        for seq in advanced:
            # Every output token not yet timed arrived at this step's end (a window delivers several).
            seen = times[index[seq.seq_id]]
            seen += [end - t0] * (seq.num_output_tokens - len(seen))
            if seq.is_finished:
                llm.output(seq)
    return Trace(time.perf_counter() - t0, [r.arrival_s for r in requests], times, decode_steps)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def engine_workloads(run: Run, impl: str, llm: LLM, wl: DictConfig, vocab: int, *, jit: bool = False) -> list[dict]:
    """The batch sweep, offline and online rows of one engine backend.

    ``jit``: the backend compiles kernels on first use (Triton: one compile per config and argument
    specialisation). The offline requests are then served once untimed before the timed pass: its
    steps meet hundreds of token counts, each a GEMM shape whose config may not have been compiled
    yet, and the timed pass should measure serving, not the compiler. (The batch sweep needs no such
    pass: it reports the median of its repeats.)"""
    rng = torch.Generator().manual_seed(int(wl.seed))
    rows: list[dict] = []
    s = wl.batch_sweep
    p, n = int(s.prompt_len), int(s.output_len)
    for b in s.batch_sizes:
        b = int(b)
        reqs = [Request(torch.randint(1, vocab, (p,), generator=rng).tolist(), n) for _ in range(b)]
        traces = [serve(llm, reqs) for _ in range(int(s.repeats))]
        steps = [statistics.median([sec for k, sec in t.decode_steps if k == b] or [math.nan]) for t in traces]
        rows.append({**run.env, "impl": impl, "workload": "batch_sweep", "batch": b, "requests": b, "prompt_len": p,
                     "output_len": n, "output_tokens": b * n, "wall_s": statistics.median(t.wall_s for t in traces),
                     "ttft_ms": statistics.median(_pct(t.ttft_ms(), 50) for t in traces),
                     "step_ms": statistics.median(steps) * 1e3, "repeats": int(s.repeats)})
    reqs = make_requests(wl.offline, vocab, torch.Generator().manual_seed(int(wl.seed)))
    if jit:
        serve(llm, reqs)
    trace = serve(llm, reqs)
    rows.append({**run.env, "impl": impl, "workload": "offline", "batch": llm.max_num_seqs,
                 "requests": len(reqs), "prompt_len": float(np.mean([len(r.prompt) for r in reqs])),
                 "output_len": trace.output_tokens / len(reqs), "output_tokens": trace.output_tokens,
                 "wall_s": trace.wall_s, "ttft_ms": _pct(trace.ttft_ms(), 50),
                 "step_ms": _pct([sec * 1e3 for _, sec in trace.decode_steps], 50), "repeats": 1,
                 "note": "after one untimed pass (JIT warm-up)" if jit else None})
    for rate in wl.online.rates:
        trace = serve(llm, make_requests(wl.online, vocab, torch.Generator().manual_seed(int(wl.seed)), float(rate)))
        ttft, tpot, itl = trace.ttft_ms(), trace.tpot_ms(), trace.itl_ms()
        rows.append({**run.env, "impl": impl, "workload": "online", "rate": float(rate), "batch": llm.max_num_seqs,
                     "requests": int(wl.online.num_requests), "output_tokens": trace.output_tokens,
                     "wall_s": trace.wall_s, "repeats": 1,
                     **{f"{name}_{tag}_ms": _pct(v, q) for name, v in (("ttft", ttft), ("tpot", tpot), ("itl", itl))
                        for tag, q in (("p50", 50), ("p99", 99))}})
    for r in rows:
        r["tokens_per_s"] = r["output_tokens"] / r["wall_s"]
    return rows


def make_llm(run: Run, ckpt: Path, backend: str, cfg: DictConfig, wl: DictConfig, **overrides: Any) -> LLM:
    """The engine of ``backend`` with the run's settings (and ``overrides``); max_model_len null:
    the workloads' longest."""
    kernels, configs = ENGINE_BACKENDS[backend]
    settings = {**OmegaConf.to_container(cfg.engine, resolve=True), **overrides}
    settings["max_model_len"] = settings.get("max_model_len") or max_model_len(wl)
    return LLM(str(ckpt), device=run.device, dtype=torch_dtype(run.dtype), kernels=kernels, kernel_configs=configs,
               config_cache=cfg.config_cache, **settings)


def config_sources(llm: LLM) -> str:
    """How the warm-up's shapes found their configs: 'exact 40 / nearest 12 / default 3'."""
    if not llm.resolved_configs:
        return ""
    counts = pd.Series([r["source"] for r in llm.resolved_configs]).value_counts()
    return " / ".join(f"{k} {counts.get(k, 0)}" for k in ("exact", "nearest", "default"))


def profile(run: Run, llm: LLM, cfg: DictConfig, ceilings: Ceilings, stem: str) -> pd.DataFrame:
    """The per-kernel breakdown of a prefill step and of decode steps at each of
    ``profile.decode_seqs`` (an int or a list) sequences (see engine.profile); written to
    ``<stem>.csv`` and ``<stem>.png``. With CUDA graphs, the decode steps' graph timelines (each
    kernel as the graph replay runs it, and the gaps between kernels) go to
    ``<stem>_graph_timeline.csv`` and W&B too."""
    from engine.profile import Step, decode_graph_timelines, plot_breakdown, profile_steps

    pf = cfg.profile
    sizes = [pf.decode_seqs] if isinstance(pf.decode_seqs, (int, str)) else list(pf.decode_seqs)
    steps = [Step("prefill", int(pf.prefill_seqs), int(pf.prefill_tokens), int(pf.prefill_tokens))]
    steps += [Step("decode", int(b), 1, int(pf.decode_context)) for b in sizes]
    df = profile_steps(llm, steps, ceilings=(ceilings.tflops, ceilings.gbps))
    df.insert(0, "date", run.env["date"])
    df.insert(1, "device", run.env["device"])
    df.to_csv(run.dir / f"{stem}.csv", index=False)
    plot_breakdown(df, run.dir / f"{stem}.png",
                   f"Per-kernel breakdown, engine {llm.kernels}/{llm.kernel_configs}, {run.dtype}\n"
                   f"{run.env['device']} · {run.env['date']}")
    timeline = decode_graph_timelines(llm, steps)
    if not timeline.empty:
        timeline.insert(0, "date", run.env["date"])
        timeline.insert(1, "device", run.env["device"])
        timeline.to_csv(run.dir / f"{stem}_graph_timeline.csv", index=False)
        run.logger.log_table(f"{stem}_graph_timeline", timeline)
    return df


def breakdown_stem(backend: str) -> str:
    """File stem (and W&B table name) of a Triton backend's per-kernel breakdown."""
    return "kernel_breakdown" if backend == "triton" else f"kernel_breakdown_{backend}"


# --- Hugging Face -----------------------------------------------------------------------------------
class HFGenerate:
    """``generate`` on the same checkpoint: greedy, exactly the batch's longest output, left padding."""

    def __init__(self, run: Run, ckpt: Path) -> None:
        self.device = run.device
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            ckpt, dtype=torch_dtype(run.dtype)).to(run.device).eval()

    def __call__(self, prompts: list[list[int]], new_tokens: int) -> float:
        """Wall seconds of one batch."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        return _timed(lambda: self.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0),
                      self.device)


def _timed(fn: Any, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def hf_workloads(run: Run, hf: HFGenerate, wl: DictConfig, vocab: int, batch_sizes: list[int]) -> list[dict]:
    """HF's batch sweep rows (one run each) and offline rows (one batch per candidate batch size)."""
    hf([[1] * 8, [1] * 13], 2)  # warm-up: CUDA context, kernels, allocator
    rng = torch.Generator().manual_seed(int(wl.seed))
    rows: list[dict] = []
    s = wl.batch_sweep
    p, n = int(s.prompt_len), int(s.output_len)
    for b in s.batch_sizes:
        prompts = torch.randint(1, vocab, (int(b), p), generator=rng).tolist()
        prefill_s, wall_s = hf(prompts, 1), hf(prompts, n)
        decode_s = wall_s - prefill_s
        rows.append({**run.env, "impl": "hf", "workload": "batch_sweep", "batch": int(b), "requests": int(b),
                     "prompt_len": p, "output_len": n, "output_tokens": int(b) * n, "wall_s": wall_s,
                     "ttft_ms": prefill_s * 1e3, "repeats": 1,
                     "step_ms": decode_s / (n - 1) * 1e3 if decode_s > 0 and n > 1 else math.nan})
    reqs = make_requests(wl.offline, vocab, torch.Generator().manual_seed(int(wl.seed)))
    for b in batch_sizes:
        batch = reqs[: int(b)]
        wall_s = hf([r.prompt for r in batch], max(r.output_len for r in batch))
        tokens = sum(r.output_len for r in batch)
        rows.append({**run.env, "impl": "hf", "workload": "offline", "batch": len(batch), "requests": len(batch),
                     "prompt_len": float(np.mean([len(r.prompt) for r in batch])), "output_len": tokens / len(batch),
                     "output_tokens": tokens, "wall_s": wall_s, "repeats": 1,
                     "note": f"one batch of the first {len(batch)} of {len(reqs)} requests; requested tokens only"})
    for r in rows:
        r["tokens_per_s"] = r["output_tokens"] / r["wall_s"]
    return rows


# --- targets ----------------------------------------------------------------------------------------
def targets(df: pd.DataFrame, floor_ms: float) -> pd.DataFrame:
    """Each target of the engine issue with its measured figure (NaN when a backend did not run)."""
    def value(impl: str, workload: str, column: str, **where: float) -> float:
        sel = df[(df["impl"] == impl) & (df["workload"] == workload)]
        for k, v in where.items():
            sel = sel[sel[k] == v]
        return float(sel[column].max()) if len(sel) else math.nan

    rows = []
    speedup = value("engine-triton", "offline", "tokens_per_s") / value("hf", "offline", "tokens_per_s")
    rows.append({"target": "offline tokens/s, engine-triton / HF generate at its best batch", "measured": speedup,
                 "threshold": 10.0, "met": speedup >= 10.0})
    tuning = value("engine-triton", "offline", "tokens_per_s") / value("engine-triton-default", "offline", "tokens_per_s")
    rows.append({"target": "offline tokens/s, tuned / default-config Triton", "measured": tuning, "threshold": 1.0,
                 "met": tuning >= 1.0})
    step1 = value("engine-triton", "batch_sweep", "step_ms", batch=1)
    rows.append({"target": "batch-1 decode step / weight-streaming floor", "measured": step1 / floor_ms,
                 "threshold": 1.5, "met": step1 / floor_ms <= 1.5, "step_ms": step1, "floor_ms": floor_ms})
    # Tuned Triton against PyTorch: throughput higher, latencies lower, on every workload.
    worse = []
    for _, r in df[df["impl"] == "engine-triton"].iterrows():
        key = {"workload": r["workload"]} | ({"batch": r["batch"]} if r["workload"] == "batch_sweep" else {}) | (
            {"rate": r["rate"]} if r["workload"] == "online" else {})
        where = {k: v for k, v in key.items() if k != "workload"}
        label = " ".join([r["workload"], *(f"{k}={v:g}" for k, v in where.items())])
        checks = [("tokens_per_s", 1)] + ([("step_ms", -1)] if r["workload"] == "batch_sweep" else []) + (
            [("ttft_p50_ms", -1), ("tpot_p50_ms", -1)] if r["workload"] == "online" else [])
        for column, sign in checks:
            theirs = value("engine-torch", r["workload"], column, **where)
            if math.isfinite(theirs) and math.isfinite(r[column]) and sign * (r[column] - theirs) < 0:
                worse.append(f"{label}: {column}")
    torch_ran = (df["impl"] == "engine-torch").any()
    rows.append({"target": "engine-triton at or above engine-torch on every workload",
                 "measured": float(len(worse)) if torch_ran else math.nan, "threshold": 0.0,
                 "met": torch_ran and not worse, "note": "; ".join(worse) or ("" if torch_ran else "torch did not run")})
    return pd.DataFrame(rows)


def offline_figure(df: pd.DataFrame, path: Path) -> Path | None:
    """Bars of offline output tokens/s per backend (HF at its best batch), speedups over HF on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    off = df[df["workload"] == "offline"]
    if off.empty:
        return None
    best = off.groupby("impl")["tokens_per_s"].max().sort_values()
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    bars = ax.bar(best.index, best.to_numpy(), color=[f"C{i}" for i in range(len(best))])
    hf = best.get("hf", math.nan)
    for bar, value in zip(bars, best.to_numpy()):
        text = f"{value:,.0f}" + (f"\n{value / hf:.1f}x HF" if math.isfinite(hf) else "")
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("output tokens/s (offline)")
    ax.set_ylim(0, best.max() * 1.25)
    ax.grid(axis="y", alpha=0.3)
    devices = ", ".join(sorted(off["device"].astype(str).unique()))
    ax.set_title(f"Offline throughput, {int(off['requests'].max())} requests\n{devices} · {off['date'].iloc[0]}")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def bench_engine_backend(run: Run, name: str, ckpt: Path, cfg: DictConfig, wl: DictConfig, vocab: int,
                         ceilings: Ceilings, rows: list[dict], failed: list[str]) -> float:
    """Append the engine backend ``name``'s rows to ``rows`` (and for the Triton backends write the
    kernel breakdown; a failure there is recorded in ``failed`` and keeps the rows). Returns the
    decode step's weight-streaming floor in ms."""
    llm = make_llm(run, ckpt, name, cfg, wl)
    floor_ms = llm.runner.model.weights.decode_bytes() / (ceilings.gbps * 1e6)
    sources = config_sources(llm)
    # One short batch before anything is timed: first-call costs (cuBLAS handles, the allocator's
    # pools, a mixed batch's attention kernels, which the engine's warm-up does not compile ahead).
    llm.generate([[1] * 8, [1] * 13], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    new = engine_workloads(run, f"engine-{name}", llm, wl, vocab, jit=name in TRITON_BACKENDS)
    rows += [{**r, "config_sources": sources, "cuda_graphs": llm.uses_cuda_graphs} for r in new]
    if name in TRITON_BACKENDS and cfg.profile.enabled:
        # Both Triton backends, so that a tuned-vs-default gap shows per operator.
        stem = breakdown_stem(name)
        try:
            run.logger.log_table(stem, profile(run, llm, cfg, ceilings, stem))
        except Exception:
            traceback.print_exc()
            failed.append(f"{name} (kernel breakdown)")
    return floor_ms


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@hydra.main(config_path="../conf", config_name="bench_engine", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run = start(cfg, "bench_engine")
    run.env["transformers"] = transformers.__version__
    unknown = sorted(set(cfg.backends) - set(BACKENDS))
    if unknown:
        fail(f"backends {unknown} unknown; choose from {list(BACKENDS)}")
    model, wl = pick(cfg.model, run.device), pick(cfg.workload, run.device)
    ckpt = ensure_checkpoint(cfg, model, run.dtype)
    vocab = int(model.vocab_size)

    if cfg.tune.n_trials:
        # Tuning runs kernels in worker processes, which need device memory: a small KV cache here,
        # and no graphs (the warm-up that tunes recaptures them, and this engine serves nothing).
        llm = make_llm(run, ckpt, "triton", cfg, wl, enforce_eager=True, gpu_memory_utilization=0.3)
        llm.warmup(tune_trials=int(cfg.tune.n_trials), sampler=str(cfg.tune.sampler),
                   families=list(cfg.tune.families) if cfg.tune.families else None,
                   decode_sizes=[int(b) for b in cfg.tune.decode_sizes] if cfg.tune.decode_sizes else None,
                   storage=cfg.tune.storage)
        tuned = pd.DataFrame(llm.tuned_configs).assign(**run.env)
        tuned.to_csv(run.dir / "tuned_configs.csv", index=False)
        run.logger.log_table("tuned_configs", tuned)
        del llm
        _free()
        if cfg.tune.only:
            run.finish([], f"tuned {len(tuned)} engine shapes into the best-config cache; tuned_configs.csv")
            return

    ceilings = measure_ceilings(run.device, run.dtype)
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    floor_ms = math.nan
    for name in tqdm(list(cfg.backends), desc="bench_engine", unit="backend"):
        t0 = time.perf_counter()
        try:
            if name == "hf":
                rows += hf_workloads(run, HFGenerate(run, ckpt), wl, vocab, [int(b) for b in cfg.hf.batch_sizes])
            else:
                floor_ms = bench_engine_backend(run, name, ckpt, cfg, wl, vocab, ceilings, rows, failed)
        except Exception:  # one broken backend must not cost the others' numbers (a GPU run is dear)
            traceback.print_exc()
            failed.append(name)
        _free()  # the backend's model and caches go before the next one loads
        print(f"bench_engine: {name} took {time.perf_counter() - t0:.1f} s")
        # Each finished backend's rows are on disk at once: a run stopped by a time limit keeps them.
        pd.DataFrame(rows).to_csv(run.dir / "results_partial.csv", index=False)
    for r in rows:
        r.update(ceiling_tflops=ceilings.tflops, ceiling_gbps=ceilings.gbps)
    df = pd.DataFrame(rows)
    if not df.empty:
        goals = targets(df, floor_ms).assign(date=run.env["date"], device=run.env["device"])
        goals.to_csv(run.dir / "targets.csv", index=False)
        run.logger.log_table("targets", goals)
        print(goals.to_string(index=False))
        offline_figure(df, run.dir / "engine_offline.png")
    figures = [run.dir / f"{breakdown_stem(b)}.png" for b in TRITON_BACKENDS] + [run.dir / "engine_offline.png"]
    run.logger.log_images([p for p in figures if p.is_file()])
    best = df.loc[df["workload"] == "offline"].sort_values("tokens_per_s").tail(1) if not df.empty else df
    summary = (f"{model.name}, offline best {best['impl'].iloc[0]} {best['tokens_per_s'].iloc[0]:.1f} tokens/s"
               if len(best) else "no backend ran")
    run.finish(rows, summary)
    (run.dir / "results_partial.csv").unlink(missing_ok=True)  # results.csv holds every row now
    if failed:
        print(f"error: backends {failed} failed (tracebacks above); the table holds the others", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
