"""Mask R-CNN with SLAB backbones: building, training step, prediction, fusion, COCO data and metrics."""
import json
import math

import numpy as np
import pytest
import torch

import slab
from conftest import FIXTURES, assert_close, randomize_bn_stats
from slab.detection import SlabBackboneWithFPN, maskrcnn
from slab.detection.config import load_config
from slab.detection.data import CocoInstances, collate, load_coco, resolve_split
from slab.detection.evaluate import coco_evaluate, to_coco_results
from slab.detection.scenes import SceneConfig, make_fmnist_scenes
from slab.reparam.fuse import remaining_norms

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Small heads: the tests are about the backbone plumbing, not the heads' widths.
SMALL_HEADS = dict(fpn_channels=32, representation_size=64, mask_layers=(32,), anchor_sizes=(8, 16, 32, 64, 128),
                   detector_kwargs=dict(rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                                        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                                        box_batch_size_per_image=32, rpn_batch_size_per_image=64,
                                        box_detections_per_img=10))

# One reduced-width model per family: (registered name, architecture overrides).
FAMILY_CANDIDATES = {
    "deit": ("deit_tiny_prepbn_patch16_224", dict(embed_dim=32, depth=2, num_heads=2)),
    "slab_deit": ("slab_deit_tiny_patch16_224", dict(embed_dim=32, depth=2, num_heads=2)),
    "pvt": ("pvt_tiny_prepbn", dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 1, 2, 2), depths=(1, 1, 1, 1),
                                    mlp_ratios=(2, 2, 2, 2))),
    "slab_pvt": ("slab_pvt_tiny", dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 1, 2, 2), depths=(1, 1, 1, 1),
                                       mlp_ratios=(2, 2, 2, 2))),
    "slab_pvt_v2": ("slab_pvt_v2_b0", dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 1, 2, 2),
                                           depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2))),
    "swin": ("swin_tiny_prepbn_patch4_window7_224", dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2))),
    "slab_swin": ("slab_swin_tiny_patch4_224", dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2))),
    "slab_cswin": ("slab_cswin_tiny_224", dict(embed_dim=16, depth=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))),
}


def _families():
    names = set(slab.list_models())
    return [pytest.param(name, kw, id=fam) for fam, (name, kw) in FAMILY_CANDIDATES.items() if name in names]


def _detector(name, kw, prepbn="continue", **extra):
    args = dict(SMALL_HEADS, min_size=(64, 96), max_size=160, prepbn=prepbn)
    args.update(extra)
    return maskrcnn(name, 4, **args, **kw)


def _targets(sizes):
    g = torch.Generator().manual_seed(1)
    images, targets = [], []
    for h, w in sizes:
        images.append(torch.rand(3, h, w, generator=g))
        boxes = torch.tensor([[4.0, 6.0, w / 2, h / 2], [w / 3, h / 4, w - 3.0, h - 5.0]])
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        targets.append(dict(boxes=boxes, labels=torch.tensor([1, 3]), masks=masks))
    return images, targets


@pytest.mark.parametrize("name,kw", _families())
def test_training_step(name, kw):
    model = _detector(name, kw).train()
    assert isinstance(model.backbone, SlabBackboneWithFPN) and model.backbone.out_channels == 32
    images, targets = _targets([(70, 90), (96, 64)])
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.backbone.body.parameters() if p.requires_grad and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name,kw", _families())
def test_predict_non_square(name, kw):
    model = _detector(name, kw, test_size=80).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 75, 131), torch.rand(3, 100, 44)])
    for o, (h, w) in zip(out, [(75, 131), (100, 44)]):
        n = o["boxes"].shape[0]
        assert o["labels"].shape == (n,) and o["scores"].shape == (n,)
        assert o["masks"].shape == (n, 1, h, w)
        if n:
            assert (o["boxes"][:, 2] <= w + 1e-3).all() and (o["boxes"][:, 3] <= h + 1e-3).all()


@pytest.mark.parametrize("name,kw", _families())
def test_fpn_shapes_and_padding(name, kw):
    backbone = _detector(name, kw).backbone.eval()
    with torch.no_grad():
        feats = backbone(torch.rand(1, 3, 50, 83))  # not a multiple of any stride: padded, then cropped
    for key, stride in zip("0123", (4, 8, 16, 32)):
        assert feats[key].shape == (1, 32, math.ceil(50 / stride), math.ceil(83 / stride))
    assert feats["pool"].shape[-2:] == (1, 2)


@pytest.mark.parametrize("name,kw", _families())
def test_fused_fpn_features_equal(name, kw):
    model = randomize_bn_stats(_detector(name, kw)).eval()
    fused = slab.fuse(model)
    assert fused is not model and getattr(fused, "is_fused", False)
    assert remaining_norms(fused) == []
    # torchvision's heads are left as they are.
    for (n1, p1), (n2, p2) in zip(model.roi_heads.named_parameters(), fused.roi_heads.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    x = torch.rand(2, 3, 96, 160) * 2 - 0.5
    with torch.no_grad():
        ref, out = model.backbone(x), fused.backbone(x)
    for key in ref:
        assert_close(f"fpn {key}", ref[key], out[key], rel=2e-5)
    with torch.no_grad():
        r = model.rpn.head(list(ref.values()))[0][0]
        o = fused.rpn.head(list(out.values()))[0][0]
    assert_close("rpn objectness", r, o, rel=2e-5)


def test_prepbn_frozen_keeps_statistics():
    name, kw = FAMILY_CANDIDATES["slab_deit"]
    model = randomize_bn_stats(_detector(name, kw, prepbn="frozen")).train()
    body = model.backbone.body
    prepbns = [m for m in body.modules() if isinstance(m, slab.PRepBN)]
    assert prepbns and all(m.lam_value == 0.0 for m in prepbns) and not any(m.training for m in prepbns)
    assert model.roi_heads.training and model.rpn.training
    before = {k: v.clone() for k, v in body.state_dict().items() if "running" in k}
    images, targets = _targets([(64, 64), (64, 96)])
    sum(model(images, targets).values()).backward()
    after = body.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for m in prepbns for p in m.ln.parameters())  # LN branch unused at lam 0


def test_prepbn_continue_updates_statistics():
    name, kw = FAMILY_CANDIDATES["slab_deit"]
    model = _detector(name, kw, prepbn="continue").train()
    slab.set_prepbn_lambda(model.backbone, 0.5)
    bn = next(m for m in model.backbone.body.modules() if isinstance(m, torch.nn.BatchNorm1d))
    assert bn.training
    images, targets = _targets([(64, 64), (64, 96)])
    model(images, targets)
    assert int(bn.num_batches_tracked) == 1


def test_trainable_layers():
    name, kw = FAMILY_CANDIDATES["slab_deit"]
    kw = dict(kw, depth=4)
    frozen = _detector(name, kw, trainable_layers=0).backbone.body
    assert not any(p.requires_grad for p in frozen.vit.parameters())
    assert all(p.requires_grad for p in frozen.levels.parameters())
    top = _detector(name, kw, trainable_layers=1).backbone.body
    trained = {n.split(".")[0] + "." + n.split(".")[1] if n.startswith("blocks") else n.split(".")[0]
               for n, p in top.vit.named_parameters() if p.requires_grad}
    assert "blocks.3" in trained and "blocks.2" not in trained and "patch_embed" not in trained
    with pytest.raises(ValueError, match="trainable_layers"):
        _detector(name, kw, trainable_layers=6)


@pytest.mark.parametrize("fam", ["slab_pvt_v2", "slab_swin", "slab_cswin"])
def test_trainable_layers_pyramid(fam):
    from slab.detection.backbone import _stage_modules, build_body, freeze_stages
    name, kw = FAMILY_CANDIDATES[fam]
    if name not in slab.list_models():
        pytest.skip(f"{name} is not registered")
    frozen_counts = []
    for k in range(6):
        body = build_body(name, **kw)
        trainable = [p for p in body.parameters() if p.requires_grad]  # some families hold fixed parameters
        last_stage = {id(p) for p in _stage_modules(body)[-1].parameters()}
        freeze_stages(body, k)
        flags = [p.requires_grad for p in trainable]
        n_frozen = flags.index(True) if True in flags else len(flags)
        assert not any(flags[:n_frozen]) and all(flags[n_frozen:]), "frozen parameters form a prefix"
        if 0 < k < 5:
            assert not flags[0], "the stem is frozen"
            assert all(p.requires_grad for p in trainable if id(p) in last_stage), "the last stage trains"
        frozen_counts.append(n_frozen)
    assert frozen_counts[0] == len(flags) and frozen_counts[5] == 0
    assert frozen_counts == sorted(frozen_counts, reverse=True) and len(set(frozen_counts)) == 6


def test_pretrained_backbone(tmp_path):
    # Ours: a classification model's checkpoint, any head size.
    name, kw = FAMILY_CANDIDATES["slab_deit"]
    cls = slab.create_model(name, num_classes=7, **kw)
    torch.save(cls.state_dict(), tmp_path / "ours.pth")
    body = _detector(name, kw, pretrained_backbone=str(tmp_path / "ours.pth")).backbone.body
    assert torch.equal(body.vit.blocks[1].attn.qkv.weight, cls.blocks[1].attn.qkv.weight)
    # The authors': their SLAB-DeiT layout and key names (the reduced reference model).
    record = json.loads((FIXTURES / "slab_deit.json").read_text())
    c = record["constructor"]
    model = _detector("slab_deit_tiny_patch16_224", dict(embed_dim=c["embed_dim"], depth=c["depth"],
                                                         num_heads=c["num_heads"]),
                      pretrained_backbone=str(FIXTURES / "slab_deit.safetensors"))
    from safetensors.torch import load_file
    sd = load_file(str(FIXTURES / "slab_deit.safetensors"))
    assert torch.equal(model.backbone.body.vit.patch_embed.proj.weight, sd["patch_embed.proj.weight"])


@pytest.mark.parametrize("fam", ["slab_pvt_v2", "slab_swin"])
def test_pretrained_pyramid_backbone(fam, tmp_path):
    name, kw = FAMILY_CANDIDATES[fam]
    if name not in slab.list_models():
        pytest.skip(f"{name} is not registered")
    cls = randomize_bn_stats(slab.create_model(name, num_classes=5, **kw))
    torch.save({"model": cls.state_dict()}, tmp_path / "ours.pth")
    body = _detector(name, kw, pretrained_backbone=str(tmp_path / "ours.pth")).backbone.body
    ref = cls.state_dict()
    got = body.state_dict()
    assert got and all(torch.equal(v, ref[k.removeprefix("model.")]) for k, v in got.items())


def test_bad_backbone_and_mode():
    with pytest.raises(ValueError, match="unknown model"):
        maskrcnn("no_such_model", 3)
    with pytest.raises(ValueError, match="prepbn"):
        _detector(*FAMILY_CANDIDATES["slab_deit"], prepbn="thawed")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("fmnist_scenes")
    make_fmnist_scenes(out, 6, 4, SceneConfig(canvas=64, max_items=3, min_scale=0.8, max_scale=1.6), seed=3)
    return out


def test_coco_writer(scenes):
    from pycocotools import mask as mask_util
    for split in ("train", "val"):
        img_dir, ann_file = resolve_split(scenes, split)
        data = json.loads(ann_file.read_text())
        assert {c["id"] for c in data["categories"]} == set(range(1, 11))
        assert len(data["images"]) == (6 if split == "train" else 4) and data["annotations"]
        ids = {im["id"] for im in data["images"]}
        for im in data["images"]:
            assert (img_dir / im["file_name"]).is_file() and im["width"] == im["height"] == 64
        for ann in data["annotations"]:
            assert ann["image_id"] in ids and ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= 10
            m = mask_util.decode(ann["segmentation"])
            assert m.shape == (64, 64) and m.sum() == ann["area"] > 0
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
            ys, xs = np.nonzero(m)
            assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == [x, y, w, h]
    ds = CocoInstances(*resolve_split(scenes, "train"), train=True, hflip=1.0)
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
    m = target["masks"]
    assert m.shape[0] == target["boxes"].shape[0] == target["labels"].shape[0] > 0
    for box, mask in zip(target["boxes"], m):  # flipped boxes still enclose their flipped masks
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box[0] <= xs.min() and xs.max() + 1 <= box[2] + 1e-4 and box[1] <= ys.min() and ys.max() < box[3]


def test_evaluator_perfect_and_empty(scenes):
    ds = CocoInstances(*resolve_split(scenes, "val"))
    outputs, ids = [], []
    for i in range(len(ds)):
        _, t = ds[i]
        outputs.append(dict(boxes=t["boxes"], labels=t["labels"], scores=torch.ones(len(t["labels"])),
                            masks=t["masks"][:, None].float()))
        ids.append(t["image_id"])
    boxes, masks = to_coco_results(outputs, ids, ds.label_to_cat)
    box_m, _ = coco_evaluate(ds.coco, boxes, "bbox", ids)
    mask_m, _ = coco_evaluate(ds.coco, masks, "segm", ids)
    assert box_m["mAP"] == pytest.approx(1.0) and mask_m["mAP"] == pytest.approx(1.0)
    assert coco_evaluate(ds.coco, [], "segm", ids)[0]["mAP"] == 0.0
    # Shifted boxes score lower.
    shifted = [dict(b, bbox=[b["bbox"][0] + 0.5 * b["bbox"][2]] + b["bbox"][1:]) for b in boxes]
    assert coco_evaluate(ds.coco, shifted, "bbox", ids)[0]["mAP"] < 0.5


def test_train_det_cli_end_to_end(scenes, tmp_path):
    from slab.cli import main
    name, kw = FAMILY_CANDIDATES["slab_deit"]
    out = tmp_path / "run"
    argv = ["train-det", "--config", "det_fmnist_demo", "--backbone", name, "--data", str(scenes),
            "--max-steps", "2", "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--output", str(out),
            "--set", "backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2, img_size: 64}",
            "--set", "min_size=[64]", "--set", "test_size=64", "--set", "fpn_channels=32",
            "--set", "mask_layers=[32]", "--set", "representation_size=64"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and 0.0 <= metrics["final"]["bbox"]["mAP"] <= 1.0
    assert "fused" in metrics and metrics["fused"]["segm"]["mAP"] >= 0.0
    assert (out / "model.pth").is_file() and (out / "checkpoints" / "step_00000002.pt").is_file()
    from slab.detection.engine import load_detector
    model = load_detector(out / "model.pth")
    assert model.slab_config["backbone"] == name
    # Resuming at the end does no more steps.
    assert main(argv + ["--resume", "--set", "eval_fused=false"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert main(argv + ["--eval-only", str(out / "model.pth")]) == 0


def test_configs():
    paper = load_config("det_maskrcnn_1x")
    assert paper["epochs"] == 12 and paper["lr"] == 1e-4 and paper["weight_decay"] == 0.05
    assert min(paper["min_size"]) == 480 and max(paper["min_size"]) == 800 and paper["max_size"] == 1333
    assert paper["fpn_channels"] == 256
    with pytest.raises(ValueError, match="unknown setting"):
        load_config(overrides={"learning_rate": 1.0})


def test_collate_and_loader(scenes):
    ds = CocoInstances(*resolve_split(scenes, "val"))
    images, targets = collate([ds[0], ds[1]])
    assert len(images) == len(targets) == 2
    assert load_coco(resolve_split(scenes, "val")[1]).getCatIds() == list(range(1, 11))
