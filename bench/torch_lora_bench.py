#!/usr/bin/env python3
"""LoRA training speed of PyTorch + transformers + PEFT on CPU, in the configuration that
`swarmtune bench train` measures, and the ratio of the two.

    pip install torch transformers peft   # CPU wheels
    python3 bench/torch_lora_bench.py --threads 2 [--swarmtune target/release/swarmtune]

Prints one JSON object per implementation and, when the swarmtune binary is given, the ratio
swarmtune / PyTorch of training tokens per second. Same shape, same LoRA (rank r, alpha 2r on
q_proj and v_proj), same batch and sequence length, AdamW, median of --steps steps after two
warm-up steps.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152),
    "builtin": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=4, intermediate_size=688, vocab_size=257),
}


def torch_bench(args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[args.shape], tie_word_embeddings=True,
                         max_position_embeddings=8192, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                             lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    times = []
    for i in range(args.steps + 2):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {
        "implementation": f"pytorch {torch.__version__}",
        "shape": args.shape,
        "threads": args.threads,
        "step_ms": step * 1e3,
        "tokens_per_s": args.batch * args.seq / step,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--swarmtune", help="path of the swarmtune binary to compare with")
    args = p.parse_args()

    ours = None
    if args.swarmtune:
        out = subprocess.run([args.swarmtune, "bench", "train", "--json", "--shape", args.shape,
                              "--seq", str(args.seq), "--batch", str(args.batch),
                              "--rank", str(args.rank), "--steps", str(args.steps),
                              "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True).stdout
        ours = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(ours))
    try:
        theirs = torch_bench(args)
    except ImportError as e:
        sys.exit(f"PyTorch, transformers and PEFT are needed for the reference: {e}")
    print(json.dumps(theirs))
    if ours:
        print(f"ratio swarmtune / pytorch tokens/s: {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
