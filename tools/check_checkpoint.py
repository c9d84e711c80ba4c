"""Check a LLaDA / Dream / LLaDA2 checkpoint directory before serving it: layout, tokenizer, special ids.

    python tools/check_checkpoint.py /path/to/LLaDA-8B-Instruct

Reads only config.json, the safetensors headers and the tokenizer files (seconds, even for 8B
checkpoints). Exit status 1 when a tensor is missing, unexpected or mis-shaped (each named).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vllm_dapd.models.loading import check_checkpoint, read_config, shard_files  # noqa: E402
from vllm_dapd.models.tokenizer import load_tokenizer, special_ids  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    args = ap.parse_args(argv)
    config = read_config(args.path)
    files = shard_files(args.path)
    size = sum(os.path.getsize(f) for f in files) / 2**30
    print(f"{config.model_type}: {len(files)} shard(s), {size:.2f} GiB")
    problems = check_checkpoint(args.path)
    for p in problems:
        print(f"  {p}")
    tok = load_tokenizer(args.path)
    ids = special_ids(config, tok)
    print(f"tokenizer {type(tok).__name__} ({len(tok)} tokens); mask {ids.mask}, eos {ids.eos}, "
          f"pad {ids.pad}, stop {list(ids.stop)}; chat template: {'yes' if tok.chat_template else 'no'}")
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
