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


def test_logits_shape_and_dtype_for_both_compute_dtypes():
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3)), jnp.uint8)
    params = ConvNet().init(jax.random.PRNGKey(0), images[:1])
    full = ConvNet().apply(params, images)
    half = ConvNet(dtype=jnp.bfloat16).apply(params, images)
    assert full.shape == half.shape == (5, 10)
    assert full.dtype == half.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    np.testing.assert_allclose(half, full, atol=0.05)


def test_widths_are_arguments_and_uint8_equals_scaled_float_input():
    model = ConvNet(channels=(4, 8), dense=6, num_classes=3)
    images = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    params = model.init(jax.random.PRNGKey(0), images)
    # 3*3*3*4+4, 3*3*4*8+8, 8*6+6, 6*3+3
    assert param_count(params) == 112 + 296 + 54 + 21
    np.testing.assert_allclose(model.apply(params, images), model.apply(params, images.astype(np.float32)),
                               rtol=1e-6)


@pytest.mark.parametrize("size", [16, 15])
def test_patch_conv_gives_the_same_logits_and_gradients_as_nn_conv(size):
    images = np.random.default_rng(3).integers(0, 256, (4, size, size, 3)).astype(np.uint8)
    labels = np.arange(4) % 10
    reference, patches = ConvNet(channels=(8, 16, 32)), ConvNet(channels=(8, 16, 32), conv="patches")
    params = reference.init(jax.random.PRNGKey(0), images)
    assert jax.tree.map(np.shape, patches.init(jax.random.PRNGKey(0), images)) == jax.tree.map(np.shape, params)

    def loss(model, p):
        logits = model.apply(p, images)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels]), logits
    (_, want_logits), want_grads = jax.value_and_grad(lambda p: loss(reference, p), has_aux=True)(params)
    (_, got_logits), got_grads = jax.value_and_grad(lambda p: loss(patches, p), has_aux=True)(params)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), got_grads, want_grads)
