"""The shipped recipes in configs/: every file parses for fit and test with options the code accepts. Without
this, a renamed option or a refused value in a real-data recipe would show only on a user's machine, after
the download of COCO."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
import yaml

from captioning.cli import LINKED_FROM_DATA, main
from captioning.data.datamodule import CaptionDataModule
from captioning.lit_module import CaptionModule

from conftest import ROOT

CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


def _config(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / name).read_text())


# --- parsing: cheap, every file ----------------------------------------------------------------------


def _print_config(subcommand: str, name: str) -> dict:
    """``train.py <subcommand> -c configs/<name> --print_config``, in this process (the same CLI, without the
    interpreter start and imports that cost ~8 s a run here: 14 runs would take two minutes)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        main([subcommand, "-c", str(ROOT / "configs" / name), "--print_config"])
    assert stop.value.code in (0, None), out.getvalue()
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("subcommand", ["fit", "test"])
@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_parses_and_keeps_its_values(name, subcommand):
    """Every key of the file is an option of this version (the parser refuses unknown keys and wrong types)
    and arrives with the file's value."""
    printed = _print_config(subcommand, name)
    for section in ("model", "data"):
        for key, value in _config(name)[section].items():
            assert printed[section][key] == value, (section, key)
    trainer = _config(name)["trainer"]
    for key, value in trainer.items():
        if key not in ("logger", "callbacks"):
            assert printed["trainer"][key] == value, key
    assert printed["trainer"]["logger"]["init_args"]["name"] == trainer["logger"]["init_args"]["name"]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_configs_model_and_data_options_pass_their_checks(name):
    """The data module and the model built from the file's options, so their range and consistency checks run
    (parsing checks types only): a value the code refuses fails here, not at a user's first step."""
    config = _config(name)
    data = CaptionDataModule(**config["data"])  # reads no files until set-up
    # what the CLI links from the data module; the vocabulary would need the data's files
    linked = {t: getattr(data, s.split(".")[1]) for t, s in LINKED_FROM_DATA.items() if t != "vocab"}
    linked["vocab"] = ["<pad>", "<start>", "<end>", "<unk>", "a"]
    with torch.device("meta"):  # the architecture without its 40M random numbers (seconds for a ResNet-101)
        CaptionModule(**config["model"], **linked)
