"""What the service feeds the model for each kind of image, value by value, against arrays computed here on their own:
16-bit samples scaled to 8 bits, transparent pixels composited onto white, grey replicated to RGB, and the first
frame of an animation. (tests/test_serve.py checks that every kind gets an answer over HTTP.)"""
import io

import numpy as np
import pytest
from PIL import Image

from cifarlab.serve import Model, image_to_input
from conftest import png as encoded


@pytest.fixture(scope="module")
def model(exported_model):
    m = Model(exported_model[0])
    assert m.size == (32, 32) and m.background == (255, 255, 255)  # images below are made at the input's size: no resize
    return m


def model_input(data, model):
    x, _ = image_to_input(data, model)
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.uint8
    return x[0].transpose(1, 2, 0)  # H x W x RGB


RNG = np.random.default_rng(0)


def test_16_bit_grey_is_scaled_to_8_bits(model):
    v = RNG.integers(0, 65536, (32, 32), dtype=np.uint16)
    expected = np.round(v / 257).astype(np.uint8)  # 65535 / 255 = 257, and v / 257 never ends in exactly .5
    np.testing.assert_array_equal(model_input(encoded(Image.fromarray(v)), model), np.dstack([expected] * 3))


def test_transparent_pixels_become_white(model):
    rgb = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    alpha = np.where(np.add.outer(np.arange(32), np.arange(32)) % 2 == 0, 255, 0).astype(np.uint8)  # a checkerboard
    img = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    expected = np.where(alpha[..., None] == 255, rgb, 255)
    np.testing.assert_array_equal(model_input(encoded(img), model), expected)


def test_grey_is_replicated_to_rgb(model):
    g = RNG.integers(0, 256, (32, 32), dtype=np.uint8)
    np.testing.assert_array_equal(model_input(encoded(Image.fromarray(g)), model), np.dstack([g] * 3))


def test_the_first_frame_of_an_animation(model):
    red, blue = (Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255)))
    gif = encoded(red, "GIF", save_all=True, append_images=[blue], duration=100)
    assert Image.open(io.BytesIO(gif)).n_frames == 2
    np.testing.assert_array_equal(model_input(gif, model), np.asarray(red))
