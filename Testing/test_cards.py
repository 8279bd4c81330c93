"""Model and head cards carry the typed `PreprocessConfig`, written as the same JSON as before it was typed, so
checkpoints and head files written earlier (an untyped dict, `image_size` from before the resolution policy,
or `{}` for none) still load."""
import json

from BrainDINOLib.checkpoints import BUILTIN_MODELS, ModelCard, read_checkpoint
from BrainDINOLib.heads.card import ClassInfo, HeadCard
from BrainDINOLib.preprocessing import PreprocessConfig

OLD_PREPROCESSING = {"clip_percentiles": [1.0, 99.0], "image_size": 224, "margin_mm": 8.0,
                     "min_foreground_voxels": 512, "min_slice_foreground": 0.05}
TYPED = PreprocessConfig(clip_percentiles=(1.0, 99.0))


def test_the_bundled_model_card_of_the_old_format_loads_typed():
    card = read_checkpoint(BUILTIN_MODELS["demo"]).card
    assert json.loads(BUILTIN_MODELS["demo"].with_suffix(".json").read_text())["preprocessing"]["image_size"] == 224
    assert card.preprocessing == PreprocessConfig()


def test_model_card_json_is_unchanged(fixture_encoder):
    card = ModelCard("fixture", fixture_encoder.architecture, TYPED)
    data = json.loads(card.to_json())
    assert data["preprocessing"] == {k: v for k, v in OLD_PREPROCESSING.items() if k != "image_size"}
    data["preprocessing"] = OLD_PREPROCESSING
    assert ModelCard.from_json(json.dumps(data)).preprocessing == TYPED
    data["preprocessing"] = {}
    assert ModelCard.from_json(json.dumps(data)).preprocessing is None
    assert json.loads(ModelCard.from_json(json.dumps(data)).to_json())["preprocessing"] == {}


def test_head_card_json_is_unchanged():
    old = {"task": "segmentation", "kind": "linear", "encoder_id": "demo-0123456789ab",
           "classes": [{"value": 0, "name": "background", "colour": [0, 0, 0]}], "layers": [2, 5], "pooling": "",
           "modalities": [], "preprocessing": OLD_PREPROCESSING, "module": {"dim": 8}, "extra": {}, "metrics": {},
           "description": ""}
    card = HeadCard.from_json(json.dumps(old))
    assert card.preprocessing == TYPED and card.classes == [ClassInfo(0, "background", (0, 0, 0))]
    written = json.loads(card.to_json())
    assert written == {**old, "preprocessing": {k: v for k, v in OLD_PREPROCESSING.items() if k != "image_size"}}
    unrecorded = HeadCard.from_json(json.dumps({**old, "preprocessing": {}}))
    assert unrecorded.preprocessing is None and json.loads(unrecorded.to_json())["preprocessing"] == {}
