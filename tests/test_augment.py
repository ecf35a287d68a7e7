import jax
import numpy as np
import pytest

import augment


def reference_forms(image):
    flipped = np.fliplr(image)
    return [np.rot90(image, k) for k in range(4)] + [np.rot90(flipped, k) for k in range(4)]


def test_each_dihedral_form_equals_numpy():
    image = np.random.default_rng(0).integers(0, 256, (7, 7, 3)).astype(np.uint8)
    forms = np.asarray(augment.all_dihedral(image))
    assert forms.shape == (8, 7, 7, 3) and forms.dtype == np.uint8
    for got, want in zip(forms, reference_forms(image)):
        np.testing.assert_array_equal(got, want)


def test_a_generic_image_has_eight_distinct_forms():
    forms = np.asarray(augment.all_dihedral(np.arange(5 * 5 * 2).reshape(5, 5, 2)))
    assert len({f.tobytes() for f in forms}) == 8


def test_non_square_images_are_refused():
    with pytest.raises(ValueError, match="square"):
        augment.all_dihedral(np.zeros((4, 5, 3)))


def test_sharded_expansion_keeps_devices_labels_and_mask_aligned():
    devices, n = jax.local_device_count(), 3
    assert devices == 8
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (devices, n, 6, 6, 3)).astype(np.uint8)  # (devices, n, S, S, C)
    labels = rng.integers(0, 10, (devices, n)).astype(np.int32)
    mask = (rng.random((devices, n)) > 0.3).astype(np.float32)
    out_images, out_labels, out_mask = augment.expand_sharded(images, labels, mask)
    assert out_images.shape == (devices, 8 * n, 6, 6, 3) and out_images.dtype == np.uint8
    assert out_labels.shape == out_mask.shape == (devices, 8 * n)
    assert len(out_images.sharding.device_set) == devices  # stays spread over the devices
    out_images = np.asarray(out_images)
    for d in range(devices):
        for i in range(n):
            for t, want in enumerate(reference_forms(images[d, i])):
                np.testing.assert_array_equal(out_images[d, 8 * i + t], want)
            assert (np.asarray(out_labels)[d, 8 * i:8 * i + 8] == labels[d, i]).all()
            assert (np.asarray(out_mask)[d, 8 * i:8 * i + 8] == mask[d, i]).all()
    np.testing.assert_array_equal(out_images[:, ::8], images)  # transform 0 is the identity
