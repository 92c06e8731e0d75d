"""Engine benchmark: the engine against Hugging Face transformers' ``generate``, same checkpoint, same device.

    python -m experiments.bench_engine                      # CPU: tiny checkpoint; GPU: Llama-3.2-1B shape
    python -m experiments.bench_engine model=llama-3.1-8b 'backends=[triton,hf]'

The checkpoint is a random-init one with the model config's dimensions, written once by the
engine's checkpoint maker under ``checkpoint_root`` (nothing is downloaded). Prompts are random token ids, generation is greedy with EOS ignored, so
every request produces exactly its output length. Backends: ``triton`` and ``torch`` (the engine's
``kernels`` setting) and ``hf`` (``AutoModelForCausalLM.generate``). Workloads (``conf/workload``):
- ``batch_sweep``: for each batch size, b prompts of prompt_len tokens generate output_len tokens;
  runs with a single output token give the prefill time (TTFT of the batch), the full runs'
  remaining time over output_len - 1 gives ms per decode step; tokens/s = b x output_len / wall
  (medians of ``repeats`` runs);
- ``offline`` (engine backends): num_requests requests with lengths uniform in the ranges,
  submitted at once; output tokens/s over the wall time.
The online workload (Poisson arrivals, TTFT/TPOT percentiles vs rate) needs a request-level API
of the engine and is filled in with the engine's benchmarks (issue 7); its figure is drawn by
``experiments.plots.engine_latency`` from rows with ``workload == "online"``.
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from experiments.context import Run, fail, pick, start
from kernels.family import torch_dtype

BACKENDS = ("triton", "torch", "hf")

Generate = Callable[[list[list[int]], list[int]], None]  # prompts (token ids), output lengths per prompt


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


def engine_generate(run: Run, ckpt: Path, kernels: str, settings: dict) -> Generate:
    """A greedy, EOS-ignoring generate through the engine with ``kernels`` ('triton' or 'torch')."""
    from engine import LLM, SamplingParams

    llm = LLM(str(ckpt), device=run.device, dtype=torch_dtype(run.dtype), kernels=kernels, **settings)

    def generate(prompts: list[list[int]], output_lens: list[int]) -> None:
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in output_lens]
        llm.generate(prompts, params, use_tqdm=False)

    return generate


def hf_generate(run: Run, ckpt: Path) -> Generate:
    """Hugging Face ``generate`` on the same checkpoint: greedy, exactly the requested new tokens.

    Prompts of one call must share a length (the batch sweep's); HF pads nothing here.
    """
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch_dtype(run.dtype)).to(run.device).eval()

    def generate(prompts: list[list[int]], output_lens: list[int]) -> None:
        ids = torch.tensor(prompts, device=run.device)
        n = max(output_lens)
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)

    return generate


def _timed(fn: Callable[[], None], device: str, repeats: int = 1) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn()``, the device's queue drained around each."""
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def batch_sweep(run: Run, impl: str, gen: Generate, wl: DictConfig, vocab: int, rng: torch.Generator) -> list[dict]:
    """Rows of tokens/s, TTFT of the batch and ms per decode step at each batch size (medians of
    ``repeats`` runs; a step time lost in the noise of a CPU run is NaN)."""
    rows = []
    sweep = wl.batch_sweep
    p, n, reps = int(sweep.prompt_len), int(sweep.output_len), int(sweep.repeats)
    for b in sweep.batch_sizes:
        prompts = torch.randint(1, vocab, (b, p), generator=rng).tolist()
        prefill_s = _timed(lambda: gen(prompts, [1] * b), run.device, reps)
        wall_s = _timed(lambda: gen(prompts, [n] * b), run.device, reps)
        decode_s = wall_s - prefill_s
        rows.append({**run.env, "impl": impl, "workload": "batch_sweep", "batch": b, "requests": b,
                     "prompt_len": p, "output_len": n, "output_tokens": b * n, "wall_s": wall_s,
                     "tokens_per_s": b * n / wall_s, "ttft_ms": prefill_s * 1e3,
                     "step_ms": decode_s / (n - 1) * 1e3 if decode_s > 0 and n > 1 else math.nan})
    return rows


def offline(run: Run, impl: str, gen: Generate, wl: DictConfig, vocab: int, rng: torch.Generator) -> list[dict]:
    """One row: every request submitted at once, output tokens/s over the wall time."""
    o = wl.offline
    plens = torch.randint(o.prompt_len[0], o.prompt_len[1] + 1, (o.num_requests,), generator=rng).tolist()
    olens = torch.randint(o.output_len[0], o.output_len[1] + 1, (o.num_requests,), generator=rng).tolist()
    prompts = [torch.randint(1, vocab, (n,), generator=rng).tolist() for n in plens]
    wall_s = _timed(lambda: gen(prompts, olens), run.device)
    return [{**run.env, "impl": impl, "workload": "offline", "batch": o.num_requests, "requests": o.num_requests,
             "prompt_len": sum(plens) / len(plens), "output_len": sum(olens) / len(olens),
             "output_tokens": sum(olens), "wall_s": wall_s, "tokens_per_s": sum(olens) / wall_s}]


def bench_backend(run: Run, name: str, ckpt: Path, cfg: DictConfig, model: DictConfig, wl: DictConfig) -> list[dict]:
    """Every workload's rows for one backend."""
    if name == "hf":
        impl, gen = "hf", hf_generate(run, ckpt)
    else:
        impl, gen = f"engine-{name}", engine_generate(run, ckpt, name, OmegaConf.to_container(cfg.engine))
    gen([[1, 2, 3]], [2])  # warm-up: compile kernels, allocate caches
    rng = torch.Generator().manual_seed(int(wl.seed))
    rows = batch_sweep(run, impl, gen, wl, int(model.vocab_size), rng)
    if name != "hf":
        rows += offline(run, impl, gen, wl, int(model.vocab_size), rng)
    return rows


@hydra.main(config_path="../conf", config_name="bench_engine", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run = start(cfg, "bench_engine")
    run.env["transformers"] = transformers.__version__
    unknown = sorted(set(cfg.backends) - set(BACKENDS))
    if unknown:
        fail(f"backends {unknown} unknown; choose from {list(BACKENDS)}")
    model, wl = pick(cfg.model, run.device), pick(cfg.workload, run.device)
    ckpt = ensure_checkpoint(cfg, model, run.dtype)
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    for name in tqdm(list(cfg.backends), desc="bench_engine", unit="backend"):
        try:
            rows += bench_backend(run, name, ckpt, cfg, model, wl)
        except Exception:  # one broken backend must not cost the others' numbers (a GPU run is dear)
            traceback.print_exc()
            failed.append(name)
        if run.device == "cuda":
            torch.cuda.empty_cache()
    best = max(rows, key=lambda r: r["tokens_per_s"], default=None)
    summary = (f"{model.name}, best {best['impl']} {best['tokens_per_s']:.1f} tokens/s ({best['workload']}, "
               f"batch {best['batch']})") if best else "no backend ran"
    run.finish(rows, summary)
    if failed:
        print(f"error: backends {failed} failed (tracebacks above); the table holds the others", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
