r"""Converts a published pickled scorer checkpoint to safetensors, once (needs torch).

  python launch/convert_scorer.py --input ImageReward.pt \
      --output weights/ImageReward/ImageReward.safetensors --allow_pickle

Works for ImageReward.pt, HPS_v2_compressed.pt / HPS_v2.1_compressed.pt,
sac+logos+ava1-l14-linearMSE.pth and transformers' pytorch_model.bin (write it as
model.safetensors next to config.json). Unpickling runs code from the file, so it is refused
unless --allow_pickle says you trust it. Tensor names are kept (nested "state_dict" entries are
unwrapped, a "module." prefix removed); the scorers map them.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spin_jax import cli  # noqa: E402

cli.quiet_start()  # before jax / transformers are imported

from absl import flags  # noqa: E402

_INPUT = flags.DEFINE_string("input", None, "Pickled checkpoint (.pt, .pth, .bin, .ckpt).")
_OUTPUT = flags.DEFINE_string("output", None, "safetensors file to write.")
_ALLOW = flags.DEFINE_bool("allow_pickle", False, "Unpickle the input (only if you trust it).")
flags.mark_flags_as_required(["input", "output"])


def main(argv):
    del argv
    from spin_jax.eval.weights import convert_pickle

    try:
        info = convert_pickle(_INPUT.value, _OUTPUT.value, allow_pickle=_ALLOW.value)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {info['tensors']} tensors to {info['output']}")
    if info["dropped"]:
        print(f"dropped non-tensor entries: {', '.join(info['dropped'])}")


if __name__ == "__main__":
    cli.run(main)
