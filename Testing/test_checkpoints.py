"""Checkpoints: every supported kind is detected from its tensors and loads strictly; unsafe files are refused."""
import json

import pytest
import torch

from BrainDINOLib import Architecture, BrainDINOError, ModelCard, load_encoder, read_checkpoint
from BrainDINOLib.checkpoints import save_safetensors, save_teacher_checkpoint
from BrainDINOLib.cli import main


@pytest.fixture(scope="module")
def teacher_state(teacher_checkpoint):
    return torch.load(teacher_checkpoint, weights_only=True)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.randn(2, 3, 64, 96)


def _backbone(state):
    return {k[len("backbone."):]: v for k, v in state["teacher"].items() if k.startswith("backbone.")}


def test_plain_dinov3_state_dict(tmp_path, teacher_state, fixture_encoder, images):
    path = tmp_path / "dinov3_vit.pth"
    torch.save(_backbone(teacher_state), path)
    encoder = load_encoder(path, device="cpu")
    assert encoder.checkpoint.kind == "dinov3-state-dict"
    assert encoder.architecture.embed_dim == 256 and encoder.architecture.num_heads == 4
    # Only LayerNorm eps differs (1e-5 for Meta's DINOv3 release, 1e-6 for BrainDINO teachers).
    same = encoder.tokens(images).patches - fixture_encoder.tokens(images).patches
    assert same.abs().max() < 0.05


def test_timm_state_dict_and_wrapped_state_dicts(tmp_path, fixture_encoder, images):
    state = fixture_encoder.model.state_dict()
    for name, payload in {"timm.pth": state, "wrapped.pth": {"model": state},
                          "ddp.pth": {f"module.{k}": v for k, v in state.items()}}.items():
        torch.save(payload, tmp_path / name)
        checkpoint = read_checkpoint(tmp_path / name)
        assert checkpoint.kind == "timm-state-dict"
        assert checkpoint.architecture.depth == 3
        assert any("num_heads=4 assumed" in note for note in checkpoint.notes)
        load_encoder(tmp_path / name, device="cpu")


def test_safetensors_with_model_card_round_trips_exactly(tmp_path, fixture_encoder, images):
    card = ModelCard("fixture", fixture_encoder.architecture, {"image_size": 224}, {"from": "test"}, "a test model")
    path = save_safetensors(fixture_encoder.model, card, tmp_path / "fixture.safetensors", dtype=torch.float32)
    assert json.loads((tmp_path / "fixture.json").read_text())["name"] == "fixture"
    encoder = load_encoder(path, device="cpu", precision="fp32")
    assert encoder.checkpoint.kind == "braindino-safetensors"
    assert encoder.architecture == fixture_encoder.architecture
    assert encoder.card.preprocessing == {"image_size": 224}
    assert encoder.model_id.startswith("fixture-")
    torch.testing.assert_close(encoder.tokens(images).patches, fixture_encoder.tokens(images).patches,
                               rtol=0, atol=0)


def test_teacher_export_round_trips(tmp_path, fixture_encoder, images):
    path = save_teacher_checkpoint(fixture_encoder.model, fixture_encoder.architecture, tmp_path / "teacher.pth",
                                   extra={"dino_head.mlp.0.weight": torch.zeros(8, 256)}, iteration=7)
    encoder = load_encoder(path, device="cpu", precision="fp32")
    assert encoder.checkpoint.kind == "braindino-teacher"
    assert encoder.architecture == fixture_encoder.architecture
    torch.testing.assert_close(encoder.tokens(images).cls, fixture_encoder.tokens(images).cls, rtol=0, atol=0)


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_state_dicts(tmp_path, images, registers):
    arch = Architecture(family="dinov2", embed_dim=128, depth=2, num_heads=2, patch_size=16,
                        num_register_tokens=registers, qkv_bias=True, pos_embed_grid=4)
    torch.manual_seed(1)
    model = arch.build().eval()
    timm_path = tmp_path / "timm.pth"
    torch.save(model.state_dict(), timm_path)
    timm_encoder = load_encoder(timm_path, device="cpu")
    assert timm_encoder.checkpoint.kind == "timm-state-dict"
    assert timm_encoder.architecture.num_register_tokens == registers
    expected = timm_encoder.tokens(images)
    if registers == 0:  # Meta's DINOv2 naming = timm's plus the mask token
        meta = dict(model.state_dict(), mask_token=torch.zeros(1, 128))
        torch.save(meta, tmp_path / "dinov2.pth")
        meta_encoder = load_encoder(tmp_path / "dinov2.pth", device="cpu")
        assert meta_encoder.checkpoint.kind == "dinov2-state-dict"
        torch.testing.assert_close(meta_encoder.tokens(images).patches, expected.patches)
    assert expected.patches.shape == (2, 4, 6, 128)
    assert expected.registers.shape == (2, registers, 128)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pth"
    torch.save({"teacher": {"backbone.x": Payload()}}, path)
    with pytest.raises(BrainDINOError, match="refused: the checkpoint holds pickled objects") as error:
        read_checkpoint(path)
    assert str(error.value).startswith(str(path))


def _teacher_variant(tmp_path, teacher_state, change):
    teacher = dict(teacher_state["teacher"])
    change(teacher)
    path = tmp_path / "variant.pth"
    torch.save({"teacher": teacher}, path)
    return path


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("backbone.blocks.1.attn.proj.bias"), "missing tensor(s) blocks.1.attn.proj.bias"),
    (lambda t: t.update({"backbone.blocks.0.attn.extra": torch.zeros(3)}), "unexpected tensor(s) blocks.0.attn.extra"),
    (lambda t: t.update({"backbone.blocks.2.mlp.fc2.weight": torch.zeros(256, 512)}),
     "tensor blocks.2.mlp.fc2.weight has shape (256, 512), expected (256, 1024)"),
])
def test_strict_loading_names_the_tensor(tmp_path, teacher_state, change, message):
    path = _teacher_variant(tmp_path, teacher_state, change)
    with pytest.raises(BrainDINOError) as error:
        load_encoder(path, device="cpu")
    assert message in str(error.value)


def test_unknown_and_broken_checkpoints(tmp_path, teacher_checkpoint):
    torch.save({"weight": torch.zeros(3), "bias": torch.zeros(3)}, tmp_path / "linear.pth")
    with pytest.raises(BrainDINOError, match="unknown checkpoint kind.*first keys: weight, bias"):
        read_checkpoint(tmp_path / "linear.pth")
    (tmp_path / "cut.pth").write_bytes(teacher_checkpoint.read_bytes()[:50000])
    with pytest.raises(BrainDINOError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "cut.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(BrainDINOError, match="not a readable safetensors file"):
        read_checkpoint(tmp_path / "bad.safetensors")
    with pytest.raises(BrainDINOError, match="no such checkpoint file"):
        read_checkpoint(tmp_path / "absent.pth")


def test_info_command(capsys, teacher_checkpoint):
    assert main(["info", str(teacher_checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kind"], info["embed_dim"], info["depth"], info["num_heads"], info["patch_size"],
            info["num_register_tokens"], info["parameters"]) == ("braindino-teacher", 256, 3, 4, 16, 4, 2_567_168)
    assert main(["info", str(teacher_checkpoint)]) == 0
    assert "braindino-teacher" in capsys.readouterr().out
