"""The model registry: timm registration, the authors' checkpoint map, pretrained configs, unknown names, CLI."""
import json

import pytest
import timm
import torch.nn as nn

import slab
from slab.cli import main as cli_main

from conftest import FIXTURES

NAMES = slab.list_models()


def _released() -> dict:
    return json.loads((FIXTURES / "released_checkpoints.json").read_text())


def test_there_are_models_of_every_family():
    assert len(NAMES) == len(set(NAMES)) and NAMES == sorted(NAMES)
    for fam in ("deit", "pvt", "pvt_v2", "swin", "cswin"):
        assert any(timm.models.model_entrypoint(n).__module__ == f"slab.models.{fam}" for n in NAMES), fam


@pytest.mark.parametrize("name", NAMES)
def test_registered_through_timm(name):
    assert timm.is_model(name)
    assert name in timm.list_models()
    assert timm.models.model_entrypoint(name).__module__.startswith("slab.models.")
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg is not None and cfg.input_size is not None and cfg.num_classes


def test_timm_create_model_builds_ours():
    # Cheap: the 28x28 Fashion-MNIST model, and a one-block DeiT through timm's own entry point.
    nano = timm.create_model("slab_deit_nano_patch4_28")
    assert type(nano).__module__ == "slab.models.deit" and nano.pretrained_cfg["input_size"] == (1, 28, 28)
    tiny = timm.create_model("slab_deit_tiny_patch16_224", depth=1, embed_dim=32, num_heads=2, num_classes=5)
    assert isinstance(tiny, nn.Module) and tiny.head.out_features == 5 and len(tiny.blocks) == 1


def test_authors_checkpoints_cover_the_twelve_released_files():
    released = _released()
    assert len(released) == 12
    assert set(slab.AUTHORS_CHECKPOINTS) == set(released)
    for file, name in slab.AUTHORS_CHECKPOINTS.items():
        assert name in NAMES, f"{file} maps to unregistered {name!r}"


@pytest.mark.parametrize("file", sorted(slab.AUTHORS_CHECKPOINTS))
def test_target_pretrained_cfg_names_its_file(file):
    name = slab.AUTHORS_CHECKPOINTS[file]
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.file == file, f"{name}: pretrained_cfg file {cfg.file!r}, but it is the model for {file}"
    assert cfg.url.endswith("/" + file)


def test_pretrained_cfg_files_are_released_files_of_that_model():
    # The converse: a model whose pretrained_cfg names a file is the one that file loads into.
    for name in NAMES:
        file = getattr(timm.models.get_pretrained_cfg(name), "file", None)
        if file:
            assert slab.AUTHORS_CHECKPOINTS.get(file) == name, f"{name} names {file}"


def test_unknown_name_raises_value_error():
    with pytest.raises(ValueError, match="unknown model 'nope'.*slab models"):
        slab.create_model("nope")


@pytest.mark.parametrize("typo, expected", [("slab_deit_tiny", "slab_deit_tiny_patch16_224"),
                                            ("pvt_tiny_prepbm", "pvt_tiny_prepbn"),
                                            ("slab_swin_tiny_patch4", "slab_swin_tiny_patch4_224")])
def test_unknown_name_names_close_ones(typo, expected):
    with pytest.raises(ValueError, match="Closest registered names") as e:
        slab.create_model(typo)
    assert expected in str(e.value)


def test_cli_models_lists_every_name(capsys):
    assert cli_main(["models"]) == 0
    assert capsys.readouterr().out.split() == NAMES


def test_cli_models_pattern(capsys):
    assert cli_main(["models", "slab_*"]) == 0
    out = capsys.readouterr().out.split()
    assert out == slab.list_models("slab_*") and out and all(n.startswith("slab_") for n in out)
