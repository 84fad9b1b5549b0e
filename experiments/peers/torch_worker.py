"""PyTorch worker: plain eager MobileNetV1/V2 with mnres' architecture, channels_last.

timm and torchvision are not used: torchvision's wheels are CUDA-linked and do not import
beside the CPU build of torch. The networks below match mnres layer for layer (widths rounded
as Keras does, BatchNorm eps 1e-3, ReLU6, linear bottlenecks, a 1280-channel V2 head, no
dropout), so the multiply-adds are the same; only the stride-2 padding is PyTorch's symmetric
one instead of Keras' bottom/right pad, which changes no shape at even sizes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from experiments.peers import workload

# Same tables as mnres.models.
MOBILENET_V1_BLOCKS = (
    (64, 1),
    (128, 2), (128, 1),
    (256, 2), (256, 1),
    (512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
    (1024, 2), (1024, 1),
)  # fmt: skip
MOBILENET_V2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act=True):
    layers = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01),  # torch's momentum = 1 - Keras'
    ]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expansion: int, stride: int):
        super().__init__()
        hidden = cin * expansion
        layers = [conv_bn(cin, hidden)] if expansion != 1 else []
        layers += [
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, cout, act=False),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


def mobilenet_v2(alpha: float, num_classes: int) -> nn.Module:
    channels = make_divisible(32 * alpha)
    layers = [conv_bn(3, channels, 3, 2)]
    for expansion, c, repeats, stride in MOBILENET_V2_STAGES:
        for i in range(repeats):
            out = make_divisible(int(c * alpha))
            layers.append(InvertedResidual(channels, out, expansion, stride if i == 0 else 1))
            channels = out
    head = make_divisible(1280 * alpha) if alpha > 1.0 else 1280
    layers += [conv_bn(channels, head), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers, nn.Linear(head, num_classes))


def mobilenet_v1(alpha: float, num_classes: int) -> nn.Module:
    channels = int(32 * alpha)
    layers = [conv_bn(3, channels, 3, 2)]
    for filters, stride in MOBILENET_V1_BLOCKS:
        out = int(filters * alpha)
        layers += [conv_bn(channels, channels, 3, stride, groups=channels), conv_bn(channels, out)]
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers, nn.Linear(channels, num_classes))


MODELS = {"mobilenet_v1": mobilenet_v1, "mobilenet_v2": mobilenet_v2}


def build(spec: dict):
    if spec["model"] not in MODELS:
        raise NotImplementedError(f"no PyTorch peer for {spec['model']!r}")
    if spec["overrides"]:
        raise NotImplementedError(f"no PyTorch peer for a model with overrides {spec['overrides']}")
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    size, batch = spec["image_size"], spec["batch_size"]
    model = MODELS[spec["model"]](spec["alpha"], spec["num_classes"])
    model = model.to(memory_format=torch.channels_last)
    # The default experiment config's optimizer: AdamW, decay 1e-2, global-norm clipping at 1.
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)

    rng = np.random.default_rng(spec["seed"])
    nhwc = torch.from_numpy(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    images = nhwc.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels_last
    labels = torch.from_numpy(rng.integers(0, spec["num_classes"], batch).astype(np.int64))

    def preprocess(x):
        return x.float().mul_(1 / 127.5).sub_(1.0)  # uint8 -> [-1, 1], as mnres does in-step

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(preprocess(images)), labels)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    def predict(x):
        model.eval()
        with torch.inference_mode():
            return torch.softmax(model(preprocess(x)), -1)[:, 1].numpy()

    info = {
        "framework": "pytorch",
        "version": f"torch {torch.__version__}",
        "platform": "cpu",
        "threads_used": {
            "intra_op": torch.get_num_threads(),
            "inter_op": torch.get_num_interop_threads(),
        },
    }
    return info, (train_step, lambda: predict(images), lambda: predict(images[:1]))


if __name__ == "__main__":
    workload.run_worker(build)
