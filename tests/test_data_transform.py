"""SSL view augmentation and evaluation spatial sampling."""
import itertools
import math

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from datasets import transform
from datasets.transform import VideoDataAugmentationDINO, ssl_view_frames
from tests.conftest import build_cfg


def _cfg(**opts):
    return build_cfg("", "", tiny=False, **opts)


def test_ssl_view_frames_defaults_rand_fr_and_paper():
    assert ssl_view_frames(_cfg(), 8) == ((8, 8), (8,) * 8)
    assert ssl_view_frames(_cfg(**{"DATA.NUM_FRAMES": 4}), 2) == ((4, 4), (4, 4))
    assert ssl_view_frames(_cfg(**{"DATA.RAND_FR": True}), 8) == ((4, 8), (2, 2, 4, 4, 8, 8, 16, 16))
    paper = _cfg(**{"DATA.GLOBAL_NUM_FRAMES": [8, 16], "DATA.LOCAL_NUM_FRAMES": [2, 2, 4, 4, 8, 8, 16, 16]})
    assert ssl_view_frames(paper, 8) == ((8, 16), (2, 2, 4, 4, 8, 8, 16, 16))


def test_ssl_view_frames_errors_name_the_mismatch():
    with pytest.raises(ValueError, match="DATA.RAND_FR True gives 8 local views.*--local_crops_number is 6"):
        ssl_view_frames(_cfg(**{"DATA.RAND_FR": True}), 6)
    with pytest.raises(ValueError, match="DATA.LOCAL_NUM_FRAMES gives 2 local views"):
        ssl_view_frames(_cfg(**{"DATA.LOCAL_NUM_FRAMES": [2, 4]}), 8)
    with pytest.raises(ValueError, match="GLOBAL_NUM_FRAMES must list 2"):
        ssl_view_frames(_cfg(**{"DATA.GLOBAL_NUM_FRAMES": [8]}), 8)


def _static_views(aug, h=40, w=56):
    """One random image and, per view, positions that repeat it for the view's frame count."""
    torch.manual_seed(1)
    image = torch.randint(0, 256, (1, h, w, 3), dtype=torch.uint8)
    return image, [torch.zeros(t, dtype=torch.long) for t in aug.global_frames + aug.local_frames]


def test_views_shapes_and_one_crop_and_colour_per_view():
    aug = VideoDataAugmentationDINO(global_size=32, local_size=16, global_frames=(4, 8),
                                    local_frames=(2, 2, 4, 4, 8, 8, 16, 16))
    out = aug.from_union(*_static_views(aug))
    assert [tuple(v.shape) for v in out] == [(3, 4, 32, 32), (3, 8, 32, 32)] + [
        (3, t, 16, 16) for t in (2, 2, 4, 4, 8, 8, 16, 16)]
    for view in out:   # identical input frames -> identical output frames: one box, one jitter per view
        assert torch.equal(view, view[:, :1].expand_as(view))
    assert not torch.allclose(out[2][:, 0], out[3][:, 0])   # but views differ from each other


def test_from_union_equals_separate_views():
    aug = VideoDataAugmentationDINO(global_size=32, local_size=16, local_crops_number=2, local_frames=(2, 4))
    frames = torch.randint(0, 256, (6, 40, 56, 3), dtype=torch.uint8)
    positions = [torch.tensor([0, 2, 4, 5]), torch.tensor([1, 3, 5, 5]), torch.tensor([2, 3]),
                 torch.tensor([0, 1, 1, 2])]
    torch.manual_seed(4)
    a = aug.from_union(frames, positions)
    torch.manual_seed(4)
    sizes = [(32, (0.4, 1.0))] * 2 + [(16, (0.05, 0.4))] * 2
    # each view on its own: its frames gathered first, then its parameters drawn and applied
    b = [transform.apply_view_params(frames[p], transform.draw_view_params(40, 56, scale), size)
         for p, (size, scale) in zip(positions, sizes)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_crop_params_drawn_once_per_view(monkeypatch):
    calls = []
    original = transform.random_resized_crop_params
    monkeypatch.setattr(transform, "random_resized_crop_params", lambda *a: calls.append(a[2]) or original(*a))
    aug = VideoDataAugmentationDINO(global_size=32, local_size=16, local_crops_number=2, local_frames=(8, 8))
    aug.from_union(*_static_views(aug))
    assert calls == [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 2


def test_random_resized_crop_params_respect_scale_and_ratio():
    torch.manual_seed(0)
    for _ in range(200):
        top, left, h, w = transform.random_resized_crop_params(256, 340, (0.05, 0.4))
        assert 0 <= top and top + h <= 256 and 0 <= left and left + w <= 340
        assert 0.04 < h * w / (256 * 340) < 0.42 and 0.70 < w / h < 1.40


def test_random_resized_crop_params_are_torchvisions_for_the_same_seed():
    # torchvision's RandomResizedCrop rule, draw for draw: area U(scale), log-uniform ratio in [3/4, 4/3], a box up to
    # the whole side (w <= width), offsets 0 ... side - box inclusive, the centre fallback after 10 attempts.
    from torchvision.transforms import RandomResizedCrop
    for (height, width), scale in itertools.product([(256, 340), (340, 256), (10, 10), (12, 30)],
                                                    [(0.05, 0.4), (0.4, 1.0), (0.9, 1.0)]):
        for seed in range(40):
            torch.manual_seed(seed)
            ours = transform.random_resized_crop_params(height, width, scale)
            torch.manual_seed(seed)
            theirs = RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), [3 / 4, 4 / 3])
            assert ours == tuple(theirs), (height, width, scale, seed)


def test_view_params_probabilities_and_jitter_ranges():
    # The original's view recipe (spec 4.1): flip p 0.5, colour jitter p 0.8 with brightness/contrast 0.4 and
    # saturation 0.2 (no hue) in a random order, grayscale p 0.2, ImageNet normalisation. 4000 draws: each
    # frequency is within 4 standard errors (<= 0.03) of its probability.
    torch.manual_seed(0)
    draws = [transform.draw_view_params(64, 80, (0.4, 1.0)) for _ in range(4000)]
    assert np.mean([d.flip for d in draws]) == pytest.approx(0.5, abs=0.03)
    assert np.mean([d.jitter is not None for d in draws]) == pytest.approx(0.8, abs=0.03)
    assert np.mean([d.gray for d in draws]) == pytest.approx(0.2, abs=0.03)
    factors = np.array([d.jitter for d in draws if d.jitter is not None])
    np.testing.assert_allclose(factors.min(0), [0.6, 0.6, 0.8], atol=0.01)
    np.testing.assert_allclose(factors.max(0), [1.4, 1.4, 1.2], atol=0.01)
    assert {d.order for d in draws if d.jitter is not None} == set(itertools.permutations(range(3)))
    assert (transform.IMAGENET_MEAN, transform.IMAGENET_STD) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.mark.parametrize("random_flip", [True, False])
def test_random_flip_key_reaches_the_ssl_views_and_off_only_drops_the_flips(synthetic_cfg, monkeypatch,
                                                                              random_flip):
    """DATA.RANDOM_FLIP False: no SSL view is flipped (e.g. motions whose mirror is another class); the flip is
    still drawn, so every other parameter is the one a flipping run draws for the same seed."""
    import dataclasses

    import train_ssl
    built = {}

    def capture(name, cfg, mode, ssl_aug):  # the SSL dataset train_ssl builds: keep its views' transform
        built["aug"] = ssl_aug
        raise StopIteration

    monkeypatch.setattr(train_ssl, "build_dataset", capture)
    args = train_ssl.get_args_parser().parse_args(["--local_crops_number", "8"])
    with pytest.raises(StopIteration):
        train_ssl.build_train_loader(args, synthetic_cfg(**{"DATA.RANDOM_FLIP": random_flip}), torch.device("cpu"))
    aug = built["aug"]
    flipping = VideoDataAugmentationDINO()
    torch.manual_seed(5)
    drawn = [p for _ in range(20) for p in aug.draw_params(64, 80)]
    torch.manual_seed(5)
    reference = [p for _ in range(20) for p in flipping.draw_params(64, 80)]
    assert any(p.flip for p in reference)
    assert drawn == (reference if random_flip else [dataclasses.replace(p, flip=False) for p in reference])


def test_no_spatial_is_full_frame_resize_to_the_global_size_and_imagenet_normalised():
    """The original's DATA.NO_SPATIAL: every view, the locals too, is the full frame resized to the global size."""
    aug = VideoDataAugmentationDINO(global_size=8, local_size=4, local_crops_number=1, local_frames=(2,),
                                    no_spatial=True)
    frames = torch.full((2, 16, 16, 3), 128, dtype=torch.uint8)
    out = aug.from_union(frames, [torch.arange(2)] * 3)
    mean = torch.tensor(transform.IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(transform.IMAGENET_STD).view(3, 1, 1, 1)
    assert out[0].shape == (3, 2, 8, 8) and out[2].shape == (3, 2, 8, 8) and aug.sizes == [8, 8, 8]
    assert torch.allclose(out[0], ((128 / 255 - mean) / std).expand(3, 2, 8, 8), atol=1e-5)


def test_apply_view_params_crop_positions_flip_jitter_gray_hand_computed():
    # Two 6x6 frames, white outside the box (1, 1, 4, 4); inside, columns 1-2 are one colour per frame and
    # columns 3-4 black. The view (size 4: no resize) is frames [1, 0, 1], flipped, brightness x0.5, grey.
    frames = torch.full((2, 6, 6, 3), 255, dtype=torch.uint8)
    frames[:, 1:5, 3:5] = 0
    frames[0, 1:5, 1:3] = torch.tensor([200, 100, 50], dtype=torch.uint8)
    frames[1, 1:5, 1:3] = torch.tensor([100, 200, 0], dtype=torch.uint8)
    params = transform.ViewParams((1, 1, 4, 4), flip=True, jitter=(0.5, 1.0, 1.0), order=(0, 1, 2), gray=True)
    out = transform.apply_view_params(frames, params, 4, torch.tensor([1, 0, 1]))
    assert out.shape == (3, 3, 4, 4)
    mean = torch.tensor(transform.IMAGENET_MEAN).view(3, 1)
    std = torch.tensor(transform.IMAGENET_STD).view(3, 1)
    grey = [0.5 * (0.2989 * r + 0.587 * g + 0.114 * b) / 255 for r, g, b in ((200, 100, 50), (100, 200, 0))]
    for t, frame in enumerate((1, 0, 1)):
        # after the flip: black columns 0-1, the grey of the frame's colour in columns 2-3, the same in every channel
        row = torch.tensor([0.0, 0.0, grey[frame], grey[frame]])
        expected = ((row - mean) / std)[:, None].expand(3, 4, 4)
        torch.testing.assert_close(out[:, t], expected, rtol=0, atol=1e-5)


def test_view_resize_is_the_originals_float_bicubic_without_antialiasing():
    """The original resizes its float views with F.interpolate(bicubic), no antialiasing. Ours, on uint8, is within
    2 levels of it on a smooth image and keeps its aliasing: 1-pixel stripes downscaled 2.5x stay high-contrast
    (an antialiased resize would average them to flat grey, ~110 levels off)."""
    def original(frames, size):
        clip = frames.permute(0, 3, 1, 2).float() / 255
        return torch.nn.functional.interpolate(clip, size=(size, size), mode="bicubic", align_corners=False) * 255

    torch.manual_seed(0)
    coarse = torch.nn.functional.interpolate(torch.rand(3, 3, 8, 10), size=(90, 120), mode="bicubic",
                                             align_corners=False)
    smooth = (coarse.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert (transform.resize_uint8(smooth, 50).float() - original(smooth, 50)).abs().max() <= 2
    stripes = torch.zeros(2, 100, 100, 3, dtype=torch.uint8)
    stripes[:, :, ::2] = 255
    ours, theirs = transform.resize_uint8(stripes, 40).float(), original(stripes, 40).clamp(0, 255)
    assert (ours - theirs).abs().max() <= 1 and ours.std() > 80


def _torchvision_view(frames, params, size, positions):
    """The view as torchvision's ops on the (T, 3, H, W) clip, one full-clip op after another: the
    reference apply_view_params must equal bit for bit."""
    top, left, h, w = params.box
    clip = TF.resize(frames[positions][:, top:top + h, left:left + w].permute(0, 3, 1, 2), [size, size],
                     interpolation=InterpolationMode.BICUBIC, antialias=False).float() / 255
    if params.flip:
        clip = TF.horizontal_flip(clip)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for k in params.order if params.jitter is not None else ():
        clip = ops[k](clip, params.jitter[k])
    if params.gray:
        clip = TF.rgb_to_grayscale(clip, num_output_channels=3)
    clip = TF.normalize(clip, transform.IMAGENET_MEAN, transform.IMAGENET_STD)
    return clip.permute(1, 0, 2, 3)


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 3 * 4 * 48 * 48 * 2 + 4])  # default; 2 frames per chunk at 48
def test_apply_view_params_is_torchvisions_ops_bit_for_bit(monkeypatch, chunk_bytes):
    # In place, in the output's (3, T, H, W) layout, a chunk of frames at a time: the same floats as
    # torchvision's resize, flip, adjust_brightness/contrast/saturation, rgb_to_grayscale and normalize on
    # the whole (T, 3, H, W) clip, for every order of the jitter and with each option on and off.
    monkeypatch.setattr(transform, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(3)
    frames = torch.randint(0, 256, (7, 60, 80, 3), dtype=torch.uint8)
    positions = torch.tensor([6, 0, 3, 3, 5])
    for i, order in enumerate(itertools.permutations(range(3))):
        for size, box in ((48, (5, 7, 50, 66)), (24, (10, 3, 17, 21))):
            jitter = tuple(float(torch.empty(()).uniform_(1 - m, 1 + m)) for m in (0.4, 0.4, 0.2))
            for flip, gray, jittered in ((i % 2 == 0, False, True), (i % 2 == 1, True, True), (True, i < 3, False)):
                params = transform.ViewParams(box, flip, jitter if jittered else None, order, gray)
                ours = transform.apply_view_params(frames, params, size, positions)
                expected = _torchvision_view(frames, params, size, positions)
                assert ours.shape == (3, 5, size, size) and ours.is_contiguous()
                assert torch.equal(ours, expected), params


def test_frame_chunks_never_leave_one_frame_alone():
    assert transform._frame_chunks(8, 1) == [(0, 2), (2, 2), (4, 2), (6, 2)]
    assert transform._frame_chunks(3, 1) == [(0, 3)]
    assert transform._frame_chunks(7, 3) == [(0, 3), (3, 4)]
    assert transform._frame_chunks(1, 5) == [(0, 1)]
    assert transform._frame_chunks(5, 8) == [(0, 5)]


def test_apply_view_params_at_224_with_two_threads_is_torchvisions_ops(monkeypatch):
    # At 224 a frame holds more floats than torch reduces on one thread: a chunk of one frame would make
    # contrast's mean a single-output reduction that torch splits over its threads (other last bits than
    # torchvision's whole-clip op, which reduces every frame on one thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(5)
        frames = torch.randint(0, 256, (3, 240, 240, 3), dtype=torch.uint8)
        for order in ((1, 0, 2), (2, 1, 0)):
            params = transform.ViewParams((0, 0, 240, 240), False, (1.2, 0.7, 1.1), order, False)
            ours = transform.apply_view_params(frames, params, 224, torch.arange(3))
            assert torch.equal(ours, _torchvision_view(frames, params, 224, torch.arange(3))), order
    finally:
        torch.set_num_threads(threads)


def test_short_side_and_uniform_crop_offsets():
    assert transform.short_side_size(256, 340, 224) == (224, 297)
    assert transform.short_side_size(340, 256, 224) == (297, 224)
    assert [transform.uniform_crop_offsets(224, 297, 224, i) for i in (0, 1, 2)] == [(0, 0), (0, 37), (0, 73)]
    assert [transform.uniform_crop_offsets(297, 224, 224, i) for i in (0, 1, 2)] == [(0, 0), (37, 0), (73, 0)]


def test_eval_crop_box_train_jitter_range():
    torch.manual_seed(0)
    for _ in range(50):
        (rh, rw), (top, left), _ = transform.eval_crop_box(240, 320, -1, 256, 320, 224, True)
        assert 256 <= rh <= 320 and rw == int(320 * rh / 240)
        assert 0 <= top <= rh - 224 and 0 <= left <= rw - 224
    assert transform.eval_crop_box(240, 320, 1, 256, 256, 224, True) == ((256, 341), (16, 59), False)


def test_eval_crop_box_train_offsets_are_the_originals_exclusive_range():
    # The original's random_crop draws randint(0, S - crop) (numpy, exclusive), 0 when S == crop: with the short
    # side 20 -> (20, 30) and a 16 crop, tops 0..3 and lefts 0..13, never 4 / 14 (flush with the edge).
    torch.manual_seed(0)
    boxes = [transform.eval_crop_box(40, 60, -1, 20, 20, 16, False) for _ in range(600)]
    assert {resized for resized, _, _ in boxes} == {(20, 30)}
    assert {top for _, (top, _), _ in boxes} == set(range(4))
    assert {left for _, (_, left), _ in boxes} == set(range(14))
    square = [transform.eval_crop_box(40, 40, -1, 16, 16, 16, False)[1] for _ in range(20)]
    assert set(square) == {(0, 0)}


def test_inverse_uniform_scale_jitter_draws_one_over_a_uniform_reciprocal():
    """DATA.INV_UNIFORM_SAMPLE (TimeSformer's SSv2 setting): the short side is 1 / U(1/320, 1/256), so the mean of
    1 / side is the midpoint of 1/320 and 1/256; the plain jitter U(256, 320) has mean side 288 and mean 1 / side
    ln(1.25) / 64 (20000 draws: the tolerance is ~4 standard errors, a fifth of the gap between the two)."""
    torch.manual_seed(0)
    sides = {inverse: torch.tensor([transform.eval_crop_box(256, 300, -1, 256, 320, 224, False, inverse)[0][0]
                                    for _ in range(20000)], dtype=torch.float64) for inverse in (False, True)}
    for drawn in sides.values():
        assert drawn.min() == 256 and drawn.max() == 320
    assert float((1 / sides[True]).mean()) == pytest.approx((1 / 256 + 1 / 320) / 2, abs=6e-6)
    assert float((1 / sides[False]).mean()) == pytest.approx(math.log(1.25) / 64, abs=6e-6)
    assert float(sides[False].mean()) == pytest.approx(288, abs=0.5)
