"""Peak memory of one distillation loss + backward, chunked over the sequence vs all at once (issue 11).

SmolLM2-135M's shapes (hidden 576, vocabulary 49,152) with random weights: the student's logits (which its own CE
already materializes) and the teacher's last hidden states + output layer (`HeadInput`, as the Distillation callback
passes it). Each setting runs in a fresh child process and reports its peak RSS above the inputs (`ru_maxrss` minus the
RSS after building the inputs), so the numbers are the loss's own working memory, gradient of the student's logits
included (one logits-sized tensor that any loss on them needs).

    python benchmarks/distill_chunked_memory.py [--batch 4] [--length 512] [--loss jsd] [--top-k 0]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, VOCAB = 576, 49152


def child(args) -> None:
    import torch

    from slimtune.distill import HeadInput, kd_loss

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() // 2))
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).requires_grad_(False)
    student = (torch.randn(args.batch, args.length, VOCAB) * 2).requires_grad_(True)
    teacher = HeadInput(torch.randn(args.batch, args.length, HIDDEN), head)
    labels = torch.ones(args.batch, args.length, dtype=torch.long)
    base = _rss_now_mb()
    started = time.perf_counter()
    loss = kd_loss(student, teacher, labels, loss=args.loss, top_k=args.top_k or None,
                   chunk_size=args.chunk or None)
    loss.backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"chunk_size": args.chunk or None, "peak_above_inputs_mb": round(peak - base, 1),
                      "seconds": round(seconds, 2), "loss": float(loss)}))


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--loss", default="jsd")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)  # the child's setting
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunks", default="0,1024,256,64", help="chunk sizes to compare (0: unchunked)")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    results = []
    for chunk in (int(c) for c in args.chunks.split(",")):
        command = [sys.executable, __file__, "--child", f"--chunk={chunk}", f"--batch={args.batch}",
                   f"--length={args.length}", f"--loss={args.loss}", f"--top-k={args.top_k}"]
        # a fixed mmap threshold: glibc's sliding one would keep freed chunk-sized blocks in the heap, so RSS would
        # measure the allocator's fragmentation rather than the loss's memory
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    logits_mb = args.batch * args.length * VOCAB * 4 / 2**20
    report = {"batch": args.batch, "length": args.length, "vocab": VOCAB, "loss": args.loss, "top_k": args.top_k or None,
              "one_logits_tensor_mb": round(logits_mb, 1), "runs": results}
    folder = Path(__file__).parent / "results"
    folder.mkdir(exist_ok=True)
    (folder / "distill_chunked_memory.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
