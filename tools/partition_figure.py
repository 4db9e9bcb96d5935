"""Adam-mini's blocks in the baby GPT (nanogpt_sai.py's default model), drawn: the embeddings
and the first transformer block, one colour per block (one second-moment value each).

    python tools/partition_figure.py [--out=DIR]     (writes DIR/adam_mini_partition.png)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanogpt_sai import GPT, Config  # noqa: E402
from plots.partition import draw_partition  # noqa: E402

NAMES = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
         "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
         "transformer.h.0.mlp.c_fc.weight"]


def main(argv):
    bad = [a for a in argv if not a.startswith("--out=")]
    if bad:
        print(f"error: unknown argument {bad[0]} (the one option is --out=DIR)", file=sys.stderr)
        return 2
    out = next((a.split("=", 1)[1] for a in argv), ".")
    os.makedirs(out, exist_ok=True)
    model = GPT(Config(), vocab_size=65)
    print(draw_partition(model, NAMES, os.path.join(out, "adam_mini_partition.png"),
                         "Adam-mini's blocks in the baby GPT (one color = one second-moment "
                         "value; colors repeat every 20 blocks)"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
