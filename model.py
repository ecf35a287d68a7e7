"""The conv net of the experiment: four stride-2 3x3 convs, global mean pool, two dense layers.

The stride-2 convs can be computed several ways (`--conv`), all the same function of the same parameters
(tests compare logits and gradients with nn.Conv): backends run some formulations much closer to their
peak than others (README, Speed; PERFORMANCE.md).
"""
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_CHANNELS = (32, 64, 128, 256)
DEFAULT_DENSE = 128
NUM_CLASSES = 10
CONVS = ("xla", "patches", "stem_patches", "space_to_depth")  # what --conv may name besides "auto"
INITIALISERS = ("flax", "haiku")


def haiku_initialiser(key, shape, dtype=jnp.float32):
    """What haiku's Conv2D and Linear drew in 2021: a normal truncated at two standard deviations, with
    standard deviation 1/sqrt(fan_in) before truncation (flax's lecun_normal corrects for the truncation,
    so its weights are 1/0.88 = 1.14 times larger)."""
    fan_in = int(np.prod(shape[:-1]))
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) / np.sqrt(fan_in)


def same_padding(size: int) -> tuple[int, int]:
    """XLA's SAME padding of a 3x3 stride-2 conv along one axis: (before, after)."""
    total = max(2 * -(-size // 2) + 1 - size, 0)
    return total // 2, total - total // 2


class StrideTwoConv(nn.Module):
    """A 3x3 stride-2 SAME conv with nn.Conv's parameters (names, shapes, initialiser) and function, computed
    another way (nn.Conv itself is the "xla" formulation):
    - "patches": one matmul over the 9 gathered taps (K = 9 C);
    - "space_to_depth": a 2x2 stride-1 conv on the input blocked 2x2 into 4 C channels, with the 3x3
      kernel scattered into a 2x2x4C one (its 7 unused taps zero): on the stem, K = 48 instead of 27.
    """
    features: int
    formulation: str = "patches"
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        n, height, width, channels = x.shape
        kernel = self.param("kernel", self.kernel_init, (3, 3, channels, self.features)).astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,)).astype(self.dtype)
        x = x.astype(self.dtype)
        out_h, out_w = -(-height // 2), -(-width // 2)
        (top, bottom), (left, right) = same_padding(height), same_padding(width)
        if self.formulation == "patches":
            x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
            taps = [x[:, dy:dy + 2 * out_h - 1:2, dx:dx + 2 * out_w - 1:2] for dy in range(3) for dx in range(3)]
            patches = jnp.concatenate(taps, axis=-1)  # (n, out_h, out_w, 9 C), ordered like the kernel
            rows = patches.reshape(n * out_h * out_w, 9 * channels)  # (pixels, 9 C)
            y = (rows @ kernel.reshape(9 * channels, self.features)).reshape(n, out_h, out_w, self.features)
        else:  # space_to_depth
            # Output row i reads padded rows 2i .. 2i + 2: blocks i and i + 1 of 2 rows each, so pad to
            # 2 (out_h + 1) rows (the rows past SAME's own padding only meet zero kernel taps).
            x = jnp.pad(x, ((0, 0), (top, 2 * (out_h + 1) - height - top), (left, 2 * (out_w + 1) - width - left),
                            (0, 0)))
            blocks = x.reshape(n, out_h + 1, 2, out_w + 1, 2, channels)  # (n, block_h, 2, block_w, 2, C)
            blocks = blocks.transpose(0, 1, 3, 2, 4, 5).reshape(n, out_h + 1, out_w + 1, 4 * channels)
            # kernel4[a, b, (py, px, c), f] = kernel[2a + py, 2b + px, c, f], zero where 2a + py or 2b + px is 3
            padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))  # (4, 4, C, F)
            kernel4 = padded.reshape(2, 2, 2, 2, channels, self.features)  # (a, py, b, px, C, F)
            kernel4 = kernel4.transpose(0, 2, 1, 3, 4, 5).reshape(2, 2, 4 * channels, self.features)
            y = jax.lax.conv_general_dilated(blocks, kernel4, (1, 1), "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))  # (n, out_h, out_w, F)
        return y + bias


class ConvNet(nn.Module):
    """Takes uint8 (or float in [0, 255]) images (batch, H, W, 3); returns float32 logits (batch, classes).

    `dtype` is the compute dtype; parameters stay float32 whatever it is.
    """
    channels: Sequence[int] = DEFAULT_CHANNELS
    dense: int = DEFAULT_DENSE
    num_classes: int = NUM_CLASSES
    dtype: Any = jnp.float32
    conv: str = "xla"  # one of CONVS
    initialiser: str = "flax"  # one of INITIALISERS
    remat_gelu: bool = False  # recompute each GELU in the backward pass instead of keeping its output

    @nn.compact
    def __call__(self, images):
        kernel_init = haiku_initialiser if self.initialiser == "haiku" else nn.initializers.lecun_normal()
        gelu = jax.checkpoint(nn.gelu) if self.remat_gelu else nn.gelu
        # Images live on the devices as uint8; scaling here lets XLA fuse it into the first conv.
        x = images.astype(self.dtype) * (1.0 / 255.0)  # (batch, H, W, 3)
        for i, width in enumerate(self.channels):
            formulation = {"stem_patches": "patches" if i == 0 else "xla"}.get(self.conv, self.conv)
            if formulation == "xla":
                conv = nn.Conv(width, (3, 3), strides=(2, 2), padding="SAME", dtype=self.dtype,
                               kernel_init=kernel_init, name=f"Conv_{i}")
            else:
                conv = StrideTwoConv(width, formulation, self.dtype, kernel_init, name=f"Conv_{i}")
            x = gelu(conv(x))
        x = jnp.mean(x, axis=(1, 2))  # (batch, channels[-1])
        x = gelu(nn.Dense(self.dense, dtype=self.dtype, kernel_init=kernel_init)(x))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=kernel_init)(x)
        return logits.astype(jnp.float32)  # (batch, classes)


def param_count(params) -> int:
    return sum(p.size for p in jax.tree_util.tree_leaves(params))
