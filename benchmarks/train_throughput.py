"""Images per second of one training step: sgdjax vs plain flax + optax vs PyTorch.

    python benchmarks/train_throughput.py [--models convnet resnet9] [--batch-sizes 128 512]
                                          [--steps 30] [--host-devices N] [--shard-counts N ...]
                                          [--contenders ...] [--quick] [--out FILE.json]

All contenders train the same architecture (SGD, momentum 0.9, weight decay 5e-4,
cross-entropy) on the same random uint8 images, in one run; steps are interleaved in
rounds of shuffled order so machine noise hits all alike. Reported: median images/s
and the interquartile range over the timed steps, after warm-up (compile time apart).
"sgdjax 8 steps/call" runs ``make_multi_step(8, unroll=True)`` on the batch repeated
8 times and reports the time per step.

"sgdjax default" is what ``experiments/cifar.py`` does with no device flags: the
arrangement ``sgdjax.parallel.choose_cpu_arrangement`` picks for the batch (on a CPU,
the batch sharded over that many host devices), with the convolution kernel gradient
``sgdjax.training.choose_kernel_grad`` picks for the examples per device. "sgdjax" is
the same step on one device; "sgdjax sharded" shards it over every device, "sgdjax
sharded K" (``--shard-counts``) over K. "... XLA kernel grad" and "... shifted kernel
grad" force the models' ``kernel_grad`` (XLA's own convolution gradient, or one matmul
per kernel offset) on one device or on the default arrangement. The CPU is split into
``--host-devices`` devices, by default as many as the arrangement and the shard
counts need (all numbers are those of one device on the whole batch).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, round_orders, summarize, write_json  # noqa: E402

# ---------------------------------------------------------------- JAX contenders


def sgdjax_step(model_name: str, batch_size: int, *, devices: int = 1,
                kernel_grad: str | None = None):  # fmt: skip
    """sgdjax's training path (augmentation off): sgdjax.sgd, the step over ``devices``
    devices (``"sharded"``; one device: ``"none"``); ``kernel_grad``: the models'
    convolution kernel gradient, by default what ``choose_kernel_grad`` picks for the
    examples per device, as the engine does."""
    import jax
    import jax.numpy as jnp

    import sgdjax
    from sgdjax import training

    if kernel_grad is None:
        kernel_grad = training.choose_kernel_grad(jax.default_backend(), batch_size // devices)
    model = training.create_model(model_name, kernel_grad=kernel_grad)
    tx = sgdjax.sgd(0.05, momentum=0.9, weight_decay=5e-4)
    state = training.TrainState.create(
        model=model, tx=tx, rng=jax.random.key(0), sample_input=jnp.zeros((1, 32, 32, 3))
    )
    mode = "sharded" if devices > 1 else "none"
    parallel = training.make_parallel_train_step(mode, num_devices=devices)
    box = {"state": parallel.place_state(state)}

    def run(batch):
        box["state"], metrics = parallel.step(box["state"], parallel.place_batch(batch))
        jax.block_until_ready(metrics["loss"])

    return run


def jax_devices() -> int:
    import jax

    return jax.device_count()


def default_step(model_name: str, batch_size: int, *, kernel_grad: str | None = None):
    """experiments/cifar.py's arrangement with no device flags, for this batch."""
    import os

    import jax

    from sgdjax.parallel import choose_cpu_arrangement

    arrangement = choose_cpu_arrangement(
        backend=jax.default_backend(), cores=os.cpu_count() or 1, batch_size=batch_size
    )
    return sgdjax_step(
        model_name, batch_size, devices=arrangement.host_devices, kernel_grad=kernel_grad
    )


def sgdjax_multi_step(model_name: str, batch_size: int, *, steps: int = 8):
    """``make_multi_step(k, unroll=True)``: k steps per call, unrolled (the CPU fast path)."""
    import jax
    import jax.numpy as jnp

    import sgdjax
    from sgdjax import training

    kernel_grad = training.choose_kernel_grad(jax.default_backend(), batch_size)
    model = training.create_model(model_name, kernel_grad=kernel_grad)
    tx = sgdjax.sgd(0.05, momentum=0.9, weight_decay=5e-4)
    state = training.TrainState.create(
        model=model, tx=tx, rng=jax.random.key(0), sample_input=jnp.zeros((1, 32, 32, 3))
    )
    multi = training.make_multi_step(steps, unroll=True)
    box = {"state": state}

    def run(batch):
        stacked = {
            key: np.broadcast_to(value, (steps, *value.shape)) for key, value in batch.items()
        }
        box["state"], metrics = multi(box["state"], stacked)
        jax.block_until_ready(metrics["loss"])
        return steps

    return run


def flax_optax_step(model_name: str, batch_size: int):
    """The usual flax + optax way: nn.Conv/nn.BatchNorm/nn.max_pool, optax.sgd, jax.jit."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    class ConvNet(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            for features in (32, 64):
                x = nn.Conv(features, (3, 3))(x)
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
                x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    class ConvBN(nn.Module):
        features: int
        pool: bool = False

        @nn.compact
        def __call__(self, x, train):
            x = nn.Conv(self.features, (3, 3), use_bias=False)(x)
            if self.pool:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            return nn.relu(x)

    class ResNet9(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = ConvBN(64)(x, train)
            x = ConvBN(128, pool=True)(x, train)
            x = x + ConvBN(128)(ConvBN(128)(x, train), train)
            x = ConvBN(256, pool=True)(x, train)
            x = ConvBN(512, pool=True)(x, train)
            x = x + ConvBN(512)(ConvBN(512)(x, train), train)
            return nn.Dense(10, use_bias=False)(jnp.max(x, axis=(1, 2))) * 0.125

    model = {"convnet": ConvNet, "resnet9": ResNet9}[model_name]()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
    opt_state = tx.init(params)
    mean = jnp.asarray([0.4914, 0.4822, 0.4465]).reshape(1, 1, 1, 3)
    std = jnp.asarray([0.2470, 0.2435, 0.2616]).reshape(1, 1, 1, 3)

    @jax.jit
    def step(params, batch_stats, opt_state, batch):
        images = (batch["image"].astype(jnp.float32) / 255.0 - mean) / std

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, images, train=True,
                mutable=["batch_stats"],
            )  # fmt: skip
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1, 2))
    box = {"state": (params, batch_stats, opt_state)}

    def run(batch):
        *state, loss = step(*box["state"], batch)
        box["state"] = tuple(state)
        jax.block_until_ready(loss)

    return run


# ---------------------------------------------------------------- PyTorch contenders


def torch_model(model_name: str):
    import torch
    from torch import nn

    def conv_bn(cin, cout, pool=False):
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False)]
        if pool:
            layers.append(nn.MaxPool2d(2))
        return nn.Sequential(*layers, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    class Residual(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

        def forward(self, x):
            return x + self.body(x)

    class Scale(nn.Module):
        def forward(self, x):
            return x * 0.125

    if model_name == "convnet":
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
        )  # fmt: skip
    del torch
    return nn.Sequential(
        conv_bn(3, 64), conv_bn(64, 128, pool=True), Residual(128), conv_bn(128, 256, pool=True),
        conv_bn(256, 512, pool=True), Residual(512), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(512, 10, bias=False), Scale(),
    )  # fmt: skip


def torch_step(model_name: str, batch_size: int, *, compiled: bool = False,
               fused: bool = False, device: str = "cpu"):  # fmt: skip
    """torch's step on ``device``; ``fused``: ``SGD(fused=True)``. Each step ends
    reading the loss, so it waits for the device."""
    import torch

    torch.manual_seed(0)
    model = torch_model(model_name).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4,
                                **({"fused": True} if fused else {}))  # fmt: skip
    mean = torch.tensor([0.4914, 0.4822, 0.4465], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616], device=device).view(1, 3, 1, 1)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train(images, labels):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    if compiled:
        forward_backward = torch.compile(train)
    else:
        forward_backward = train

    def run(batch):
        images = torch.from_numpy(batch["image"]).to(device).permute(0, 3, 1, 2)
        images = (images.float().div_(255) - mean) / std
        labels = torch.from_numpy(batch["label"]).to(device).long()
        forward_backward(images, labels).item()

    return run


CONTENDERS = {
    "sgdjax default": default_step,
    "sgdjax default XLA kernel grad": lambda model, batch: default_step(
        model, batch, kernel_grad="xla"
    ),
    "sgdjax default shifted kernel grad": lambda model, batch: default_step(
        model, batch, kernel_grad="shifted"
    ),
    "sgdjax": sgdjax_step,
    "sgdjax XLA kernel grad": lambda model, batch: sgdjax_step(model, batch, kernel_grad="xla"),
    "sgdjax shifted kernel grad": lambda model, batch: sgdjax_step(
        model, batch, kernel_grad="shifted"
    ),
    "sgdjax 8 steps/call": sgdjax_multi_step,
    "sgdjax sharded": lambda model, batch: sgdjax_step(model, batch, devices=jax_devices()),
    "flax+optax": flax_optax_step,
}
# torch's contenders, registered in CONTENDERS on the CPU and again on --torch-device.
TORCH_OPTIONS = {"torch eager": {}, "torch.compile": {"compiled": True},
                 "torch eager fused SGD": {"fused": True}}  # fmt: skip


def _torch_contenders(device: str) -> dict:
    return {name: (lambda model, batch, options=options: torch_step(model, batch, device=device,
                                                                    **options))
            for name, options in TORCH_OPTIONS.items()}  # fmt: skip


CONTENDERS.update(_torch_contenders("cpu"))

# ---------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["convnet", "resnet9"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--host-devices", type=int,
        help="split the CPU into N JAX devices (default: what the contenders need)",
    )  # fmt: skip
    parser.add_argument(
        "--shard-counts", nargs="+", type=int, default=[],
        help="add 'sgdjax sharded K' for each K: the step sharded over K host devices",
    )  # fmt: skip
    parser.add_argument("--torch-device", default="cpu",
                        help="where torch's contenders run (cuda on a GPU machine)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    CONTENDERS.update(_torch_contenders(args.torch_device))
    import os

    import jax

    from sgdjax.parallel import choose_cpu_arrangement, use_cpu_devices

    if args.quick:
        args.models, args.batch_sizes, args.steps, args.warmup = ["convnet"], [16], 2, 1
        args.contenders = [c for c in args.contenders if c != "torch.compile"]
    if any(count <= 0 for count in args.shard_counts):
        parser.error(f"--shard-counts must be positive, got {args.shard_counts}")
    for count in args.shard_counts:
        name = f"sgdjax sharded {count}"
        CONTENDERS[name] = lambda model, batch, count=count: sgdjax_step(model, batch,
                                                                         devices=count)  # fmt: skip
        args.contenders.append(name)
    needed = max([1, *args.shard_counts] + [
        choose_cpu_arrangement(backend="cpu", cores=os.cpu_count() or 1,
                               batch_size=batch).host_devices
        for batch in args.batch_sizes
    ])  # fmt: skip
    try:
        use_cpu_devices(args.host_devices or needed)
    except (ValueError, RuntimeError) as error:
        parser.error(f"--host-devices: {error}")

    import torch

    results = {
        "environment": environment(),
        "torch_threads": torch.get_num_threads(),
        "torch_device": args.torch_device,
        "jax_devices": jax.device_count(),
        "runs": [],
    }
    for model_name in args.models:
        for batch_size in args.batch_sizes:
            rng = np.random.default_rng(0)
            batches = [
                {
                    "image": rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8),
                    "label": rng.integers(0, 10, batch_size).astype(np.int32),
                }
                for _ in range(4)
            ]
            runners, compile_seconds, failures = {}, {}, {}
            for name in args.contenders:
                try:
                    run = CONTENDERS[name](model_name, batch_size)
                    start = time.perf_counter()
                    run(batches[0])  # compiles
                    compile_seconds[name] = time.perf_counter() - start
                    for index in range(args.warmup):
                        run(batches[index % len(batches)])
                    runners[name] = run
                except Exception as error:  # noqa: BLE001 - report any contender that cannot run
                    failures[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            timings = {name: [] for name in runners}
            for index, order in enumerate(round_orders(list(runners), args.steps)):
                batch = batches[index % len(batches)]
                for name in order:
                    start = time.perf_counter()
                    steps = runners[name](batch) or 1  # a contender may run several per call
                    timings[name].append((time.perf_counter() - start) / steps)
            rows = []
            torch_median = np.median(timings["torch eager"]) if "torch eager" in timings else None
            for name, seconds in timings.items():
                stats = summarize(seconds)
                rate = batch_size / stats["median"]
                spread = f"{batch_size / stats['q3']:.0f}-{batch_size / stats['q1']:.0f}"
                ratio = torch_median / stats["median"] if torch_median else float("nan")
                rows.append([name, f"{rate:.0f}", spread, f"{ratio:.2f}",
                             f"{compile_seconds[name]:.1f}"])  # fmt: skip
                results["runs"].append({
                    "model": model_name, "batch_size": batch_size, "contender": name,
                    "images_per_second": rate, "seconds": stats,
                    "first_step_seconds": compile_seconds[name],
                })  # fmt: skip
            for name, reason in failures.items():
                rows.append([name, "-", "-", "-", reason[:60]])
                results["runs"].append({"model": model_name, "batch_size": batch_size,
                                        "contender": name, "failed": reason})  # fmt: skip
            print(f"\n{model_name}, batch {batch_size}, {args.steps} interleaved steps")
            print_table(
                ["contender", "images/s", "IQR images/s", "x torch eager", "first step s"], rows
            )
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
