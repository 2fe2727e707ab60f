"""Networks: shapes per preset, unit-norm descriptors, gradients, blocks against reference computations,
pretrained EfficientNet-Lite weights, the paper's torchvision backbones (where torchvision imports)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tscm_ros.describe.checkpoint import load_model_config
from tscm_ros.describe.models import (
    GeM,
    InterTransformer,
    NetVLADLoupe,
    build_backbone,
    build_model,
    freeze,
    prepare_for_inference,
)
from tscm_ros.describe.models.backbones import efficientnet_lite_weight_file
from tscm_ros.describe.models.blocks import CrossAttentionBlock
from tscm_ros.errors import ConfigError


def torchvision_or_none():
    try:
        import torchvision
    except Exception:  # CUDA-only torchvision next to CPU torch raises RuntimeError on import
        return None
    return torchvision


def images_for(preprocess, count: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, preprocess.height, preprocess.width, generator=generator)


@pytest.mark.parametrize(
    ("preset", "kind", "dim"),
    [
        ("tiny", "student", 64),
        ("tiny", "teacher", 64),
        ("student_offline", None, 512),
        ("teacher_offline", None, 512),
        ("baseline_offline", None, 112),
    ],
)
def test_presets_give_unit_norm_descriptors_of_their_dimension(preset, kind, dim):
    config, preprocess = load_model_config(preset, kind)
    model = build_model(config)
    assert model.dim == dim
    with torch.no_grad():
        descriptors = model(images_for(preprocess, 3))
    assert descriptors.shape == (3, dim)
    assert torch.allclose(descriptors.norm(dim=1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(descriptors[0], descriptors[1])


def test_offline_student_has_at_most_a_third_of_the_teachers_parameters():
    student = build_model(load_model_config("student_offline")[0])
    teacher = build_model(load_model_config("teacher_offline")[0])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(student) * 3 <= count(teacher)
    assert student.dim == teacher.dim  # the distillation losses compare them dimension by dimension


@pytest.mark.parametrize(("preset", "kind"), [("tiny", "student"), ("tiny", "teacher"), ("student_offline", None)])
def test_gradients_reach_every_trainable_parameter(preset, kind):
    config, _ = load_model_config(preset, kind)
    model = build_model(config).train()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    target = torch.randn(4, model.dim, generator=torch.Generator().manual_seed(2))
    (model(images) * target).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, f"zero gradient for {name}"


def test_build_model_is_deterministic_and_leaves_the_global_rng_alone():
    config, _ = load_model_config("tiny", "teacher")
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = build_model(config).state_dict()
    assert torch.equal(torch.rand(3), expected_next)
    second = build_model(config).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = build_model({**config, "seed": 1}).state_dict()
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_freeze_stops_gradients_and_batch_norm_updates():
    config, preprocess = load_model_config("tiny", "teacher")
    teacher = freeze(build_model(config).train())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher(images_for(preprocess, 4))
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_inference_copy_gives_the_same_descriptors():
    config, preprocess = load_model_config("student_offline")
    model = build_model(config)
    images = images_for(preprocess, 2)
    fast = prepare_for_inference(model)
    with torch.no_grad():
        expected = model(images)
        got = fast(images.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, expected, atol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())


def test_gem_against_hand_computed_values():
    feature_map = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert torch.allclose(GeM(p=1.0)(feature_map), torch.tensor([[2.5]]))
    expected = ((1 + 8 + 27 + 64) / 4) ** (1 / 3)
    assert torch.allclose(GeM(p=3.0)(feature_map), torch.tensor([[expected]]))
    assert isinstance(GeM().p, nn.Parameter)


def test_netvlad_initialisation_from_tokens_assigns_each_cluster_its_own_tokens():
    generator = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=1)
    tokens = (directions.repeat_interleave(50, dim=0) + 0.05 * torch.randn(200, 16, generator=generator)).unsqueeze(0)
    vlad = NetVLADLoupe(16, 4, output_dim=8, gating=False)
    vlad.init_from_tokens(tokens)
    for mode in (vlad.train, vlad.eval):  # the assignment batch norm starts as the identity in both modes
        mode()
        with torch.no_grad():
            logits = vlad.assignment_norm(vlad.assignment(torch.nn.functional.normalize(tokens[0], dim=1)))
            weights = torch.softmax(logits, dim=1)
        assignment = weights.argmax(dim=1).reshape(4, 50)
        assert all(len(set(row.tolist())) == 1 for row in assignment)  # one cluster per direction
        assert len(set(assignment[:, 0].tolist())) == 4
        assert weights.max(dim=1).values.mean() > 0.9
    with pytest.raises(ValueError, match="at least 4 tokens"):
        vlad.init_from_tokens(tokens[:, :3])


def test_netvlad_loupe_matches_a_loop_implementation():
    torch.manual_seed(0)
    dim, clusters, count = 3, 2, 4
    vlad = NetVLADLoupe(dim, clusters, output_dim=dim * clusters, gating=False).eval()
    with torch.no_grad():
        vlad.projection.weight.copy_(torch.eye(dim * clusters))
    tokens = torch.randn(2, count, dim)
    got = vlad(tokens)
    tokens = tokens / tokens.norm(dim=-1, keepdim=True)  # the layer's input normalisation
    eps = vlad.output_norm.eps
    for b in range(2):
        logits = (tokens[b] @ vlad.assignment.weight.T) / math.sqrt(1 + vlad.assignment_norm.eps)
        weights = torch.softmax(logits, dim=1)
        residuals = []
        for k in range(clusters):
            residual = sum(weights[t, k] * (tokens[b, t] - vlad.centres[k]) for t in range(count))
            residuals.append(residual / residual.norm())
        flat = torch.cat(residuals)
        expected = flat / flat.norm() / math.sqrt(1 + eps)
        assert torch.allclose(got[b], expected, atol=1e-5)


def test_cross_attention_block_matches_torch_multihead_attention():
    torch.manual_seed(0)
    dim, heads = 8, 4
    block = CrossAttentionBlock(dim, heads, ffn_dim=16).eval()
    reference = nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([block.query.weight, block.key_value.weight]))
        reference.in_proj_bias.copy_(torch.cat([block.query.bias, block.key_value.bias]))
        reference.out_proj.weight.copy_(block.out.weight)
        reference.out_proj.bias.copy_(block.out.bias)
    queries, context = torch.randn(2, 5, dim), torch.randn(2, 7, dim)
    with torch.no_grad():
        context_normed = block.context_norm(context)
        attended, _ = reference(block.query_norm(queries), context_normed, context_normed)
        x = queries + attended
        expected = x + block.ffn(block.ffn_norm(x))
        assert torch.allclose(block(queries, context), expected, atol=1e-5)


def test_inter_transformer_fuses_both_directions():
    fusion = InterTransformer(dim=16, heads=4).eval()
    cnn, vit = torch.randn(2, 6, 16), torch.randn(2, 3, 16)
    fused = fusion(cnn, vit)
    assert fused.shape == (2, 9, 16)
    changed_cnn = fusion(cnn, torch.randn_like(vit))
    # The CNN tokens' half changes when the ViT tokens change: they attend to them.
    assert not torch.allclose(changed_cnn[:, 3:], fused[:, 3:])


@pytest.mark.parametrize(
    ("name", "stage", "blocks", "channels", "stride"),
    [("efficientnet_lite0", 5, 11, 112, 16), ("efficientnet_lite1", 7, 21, 320, 32),
     ("efficientnet_lite2", 5, 15, 120, 16)],
)
def test_truncated_efficientnet_loads_the_packaged_imagenet_weights(name, stage, blocks, channels, stride):
    backbone = build_backbone({"name": name, "stage": stage, "pretrained": True})
    assert (backbone.channels, backbone.stride, len(backbone._blocks)) == (channels, stride, blocks)
    variant = int(name[-1])
    packaged = torch.load(efficientnet_lite_weight_file(variant), map_location="cpu", weights_only=True)
    own = backbone.state_dict()
    last = blocks - 1
    keys = ["_conv_stem.weight", "_bn0.running_var", f"_blocks.{last}._project_conv.weight",
            f"_blocks.{last}._bn2.bias"]
    for key in keys:
        assert torch.equal(own[key], packaged[key]), key
    assert not any(key.startswith(f"_blocks.{blocks}.") or key.startswith("_conv_head") for key in own)
    features = backbone.eval()(torch.zeros(1, 3, 192, 256))
    assert features.shape == (1, channels, 192 // stride, 256 // stride)


def test_untrained_efficientnet_differs_from_the_pretrained_one():
    pretrained = build_backbone({"name": "efficientnet_lite0", "stage": 2})
    random_init = build_backbone({"name": "efficientnet_lite0", "stage": 2, "pretrained": False})
    assert not torch.equal(pretrained._conv_stem.weight, random_init._conv_stem.weight)


@pytest.mark.parametrize(
    "spec",
    [{"name": "no_such_net"}, {"name": "efficientnet_lite0", "stage": 9}, {"name": "tiny", "depth": 3}, {"stage": 3}],
)
def test_bad_backbone_configs_raise_config_error(spec):
    with pytest.raises(ConfigError):
        build_backbone(spec)


def test_bad_model_configs_raise_config_error():
    config, _ = load_model_config("tiny", "student")
    with pytest.raises(ConfigError, match="kind"):
        build_model({**config, "kind": "sensei"})
    with pytest.raises(ConfigError, match="unknown"):
        build_model({**config, "dropout": 0.5})
    with pytest.raises(ConfigError, match="clusters"):
        build_model({**config, "vlad_branch": {"dim": 8, "output_dim": 8}})


def test_projection_dim_shrinks_the_descriptor_to_unit_vectors():
    config, preprocess = load_model_config("tiny", "student")
    model = build_model({**config, "projection_dim": 8})
    with torch.no_grad():
        descriptors = model(images_for(preprocess, 3, seed=4))
    assert descriptors.shape == (3, 8) and model.dim == 8
    assert torch.allclose(descriptors.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(ConfigError, match="projection_dim"):
        build_model({**config, "projection_dim": 10_000})


@pytest.mark.skipif(torchvision_or_none() is not None, reason="torchvision imports here")
def test_paper_presets_explain_that_they_need_torchvision():
    for preset in ("student_paper", "teacher_paper"):
        config, _ = load_model_config(preset)
        with pytest.raises(ConfigError, match="torchvision"):
            build_model(config)


@pytest.mark.skipif(torchvision_or_none() is None, reason="torchvision cannot be imported here")
def test_paper_presets_build_and_run_with_torchvision(tmp_path):
    torchvision = torchvision_or_none()
    reference = torchvision.models.resnet50(weights=None)
    weights = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), weights)
    resnet = build_backbone({"name": "resnet50", "stage": 3, "weights": str(weights)})
    assert (resnet.channels, resnet.stride) == (1024, 16)
    assert torch.equal(resnet.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    vit = build_backbone({"name": "vit_b_16", "pretrained": False})
    assert vit.eval()(torch.zeros(1, 3, 224, 224)).shape == (1, 768, 14, 14)
    assert vit(torch.zeros(1, 3, 192, 256)).shape == (1, 768, 12, 16)
    for preset in ("student_paper", "teacher_paper"):
        config, preprocess = load_model_config(preset)
        for section in ("backbone", "cnn_backbone", "vit_backbone"):
            if section in config:
                config[section] = {**config[section], "pretrained": False}
        model = build_model(config)
        with torch.no_grad():
            descriptors = model(images_for(preprocess, 2))
        assert descriptors.shape == (2, 2048)
        assert torch.allclose(descriptors.norm(dim=1), torch.ones(2), atol=1e-5)
        if preset == "student_paper":
            assert 12e6 < sum(p.numel() for p in model.parameters()) < 14e6  # the paper's ~13 M
