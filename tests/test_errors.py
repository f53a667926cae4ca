"""The library's errors name its own arguments; the scripts report them as their flags."""

import os
import pickle
import shutil

import pytest
from helpers import run_script

from hypernet import data, training
from hypernet.errors import ArgumentError, UsageError, flag_errors


def test_an_argument_error_names_the_argument_and_becomes_a_flag_error():
    error = ArgumentError("clip_skip", "13: use 1 to 12")
    assert str(error) == "clip_skip 13: use 1 to 12" and error.argument == "clip_skip"
    flag_error = error.about("--clip_skip")
    assert type(flag_error) is UsageError and str(flag_error) == "--clip_skip 13: use 1 to 12"


def test_an_argument_error_crosses_processes_whole():
    """Processes exchange the errors of preparing records (gather_object pickles them)."""
    copy = pickle.loads(pickle.dumps(ArgumentError("store_dir", "/x: not writable (Permission denied)")))
    assert (copy.argument, copy.message) == ("store_dir", "/x: not writable (Permission denied)")


def test_flag_errors_translates_the_arguments_it_names_and_passes_others_through():
    with pytest.raises(UsageError) as raised, flag_errors(name="--optimizer", use_8bit="--use_8bit_adam"):
        training.optimizer_class("Adamish")
    assert type(raised.value) is UsageError
    assert str(raised.value) == "--optimizer 'Adamish': not a torch.optim class (e.g. AdamW, Adam, SGD)"
    with pytest.raises(ArgumentError) as raised, flag_errors(path="--template_file"):
        training.optimizer_class("Adamish")
    assert raised.value.argument == "name", "an argument the block does not name stays the library's error"


def test_library_errors_name_no_flag(tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    for call, argument in [
        (lambda: data.folder_entries(str(tmp_path)), "data_dir"),
        (lambda: data.load_template(str(tmp_path / "empty.txt")), "path"),
        (lambda: data.RecordStore(str(tmp_path / "empty.txt")), "store_dir"),
        (lambda: training.optimizer_class("LBFGS"), "name"),
    ]:
        with pytest.raises(ArgumentError) as raised:
            call()
        assert raised.value.argument == argument and "--" not in str(raised.value), str(raised.value)


def test_a_missing_column_is_an_error_about_its_flag(tmp_path, tiny_model_dir, small_dataset, capsys):
    pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    folder.mkdir()
    for name in sorted(n for n in os.listdir(small_dataset) if n.endswith(".png"))[:2]:
        shutil.copy(os.path.join(small_dataset, name), folder / name)  # an imagefolder: an image column only
    code = run_script(
        "train_hypernetwork.py",
        "--pretrained_model_name_or_path",
        tiny_model_dir,
        "--dataset_name",
        folder,
        "--caption_column",
        "caption",
        "--output_dir",
        tmp_path / "out",
    )
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after datasets' progress bar
    assert code == 2
    assert (
        last_line
        == f"train_hypernetwork.py: error: --caption_column 'caption': {folder} has no such column; it has image"
    )
