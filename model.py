"""The conv net of the experiment: four stride-2 3x3 convs, global mean pool, two dense layers."""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DEFAULT_CHANNELS = (32, 64, 128, 256)
DEFAULT_DENSE = 128
NUM_CLASSES = 10


class PatchConv(nn.Module):
    """A 3x3 stride-2 SAME conv written as one matmul over the 9 gathered patches.

    Same parameters (names, shapes, initialisers) and same function as nn.Conv; it exists because some
    backends run a plain matmul closer to their peak than a strided convolution (see README, Speed).
    """
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        n, height, width, channels = x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, channels, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        out_h, out_w = -(-height // 2), -(-width // 2)
        pad_h, pad_w = max(2 * out_h + 1 - height, 0), max(2 * out_w + 1 - width, 0)  # SAME, as XLA splits it
        x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
        taps = [x[:, dy:dy + 2 * out_h - 1:2, dx:dx + 2 * out_w - 1:2] for dy in range(3) for dx in range(3)]
        patches = jnp.concatenate(taps, axis=-1)  # (n, out_h, out_w, 9 * channels), ordered like the kernel
        rows = patches.reshape(n * out_h * out_w, 9 * channels)  # (pixels, 9 * channels)
        y = rows @ kernel.astype(self.dtype).reshape(9 * channels, self.features) + bias.astype(self.dtype)
        return y.reshape(n, out_h, out_w, self.features)  # (n, out_h, out_w, features)


class ConvNet(nn.Module):
    """Takes uint8 (or float in [0, 255]) images (batch, H, W, 3); returns float32 logits (batch, classes).

    `dtype` is the compute dtype; parameters stay float32 whatever it is.
    """
    channels: Sequence[int] = DEFAULT_CHANNELS
    dense: int = DEFAULT_DENSE
    num_classes: int = NUM_CLASSES
    dtype: Any = jnp.float32
    conv: str = "xla"  # "xla": nn.Conv; "patches": PatchConv, the same function as a matmul

    @nn.compact
    def __call__(self, images):
        # Images live on the devices as uint8; scaling here lets XLA fuse it into the first conv.
        x = images.astype(self.dtype) * (1.0 / 255.0)  # (batch, H, W, 3)
        for i, width in enumerate(self.channels):
            if self.conv == "patches":
                x = PatchConv(width, self.dtype, name=f"Conv_{i}")(x)
            else:
                x = nn.Conv(width, (3, 3), strides=(2, 2), padding="SAME", dtype=self.dtype, name=f"Conv_{i}")(x)
            x = nn.gelu(x)
        x = jnp.mean(x, axis=(1, 2))  # (batch, channels[-1])
        x = nn.gelu(nn.Dense(self.dense, dtype=self.dtype)(x))
        logits = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        return logits.astype(jnp.float32)  # (batch, classes)


def param_count(params) -> int:
    return sum(p.size for p in jax.tree_util.tree_leaves(params))
