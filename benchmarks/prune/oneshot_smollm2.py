"""One-shot pruning of SmolLM2-135M-Instruct: magnitude, Wanda and SparseGPT at 50% unstructured and 2:4, WikiText-2
test perplexity (GPTQ protocol: consecutive windows of the test split) against the dense model, the same C4
calibration windows for every method, and each method's wall time.

    python benchmarks/prune/oneshot_smollm2.py [--data-dir ../shared/data] [--n-samples 16] [--seq-len 512]
        [--eval-seq-len 512] [--windows 8] [--threads 2] [--out benchmarks/results/prune_oneshot_smollm2.json]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common as C  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def main():
    import torch

    from slimtune.data.calibration import calibration_batches
    from slimtune.eval import perplexity, read_eval_text, tokenize_eval_text
    from slimtune.models import load_base_model, load_tokenizer
    from slimtune.prune import prune_model_oneshot

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_data_dir(parser)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/prune_oneshot_smollm2.json"))
    args = parser.parse_args()
    C.use_data_dir(args.data_dir)
    torch.set_num_threads(args.threads)
    cfg = C.smollm2_model_cfg(quantization="none")
    tokenizer = load_tokenizer(cfg)
    model = load_base_model(cfg).eval().requires_grad_(False)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = tokenize_eval_text(read_eval_text("wikitext2"), tokenizer)
    batches = calibration_batches("c4", tokenizer, args.n_samples, args.seq_len, seed=0)

    def ppl() -> float:
        return perplexity(model, ids, args.eval_seq_len, max_windows=args.windows, progress=False)["ppl"]

    results = {"settings": vars(args), "environment": C.environment(), "dense": {"ppl": ppl()}}
    print(json.dumps(results["dense"]), flush=True)
    for pattern in ("50%", "2:4"):
        for method in ("magnitude", "wanda", "sparsegpt"):
            model.load_state_dict(dense_state)
            started = time.perf_counter()
            with torch.no_grad():
                prune_model_oneshot(model, method, 0.5, (2, 4) if pattern == "2:4" else None,
                                    calib_batches=None if method == "magnitude" else batches)
            seconds = time.perf_counter() - started
            results[f"{method} {pattern}"] = {"ppl": ppl(), "seconds": seconds}
            print(method, pattern, json.dumps(results[f"{method} {pattern}"]), flush=True)
    C.write_json(Path(args.out), results)
    print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
