"""jaxgen.models.tokenizers.resize against torch.nn.functional.interpolate (NHWC <-> NCHW)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.models.tokenizers import resize

torch = pytest.importorskip("torch")
F = torch.nn.functional
# torch's vectorised CPU kernels use FMA, its ATEN_CPU_CAPABILITY=default one does not (see bicubic_weights).
FUSED = torch.backends.cpu.get_cpu_capability() != "DEFAULT"


def _torch_ref(x: np.ndarray, **kw) -> np.ndarray:
    y = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), **kw)
    return y.permute(0, 2, 3, 1).numpy()


def _assert_close(out, ref):
    # float32 rounding only: same weights, different summation order than torch.
    out = np.asarray(out)
    assert out.shape == ref.shape and out.dtype == np.float32
    err = np.abs(out - ref).max()
    assert err <= 2e-6 * max(1.0, np.abs(ref).max()), err


def _x(hw, seed=0, b=2, c=3):
    return np.random.default_rng(seed).standard_normal((b, *hw, c)).astype(np.float32)


AREA = [(16, o) for o in (1, 2, 3, 4, 5, 6, 8, 10, 13)] + [(4, 1), (4, 2), (4, 3), (6, 4)]
AREA += [(32, o) for o in (24, 18, 13, 9)] + [(3, 7), (5, 16)]  # last two: upsampling
CUBIC = [(i, 16) for i in (1, 2, 3, 4, 5, 6, 8, 10, 13)] + [(1, 4), (2, 4), (3, 4), (2, 6), (4, 6)]
CUBIC += [(i, 32) for i in (9, 13, 18, 24)] + [(16, 16), (16, 7), (32, 13)]  # identity, downsampling


@pytest.mark.parametrize("n_in,n_out", AREA)
def test_area_matches_torch(n_in, n_out):
    x, size = _x((n_in, n_in)), (n_out, n_out)
    _assert_close(resize.area_resize(jnp.asarray(x), size), _torch_ref(x, size=size, mode="area"))


@pytest.mark.parametrize("n_in,n_out", CUBIC)
def test_bicubic_matches_torch(n_in, n_out):
    x = _x((n_in, n_in))
    ref = _torch_ref(x, size=(n_out, n_out), mode="bicubic", align_corners=False)
    _assert_close(resize.bicubic_resize(jnp.asarray(x), (n_out, n_out), fused=FUSED), ref)


def _torch_weights(n_in, n_out, mode):
    """torch's [Out, In] matrix along H, probed with one-hot images (W: 1 -> 1 is the identity)."""
    kw = {"align_corners": False} if mode == "bicubic" else {}
    y = F.interpolate(torch.eye(n_in).reshape(n_in, 1, n_in, 1), size=(n_out, 1), mode=mode, **kw)
    return y[:, 0, :, 0].T.numpy()


def test_weights_bit_exact():
    pairs = [(i, o) for i in range(1, 34) for o in range(1, 34)]
    pairs += [(256, 224), (224, 256), (1000, 333), (7, 1024)]
    for i, o in pairs:
        np.testing.assert_array_equal(resize.area_weights(i, o), _torch_weights(i, o, "area"))
        np.testing.assert_array_equal(resize.bicubic_weights(i, o, FUSED), _torch_weights(i, o, "bicubic"))


@pytest.mark.parametrize("hw,size", [((5, 9), (16, 12)), ((12, 7), (4, 13)), ((16, 10), (3, 5))])
def test_non_square_matches_torch(hw, size):
    x = _x(hw, seed=1)
    _assert_close(resize.area_resize(jnp.asarray(x), size), _torch_ref(x, size=size, mode="area"))
    ref = _torch_ref(x, size=size, mode="bicubic", align_corners=False)
    _assert_close(resize.bicubic_resize(jnp.asarray(x), size, fused=FUSED), ref)


@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (8, 8)])
def test_nearest_upsample_2x_matches_torch(hw):
    x = _x(hw)
    ref = _torch_ref(x, scale_factor=2, mode="nearest")
    np.testing.assert_array_equal(np.asarray(resize.nearest_upsample_2x(jnp.asarray(x))), ref)


def test_jit_and_dtype():
    x = jnp.asarray(_x((10, 10)))
    for fn in (resize.area_resize, resize.bicubic_resize):
        f = jax.jit(fn, static_argnums=1)
        np.testing.assert_allclose(f(x, (4, 16)), fn(x, (4, 16)), atol=1e-6)
        assert fn(x.astype(jnp.bfloat16), (4, 16)).dtype == jnp.bfloat16
    assert jax.jit(resize.nearest_upsample_2x)(x).shape == (2, 20, 20, 3)


def test_grads_are_weight_column_sums():
    # Both resizes are linear, y = Wh x Ww^T per channel: d sum(y) / dx[h, w] = (sum_o Wh[o, h]) * (sum_p Ww[p, w]),
    # non-uniform for overlapping area windows and for bicubic's border taps (its weights are clamped at the edges).
    x = jnp.asarray(_x((6, 16), b=1, c=2))
    for fn, weights, size in ((resize.area_resize, resize.area_weights, (4, 13)),
                              (resize.bicubic_resize, resize.bicubic_weights, (32, 7))):  # fmt: skip
        g = np.asarray(jax.grad(lambda v, fn=fn, size=size: fn(v, size).sum())(x))
        want = np.outer(weights(6, size[0]).sum(0), weights(16, size[1]).sum(0))
        assert not np.allclose(want, want.mean()), fn.__name__
        np.testing.assert_allclose(g[0, :, :, 0], want, rtol=1e-5, atol=1e-6, err_msg=fn.__name__)
        np.testing.assert_allclose(g[0, :, :, 1], want, rtol=1e-5, atol=1e-6, err_msg=fn.__name__)


BAD = [((4, 4, 3), (2, 2)), ((1, 4, 4, 3, 1), (2, 2)), ((1, 4, 4, 3), (0, 2)), ((1, 4, 4, 3), (2,))]


@pytest.mark.parametrize("shape,size", BAD)
def test_bad_args_raise(shape, size):
    x = jnp.zeros(shape)
    for fn in (resize.area_resize, resize.bicubic_resize):
        with pytest.raises(ValueError):
            fn(x, size)
    if len(shape) != 4:
        with pytest.raises(ValueError):
            resize.nearest_upsample_2x(x)
