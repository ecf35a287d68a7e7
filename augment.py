"""The 8 dihedral forms of every training image, materialised once on the devices.

Transform t in 0..7 is `np.rot90(np.fliplr(image) if t >= 4 else image, k=t % 4)`: rotations by
0, 90, 180 and 270 degrees counter-clockwise, then the same four after a left-right flip. Transform 0 is
the identity, so `augmented[:, ::8]` are the original images.
"""
import jax
import jax.numpy as jnp

NUM_TRANSFORMS = 8


def dihedral(image, transform):
    """One dihedral form of a square image (S, S, C); `transform` (0..7) may be a traced value.

    Written as a gather with computed indices because jnp.rot90 needs a static rotation count.
    """
    image = jnp.asarray(image)
    size = image.shape[0]
    if image.shape[1] != size:
        raise ValueError(f"dihedral transforms need square images, got {image.shape[:2]}")
    rotation, flip = transform % 4, transform >= 4
    row, col = jnp.meshgrid(jnp.arange(size), jnp.arange(size), indexing="ij")  # (S, S) each
    last = size - 1
    # np.rot90(a, k)[row, col] reads a at these (source_row, source_col).
    source_row = jnp.select([rotation == 0, rotation == 1, rotation == 2], [row, col, last - row], last - col)
    source_col = jnp.select([rotation == 0, rotation == 1, rotation == 2], [col, last - row, last - col], row)
    source_col = jnp.where(flip, last - source_col, source_col)
    return image[source_row, source_col]


def all_dihedral(image):
    """(S, S, C) -> (8, S, S, C), in the order of the module docstring."""
    return jax.vmap(dihedral, in_axes=(None, 0))(image, jnp.arange(NUM_TRANSFORMS))


def expand_shard(images, labels, mask):
    """One device's shard: (n, S, S, C) -> (8n, S, S, C); labels and mask repeated to stay aligned."""
    forms = jax.vmap(all_dihedral)(images)  # (n, 8, S, S, C)
    n, size, channels = images.shape[0], images.shape[1], images.shape[3]
    forms = forms.reshape(n * NUM_TRANSFORMS, size, size, channels)  # (8n, S, S, C), image-major
    return forms, jnp.repeat(labels, NUM_TRANSFORMS), jnp.repeat(mask, NUM_TRANSFORMS)


# (devices, n, S, S, C) -> (devices, 8n, S, S, C); the result stays sharded on the devices.
expand_sharded = jax.pmap(expand_shard)
