import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ConvNet, param_count


def test_default_model_has_the_experiments_parameter_count():
    params = ConvNet().init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3), jnp.uint8))["params"]
    assert param_count(params) == 422_602
    assert [params[f"Conv_{i}"]["kernel"].shape for i in range(4)] == [
        (3, 3, 3, 32), (3, 3, 32, 64), (3, 3, 64, 128), (3, 3, 128, 256)]
    assert params["Dense_0"]["kernel"].shape == (256, 128)
    assert params["Dense_1"]["kernel"].shape == (128, 10)


def reference_forward(params, images, dtype=np.float32):
    """The net written out with plain lax ops on images / 255 (no flax, no model.py), in `dtype`."""
    x = jnp.asarray(images, jnp.float32).astype(dtype) / 255
    for i in range(sum(name.startswith("Conv_") for name in params)):
        layer = params[f"Conv_{i}"]
        x = jax.lax.conv_general_dilated(x, layer["kernel"].astype(dtype), (2, 2), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + layer["bias"].astype(dtype)
        x = jax.nn.gelu(x)
    x = x.mean(axis=(1, 2))
    x = jax.nn.gelu(x @ params["Dense_0"]["kernel"].astype(dtype) + params["Dense_0"]["bias"].astype(dtype))
    return (x @ params["Dense_1"]["kernel"].astype(dtype) + params["Dense_1"]["bias"].astype(dtype)).astype(np.float32)


def test_logits_equal_a_plain_lax_forward_in_either_compute_dtype():
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3)), jnp.uint8)
    params = ConvNet().init(jax.random.PRNGKey(0), images[:1])
    full = ConvNet().apply(params, images)
    half = ConvNet(dtype=jnp.bfloat16).apply(params, images)
    assert full.shape == half.shape == (5, 10)
    assert full.dtype == half.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    # Logits here are about 0.06 across; float32 agrees to rounding, bfloat16 only to its 8-bit mantissa.
    want = reference_forward(params["params"], images)
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(full, want, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(half, reference_forward(params["params"], images, jnp.bfloat16), rtol=0,
                               atol=2e-2 * scale)
    assert 1e-3 * scale < float(np.abs(half - full).max()) < 0.1 * scale  # bfloat16 really computes in bfloat16


def test_widths_are_arguments_and_the_images_are_scaled_by_1_over_255():
    model = ConvNet(channels=(4, 8), dense=6, num_classes=3)
    images = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    params = model.init(jax.random.PRNGKey(0), images)
    # 3*3*3*4+4, 3*3*4*8+8, 8*6+6, 6*3+3
    assert param_count(params) == 112 + 296 + 54 + 21
    want = reference_forward(params["params"], images)  # its own scaling, not the model's
    for given in (images, images.astype(np.float32)):  # uint8 or float in [0, 255]: the same logits
        np.testing.assert_allclose(model.apply(params, given), want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("conv,remat_gelu,size", [
    ("patches", False, 16), ("patches", False, 15), ("stem_patches", False, 15), ("space_to_depth", False, 16),
    ("space_to_depth", True, 15), ("xla", True, 16)])  # odd sides pad differently: both kinds for each
def test_every_conv_formulation_gives_nn_convs_logits_and_gradients(conv, remat_gelu, size):
    images = np.random.default_rng(3).integers(0, 256, (4, size, size, 3)).astype(np.uint8)
    labels = np.arange(4) % 10
    reference, variant = ConvNet(channels=(8, 16, 32)), ConvNet(channels=(8, 16, 32), conv=conv, remat_gelu=remat_gelu)
    params = reference.init(jax.random.PRNGKey(0), images)
    assert jax.tree.map(np.shape, variant.init(jax.random.PRNGKey(0), images)) == jax.tree.map(np.shape, params)

    def loss(model, p):
        logits = model.apply(p, images)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels]), logits
    (_, want_logits), want_grads = jax.value_and_grad(lambda p: loss(reference, p), has_aux=True)(params)
    (_, got_logits), got_grads = jax.value_and_grad(lambda p: loss(variant, p), has_aux=True)(params)
    # Float32 rounding apart, the same function: logits are about 0.05 here, their differences about 2e-8.
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-7)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale, err_msg=str(path))


def test_haiku_initialiser_draws_what_haiku_drew_and_flax_draws_larger():
    """haiku (2021): truncated at 2 std, std 1/sqrt(fan_in) before truncation, so 0.8796/sqrt(fan_in) after;
    flax's lecun_normal corrects for the truncation (std 1/sqrt(fan_in)). Biases start at zero in both."""
    images = np.zeros((1, 64, 64, 3), np.uint8)
    haiku = ConvNet(initialiser="haiku").init(jax.random.PRNGKey(0), images)["params"]
    flax_params = ConvNet().init(jax.random.PRNGKey(0), images)["params"]
    truncated_std = 0.87962566  # of a standard normal truncated at +-2
    for name in ("Conv_2", "Conv_3", "Dense_0"):
        kernel, fan_in = np.asarray(haiku[name]["kernel"]), np.prod(haiku[name]["kernel"].shape[:-1])
        assert np.abs(kernel).max() <= 2 / np.sqrt(fan_in) * (1 + 1e-6)
        np.testing.assert_allclose(kernel.std() * np.sqrt(fan_in), truncated_std, rtol=0.02)
        np.testing.assert_allclose(np.asarray(flax_params[name]["kernel"]).std() * np.sqrt(fan_in), 1.0, rtol=0.02)
        assert not np.asarray(haiku[name]["bias"]).any()


def numpy_forward(params, images):
    """The net as the README describes it, in NumPy float64 with nothing from jax, flax or model.py: each
    3x3 stride-2 conv an explicit sum over its 9 taps (zero padding as XLA's SAME puts it: the odd pixel
    after), then GELU in its tanh form (flax's nn.gelu default), a mean over the pixels, Dense 128 + GELU,
    Dense 10. Images are uint8 scaled by 1/255."""
    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    x = np.asarray(images, np.float64) / 255  # (n, H, W, C)
    for i in range(sum(name.startswith("Conv_") for name in params)):
        kernel, bias = (np.asarray(params[f"Conv_{i}"][k], np.float64) for k in ("kernel", "bias"))
        n, height, width, _ = x.shape
        out_h, out_w = -(-height // 2), -(-width // 2)
        pad_h, pad_w = max(2 * out_h + 1 - height, 0), max(2 * out_w + 1 - width, 0)
        padded = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
        out = np.zeros((n, out_h, out_w, kernel.shape[3]))
        for dy in range(3):
            for dx in range(3):
                tap = padded[:, dy:dy + 2 * out_h - 1:2, dx:dx + 2 * out_w - 1:2, :]  # (n, out_h, out_w, C)
                out += np.einsum("nhwc,cf->nhwf", tap, kernel[dy, dx])
        x = gelu(out + bias)
    x = x.mean(axis=(1, 2))  # (n, channels[-1])
    dense0, dense1 = params["Dense_0"], params["Dense_1"]
    x = gelu(x @ np.asarray(dense0["kernel"], np.float64) + np.asarray(dense0["bias"], np.float64))
    return x @ np.asarray(dense1["kernel"], np.float64) + np.asarray(dense1["bias"], np.float64)


@pytest.mark.parametrize("conv,remat_gelu", [("xla", False), ("patches", False), ("stem_patches", False),
                                             ("space_to_depth", False), ("xla", True)])
def test_the_default_net_computes_what_the_readme_describes(conv, remat_gelu):
    """Golden: the 422,602-parameter net's logits on fixed images (the synthetic source's, smooth colours and
    rings with noise) against the NumPy forward pass above, for every conv formulation."""
    import data
    images = data.synthetic_dataset(6, 64).images  # (6, 64, 64, 3) uint8, the same every time
    model = ConvNet(conv=conv, remat_gelu=remat_gelu)
    params = model.init(jax.random.PRNGKey(3), images[:1])["params"]
    want = numpy_forward(params, images)
    got = np.asarray(model.apply({"params": params}, images), np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert np.abs(want).max() > 1e-2 and np.ptp(want, axis=0).max() > 1e-3  # logits that differ between images
