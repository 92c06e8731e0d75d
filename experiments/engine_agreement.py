"""Engine vs Hugging Face transformers, greedy, on a random-init Llama checkpoint.

    python -m experiments.engine_agreement --out results/engine_agreement_<device>.csv
    python -m experiments.engine_agreement --preset tiny --dtype float32 --out /tmp/agree.csv   # CPU smoke

Writes the ``--preset`` checkpoint (default llama-3.2-1b shape) into a temporary folder, makes 16
prompts (BOS and random token ids, 1 to 256 tokens) and generates 32 tokens each, greedily with EOS
ignored, with the engine (``--kernels``, ``--dtype``, a token budget that chunks the long prompts)
and with ``LlamaForCausalLM.generate`` in the same dtype. Per prompt it reports where the token
streams first part and, for every token transformers chose, its log-probability given
transformers' prefix under transformers (from ``generate``'s logits) and under the engine (the
engine's prompt log-probabilities of prompt + transformers' tokens), plus, as the noise floor of the
dtype, transformers in float32 on the same tokens. Writes a CSV (one row per prompt) with the
device, versions and date, and prints a summary.

Tolerance, per prompt: max |engine - transformers| over transformers' choices <= max(0.1 nats,
2 x floor), floor = max |transformers in the dtype - transformers in float32| on the same tokens.
Why: bfloat16 keeps 8 significant bits, so the logits themselves (stored in bfloat16 by both, as
transformers' LM head produces them) carry a rounding error of up to 2^-9 |z|, about 0.01-0.02
nats for the top logits of these models (|z| up to 4-8); two correct implementations that round in
different places (fused QKV and gate/up GEMMs, a float32-accumulating paged attention kernel
against SDPA) drift apart by a few hundredths of a nat more over the layers. The floor measures
that drift for transformers itself; the engine may be at most twice as far from transformers as
transformers' own bfloat16 run is from float32 (0.1 nats at least). A real error (a wrong position,
mask, block or scaling) moves log-probabilities by O(1) nats, so the check still separates right
from wrong. Where greedy tokens part, the two candidates are near-ties under both models, which
the divergence columns show (transformers' log-probabilities of both tokens at that step).
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import tempfile
from pathlib import Path

import kernels  # noqa: F401  (picks Triton's backend before triton loads)
import pandas as pd
import torch
import transformers
import triton  # noqa: E402,I001
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.checkpoint import make_checkpoint
from kernels.family import DTYPES

PROMPT_LENS = (1, 3, 7, 12, 16, 24, 31, 40, 55, 64, 80, 100, 128, 160, 200, 256)


def make_prompts(bos: int, vocab: int, lens: list[int], seed: int) -> list[list[int]]:
    """BOS followed by random token ids, one prompt per length."""
    g = torch.Generator().manual_seed(seed)
    return [[bos] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in lens]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def hf_generate(model_dir: Path, prompts, new_tokens: int, dtype: torch.dtype, device: torch.device):
    """transformers' greedy tokens (EOS ignored) and the log-probability of each, from generate's logits."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # exactly new_tokens tokens, as the engine's ignore_eos
    tokens, logprobs = [], []
    for p in prompts:
        out = model.generate(
            torch.tensor([p], device=device), max_new_tokens=new_tokens,
            do_sample=False, output_logits=True, return_dict_in_generate=True,
        )
        toks = out.sequences[0, len(p):].tolist()
        steps = torch.stack([s[0] for s in out.logits]).float().log_softmax(-1)  # [new_tokens, V]
        tokens.append(toks)
        logprobs.append(steps.cpu())
    del model
    _free(device)
    return tokens, logprobs


@torch.no_grad()
def hf_teacher_forced(model_dir: Path, sequences, starts, dtype: torch.dtype, device: torch.device):
    """Log-probabilities of sequences[i][starts[i]:] given what precedes each token, one forward each."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    out = []
    for seq, s in zip(sequences, starts):
        ids = torch.tensor([seq], device=device)
        lp = model(ids).logits[0].float().log_softmax(-1)
        out.append(lp[torch.arange(s - 1, len(seq) - 1), ids[0, s:]].cpu())
    del model
    _free(device)
    return out


def compare(args: argparse.Namespace, model_dir: Path, device: torch.device) -> pd.DataFrame:
    dtype = DTYPES[args.dtype]
    cfg = json.loads((model_dir / "config.json").read_text())
    # Evenly spaced picks of PROMPT_LENS scaled to --max-prompt-len, kept distinct (so no two prompts are equal).
    picks = [PROMPT_LENS[round(i * (len(PROMPT_LENS) - 1) / max(1, args.prompts - 1))] for i in range(args.prompts)]
    lens: list[int] = []
    for n in picks:
        lens.append(max(len(lens) + 1, round(n * args.max_prompt_len / max(PROMPT_LENS)), lens[-1] + 1 if lens else 1))
    prompts = make_prompts(cfg["bos_token_id"], cfg["vocab_size"], lens, args.seed)
    n = args.tokens

    hf_tokens, hf_steps = hf_generate(model_dir, prompts, n, dtype, device)
    full = [p + t for p, t in zip(prompts, hf_tokens)]
    starts = [len(p) for p in prompts]
    floor = hf_teacher_forced(model_dir, full, starts, torch.float32, device)

    llm = LLM(model_dir, device=device, dtype=dtype, kernels=args.kernels,
              max_num_batched_tokens=args.max_num_batched_tokens)
    greedy = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    eng = llm.generate(prompts, greedy, use_tqdm=False)
    forced = llm.generate(full, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=True), use_tqdm=False)
    chunked = llm.scheduler.stats.partial_prefills

    rows = []
    for i, p in enumerate(prompts):
        e_tok, h_tok = eng[i].token_ids, hf_tokens[i]
        hf_lp = hf_steps[i][torch.arange(n), torch.tensor(h_tok)].double()
        eng_lp = torch.tensor(forced[i].prompt_logprobs[len(p):], dtype=torch.float64)
        fp32_lp = floor[i].double()
        d = next((j for j in range(n) if e_tok[j] != h_tok[j]), None)
        row = {
            "prompt": i,
            "prompt_len": len(p),
            "new_tokens": n,
            "tokens_equal": d is None,
            "first_divergence": -1 if d is None else d,
            "max_abs_dlogprob": float((eng_lp - hf_lp).abs().max()),
            "mean_abs_dlogprob": float((eng_lp - hf_lp).abs().mean()),
            "floor_hf_vs_fp32": float((hf_lp - fp32_lp).abs().max()),
            "engine_vs_fp32": float((eng_lp - fp32_lp).abs().max()),
        }
        if d is not None:
            # The step where they part: both candidates under both models (same prefix up to d).
            hf_at_d = hf_steps[i][d]
            row.update(
                engine_token=e_tok[d],
                hf_token=h_tok[d],
                hf_lp_hf_token=float(hf_at_d[h_tok[d]]),
                hf_lp_engine_token=float(hf_at_d[e_tok[d]]),
                engine_lp_hf_token=float(eng_lp[d]),
            )
        row["tol"] = max(args.tol, 2 * row["floor_hf_vs_fp32"])
        row["ok"] = row["max_abs_dlogprob"] <= row["tol"]
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["partial_prefills"] = chunked
    return df


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="CSV to write, e.g. results/engine_agreement_h100.csv")
    ap.add_argument("--preset", default="llama-3.2-1b", help="checkpoint preset (engine.checkpoint)")
    ap.add_argument("--checkpoint", default=None, help="use this model folder instead of writing one")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--kernels", choices=["triton", "torch"], default="triton")
    ap.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--max-prompt-len", type=int, default=max(PROMPT_LENS), help="prompt lengths scale to this")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512, help="the engine's token budget per step")
    ap.add_argument("--tol", type=float, default=0.1,
                    help="least tolerance on |engine - transformers| log-probabilities, nats (see the docstring)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPT_LENS):
        ap.error(f"--prompts must be in 1..{len(PROMPT_LENS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")

    with tempfile.TemporaryDirectory(prefix="engine-agreement-") as tmp:
        if args.checkpoint:
            model_dir = Path(args.checkpoint)
        else:
            model_dir = Path(tmp) / args.preset
            print(f"writing a random-init {args.preset} checkpoint to {model_dir}")
            stored = "float32" if args.dtype == "float32" else "bfloat16"
            make_checkpoint(model_dir, args.preset, seed=args.seed, dtype=stored)
        df = compare(args, model_dir, device)

    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "date": dt.date.today().isoformat(),
        "preset": args.checkpoint or args.preset,
        "dtype": args.dtype,
        "kernels": args.kernels,
    }
    for k, v in reversed(meta.items()):
        df.insert(0, k, v)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)

    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  transformers {meta['transformers']}  "
          f"{meta['date']}\n{meta['preset']} {meta['dtype']} kernels={meta['kernels']}: {len(df)} prompts x "
          f"{args.tokens} greedy tokens ({df.attrs['partial_prefills']} partial prefill chunks)")
    cols = ["prompt", "prompt_len", "first_divergence", "max_abs_dlogprob", "floor_hf_vs_fp32", "engine_vs_fp32", "tol", "ok"]
    print(df[cols].to_string(index=False, float_format=lambda x: f"{x:.2e}"))
    print(f"token-identical: {int(df.tokens_equal.sum())}/{len(df)}; within tolerance: "
          f"{int(df.ok.sum())}/{len(df)}; max |dlogprob| {df.max_abs_dlogprob.max():.4f} "
          f"(transformers {args.dtype} vs float32: {df.floor_hf_vs_fp32.max():.4f}); wrote {out}")
    if not df.ok.all():
        raise SystemExit(1)
    return df


if __name__ == "__main__":
    main()
