"""Which training image a step reads, and its augmentation, are functions of (seed, epoch,
position) only: a sampler resumed mid-epoch continues the permutation, an augmented read does
not depend on the generator's state before it (nor on the number of loader workers), and the
training loader's saved position restores the remaining batches exactly."""
import warnings

import pytest
import torch

# the wrapper pytorch_lightning puts around a custom sampler in a distributed run (its data
# connector imports it from here)
from lightning_fabric.utilities.distributed import DistributedSamplerWrapper
from torchvision.transforms import v2

from xbarflow.data import EpochShuffleSampler, ResumableLoader, SeededDraws
from xbarflow.data.images import TransformedTensorDataset

N = 22


def _augmented(n=N):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 1, 8, 8, generator=g), torch.arange(n)
    return TransformedTensorDataset(x, y, v2.Compose([v2.RandomCrop(8, padding=2), v2.RandomHorizontalFlip()]))


def test_a_resumed_sampler_continues_the_epoch_where_it_stopped():
    sampler = EpochShuffleSampler(N, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    assert sorted(k - 2 * N for k in full) == list(range(N))  # draw keys epoch * n + i, a permutation
    assert list(sampler) == full  # a function of (seed, epoch)
    resumed = EpochShuffleSampler(N, seed=3)
    resumed.resume_at(2, 7)
    resumed.set_epoch(1)
    assert len(list(resumed)) == N  # another epoch: untouched, and the position is kept ...
    resumed.set_epoch(2)
    assert list(resumed) == full[7:]  # ... for the epoch it belongs to, once
    assert list(resumed) == full and len(resumed) == N
    at_end = EpochShuffleSampler(N, seed=3)
    at_end.resume_at(1, N)  # saved at epoch 1's end: epoch 2 starts from its beginning
    at_end.set_epoch(2)
    assert list(at_end) == full


def test_an_augmented_read_depends_on_its_draw_only():
    draws = SeededDraws(_augmented(), seed=5)
    first = draws[17][0]
    torch.manual_seed(123)
    torch.rand(1000)
    state = torch.get_rng_state()
    again = draws[17][0]
    assert torch.equal(first, again)  # whatever ran before it
    assert torch.equal(torch.get_rng_state(), state)  # and the global generator is left as it was
    # the same image in another epoch (key + n) or another run's seed is augmented anew
    other_epoch = [torch.equal(draws[k][0], draws[k + N][0]) for k in range(N)]
    other_seed = [torch.equal(draws[k][0], SeededDraws(_augmented(), seed=6)[k][0]) for k in range(N)]
    assert not all(other_epoch) and not all(other_seed)
    assert all(int(draws[k + 3 * N][1]) == k for k in range(N))  # key -> image key % n
    plain = SeededDraws(torch.utils.data.TensorDataset(torch.arange(N)), seed=0)
    assert int(plain[N + 4][0]) == 4 and not plain.random_reads


def _loader(workers=0, batch_size=4):
    return ResumableLoader(SeededDraws(_augmented(), seed=1), batch_size=batch_size,
                           sampler=EpochShuffleSampler(N, seed=1), num_workers=workers)


def test_the_loaders_saved_position_restores_the_remaining_batches():
    loader = _loader()
    loader.sampler.set_epoch(1)
    full = list(loader)  # 6 batches, the last of 2 images
    assert len(full) == 6 and loader.state_dict() == {"epoch": 1, "batches": 6, "images_per_batch": 4}
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 3, "images_per_batch": 4}
    resumed = _loader()
    resumed.load_state_dict(state)
    it = iter(resumed)  # made before set_epoch, as Lightning does; read at the first batch
    resumed.sampler.set_epoch(1)
    rest = list(it)
    assert len(rest) == 3
    for (x, y), (x_ref, y_ref) in zip(rest, full[3:], strict=True):
        assert torch.equal(y, y_ref) and torch.equal(x, x_ref)  # same images, same crops and flips
    assert resumed.state_dict()["batches"] == 6  # counted from the epoch's start
    nxt = _loader()
    nxt.load_state_dict({"epoch": 1, "batches": 6, "images_per_batch": 4})  # saved at the epoch's end
    nxt.sampler.set_epoch(2)
    assert len(list(nxt)) == 6


def test_augmented_batches_do_not_depend_on_the_number_of_workers():
    one, two = _loader(workers=0), _loader(workers=2)
    for loader in (one, two):
        loader.sampler.set_epoch(3)
    for (x0, y0), (x2, y2) in zip(one, two, strict=True):
        assert torch.equal(y0, y2) and torch.equal(x0, x2)


def test_a_distributed_loader_warns_only_when_a_position_within_an_epoch_is_lost():
    """Under Lightning's distributed wrapper the shards are not skipped into: a position saved within
    an epoch warns (its remaining batches are drawn anew); one at an epoch's end or before its first
    batch resumes exactly and says nothing. The saved epoch is the draw sampler's, through the wrapper."""
    def loader():
        wrapped = DistributedSamplerWrapper(EpochShuffleSampler(N, seed=3), num_replicas=2, rank=0, shuffle=False)
        return ResumableLoader(SeededDraws(_augmented(), seed=5), batch_size=4, sampler=wrapped)

    dl = loader()
    dl.sampler.set_epoch(3)  # as Lightning does; forwarded to the draw sampler
    batches = list(dl)
    assert len(batches) == len(dl) == 3  # 11 of the 22 images on this rank, 4 a batch
    assert dl.state_dict()["epoch"] == 3 and dl.state_dict()["batches"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader().load_state_dict(dl.state_dict())                                # at the epoch's end
        loader().load_state_dict({"epoch": 3, "batches": 0, "images_per_batch": 4})  # before its first batch
    with pytest.warns(RuntimeWarning, match="mid-epoch with a distributed sampler"):
        loader().load_state_dict({"epoch": 3, "batches": 1, "images_per_batch": 4})
