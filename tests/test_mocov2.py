"""MoCo-v2: InfoNCE parity with lightly, queue, shuffle-BN, one training step on a tiny backbone."""

import torch
import torch.nn.functional as F

from semssl.config import DEFAULT_RECIPE, load_config
from semssl.losses.infonce import MemoryQueue, info_nce
from semssl.methods import build_method
from semssl.methods.base import ema_update
from semssl.models.backbones import ResNetBackbone, SplitBatchNorm2d
from semssl.schedules import Progress


def test_info_nce_matches_lightly_ntxent_with_memory_bank():
    from lightly.loss import NTXentLoss

    torch.manual_seed(0)
    n, d, k = 8, 16, 32
    q = F.normalize(torch.randn(n, d), dim=1)
    key = F.normalize(torch.randn(n, d), dim=1)
    queue = F.normalize(torch.randn(k, d), dim=1)
    ours, logits = info_nce(q, key, queue, temperature=0.2)
    ref = NTXentLoss(temperature=0.2, memory_bank_size=(k, d))
    ref.memory_bank.bank = queue.clone()  # lightly stores [size, dim]
    theirs = ref(q, key)  # no grad on inputs: the bank is not updated
    torch.testing.assert_close(ours, theirs)
    assert logits.shape == (n, 1 + k)
    # and by hand, for one row
    row = torch.cat([(q[0] * key[0]).sum(0, keepdim=True), queue @ q[0]]) / 0.2
    torch.testing.assert_close(F.cross_entropy(logits[:1], torch.zeros(1, dtype=torch.long)),
                               -torch.log_softmax(row, 0)[0])


def test_queue_is_fifo_and_wraps():
    queue = MemoryQueue(size=5, dim=2)
    for i in range(3):
        queue.enqueue(torch.full((2, 2), float(i)))
    # 6 keys into 5 slots: slot 0 overwritten by the last batch's second key
    assert queue.queue[:, 0].tolist() == [2.0, 0.0, 1.0, 1.0, 2.0]
    assert int(queue.ptr) == 1


def test_split_batchnorm_equals_per_split_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 3, 3)
    split = SplitBatchNorm2d(4, num_splits=2).train()
    plain = torch.nn.BatchNorm2d(4).train()
    out = split(x)
    # split k holds samples k, k + s, k + 2s, ... (the MoCo CIFAR demo's view(-1, C*s, H, W) layout)
    torch.testing.assert_close(out[0::2], plain(x[0::2]))
    torch.testing.assert_close(out[1::2], torch.nn.BatchNorm2d(4).train()(x[1::2]))
    split.eval()
    assert torch.allclose(split(x), F.batch_norm(x, split.running_mean, split.running_var, split.weight,
                                                 split.bias, False))


def test_backbone_stages_and_channels():
    for arch, dim in (("resnet18", 512), ("resnet50", 2048)):
        net = ResNetBackbone(arch)
        out = net(torch.randn(2, 3, 64, 64))
        assert out["pooled"].shape == (2, dim)
        assert out["layer4"].shape == (2, dim, 2, 2)
        assert out["layer3"].shape[1] == net.channels["layer3"]
        torch.testing.assert_close(net.stage("layer4")(out["layer3"]), out["layer4"])
    small = ResNetBackbone("resnet18", small_input=True)
    assert small(torch.randn(1, 3, 32, 32))["layer4"].shape[-1] == 4


def tiny_mocov2():
    cfg = load_config(DEFAULT_RECIPE, ["model.arch=resnet18", "method.queue_size=16", "model.bn_splits=2"])
    return cfg, build_method(cfg)


def test_mocov2_step_enqueues_keys_and_trains():
    torch.manual_seed(0)
    cfg, method = tiny_mocov2()
    x = torch.randn(4, 3, 32, 32)
    batch = {"views": {"q": x, "k": x.flip(-1)}}
    progress = Progress(epoch=0, step=0, steps_per_epoch=1, total_steps=1)
    torch.manual_seed(3)  # the key shuffle's permutation is the step's first random draw
    out = method.training_step(batch, progress)
    assert out["loss"].requires_grad and torch.isfinite(out["loss"])
    assert int(method.queue.ptr) == 4
    # the enqueued keys are the key encoder's normalised embeddings of view k, computed on the shuffled batch
    # (BatchNorm in 2 splits sees the shuffled groups) and put back in batch order
    torch.manual_seed(3)
    perm = torch.randperm(4)
    with torch.no_grad():
        shuffled = method.encoder_k(x.flip(-1)[perm])["z"]
        in_order = method.encoder_k(x.flip(-1))["z"]
    assert perm.tolist() != [0, 1, 2, 3]
    torch.testing.assert_close(method.queue.queue[:4], shuffled[torch.argsort(perm)], rtol=0, atol=1e-6)
    assert not torch.allclose(method.queue.queue[:4], shuffled, atol=1e-3)  # the order is undone ...
    assert not torch.allclose(method.queue.queue[:4], in_order, atol=1e-3)  # ... but the BN groups were shuffled
    torch.testing.assert_close(method.queue.queue[:4].norm(dim=1), torch.ones(4))
    out["loss"].backward()
    assert method.encoder_q.backbone.conv1.weight.grad is not None
    assert all(p.grad is None for p in method.encoder_k.parameters())
    trainable = {id(p) for g in method.param_groups(1e-4) for p in g["params"]}
    assert not trainable & {id(p) for p in method.encoder_k.parameters()}


def test_ema_update():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = 0.9 * b.weight.detach().clone() + 0.1 * a.weight.detach()
    ema_update(a, b, 0.9)
    torch.testing.assert_close(b.weight.detach(), expected)


def test_projector_follows_the_backbone_width_and_options():
    cfg = load_config(DEFAULT_RECIPE, ["model.arch=resnet18", "model.width=64", "method.queue_size=16"])
    method = build_method(cfg)
    linears = [m for m in method.encoder_q.projector if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(512, 512), (512, 128)]  # MoCo-v2: d -> d -> 128
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in method.encoder_q.projector)
    bn = build_method(load_config(DEFAULT_RECIPE, ["model.arch=resnet18", "method.queue_size=16",
                                                   "method.proj_batch_norm=true"]))
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in bn.encoder_q.projector)
