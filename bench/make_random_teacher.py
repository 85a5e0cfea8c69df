"""A teacher with a real model's shape and tokenizer but random weights, for speed checks.

    python bench/make_random_teacher.py CONFIG_DIR OUT_DIR

CONFIG_DIR holds a transformers ``config.json`` and tokenizer files (``tokenizer.json`` may be
gzipped); OUT_DIR receives a SafeTensors model. Throughput does not depend on weight values, so a
GPU machine that cannot receive the real 135M-parameter weights can still time the real shapes.
"""

from __future__ import annotations

import gzip
import shutil
import sys
from pathlib import Path


def main(src: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(src)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    for f in src.iterdir():
        if f.name == "config.json":
            continue
        if f.suffix == ".gz":
            with gzip.open(f, "rb") as zin, open(out / f.stem, "wb") as zout:
                shutil.copyfileobj(zin, zout)
        else:
            shutil.copy(f, out / f.name)
    print(f"{out}: {sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(out).parameters()):,} parameters")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
