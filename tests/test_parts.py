"""Heads, backbones, split BatchNorm and kNN: the pure parts."""

import pytest
import torch
from torch import nn

from mocoq.backbones import SmallResNet, torchvision_resnet
from mocoq.heads import ProjectionHead
from mocoq.knn import knn_predict, topk_accuracy
from mocoq.norm import SplitBatchNorm2d, convert_to_split_batchnorm


def test_projection_heads() -> None:
    linear = ProjectionHead(32, out_dim=8, num_layers=1)
    assert [type(m) for m in linear] == [nn.Linear]
    mlp = ProjectionHead(32, out_dim=8, num_layers=2)
    assert [type(m) for m in mlp] == [nn.Linear, nn.ReLU, nn.Linear]
    assert mlp[0].out_features == 32  # hidden defaults to the input width, as in MoCo v2
    assert mlp(torch.randn(5, 32)).shape == (5, 8)
    with pytest.raises(ValueError, match="at least one layer"):
        ProjectionHead(8, num_layers=0)


def test_resnet18_one_channel_small_stem() -> None:
    model = torchvision_resnet("resnet18", in_channels=1, small_image_stem=True)
    assert model.conv1.weight.shape == (64, 1, 3, 3)  # one input channel, no copying
    assert isinstance(model.maxpool, nn.Identity)
    assert model.out_dim == 512
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 512)


def test_resnet50_standard_stem() -> None:
    model = torchvision_resnet("resnet50")
    assert model.conv1.weight.shape == (64, 3, 7, 7)
    assert model.out_dim == 2048


def test_unknown_backbone_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet9'.*resnet18"):
        torchvision_resnet("resnet9")


def test_small_resnet_shapes() -> None:
    model = SmallResNet(1, widths=(8, 16, 32), blocks=(1, 2, 1))
    assert model.out_dim == 32
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 32)
    with pytest.raises(ValueError, match="one entry per stage"):
        SmallResNet(1, widths=(8, 16), blocks=(1,))


def test_split_batchnorm_matches_separate_batchnorms() -> None:
    torch.manual_seed(0)
    groups, channels = 4, 3
    split = SplitBatchNorm2d(channels, groups)
    with torch.no_grad():
        split.weight.uniform_(0.5, 1.5)
        split.bias.uniform_(-0.5, 0.5)
    reference = [nn.BatchNorm2d(channels) for _ in range(groups)]
    for bn in reference:
        bn.load_state_dict(split.state_dict())
    x = torch.randn(8, channels, 5, 5) * 3 + 1
    x.requires_grad_(True)
    out = split(x)
    # Group g holds the contiguous samples 2g, 2g + 1 (N / G = 2).
    size = x.shape[0] // groups
    x_ref = x.detach().clone().requires_grad_(True)
    expected = torch.cat([bn(x_ref[g * size : (g + 1) * size]) for g, bn in enumerate(reference)])
    assert torch.allclose(out, expected, atol=1e-5)
    out.pow(2).sum().backward()
    expected.pow(2).sum().backward()
    assert x.grad is not None and x_ref.grad is not None
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert split.weight.grad is not None
    assert torch.allclose(
        split.weight.grad,
        sum(bn.weight.grad for bn in reference),
        atol=1e-4,  # type: ignore[misc]
    )
    for name in ("running_mean", "running_var"):
        mean_over_groups = torch.stack([getattr(bn, name) for bn in reference]).mean(0)
        assert torch.allclose(getattr(split, name), mean_over_groups, atol=1e-6)
    assert int(split.num_batches_tracked) == 1
    split.eval()
    plain = nn.BatchNorm2d(channels)
    plain.load_state_dict(split.state_dict())
    plain.eval()
    assert torch.allclose(split(x), plain(x), atol=1e-6)


def test_split_batchnorm_channels_last_matches_contiguous() -> None:
    torch.manual_seed(0)
    contiguous = SplitBatchNorm2d(4, 2, momentum=None)
    channels_last = SplitBatchNorm2d(4, 2, momentum=None).to(memory_format=torch.channels_last)
    x = torch.randn(6, 4, 3, 3)
    for _ in range(2):  # momentum=None: the cumulative average over batches, as nn.BatchNorm2d
        out = channels_last(x.contiguous(memory_format=torch.channels_last))
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(out, contiguous(x), atol=1e-5)
    assert torch.allclose(contiguous.running_var, channels_last.running_var, atol=1e-6)
    # The same batch twice: the cumulative average is that batch's mean over the groups.
    group_means = torch.stack([x[:3].mean(dim=(0, 2, 3)), x[3:].mean(dim=(0, 2, 3))]).mean(0)
    assert torch.allclose(contiguous.running_mean, group_means, atol=1e-6)
    assert int(contiguous.num_batches_tracked) == 2


def test_split_batchnorm_needs_divisible_batch() -> None:
    with pytest.raises(ValueError, match="divisible by 4 groups, got 6"):
        SplitBatchNorm2d(3, 4)(torch.randn(6, 3, 2, 2))


def test_convert_keeps_state_and_eval_function() -> None:
    model = SmallResNet(1, widths=(4, 8), blocks=(1, 1))
    model.eval()
    x = torch.randn(4, 1, 12, 12)
    before = model(x)
    convert_to_split_batchnorm(model, 2)
    assert sum(isinstance(m, SplitBatchNorm2d) for m in model.modules()) >= 4
    assert not any(
        type(m) is nn.BatchNorm2d for m in model.modules()
    )  # every BatchNorm2d was replaced
    assert torch.allclose(model(x), before, atol=1e-6)


def test_knn_weighted_vote_by_hand() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    scores = knn_predict(query, bank, labels, num_classes=2, k=2, temperature=0.5)
    sims = (
        torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(bank, dim=1).t()
    )
    top = sims[0].topk(2)
    expected = torch.zeros(2)
    for sim, idx in zip(top.values, top.indices, strict=True):
        expected[labels[idx]] += torch.exp(sim / 0.5)
    assert torch.allclose(scores[0], expected)


def test_knn_chunking_does_not_change_scores() -> None:
    torch.manual_seed(1)
    bank, labels, queries = torch.randn(50, 6), torch.randint(0, 4, (50,)), torch.randn(23, 6)
    full = knn_predict(queries, bank, labels, 4, k=7, chunk_size=1000)
    chunked = knn_predict(queries, bank, labels, 4, k=7, chunk_size=5)
    assert torch.allclose(full, chunked)


def test_topk_accuracy() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    top1, top2 = topk_accuracy(scores, labels, (1, 2))
    assert top1 == pytest.approx(1 / 3)
    assert top2 == pytest.approx(2 / 3)


def test_convert_keeps_parameters_and_their_requires_grad() -> None:
    model = SmallResNet(1, widths=(4, 8), blocks=(1, 1))
    for parameter in model.parameters():
        parameter.requires_grad_(False)  # as in a key encoder
    before = {name: p for name, p in model.named_parameters()}
    convert_to_split_batchnorm(model, 2)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)  # the same objects
    assert not any(p.requires_grad for p in model.parameters())
