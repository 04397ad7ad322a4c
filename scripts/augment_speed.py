"""Two-view augmentation throughput: the per-image torchvision path against the batched one.

    .venv/bin/python scripts/augment_speed.py [--batch-size 256] [--repeats 5] [--threads 1]

Fashion-MNIST train images (random 28x28 images when it is not installed), MoCo v2's recipe.
Each repeat times one batch through each path, alternating, so both see the same machine load;
prints images/s (two views per image) per repeat, the medians, and their ratio. The per-image
path runs in this one process: a DataLoader with W workers gets up to W times its figure.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mocoq.data.batched import BatchedMoCoAugmentation
from mocoq.data.datasets import DatasetNotFoundError, fashion_mnist
from mocoq.data.transforms import MoCoAugmentation


def load_images(count: int) -> tuple[torch.Tensor, str]:
    """``count`` uint8 images (count, 1, 28, 28) and where they came from."""
    try:
        return fashion_mnist(split="train").images[:count], "Fashion-MNIST"
    except DatasetNotFoundError:
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (count, 1, 28, 28), dtype=torch.uint8, generator=generator)
        return images, "random 28x28 images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="device of the batched path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, source = load_images(args.batch_size * (args.repeats + 1))
    per_image = MoCoAugmentation(28, [0.2860], [0.3530])  # conf/augment/mocov2.yaml's recipe
    batched = BatchedMoCoAugmentation.from_transform(per_image)
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)

    def run_per_image(batch: torch.Tensor) -> None:
        for image in batch:
            per_image(image)

    def run_batched(batch: torch.Tensor) -> None:
        batched(batch.to(device), generator)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run_per_image(images[: args.batch_size])  # warm-up
    run_batched(images[: args.batch_size])
    rates: dict[str, list[float]] = {"per-image": [], "batched": []}
    for repeat in range(1, args.repeats + 1):
        batch = images[repeat * args.batch_size : (repeat + 1) * args.batch_size]
        for name, run in (("per-image", run_per_image), ("batched", run_batched)):
            start = time.perf_counter()
            run(batch)
            rates[name].append(args.batch_size / (time.perf_counter() - start))
        print(
            f"repeat {repeat}: per-image {rates['per-image'][-1]:9.0f} images/s, "
            f"batched {rates['batched'][-1]:9.0f} images/s"
        )
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"{source}, batch {args.batch_size}, {args.threads} thread(s), batched on {device}: "
        f"median per-image {medians['per-image']:.0f} images/s, batched "
        f"{medians['batched']:.0f} images/s, ratio {medians['batched'] / medians['per-image']:.1f}x"
    )


if __name__ == "__main__":
    main()
