"""Cluster lookups against transformers' PIL image processor, a float32 PyTorch composition and numpy.rint."""

import numpy as np
import pytest
import torch

from igpt_fast.kernels.clusters import dequantize, quantize

NEAR_TIE = 1e-5  # transformers computes a^2 - 2ab + b^2: nearest distances closer than this may order either way


def random_clusters(n, seed):
    return torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, (n, 3)).astype(np.float32))


def kmeans_clusters(n, seed):
    """Centres of k-means over pixels of smooth random images, like the real table's (a few Lloyd steps)."""
    from sklearn.cluster import KMeans

    pixels = smooth_images(16, 32, seed).reshape(-1, 3).astype(np.float32) / 127.5 - 1
    fit = KMeans(n_clusters=n, n_init=1, max_iter=10, random_state=seed).fit(pixels)
    return torch.from_numpy(fit.cluster_centers_.astype(np.float32))


def smooth_images(n, side, seed):
    """uint8 [n, side, side, 3]: gradients plus noise, so neighbouring pixels share colors as in photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    images = []
    for _ in range(n):
        a, b, c = rng.uniform(-1, 1, (3, 3))
        image = 128 + 100 * (a * x[..., None] + b * y[..., None] + c * x[..., None] * y[..., None])
        images.append(np.clip(image + rng.normal(0, 12, image.shape), 0, 255))
    return np.stack(images).astype(np.uint8)


def float32_ids(x, clusters):
    """argmin over (r - cr)^2 + (g - cg)^2 + (b - cb)^2 in float32, summed in the kernel's order."""
    x = x.reshape(-1, 3).float().cpu()
    clusters = clusters.cpu()
    d = (x[:, 0:1] - clusters[:, 0]).square() + (x[:, 1:2] - clusters[:, 1]).square()
    return (d + (x[:, 2:3] - clusters[:, 2]).square()).argmin(dim=-1)


def float64_distances(x, clusters):
    x = x.reshape(-1, 3).double().cpu()
    return ((x[:, None, :] - clusters.double().cpu()[None]) ** 2).sum(-1)  # [P, C]


def assert_same_ids_apart_from_near_ties(ids, expected, x, clusters):
    """Where two id tables disagree, the two chosen centres must be (near-)equally distant."""
    ids, expected = ids.flatten().cpu(), expected.flatten().cpu()
    differ = (ids != expected).nonzero().flatten()
    distances = float64_distances(x.reshape(-1, 3)[differ.to(x.device)], clusters)
    rows = torch.arange(len(differ))
    gaps = (distances[rows, ids[differ]] - distances[rows, expected[differ]]).abs()
    assert len(differ) <= 0.01 * len(ids), f"{len(differ)} of {len(ids)} ids differ"
    assert (gaps <= NEAR_TIE).all(), f"ids differ beyond a near tie at pixels {differ[gaps > NEAR_TIE].tolist()}"


# --- quantize -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("table", ["random", "kmeans"])
def test_quantize_matches_transformers_processor(device, table):
    from transformers import ImageGPTImageProcessorPil

    clusters = random_clusters(512, 0) if table == "random" else kmeans_clusters(512, 1)
    images = np.concatenate([smooth_images(2, 32, 2), np.random.default_rng(3).integers(0, 256, (1, 32, 32, 3),
                                                                                        dtype=np.uint8)])
    processor = ImageGPTImageProcessorPil(clusters=clusters.numpy(), do_resize=False)
    expected = processor(list(images), return_tensors="pt")["input_ids"]
    ids = quantize(torch.from_numpy(images).to(device), clusters.to(device))
    assert ids.shape == (3, 1024) and ids.dtype == torch.int64
    x = torch.from_numpy(images).float() / 127.5 - 1
    assert_same_ids_apart_from_near_ties(ids, expected, x, clusters)
    torch.testing.assert_close(ids.cpu(), float32_ids(x, clusters).view(3, 1024))


@pytest.mark.parametrize("n,h,w,n_clusters",
                         [(1, 1, 1, 1), (1, 3, 5, 3), (2, 7, 3, 17), (3, 9, 11, 65), (1, 6, 6, 512)])
def test_quantize_float_pixels(device, n, h, w, n_clusters):
    g = torch.Generator().manual_seed(n * 100 + n_clusters)
    pixels = torch.rand(n, h, w, 3, generator=g) * 2 - 1
    clusters = random_clusters(n_clusters, n_clusters)
    ids = quantize(pixels.to(device), clusters.to(device))
    assert ids.shape == (n, h * w)
    torch.testing.assert_close(ids.cpu().flatten(), float32_ids(pixels, clusters))
    assert_same_ids_apart_from_near_ties(ids, float64_distances(pixels, clusters).argmin(-1), pixels, clusters)


def test_quantize_uint8_scales_in_kernel(device):
    pixels = torch.from_numpy(np.random.default_rng(4).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8))
    clusters = random_clusters(100, 4).to(device)
    scaled = pixels.float() / 127.5 - 1
    torch.testing.assert_close(quantize(pixels.to(device), clusters), quantize(scaled.to(device), clusters))
    # every byte value maps where the float32 scaling maps it
    all_values = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(-1, -1, -1, 3).contiguous()
    torch.testing.assert_close(quantize(all_values.to(device), clusters).cpu().flatten(),
                               float32_ids(all_values.float() / 127.5 - 1, clusters))


def test_quantize_ties_go_to_the_first_index(device):
    clusters = torch.full((130, 3), 5.0)  # far from every pixel but the centers set below
    # duplicates within a 64-center chunk and across chunks
    clusters[[3, 70, 129]] = torch.tensor([0.9, 0.9, 0.9])
    clusters[[99, 100]] = torch.tensor([-0.9, 0.8, -0.7])
    # two distinct centers exactly equidistant from the black pixel, the later index listed first
    clusters[10] = torch.tensor([0.5, 0.0, 0.0])
    clusters[2] = torch.tensor([-0.5, 0.0, 0.0])
    pixels = torch.stack([clusters[3], clusters[99], torch.zeros(3)]).view(1, 1, 3, 3)
    ids = quantize(pixels.to(device), clusters.to(device))
    assert ids.cpu().tolist() == [[3, 99, 2]]


def test_quantize_any_strides(device):
    nchw = torch.from_numpy(np.random.default_rng(6).integers(0, 256, (2, 3, 8, 5), dtype=np.uint8)).to(device)
    nhwc = nchw.permute(0, 2, 3, 1)  # a channels-first buffer seen as [N, H, W, 3]
    wide_clusters = random_clusters(33, 6).repeat(1, 2).to(device)[:, ::2]  # strided [C, 3] view
    expected = quantize(nhwc.contiguous(), wide_clusters.contiguous())
    torch.testing.assert_close(quantize(nhwc, wide_clusters), expected)


@pytest.mark.gpu
def test_quantize_a_million_pixels():
    clusters = random_clusters(512, 7).cuda()
    pixels = torch.randint(0, 256, (1024, 32, 32, 3), dtype=torch.uint8, device="cuda")
    ids = quantize(pixels, clusters)
    # Scaled on the CPU, which divides exactly (as the kernel and numpy do): CUDA's x / 127.5 multiplies by the
    # reciprocal, 1 ulp off for some pixels, which flipped a near-tie id in one H100 run of this test.
    x = (pixels.cpu().float() / 127.5 - 1).cuda()
    for start in range(0, 1024, 128):  # the float32 composition in slices, to bound its [P, C] memory
        xs, expected = x[start:start + 128].reshape(-1, 3), None
        d = (xs[:, 0:1] - clusters[:, 0]).square() + (xs[:, 1:2] - clusters[:, 1]).square()
        expected = (d + (xs[:, 2:3] - clusters[:, 2]).square()).argmin(-1)
        torch.testing.assert_close(ids[start:start + 128].flatten(), expected)


# --- dequantize -----------------------------------------------------------------------------------------


def rounding_clusters():
    """Centers whose 127.5 * (c + 1) lands on, next to and between .5 boundaries, and outside 0..255."""
    targets = np.concatenate([np.arange(0, 256) + 0.5, np.arange(0, 256) + 0.4999, np.arange(0, 256) + 0.5001,
                              [-3.0, -0.4, 0.0, 127.5, 254.5, 255.49, 255.5, 256.7, 300.0]])
    return torch.from_numpy((targets / 127.5 - 1).astype(np.float32))[:, None].repeat(1, 3) * \
        torch.tensor([1.0, 1.0, -1.0])  # the third channel mirrored: the same boundaries from the other side


def numpy_dequantize(ids, clusters):
    return np.clip(np.rint(127.5 * (clusters.numpy()[ids.numpy()] + 1)), 0, 255).astype(np.uint8)


# uint16..uint64: torch has no min/max for them, which the range check had called
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
                                   torch.uint64])
def test_dequantize_matches_numpy_rint(device, dtype):
    clusters = rounding_clusters()
    n_clusters = clusters.shape[0]
    high = min(n_clusters, torch.iinfo(dtype).max + 1)
    ids = torch.cat([torch.arange(high), torch.randint(0, high, (37,))]).to(dtype).view(-1, 1).repeat(1, 2).T
    pixels = dequantize(ids.to(device), clusters.to(device))
    assert pixels.shape == (*ids.shape, 3) and pixels.dtype == torch.uint8
    np.testing.assert_array_equal(pixels.cpu().numpy(), numpy_dequantize(ids.long(), clusters))


def test_dequantize_odd_shapes_and_strides(device):
    clusters = random_clusters(17, 8)
    for shape in [(1, 1), (3, 5), (2, 129)]:
        ids = torch.randint(0, 17, shape)
        np.testing.assert_array_equal(dequantize(ids.to(device), clusters.to(device)).cpu().numpy(),
                                      numpy_dequantize(ids, clusters))
    transposed = torch.randint(0, 17, (7, 4)).T  # [4, 7] with strides (1, 4)
    np.testing.assert_array_equal(dequantize(transposed.to(device), clusters.to(device)).cpu().numpy(),
                                  numpy_dequantize(transposed, clusters))


@pytest.mark.gpu
def test_dequantize_a_million_ids():
    clusters = rounding_clusters().cuda()
    ids = torch.randint(0, clusters.shape[0], (1024, 1024), device="cuda")
    np.testing.assert_array_equal(dequantize(ids, clusters).cpu().numpy(), numpy_dequantize(ids.cpu(), clusters.cpu()))


# --- bad arguments --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [-1, 17, 1000])
def test_dequantize_rejects_out_of_range_ids(device, bad_id):
    ids = torch.tensor([[0, 5, bad_id, 16]], device=device)
    with pytest.raises(ValueError, match=f"ids hold {bad_id}"):
        dequantize(ids, random_clusters(17, 9).to(device))


def test_bad_shapes_and_dtypes(device):
    clusters = random_clusters(5, 10).to(device)
    pixels = torch.zeros(1, 2, 2, 3, dtype=torch.uint8, device=device)
    ids = torch.zeros(1, 4, dtype=torch.int64, device=device)
    cases = [
        (quantize, (torch.zeros(1, 2, 2, 4, dtype=torch.uint8, device=device), clusters), r"\[N, H, W, 3\]"),
        (quantize, (torch.zeros(2, 2, 3, dtype=torch.uint8, device=device), clusters), r"\[N, H, W, 3\]"),
        (quantize, (pixels.double(), clusters), "uint8 or float32"),
        (quantize, (pixels, clusters.double()), r"float32 \[C, 3\]"),
        (quantize, (pixels, clusters[:, :2]), r"float32 \[C, 3\]"),
        (quantize, (pixels, clusters[:0]), "C >= 1"),
        (dequantize, (ids.float(), clusters), "integer"),
        (dequantize, (ids.bool(), clusters), "integer"),
        (dequantize, (ids[0], clusters), r"\[N, L\]"),
        (dequantize, (ids, clusters.half()), r"float32 \[C, 3\]"),
        # clusters on another device than the input: "meta" never is the input's device, so this runs on a
        # machine without a GPU too (cpu clusters beside CUDA pixels take the same check)
        (quantize, (pixels, clusters.to("meta")), f"quantize: clusters are on meta, the input on {device}"),
        (dequantize, (ids, clusters.to("meta")), f"dequantize: clusters are on meta, the input on {device}"),
    ]
    for op, args, message in cases:
        with pytest.raises(ValueError, match=message):
            op(*args)
