"""The FID Inception-v3: the TensorFlow 'inception-2015-12-05' graph the FID/IS/sFID numbers (and the ADM evaluator)
are defined on, as a PyTorch module whose parameter names are those of the two public ports of its weights:

- ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's port; torchvision Inception3 key names), and
- ``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity's port; the same key names).

Both hold the graph's constants converted one to one (conv kernels HWIO -> OIHW, batch-norm gamma/beta/moving
stats, the 2048 x 1008 softmax layer), so either gives the TF graph's activations up to float32 round-off. Nothing
is downloaded: the user passes the file's path. The graph differs from torchvision's Inception3 in three places,
patched below as the ports do: average pools ignore padding (TF's SAME pooling), the last block pools with max
instead of average, and the input is resized like TF 1.x ResizeBilinear (no half-pixel offset), then mapped
[0, 255] -> [-1, 1) by (x - 128) / 128.

Which TF tensor each output is (the names the ADM evaluator reads):
    pool    [N, 2048]  pool_3:0                          FID, precision/recall
    logits  [N, 1008]  pool_3 @ softmax/weights (no bias) Inception Score (softmax over all 1008 classes)
    spatial [N, 2023]  mixed_6/conv:0[..., :7], NHWC-flattened (17 x 17 x 7)   sFID
mixed_6 is the 7th mixed block, Mixed_6d here; its 'conv' is the 1x1 branch after its ReLU.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

INPUT_SIZE = 299  # the graph's input resolution; load_inception reads it at call time (tests shrink it)
SPATIAL_CHANNELS = 7  # the ADM evaluator keeps the first 7 channels of mixed_6/conv


class InceptionFeatures(NamedTuple):
    pool: Tensor     # [N, 2048] float32
    logits: Tensor   # [N, 1008] float32, without the softmax bias (as the ADM evaluator and torch-fidelity)
    spatial: Tensor  # [N, 7 * h * w] float32, flattened in NHWC order so it lines up with ADM's mu_s / sigma_s


def tf1_resize_bilinear(x: Tensor, size: int) -> Tensor:
    """TF 1.x ResizeBilinear (align_corners=False, no half-pixel centres): source = dest * in/out.

    torch's bilinear interpolation uses half-pixel centres, which shifts every output pixel and moves FID by a few
    tenths at 256 -> 299; this reproduces the graph's resize instead.
    """
    def axis(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        # float32 like the TF kernel: scale = in / (float)out, source = i * scale, weight = source - floor(source)
        src = torch.arange(size, device=x.device, dtype=torch.float32) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.floor().long()
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo).to(x.dtype)

    (y0, y1, wy), (x0, x1, wx) = axis(x.shape[-2]), axis(x.shape[-1])
    top, bottom = x.index_select(-2, y0), x.index_select(-2, y1)
    # Horizontal lerps first, then vertical: the kernel's order, so the round-off matches it too.
    top_l, bottom_l = top.index_select(-1, x0), bottom.index_select(-1, x0)
    top = top_l + (top.index_select(-1, x1) - top_l) * wx
    bottom = bottom_l + (bottom.index_select(-1, x1) - bottom_l) * wx
    return top + (bottom - top) * wy[:, None]


class ConvBN(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, TF's) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF averages over real pixels only


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int, k: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64 // k, 1)
        self.branch5x5_1 = ConvBN(cin, 48 // k, 1)
        self.branch5x5_2 = ConvBN(48 // k, 64 // k, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64 // k, 1)
        self.branch3x3dbl_2 = ConvBN(64 // k, 96 // k, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96 // k, 96 // k, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features // k, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool_same(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int, k: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384 // k, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64 // k, 1)
        self.branch3x3dbl_2 = ConvBN(64 // k, 96 // k, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96 // k, 96 // k, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int, k: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192 // k, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192 // k, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192 // k, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192 // k, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(block output, the 1x1 branch): the branch of the 7th mixed block is the sFID feature."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([b1, b7, bd, self.branch_pool(_avg_pool_same(x))], 1), b1


class InceptionD(nn.Module):
    def __init__(self, cin: int, k: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192 // k, 1)
        self.branch3x3_2 = ConvBN(192 // k, 320 // k, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192 // k, 1)
        self.branch7x7x3_2 = ConvBN(192 // k, 192 // k, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192 // k, 192 // k, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192 // k, 192 // k, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int, k: int, max_pool: bool) -> None:
        super().__init__()
        # The graph's last block (mixed_10) pools with max where the paper has average; the ports keep the graph's.
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320 // k, 1)
        self.branch3x3_1 = ConvBN(cin, 384 // k, 1)
        self.branch3x3_2a = ConvBN(384 // k, 384 // k, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384 // k, 384 // k, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448 // k, 1)
        self.branch3x3dbl_2 = ConvBN(448 // k, 384 // k, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384 // k, 384 // k, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384 // k, 384 // k, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192 // k, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_same(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd), self.branch_pool(pooled)], 1)


class InceptionV3FID(nn.Module):
    """The FID Inception-v3. ``width_divisor`` > 1 divides every channel count: only for tiny test networks (the
    real weights are width_divisor=1, and load_inception reads it off the file)."""

    def __init__(self, width_divisor: int = 1, input_size: int = INPUT_SIZE) -> None:
        super().__init__()
        k = width_divisor
        if k < 1 or 16 % k:  # every channel count of the network is a multiple of 16
            raise ValueError(f"width_divisor must divide 16, got {k}")
        self.input_size = input_size
        self.Conv2d_1a_3x3 = ConvBN(3, 32 // k, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32 // k, 32 // k, 3)
        self.Conv2d_2b_3x3 = ConvBN(32 // k, 64 // k, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64 // k, 80 // k, 1)
        self.Conv2d_4a_3x3 = ConvBN(80 // k, 192 // k, 3)
        self.Mixed_5b = InceptionA(192 // k, 32, k)
        self.Mixed_5c = InceptionA(256 // k, 64, k)
        self.Mixed_5d = InceptionA(288 // k, 64, k)
        self.Mixed_6a = InceptionB(288 // k, k)
        self.Mixed_6b = InceptionC(768 // k, 128 // k, k)
        self.Mixed_6c = InceptionC(768 // k, 160 // k, k)
        self.Mixed_6d = InceptionC(768 // k, 160 // k, k)
        self.Mixed_6e = InceptionC(768 // k, 192 // k, k)
        self.Mixed_7a = InceptionD(768 // k, k)
        self.Mixed_7b = InceptionE(1280 // k, k, max_pool=False)
        self.Mixed_7c = InceptionE(2048 // k, k, max_pool=True)
        self.fc = nn.Linear(2048 // k, 1008)

    @property
    def feature_dim(self) -> int:
        return self.fc.in_features

    def forward(self, images: Tensor) -> InceptionFeatures:
        """images: [N, 3, H, W], uint8 or float, pixel values in [0, 255] (any H, W; resized to input_size)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got shape {tuple(images.shape)}")
        x = tf1_resize_bilinear(images.to(self.fc.weight.dtype), self.input_size)
        x = (x - 128.0) / 128.0  # the graph's Sub/Mul pair
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x, _ = self.Mixed_6b(x)
        x, _ = self.Mixed_6c(x)
        x, mixed_6 = self.Mixed_6d(x)
        x, _ = self.Mixed_6e(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = x.mean(dim=(2, 3))
        spatial = mixed_6[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        return InceptionFeatures(pool.float(), (pool @ self.fc.weight.T).float(), spatial.float())


def load_inception(path: str | os.PathLike, device: torch.device | str = "cpu",
                   input_size: int | None = None) -> InceptionV3FID:
    """Build the FID Inception from a local weights file (either port named in the module docstring)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception weights {path}: no such file (pass a local pt_inception-2015-12-05-6726825d.pth or "
            "weights-inception-2015-12-05-6726825d.pth; nothing is downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unpickling failure means the same thing to the user
        raise ValueError(f"Inception weights {path}: not a readable PyTorch state dict ({e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "Conv2d_1a_3x3.conv.weight" not in {k.removeprefix("module.") for k in state}:
        raise ValueError(f"Inception weights {path}: no 'Conv2d_1a_3x3.conv.weight'; not an FID Inception-v3 "
                         "state dict (see soflow_fast/evaluation/inception.py for the supported files)")
    # Older files lack num_batches_tracked and some carry a DataParallel 'module.' prefix; neither is a weight.
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    width = state["Conv2d_1a_3x3.conv.weight"].shape[0]
    if width < 2 or 32 % width:
        raise ValueError(f"Inception weights {path}: first conv has {width} filters; expected 32 (or 32/k for a "
                         "test network)")
    model = InceptionV3FID(32 // width, INPUT_SIZE if input_size is None else input_size)
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"Inception weights {path}: keys do not match the FID Inception-v3 "
                         f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")
    for k, v in model.state_dict().items():
        if k in state and state[k].shape != v.shape:
            raise ValueError(f"Inception weights {path}: {k} has shape {tuple(state[k].shape)}, expected "
                             f"{tuple(v.shape)}")
    model.load_state_dict(state, strict=False)  # strict apart from num_batches_tracked, checked above
    return model.to(device).eval().requires_grad_(False)
