"""Which library runs each convolution and matmul on the CPU, under each set of XLA flags.

    python benchmarks/xla_cpu_backends.py [--flags "XLA_FLAGS value" ...] [--out FILE.json]

XLA's CPU backend can hand operations to libraries (YNNPACK, XNNPACK, oneDNN) as
custom fusions, chosen by flags read once when JAX starts. This compiles three small
programs in a fresh process per flag set and reads the optimized HLO:

* ``conv``: a 3x3 convolution (16 x 32 x 32 x 64 -> 128, NHWC) and both its
  gradients (forward, input gradient and kernel gradient);
* ``conv block``: a convolution, BatchNorm on the batch's statistics, ReLU and a 2x2
  max pool, with both gradients (the ConvNet's block);
* ``matmul``: a 512 x 512 matmul and a ReLU.

For each it prints the convolutions run by XLA's own emitter, those inside a library
fusion (by the fusion's kind), the number of library fusions and of XLA loop fusions,
and whether the compiled program is the same text as with no flags (metadata aside).
A flag that leaves the program the same cannot change the step's speed: any timing
difference under it is noise. No timing is taken here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, write_json  # noqa: E402

DEFAULT_FLAGS = (  # those timed in docs/speed.md's flag table, and three more
    "",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise",
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "--xla_cpu_experimental_xnn_fusion_type=+individual_convolution",
    "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    "--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce",
    "--xla_cpu_use_xnnpack=false",
    "--xla_cpu_use_fusion_emitters=false",
)

_CHILD = r"""
import json, re, sys
import jax, jax.numpy as jnp

def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

def conv_loss(x, w):
    return jnp.sum(jnp.maximum(conv(x, w), 0.0) ** 2)

def block_loss(x, w):
    y = conv(x, w)
    mean = y.mean((0, 1, 2))
    var = ((y - mean) ** 2).mean((0, 1, 2))
    y = jnp.maximum((y - mean) * jax.lax.rsqrt(var + 1e-5), 0.0)
    y = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return jnp.sum(y ** 2)

x, w = jnp.ones((16, 32, 32, 64)), jnp.ones((3, 3, 64, 128))
a = jnp.ones((512, 512))
programs = {
    "conv": jax.jit(jax.value_and_grad(conv_loss, argnums=(0, 1))).lower(x, w),
    "conv block": jax.jit(jax.value_and_grad(block_loss, argnums=(0, 1))).lower(x, w),
    "matmul": jax.jit(lambda a, b: jnp.maximum(a @ b, 0.0)).lower(a, a),
}
texts = {}
for name, lowered in programs.items():
    text = lowered.compile().as_text()
    texts[name] = re.sub(r"metadata=\{[^}]*\}|HloModule[^\n]*", "", text)
json.dump(texts, sys.stdout)
"""


def compiled_programs(flags: str) -> dict[str, str]:
    """The optimized HLO text of each program, compiled in a fresh process under ``flags``."""
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                            text=True, timeout=600, check=False)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"XLA_FLAGS={flags!r} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout)


def _computations(text: str) -> dict[str, str]:
    """Each computation of an HLO module by name."""
    blocks = re.split(r"\n(?=\S)", text)
    named = {}
    for block in blocks:
        match = re.match(r"(?:ENTRY )?%([\w.-]+)", block.strip())
        if match:
            named[match.group(1)] = block
    return named


def describe(text: str) -> dict[str, object]:
    """Where each convolution runs, and the counts of library and loop fusions."""
    computations = _computations(text)
    library = {}  # fused computation -> library kind
    for line in text.splitlines():
        match = re.search(r"kind=kCustom, calls=%([\w.-]+).*\"kind\":\"(__\w+)\"", line)
        if match:
            library[match.group(1)] = match.group(2).strip("_")
    in_library: dict[str, int] = {}
    for name, kind in library.items():
        count = len(re.findall(r" convolution\(", computations.get(name, "")))
        if count:
            in_library[kind] = in_library.get(kind, 0) + count
    total = len(re.findall(r" convolution\(", text))
    return {
        "convolutions_in_xla": total - sum(in_library.values()),
        "convolutions_in_library": in_library,
        "library_fusions": len(library),
        "loop_fusions": len(re.findall(r"kind=kLoop", text)),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flags", nargs="+", default=list(DEFAULT_FLAGS),
                        help="XLA_FLAGS values ('' is no flags, always included)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="two flag sets (smoke)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    flag_sets = list(dict.fromkeys(["", *args.flags]))
    if args.quick:
        flag_sets = flag_sets[:2]
    compiled = {flags: compiled_programs(flags) for flags in flag_sets}
    baseline = compiled[""]
    results, rows = [], []
    for flags, texts in compiled.items():
        for program, text in texts.items():
            found = describe(text)
            same = text == baseline[program]
            results.append({"flags": flags, "program": program, "same_as_no_flags": same,
                            **found})  # fmt: skip
            libraries = ", ".join(f"{k} {v}" for k, v in found["convolutions_in_library"].items())
            rows.append([flags or "(none)", program, found["convolutions_in_xla"],
                         libraries or "-", found["library_fusions"], found["loop_fusions"],
                         "yes" if same else "no"])  # fmt: skip
    print_table(["XLA_FLAGS", "program", "convolutions in XLA", "convolutions in a library",
                 "library fusions", "loop fusions", "same program as no flags"], rows)  # fmt: skip
    write_json(args.out, {"environment": environment(), "results": results})
    return results


if __name__ == "__main__":
    main()
