"""The ml package on its own: split, preprocessing, Grad-CAM, weights files and the CLIs."""

import contextlib
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from ml.audit import shared_mistakes
from ml.augment import augment_batch
from ml.data import Sample, list_samples, patient, patient_group, split_by_patient
from ml.evaluate import without_nan
from ml.gradcam import cam_from_features, grad_cam, render_overlay
from ml.metrics import borderline_figures, choose_threshold, screening_metrics
from ml.model import MIN_HEATMAP_GRID, PARASITIZED, MalariaVGG, ModelConfig
from ml.predictor import Predictor
from ml.preprocessing import open_rgb, square_resize
from ml.tensors import REFERENCE_CELL_COLOUR, standardise_stain
from ml.weights import DEFAULT_WEIGHTS, ModelInfo, WeightsNotFound, load_model, read_info, save_model
from tests.conftest import FIXTURE_CELLS, ROOT

# The NIH cells, beside the checkout as on the project's machine, or where NIH_CELLS says (a clone elsewhere).
SHARED_DATA = Path(os.environ.get("NIH_CELLS") or ROOT.parent / "shared" / "datasets" / "nih-malaria-cells")


def tiny_weights(path: Path, *, threshold: float = 0.5) -> Path:
    torch.manual_seed(0)
    model = MalariaVGG(ModelConfig(input_size=32, trunk_stride=8))
    save_model(model, path, info=ModelInfo(config=model.config, version="test-tiny", threshold=threshold))
    return path


def test_patient_group_is_the_prefix_before_img():
    assert patient_group("C100P61ThinF_IMG_20150918_144104_cell_162.png") == "C100P61ThinF"
    assert patient_group("C39P4thinF_original_IMG_20150622_113126_cell_12.png") == "C39P4thinF_original"


@pytest.mark.parametrize("data", [FIXTURE_CELLS, SHARED_DATA], ids=["fixture", "shared"])
def test_split_never_puts_a_patient_group_on_both_sides(data):
    if not data.is_dir():
        pytest.fail(f"{data} is missing: clone beside shared/, or set NIH_CELLS to the NIH cells' folder")
    samples = list_samples(data)
    kept, held_out = split_by_patient(samples, holdout_fraction=0.3, seed=1)
    assert kept and held_out and len(kept) + len(held_out) == len(samples)
    assert not {s.patient_group for s in kept} & {s.patient_group for s in held_out}
    assert not {patient(s.patient_group) for s in kept} & {patient(s.patient_group) for s in held_out}


def test_a_patient_filed_under_two_prefixes_stays_on_one_side():
    """C47P8 was photographed on two microscopes; the held-out split of the shipped model's card
    (seed 7) drew one prefix and not the other, so its cells now all stay on the training side."""
    assert patient("C47P8thinOriginalOlympusCX21") == patient("C47P8thin_Original_Motic") == "C47P8"
    assert patient("C1_thinF") == "C1_thinF"  # no patient code: the group is its own patient
    names = ["C47P8thinOriginalOlympusCX21", "C47P8thin_Original_Motic"] + [f"C{k}P{k}thinF" for k in range(100, 140)]
    samples = [Sample(Path(f"{name}_IMG_1_cell_{k}.png"), k % 2) for name in names for k in range(3)]
    for seed in range(40):
        kept, held_out = split_by_patient(samples, holdout_fraction=0.3, seed=seed)
        in_kept = {"C47P8" in s.path.name for s in kept}
        in_held_out = {"C47P8" in s.path.name for s in held_out}
        assert not (True in in_kept and True in in_held_out), seed
    assert SHARED_DATA.is_dir(), f"{SHARED_DATA} is missing: clone beside shared/, or set NIH_CELLS"
    _, test = split_by_patient(list_samples(SHARED_DATA), holdout_fraction=0.15, seed=7)
    assert len({s.patient_group for s in test}) == 26 and not any("C47P8" in s.path.name for s in test)


def test_square_resize_keeps_aspect_on_black():
    image = Image.new("RGB", (100, 50), (255, 255, 255))
    array = square_resize(image, 64)
    assert array.shape == (64, 64, 3)
    assert array[0, 32].sum() == 0 and array[32, 32].min() == 255  # padding above, cell in the middle


def synthetic_cell(cell_colour: tuple[int, int, int], *, size: int = 48) -> np.ndarray:
    """A round cell of one colour on black with a dark purple chromatin dot off-centre."""
    yy, xx = np.mgrid[:size, :size]
    image = np.zeros((size, size, 3), dtype=np.float64)
    image[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2.5) ** 2] = cell_colour
    dot = (yy - size / 2.5) ** 2 + (xx - size / 2.5) ** 2 < 9
    image[dot] *= 0.45
    return image.round().astype(np.uint8)


def test_stain_standardisation_removes_a_smear_colour_cast():
    pink = synthetic_cell((200, 140, 140))
    lavender = synthetic_cell((150, 148, 172))
    batch = torch.from_numpy(np.stack([pink, lavender])).permute(0, 3, 1, 2)
    before = (batch[0].float() - batch[1].float()).abs().mean()
    out = standardise_stain(batch)
    assert (out[0] - out[1]).abs().mean() < before / 10
    assert out[:, :, 0, 0].abs().max() == 0  # background stays black
    cell_pixels = out[0, :, 24, 30]
    dot_pixels = out[0, :, 19, 19]
    assert (dot_pixels < cell_pixels * 0.6).all()  # the chromatin stays dark relative to its cell
    assert cell_pixels.tolist() == pytest.approx(REFERENCE_CELL_COLOUR, abs=12)


def test_augmentation_keeps_black_black_and_values_in_range():
    batch = torch.from_numpy(np.stack([synthetic_cell((200, 140, 140))] * 8)).permute(0, 3, 1, 2)
    plain = augment_batch(batch, torch.Generator().manual_seed(0))
    mixed = augment_batch(batch, torch.Generator().manual_seed(0), mix_channels=True)
    for out in (plain, mixed):
        assert out.shape == (8, 3, 48, 48) and out.min() >= 0 and out.max() <= 255
        assert out[:, :, 0, 0].abs().max() == 0
        assert not torch.allclose(out[0], out[1])  # each image gets its own colour and orientation
    assert not torch.allclose(plain, mixed)


def test_predictor_applies_the_models_stain_standardisation(tmp_path):
    """What the network is fed, seen through its first layer: with standardisation a pink and a
    lavender smear of the same cell look alike to it, without it they do not."""
    pink, lavender = (Image.fromarray(synthetic_cell(c)) for c in ((200, 140, 140), (150, 148, 172)))
    gaps = {}
    for standardise in (True, False):
        model = MalariaVGG(ModelConfig(input_size=32, trunk_stride=8, stain_standardise=standardise))
        path = tmp_path / f"{standardise}.safetensors"
        save_model(model, path, info=ModelInfo(config=model.config, version="tiny", threshold=0.5))
        predictor = Predictor(path, bf16=False)
        assert predictor.info.config.stain_standardise is standardise
        fed = []
        predictor.model.features[0].register_forward_hook(lambda layer, inputs, output, fed=fed: fed.append(inputs[0]))
        predictor.predict([pink, lavender])
        gaps[standardise] = (fed[0][0] - fed[0][1]).abs().mean()
    assert gaps[True] < gaps[False] / 10


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "I;16", "LA"])
def test_any_mode_decodes_to_rgb(tmp_path, mode):
    path = tmp_path / "cell.png"
    Image.new(mode, (40, 30)).save(path)
    assert open_rgb(path).mode == "RGB"


def test_a_float_tiff_keeps_its_picture_and_a_colour_keyed_background_turns_black(tmp_path):
    """ImageJ saves 32-bit float TIFFs in 0..1, which a plain conversion clips to black; a PNG may
    mark its background transparent with a colour key (tRNS) instead of an alpha channel."""
    gradient = np.tile(np.linspace(0, 1, 40, dtype=np.float32), (30, 1))
    gradient[5, 5], gradient[6, 6] = np.nan, np.inf  # ImageJ's "no data", and a broken pixel
    Image.fromarray(gradient, mode="F").save(tmp_path / "float.tif")
    decoded = np.asarray(open_rgb(tmp_path / "float.tif"))
    assert decoded[0, 0].tolist() == [0, 0, 0] and decoded[0, -1].tolist() == [255, 255, 255]
    assert decoded[5, 5].tolist() == decoded[6, 6].tolist() == [0, 0, 0]
    keyed = np.full((30, 40, 3), 255, np.uint8)
    keyed[10:20, 10:30] = (180, 90, 120)  # the cell on a white background declared transparent
    Image.fromarray(keyed).save(tmp_path / "keyed.png", transparency=(255, 255, 255))
    decoded = np.asarray(open_rgb(tmp_path / "keyed.png"))
    assert decoded[0, 0].tolist() == [0, 0, 0] and decoded[15, 15].tolist() == [180, 90, 120]


def test_a_16_bit_picture_decodes_with_one_float_copy_of_it():
    """A 4096 px 16-bit TIFF fits under the 10 MB upload limit; its float copies are what cost."""
    import tracemalloc

    side = 2048
    ramp = (np.arange(side * side, dtype=np.uint32) % 65536).astype(np.uint16).reshape(side, side)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="TIFF", compression="tiff_deflate")
    tracemalloc.start()
    try:
        decoded = open_rgb(buffer.getvalue())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_float_copy = side * side * 8
    assert decoded.size == (side, side) and peak < 2 * one_float_copy, f"{peak / 2**20:.0f} MiB"


def test_grad_cam_equals_closed_form_cam_up_to_scale():
    torch.manual_seed(0)
    model = MalariaVGG(ModelConfig(input_size=64, trunk_stride=8)).eval()
    inputs = torch.randn(3, 3, 64, 64)
    gradient_maps = grad_cam(model, inputs, PARASITIZED)
    with torch.inference_mode():
        closed_form = cam_from_features(model, model.forward_features(inputs), PARASITIZED)
    assert gradient_maps.shape == closed_form.shape == (3, 8, 8)
    assert gradient_maps.max() > 0
    torch.testing.assert_close(gradient_maps, closed_form, atol=1e-5, rtol=1e-4)


def with_metadata(path: Path, out: Path, **changes) -> Path:
    """A copy of the model file at ``path`` with metadata entries changed; ``config_<key>`` changes
    one key of its config."""
    with safe_open(path, "pt") as stored:
        metadata, tensors = stored.metadata(), {name: stored.get_tensor(name) for name in stored.keys()}  # noqa: SIM118 - not a dict
    config = json.loads(metadata["config"]) | {
        k.removeprefix("config_"): v for k, v in changes.items() if k.startswith("config_")
    }
    metadata = {"config": json.dumps(config)} | {k: v for k, v in (metadata | changes).items() if "config" not in k}
    save_file(tensors, str(out), metadata=metadata | ({"config": changes["config"]} if "config" in changes else {}))
    return out


@pytest.mark.parametrize(
    ("changes", "refusal"),
    [
        # Its P(Uninfected) would be read as P(Parasitized), and its heatmap drawn for the wrong class.
        ({"config_class_names": ["Uninfected", "Parasitized"]}, "class_names must be"),
        # No probability is >= NaN: every cell would be called Uninfected, and nothing would say why.
        ({"threshold": "nan"}, "threshold must lie between 0 and 1"),
        ({"threshold": "1.5"}, "threshold must lie between 0 and 1"),
        ({"config": "[]"}, "a model config is a JSON object"),
        ({"config_input_size": 0}, "input_size must be a positive multiple"),
        ({"config_std": [0.2, 0.0, 0.2]}, "std must be above 0"),
        ({"config_mean": [0.5, 0.5]}, "mean must be three finite numbers"),
        # Every result records it: one the results cannot hold failed each cell, after three tries.
        ({"version": "v" * 101}, "version must be 1 to 100 printable characters"),
        ({"version": ""}, "version must be 1 to 100 printable characters"),
    ],
    ids=[
        "classes-swapped",
        "threshold-nan",
        "threshold-above-1",
        "config-not-an-object",
        "input-size-0",
        "std-0",
        "mean-short",
        "version-too-long",
        "version-empty",
    ],
)
def test_a_model_file_that_would_mislabel_cells_is_refused(tmp_path, changes, refusal):
    path = with_metadata(tiny_weights(tmp_path / "model.safetensors"), tmp_path / "changed.safetensors", **changes)
    with pytest.raises(ValueError, match=refusal):
        Predictor(path)


def test_a_model_file_with_weights_that_are_not_numbers_is_refused(tmp_path):
    """NaN weights give NaN probabilities, and no NaN is >= the threshold: the file loaded, and the
    worker and ml.evaluate called every cell Uninfected."""
    path = tiny_weights(tmp_path / "model.safetensors")
    with safe_open(path, "pt") as stored:
        metadata, tensors = stored.metadata(), {name: stored.get_tensor(name) for name in stored.keys()}  # noqa: SIM118 - not a dict
    tensors["classifier.weight"][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="not finite numbers .* such as classifier.weight"):
        Predictor(tmp_path / "nan.safetensors")


@pytest.mark.parametrize("arch", ["vgg19", "vgg19_bn"])
def test_the_trunk_is_torchvisions_layer_for_layer(arch):
    """So torchvision's ImageNet weights load into it by name (--init imagenet)."""
    from torchvision import models

    ours = MalariaVGG(ModelConfig(arch=arch, input_size=32, trunk_stride=32)).features
    theirs = getattr(models, arch)(weights=None).features
    assert str(ours) == str(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_heatmap_grid_is_at_least_8x8_for_the_shipped_config():
    assert ModelConfig().heatmap_size >= MIN_HEATMAP_GRID == 8
    assert read_info(DEFAULT_WEIGHTS).config.heatmap_size >= 8


def test_the_train_example_keeps_the_test_patients_out_and_the_shipped_model_whole():
    """``ml.train --help`` began by training on the whole shared folder, the held-out test patients
    included, over ml/weights/malaria_vgg19.safetensors."""
    from ml import train

    assert "--data /tmp/malaria-split/train" in train.__doc__ and "--out ml/weights/" not in train.__doc__


def test_the_model_cards_references_to_the_code_name_what_is_there():
    """It sent readers to ml.preprocessing.standardise_stain, which is in ml.tensors."""
    card = (ROOT / "ml" / "MODEL_CARD.md").read_text()
    references = re.findall(r"`(ml(?:\.\w+)+)\.(\w+)`", card)
    assert references
    for module, name in references:
        assert hasattr(importlib.import_module(module), name), f"{module}.{name}"


def test_overlay_has_the_original_size():
    original = np.zeros((70, 90, 3), dtype=np.uint8)
    overlay = render_overlay(original, np.random.default_rng(0).random((8, 8)).astype(np.float32))
    assert overlay.shape == (70, 90, 3) and overlay.dtype == np.uint8 and overlay.any()


def test_weights_round_trip_without_pickle(tmp_path):
    path = tiny_weights(tmp_path / "w.safetensors", threshold=0.4)
    with open(path, "rb") as handle:
        assert b"\x80\x04" not in handle.read(16)  # not a pickle stream
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["config"])["input_size"] == 32
    model, info = load_model(path)
    assert info.version == "test-tiny" and info.threshold == 0.4
    assert not model.training


def test_missing_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(WeightsNotFound, match="ml.train"):
        load_model(tmp_path / "absent.safetensors")


def test_predictor_batches_match_single_predictions(tmp_path):
    predictor = Predictor(tiny_weights(tmp_path / "w.safetensors"), batch_size=2, bf16=False)
    images = [open_rgb(p) for p in sorted(FIXTURE_CELLS.glob("*/*.png"))]
    together = predictor.predict(images)
    alone = [predictor.predict([image])[0] for image in images]
    for a, b in zip(together, alone, strict=True):
        assert a.label == b.label and a.probability_parasitized == pytest.approx(b.probability_parasitized, abs=1e-5)
        assert a.heatmap.shape == (4, 4)


def run_module(*args: str) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` run in this process, which has torch imported already (a new
    process takes seconds to import it): its exit status and what it printed."""
    module, *argv = args
    stdout, stderr = io.StringIO(), io.StringIO()
    status = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            importlib.import_module(module).main(argv)
        except SystemExit as exit_:
            if isinstance(exit_.code, str):  # what the interpreter does with SystemExit("message")
                print(exit_.code, file=sys.stderr)
            status = 1 if isinstance(exit_.code, str) else exit_.code or 0
    return subprocess.CompletedProcess(args, status, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(scope="module")
def training_cells(tmp_path_factory) -> Path:
    """The fixture cells' four patients, each with a cell of either class, so that every split by
    patient has both classes on both sides (validation needs both to choose an epoch and a threshold)."""
    folder = tmp_path_factory.mktemp("training-cells")
    for label, name in enumerate(("Parasitized", "Uninfected")):
        (folder / name).mkdir()
        cells = sorted((FIXTURE_CELLS / name).glob("*.png"))
        for k, path in enumerate(sorted(FIXTURE_CELLS.glob("*/*.png"))):
            cell = f"{patient_group(path.name)}_IMG_20150101_000000_cell_{label}{k}.png"
            shutil.copy(cells[k % len(cells)], folder / name / cell)
    return folder


def train_on_fixture_cells(data: Path, out: Path, *options: str, bf16: bool = False) -> subprocess.CompletedProcess:
    """One quick epoch of ``ml.train`` at 64 px (the least an 8x8 heatmap grid allows), half of the
    patients for validation; in fp32 unless asked (bf16 is slow on a CPU without it)."""
    common = ["--epochs", "1", "--batch-size", "2", "--input-size", "64", "--val-fraction", "0.5"]
    common += [] if bf16 else ["--no-bf16"]
    return run_module("ml.train", "--data", str(data), "--out", str(out), *common, *options)


def test_cells_filed_in_sub_folders_are_refused_not_left_out(tmp_path):
    """A lab filing cells per patient (Parasitized/<patient>/cell.png) got figures on the others
    only, with nothing said."""
    data = tmp_path / "cells"
    shutil.copytree(FIXTURE_CELLS, data)
    nested = data / "Parasitized" / "C1P1thinF"
    nested.mkdir()
    shutil.copy(next((FIXTURE_CELLS / "Parasitized").glob("*.png")), nested / "C1P1thinF_IMG_2015_cell_1.png")
    (data / "Uninfected" / ".thumbnails").mkdir()  # hidden folders are no cells'
    (data / "Uninfected" / ".thumbnails" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="C1P1thinF holds cells in a sub-folder of its class folder"):
        list_samples(data)
    shutil.rmtree(nested)
    assert len(list_samples(data)) == 4


def test_a_split_of_files_that_name_no_patient_is_refused(tmp_path):
    """Each such name was a patient group of its own: a split by image, with one slide's cells on
    both sides (the data set's README: 3-4 points of accuracy that do not exist)."""
    samples = [Sample(Path(f"slide{slide}_cell_{k}.png"), k % 2) for slide in "ABC" for k in range(4)]
    with pytest.raises(ValueError, match=r"12 file names do not name their patient group .* e.g. slideA_cell_0.png"):
        split_by_patient(samples, holdout_fraction=0.3, seed=1)


def test_training_options_that_would_be_ignored_are_refused(tmp_path, training_cells):
    out = tmp_path / "m.safetensors"
    weights = train_on_fixture_cells(training_cells, out, "--backbone-weights", str(tmp_path / "vgg19.pth"))
    assert weights.returncode != 0 and "--backbone-weights is read by --init imagenet only" in weights.stderr
    both = train_on_fixture_cells(training_cells, out, "--init", "imagenet", "--init-from", str(tmp_path / "m0"))
    assert both.returncode != 0 and "give one of them" in both.stderr
    assert not out.exists()


def test_evaluate_passes_over_hidden_files_and_stops_at_an_unreadable_cell_naming_it(tmp_path):
    data = tmp_path / "cells"
    shutil.copytree(FIXTURE_CELLS, data)
    (data / "Parasitized" / "._C137P98ThinF_IMG_20151005_160256_cell_67.png").write_bytes(b"\0\5\26\7AppleDouble")
    assert len(list_samples(data)) == 4, "a macOS twin is no cell, nor its own patient group"
    evaluated = run_module("ml.evaluate", "--data", str(data), "--json", "--bootstrap", "0")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["n"] == 4
    broken = data / "Uninfected" / "C1P1_IMG_20150101_000000_cell_1.png"
    broken.write_bytes(b"\x89PNG truncated in the copy")
    refused = run_module("ml.evaluate", "--data", str(data), "--json", "--bootstrap", "0")
    assert refused.returncode == 1 and refused.stdout == "", "no figures that leave a cell out"
    assert f"ml.evaluate: {broken}: cannot decode image" in refused.stderr


@pytest.mark.slow
def test_train_then_evaluate_cli_on_fixture_cells(tmp_path, training_cells, monkeypatch):
    out = tmp_path / "model.safetensors"
    trained = train_on_fixture_cells(training_cells, out, bf16=True)
    assert trained.returncode == 0, trained.stderr
    assert "validation" in trained.stdout and out.is_file() and out.with_suffix(".ckpt").is_file()
    resumed = train_on_fixture_cells(training_cells, out, "--resume", bf16=True)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout
    for changed, name in ((("--batch-size", "4"), "batch_size"), (("--min-sensitivity", "0.5"), "min_sensitivity")):
        other = train_on_fixture_cells(training_cells, out, "--resume", *changed, bf16=True)
        assert other.returncode != 0 and f"other settings or data ({name})" in other.stderr
    nothing_to_resume = train_on_fixture_cells(training_cells, tmp_path / "new.safetensors", "--resume")
    assert nothing_to_resume.returncode != 0 and "there is no checkpoint" in nothing_to_resume.stderr
    # The checkpoint knows its cells by name and class, not by the path --data gave them.
    elsewhere = tmp_path / "same-cells"
    elsewhere.symlink_to(training_cells, target_is_directory=True)
    found_elsewhere = train_on_fixture_cells(elsewhere, out, "--resume", bf16=True)
    assert found_elsewhere.returncode == 0 and "resumed from" in found_elsewhere.stdout, found_elsewhere.stderr
    relabelled = tmp_path / "relabelled"  # a cell moved to the other class after an audit
    shutil.copytree(training_cells, relabelled)
    moved = next((relabelled / "Uninfected").glob("*.png"))
    moved.rename(relabelled / "Parasitized" / moved.name)
    refused = train_on_fixture_cells(relabelled, out, "--resume", bf16=True)
    assert refused.returncode != 0 and "other settings or data (cells)" in refused.stderr
    checkpoint = out.with_suffix(".ckpt")  # as an earlier ml.train wrote it: the data by its path
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    saved["progress"]["recipe"] = {k: v for k, v in saved["progress"]["recipe"].items() if k != "cells"}
    torch.save(
        saved | {"progress": saved["progress"] | {"recipe": saved["progress"]["recipe"] | {"data": "x"}}}, checkpoint
    )
    earlier = train_on_fixture_cells(training_cells, out, "--resume", bf16=True)
    assert earlier.returncode != 0 and "is from an earlier ml.train" in earlier.stderr

    # The epoch and threshold were chosen on the figures the worker's predictor gets from the file.
    info = read_info(out)
    validation = [s for s in list_samples(training_cells) if s.patient_group in info.metrics["validation_groups"]]
    scores = np.array(
        [p.probability_parasitized for p in Predictor(out).predict([open_rgb(s.path) for s in validation])]
    )
    positives = np.array([s.label == PARASITIZED for s in validation])
    assert info.metrics["validation"]["n"] == len(validation) == 4
    assert screening_metrics(scores, positives, info.threshold)["ece"] == pytest.approx(
        info.metrics["validation"]["ece"], abs=1e-6
    )
    assert choose_threshold(scores, positives) == info.threshold

    evaluated = run_module(
        "ml.evaluate",
        "--data",
        str(FIXTURE_CELLS),
        "--weights",
        str(out),
        "--json",
        "--save-overlays",
        str(tmp_path / "examples"),
        "--overlays-per-class",
        "1",
    )
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["n"] == 4 and report["model_version"] == info.version
    for key in ("accuracy", "sensitivity", "specificity", "auc", "images_per_second"):
        assert key in report
    low, high = report["ci95"]["accuracy"]
    assert 0 <= low <= report["accuracy"] <= high <= 1
    examples = sorted((tmp_path / "examples").glob("*.png"))
    assert [e.name.split("-called-")[0] for e in examples] == ["parasitized", "uninfected"]

    # The validation patients as a folder of their own: what the borderline band was judged on.
    validation_folder = tmp_path / "validation-split"
    split = run_module(
        "ml.split", "--data", str(training_cells), "--out", str(validation_folder), "--validation-of", str(out)
    )
    assert split.returncode == 0, split.stderr
    linked = sorted(path.name for path in (validation_folder / "validation").rglob("*.png"))
    assert linked == sorted(s.path.name for s in validation)
    on_validation = run_module(
        "ml.evaluate", "--data", str(validation_folder / "validation"), "--weights", str(out), "--json"
    )
    expected = json.loads(json.dumps(without_nan(borderline_figures(scores, positives, info.threshold))))
    assert json.loads(on_validation.stdout)["borderline"] == expected

    monkeypatch.setenv("MODEL_WEIGHTS", str(out))  # the model the site runs, as the worker reads it
    deployed = run_module("ml.evaluate", "--data", str(FIXTURE_CELLS), "--json", "--bootstrap", "0")
    assert json.loads(deployed.stdout)["model_version"] == info.version
    monkeypatch.delenv("MODEL_WEIGHTS")

    human = run_module("ml.evaluate", "--data", str(FIXTURE_CELLS), "--weights", str(out))
    assert "sensitivity" in human.stdout and "ROC AUC" in human.stdout and "borderline" in human.stdout
    assert "95% CI over patient groups" in human.stdout

    against_itself = run_module(
        "ml.evaluate", "--data", str(FIXTURE_CELLS), "--weights", str(out), "--against", str(out)
    )
    assert "accuracy       " in against_itself.stdout and "this model +0.0000" in against_itself.stdout


@pytest.mark.slow
def test_imagenet_init_freezes_the_trunk_and_trains_the_head(tmp_path, training_cells):
    """The seed's method, with an ImageNet-shaped VGG19 state dict the test writes itself."""
    from torchvision.models import vgg19

    torch.manual_seed(0)
    backbone = vgg19(weights=None).state_dict()
    backbone_file = tmp_path / "vgg19-imagenet.pth"
    torch.save(backbone, backbone_file)
    out = tmp_path / "head.safetensors"
    trained = train_on_fixture_cells(
        training_cells, out, "--init", "imagenet", "--backbone-weights", str(backbone_file), "--input-size", "128"
    )
    assert trained.returncode == 0, trained.stderr
    model, info = load_model(out)
    assert info.config.arch == "vgg19" and info.metrics["init"] == "imagenet"
    trunk = {k.removeprefix("features."): v for k, v in model.state_dict().items() if k.startswith("features.")}
    for name, tensor in trunk.items():  # frozen: identical to the backbone (up to fp16 storage)
        torch.testing.assert_close(tensor, backbone[f"features.{name}"].half().float())


@pytest.mark.slow
def test_init_from_continues_an_earlier_model_at_a_larger_input_size(tmp_path, training_cells):
    """Progressive resizing: a second stage starts from the first stage's file at a larger input
    size, and may switch stain standardisation on (batch norm adapts)."""
    earlier = tiny_weights(tmp_path / "stage1.safetensors")
    assert not read_info(earlier).config.stain_standardise
    out = tmp_path / "stage2.safetensors"
    continued = ("--init-from", str(earlier), "--input-size", "96", "--lr", "1e-9", "--stain-standardise")
    trained = train_on_fixture_cells(training_cells, out, *continued)
    assert trained.returncode == 0, trained.stderr
    assert "starting from test-tiny at 96px" in trained.stdout
    model, info = load_model(out)
    assert info.config.input_size == 96 and info.config.trunk_stride == 8 and info.config.stain_standardise
    assert info.metrics["init_from"] == "test-tiny"
    start, _ = load_model(earlier)
    convolutions = [k for k, v in start.state_dict().items() if k.startswith("features.") and v.dim() == 4]
    for name in convolutions:  # a 1e-9 learning rate leaves the earlier convolutions in place
        torch.testing.assert_close(model.state_dict()[name], start.state_dict()[name])

    restrided = train_on_fixture_cells(
        training_cells, tmp_path / "restrided.safetensors", "--init-from", str(earlier), "--trunk-stride", "16"
    )
    assert restrided.returncode != 0 and "trunk stride" in restrided.stderr


def test_imagenet_init_without_weights_explains(tmp_path, training_cells):
    absent = str(tmp_path / "absent.pth")
    result = train_on_fixture_cells(
        training_cells, tmp_path / "x.safetensors", "--init", "imagenet", "--backbone-weights", absent
    )
    assert result.returncode != 0 and "--backbone-weights" in result.stderr


@pytest.mark.slow
def test_stain_standardised_recipe_is_recorded_in_the_model_file(tmp_path, training_cells):
    out = tmp_path / "stain.safetensors"
    trained = train_on_fixture_cells(training_cells, out, "--stain-standardise", "--label-smoothing", "0.1")
    assert trained.returncode == 0, trained.stderr
    assert load_model(out)[1].config.stain_standardise


# Two epochs of two steps each (six training cells, three at a time), a quarter of the patients
# (two cells, one of either class) for validation: shared by the recipe options' tests.
SHORT_RUN = ("--epochs", "2", "--batch-size", "3", "--val-fraction", "0.25", "--seed", "5")


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, training_cells) -> Path:
    out = tmp_path_factory.mktemp("plain-run") / "plain.safetensors"
    trained = train_on_fixture_cells(training_cells, out, *SHORT_RUN)
    assert trained.returncode == 0, trained.stderr
    return out


@pytest.mark.slow
def test_mixup_trains_on_blended_cells_and_is_recorded(tmp_path, training_cells, plain_run):
    mixed = tmp_path / "mixed.safetensors"
    trained = train_on_fixture_cells(training_cells, mixed, *SHORT_RUN, "--mixup", "0.4")
    assert trained.returncode == 0, trained.stderr
    assert read_info(mixed).metrics["mixup_alpha"] == 0.4 and read_info(plain_run).metrics["mixup_alpha"] is None
    # Same seed, cells and order: only the blending can make the weights differ.
    plain_state, mixed_state = load_model(plain_run)[0].state_dict(), load_model(mixed)[0].state_dict()
    assert any(not torch.equal(plain_state[k], mixed_state[k]) for k in plain_state)
    refused = train_on_fixture_cells(training_cells, tmp_path / "bad.safetensors", "--mixup", "0")
    assert refused.returncode != 0 and "alpha must be above 0" in refused.stderr


@pytest.mark.slow
def test_ema_exports_the_weight_average_and_resumes_with_it(tmp_path, training_cells, plain_run):
    """With a decay this close to 1 the average barely moves after its first update, so the exported
    weights must differ from the same seed's run without it, which takes more steps."""
    averaged = tmp_path / "ema.safetensors"
    trained = train_on_fixture_cells(training_cells, averaged, *SHORT_RUN, "--ema", "0.999999")
    assert trained.returncode == 0, trained.stderr
    plain_model, plain_info = load_model(plain_run)
    ema_model, ema_info = load_model(averaged)
    assert plain_info.metrics["ema_decay"] is None and ema_info.metrics["ema_decay"] == 0.999999
    plain_state, ema_state = plain_model.state_dict(), ema_model.state_dict()
    assert plain_state.keys() == ema_state.keys()
    assert any(not torch.equal(plain_state[k], ema_state[k]) for k in plain_state)

    checkpoint = torch.load(averaged.with_suffix(".ckpt"), map_location="cpu", weights_only=True, mmap=True)
    assert "average" in checkpoint
    resumed = train_on_fixture_cells(training_cells, averaged, *SHORT_RUN, "--ema", "0.999999", "--resume")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr


def test_refit_trains_on_validation_patients_too_and_keeps_the_validation_runs_threshold(
    tmp_path, training_cells, plain_run
):
    chosen = read_info(plain_run)
    refit = tmp_path / "refit.safetensors"
    trained = train_on_fixture_cells(training_cells, refit, *SHORT_RUN, "--refit", str(plain_run))
    assert trained.returncode == 0, trained.stderr
    assert "validation: 0 images" in trained.stdout
    info = read_info(refit)
    assert info.version != chosen.version
    assert info.threshold == chosen.threshold
    assert info.metrics["refit_of"] == chosen.version
    assert info.metrics["train_images"] == len(list_samples(training_cells))
    assert info.metrics["validation"] == chosen.metrics["validation"]
    assert info.metrics["validation_groups"] == chosen.metrics["validation_groups"]
    # The same two-epoch schedule, stopped where the validation run chose its weights.
    assert info.metrics["epoch"] == chosen.metrics["epoch"] and info.metrics["recipe"]["epochs"] == 2

    def refused(*options: str) -> str:
        result = train_on_fixture_cells(training_cells, tmp_path / "x.safetensors", "--refit", str(plain_run), *options)
        assert result.returncode != 0 and not (tmp_path / "x.safetensors").exists()
        return result.stderr

    assert "with --epochs 2" in refused("--batch-size", "3", "--seed", "5")
    assert "without --mixup" in refused(*SHORT_RUN, "--mixup", "0.2")
    assert "input_size=64" in refused(*SHORT_RUN, "--input-size", "96")
    assert "without --limit" in refused(*SHORT_RUN, "--limit", "7")


@pytest.mark.slow
def test_exclude_leaves_listed_cells_out_of_training_but_never_out_of_validation(tmp_path, training_cells):
    from ml.train import excluded_file_names

    train_side, val_side = split_by_patient(list_samples(training_cells), holdout_fraction=0.5, seed=20261125)
    listed = [train_side[0].path.name, val_side[0].path.name]
    audit_report = tmp_path / "audit.json"  # the shape ml.audit --json writes
    audit_report.write_text(json.dumps({"cells": [{"file": name, "label": "?", "scores": []} for name in listed]}))
    plain_list = tmp_path / "recheck.txt"
    plain_list.write_text(f"# cells to re-check\n{listed[0]}\n\n{listed[1]}  # on the validation side\n")
    assert excluded_file_names(str(plain_list)) == excluded_file_names(str(audit_report)) == set(listed)

    out = tmp_path / "model.safetensors"
    trained = train_on_fixture_cells(training_cells, out, "--exclude", str(audit_report))
    assert trained.returncode == 0, trained.stderr
    assert f"left 1 of {len(train_side)} training cells out" in trained.stdout
    metrics = load_model(out)[1].metrics
    assert metrics["excluded_from_training"] == 1
    assert metrics["train_images"] == len(train_side) - 1
    assert metrics["validation_images"] == len(val_side)

    not_a_report = tmp_path / "other.json"
    not_a_report.write_text(json.dumps([listed[0]]))
    refused = train_on_fixture_cells(training_cells, tmp_path / "x.safetensors", "--exclude", str(not_a_report))
    assert refused.returncode != 0 and "not an ml.audit --json report" in refused.stderr


def test_split_of_a_folder_without_cells_says_so(tmp_path):
    """It said no patient was wholly among the groups drawn, and to try another --seed."""
    empty = tmp_path / "empty"
    for name in ("Parasitized", "Uninfected"):
        (empty / name).mkdir(parents=True)
    result = run_module("ml.split", "--data", str(empty), "--out", str(tmp_path / "split"))
    assert result.returncode == 1 and result.stderr == f"ml.split: no images found under {empty}\n"


def test_split_refuses_the_validation_cells_of_a_refit_it_was_trained_on(tmp_path):
    """A --refit file keeps its first run's validation_groups but trained on them: ml.split wrote
    them out as the patients it was validated on, and ml.evaluate scored it on its training cells."""
    groups = sorted({patient_group(p.name) for p in FIXTURE_CELLS.glob("*/*.png")})
    torch.manual_seed(0)
    model = MalariaVGG(ModelConfig(input_size=32, trunk_stride=8))
    metrics = {"validation_groups": groups, "refit_of": "vgg19_bn-64px-earlier", "validation_images": 4}
    refit = tmp_path / "refit.safetensors"
    save_model(model, refit, info=ModelInfo(config=model.config, version="refit", metrics=metrics))
    out = tmp_path / "validation"
    result = run_module("ml.split", "--data", str(FIXTURE_CELLS), "--out", str(out), "--validation-of", str(refit))
    assert result.returncode != 0 and "is a --refit of vgg19_bn-64px-earlier" in result.stderr
    assert not list(out.glob("validation/*/*"))


def test_exclude_from_an_audit_of_the_originals_applies_to_their_compact_copy(tmp_path, training_cells, monkeypatch):
    """An audit of the PNG originals names .png files; --exclude matched the .webp copy's cells by
    the whole name, left none out, said 'left 0 of 4' and trained on: the listed labels stayed in.
    A list of another folder's cells was taken as quietly."""
    from ml import train

    copy = tmp_path / "cells-64"  # what ml.compact writes: the same stems, as .webp
    for cell in training_cells.glob("*/*.png"):
        (copy / cell.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(cell, copy / cell.parent.name / f"{cell.stem}.webp")
    listed = sorted(p.name for p in training_cells.glob("Parasitized/*.png"))
    audit_report = tmp_path / "audit.json"
    audit_report.write_text(json.dumps({"cells": [{"file": name, "label": "Parasitized"} for name in listed]}))

    def stop(*args, **kwargs):
        raise SystemExit("stopped before training")

    monkeypatch.setattr(train, "load_arrays", stop)
    result = train_on_fixture_cells(copy, tmp_path / "m.safetensors", "--exclude", str(audit_report))
    assert "left 2 of 4 training cells out" in result.stdout, result.stderr

    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("C9P9thinF_IMG_1_cell_1.png\n")
    refused = train_on_fixture_cells(copy, tmp_path / "m.safetensors", "--exclude", str(elsewhere))
    assert refused.returncode != 0 and "none of the 1 cells" in refused.stderr


def test_train_refuses_a_heatmap_grid_coarser_than_8x8(tmp_path, training_cells):
    out = tmp_path / "coarse.safetensors"
    coarse = train_on_fixture_cells(training_cells, out, "--trunk-stride", "32")  # 64 px: a 2x2 grid
    assert coarse.returncode != 0 and "2x2 heatmap grid, coarser than 8x8" in coarse.stderr
    assert "give --input-size 256 or more" in coarse.stderr and not out.exists()


def test_train_without_resume_keeps_an_existing_checkpoint(tmp_path, training_cells):
    """An interrupted run of hours restarted without --resume trained afresh over its checkpoint."""
    out = tmp_path / "model.safetensors"
    out.with_suffix(".ckpt").write_bytes(b"hours of training")
    again = train_on_fixture_cells(training_cells, out)
    assert again.returncode != 0 and "add --resume to continue it, or remove it" in again.stderr
    assert out.with_suffix(".ckpt").read_bytes() == b"hours of training" and not out.exists()


@pytest.mark.parametrize("checkpoint", [b"not a checkpoint", "foreign"], ids=["garbage", "another-programs-file"])
def test_resume_from_a_checkpoint_it_cannot_read_says_so_in_a_line(tmp_path, training_cells, checkpoint):
    """Torch's unpickling error or a KeyError came out as a traceback."""
    out = tmp_path / "model.safetensors"
    if checkpoint == "foreign":
        torch.save({"state_dict": {}}, out.with_suffix(".ckpt"))
    else:
        out.with_suffix(".ckpt").write_bytes(checkpoint)
    resumed = train_on_fixture_cells(training_cells, out, "--resume")
    assert resumed.returncode != 0 and "--resume: " in resumed.stderr and "is not a checkpoint" in resumed.stderr
    assert not out.exists()


def test_a_finished_run_does_not_stop_the_next_one_to_the_same_file(tmp_path, training_cells, monkeypatch):
    """The checkpoint is written after every epoch, the last too: a run after a finished one (new
    cells, another recipe) was refused as if the first had been interrupted."""
    from ml import train

    monkeypatch.setattr(train, "train_one_epoch", lambda *args, **kwargs: None)  # nothing to learn here
    out = tmp_path / "model.safetensors"
    assert train_on_fixture_cells(training_cells, out).returncode == 0
    again = train_on_fixture_cells(training_cells, out)
    assert again.returncode == 0 and "wrote" in again.stdout, again.stderr


def test_a_run_whose_validation_scores_are_nan_writes_no_model(tmp_path, training_cells, monkeypatch):
    """NaN weights (a learning rate too high, an fp16 overflow) scored an AUC of 0.0, which beat
    the starting -1: the model was written with exit status 0, and labelled every cell Uninfected."""
    from ml import train

    def diverged(model, *args, **kwargs):
        with torch.no_grad():
            model.classifier.weight.fill_(float("nan"))

    monkeypatch.setattr(train, "train_one_epoch", diverged)
    out = tmp_path / "model.safetensors"
    result = train_on_fixture_cells(training_cells, out)
    assert result.returncode != 0 and "validation scores are NaN" in result.stderr and not out.exists()


def test_the_tools_report_an_ordinary_mistake_in_a_line_not_a_traceback(tmp_path):
    weights = str(tiny_weights(tmp_path / "w.safetensors"))
    nested = tmp_path / "cells"
    shutil.copytree(FIXTURE_CELLS, nested)
    (nested / "Parasitized" / "C1P1thinF").mkdir()
    shutil.copy(next((FIXTURE_CELLS / "Parasitized").glob("*.png")), nested / "Parasitized" / "C1P1thinF" / "a.png")
    unnamed = tmp_path / "lab"  # a lab's own file names, which name no patient
    for name in ("Parasitized", "Uninfected"):
        (unnamed / name).mkdir(parents=True)
        for k, cell in enumerate(sorted((FIXTURE_CELLS / name).glob("*.png"))):
            shutil.copy(cell, unnamed / name / f"{name.lower()}_{k}.png")
    cases = [
        (["ml.evaluate", "--data", str(nested), "--weights", weights], "sub-folder"),
        (["ml.evaluate", "--data", str(tmp_path), "--weights", weights], "must contain the folders"),
        (["ml.evaluate", "--data", str(FIXTURE_CELLS), "--weights", str(tmp_path / "none")], "weights not found"),
        (["ml.split", "--data", str(nested), "--out", str(tmp_path / "split")], "sub-folder"),
        (["ml.split", "--data", str(unnamed), "--out", str(tmp_path / "split")], "do not name their patient"),
        (["ml.train", "--data", str(nested), "--out", str(tmp_path / "m.safetensors")], "sub-folder"),
        (["ml.train", "--data", str(unnamed), "--out", str(tmp_path / "m.safetensors")], "do not name their patient"),
    ]
    model_file = ["ml.train", "--data", str(FIXTURE_CELLS), "--out", str(tmp_path / "m.safetensors")]
    other_trunk = tmp_path / "resnet.safetensors"  # another network's ImageNet file, given by mistake
    save_file({"features.0.weight": torch.zeros(64, 3, 7, 7)}, str(other_trunk))
    a_cell = next((FIXTURE_CELLS / "Parasitized").glob("*.png"))
    cases += [
        ([*model_file, "--exclude", str(tmp_path / "no-such-list.txt")], "--exclude: "),
        ([*model_file, "--init-from", str(tmp_path / "none")], "weights not found"),
        ([*model_file, "--init-from", str(a_cell)], "is not a usable weights file"),
        ([*model_file, "--refit", str(tmp_path / "none")], "weights not found"),
        ([*model_file, "--input-size", "50"], "positive multiple of trunk_stride"),
        ([*model_file, "--init", "imagenet", "--backbone-weights", str(other_trunk)], "not torchvision's VGG19"),
    ]
    for argv, expected in cases:
        result = run_module(*argv)
        assert result.returncode == 1 and result.stdout == "", argv
        assert result.stderr.startswith(f"{argv[0]}: ") and expected in result.stderr, (argv, result.stderr)
        assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    ("argv", "refusal"),
    [
        (["ml.train", "--epochs", "0"], "--epochs: 0: give 1 or more"),
        (["ml.train", "--batch-size", "0"], "--batch-size: 0: give 1 or more"),
        (["ml.train", "--checkpoint-every", "-1"], "--checkpoint-every: -1: give 1 or more"),
        (["ml.train", "--min-sensitivity", "1.5"], "give a sensitivity above 0 and at most 1"),
        (["ml.train", "--min-sensitivity", "0"], "give a sensitivity above 0 and at most 1"),
        (["ml.bench", "--images", "0"], "--images: 0: give 1 or more"),
        (["ml.bench", "--batch-size", "0"], "--batch-size: 0: give 1 or more"),
        (["ml.train", "--threads", "0"], "--threads: 0: give 1 or more"),
        (["ml.train", "--limit", "-3"], "--limit: -3: give 1 or more"),
        (["ml.bench", "--threads", "0"], "--threads: 0: give 1 or more"),
        (["ml.compact", "--size", "0"], "--size: 0: give 1 or more"),
        (["ml.compact", "--workers", "0"], "--workers: 0: give 1 or more"),
        (["ml.compact", "--quality", "150"], "give a quality from 0 to 100"),
        (["ml.audit", "--cut", "nan"], "give a probability between 0 and 1"),
        (["ml.audit", "--cut", "1.5"], "give a probability between 0 and 1"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_counts_and_shares_out_of_range_are_refused_by_name(tmp_path, argv, refusal):
    """--epochs 0 exited 0 without a model, a --batch-size or --images of 0 divided by zero, a
    cut or a sensitivity outside 0..1 went through, --threads 0 was torch's RuntimeError, and
    ml.compact's --quality 150 libwebp's error for every cell."""
    module, *options = argv
    required = {
        "ml.train": ["--data", str(FIXTURE_CELLS), "--out", str(tmp_path / "m.safetensors")],
        "ml.bench": [],
        "ml.audit": ["--data", str(FIXTURE_CELLS), "--weights", "a", "b"],
        "ml.compact": ["--data", str(FIXTURE_CELLS), "--out", str(tmp_path / "copy"), "--size", "64"],
    }[module]
    result = run_module(module, *required, *options)
    assert result.returncode == 2 and refusal in result.stderr, result.stderr
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "copy").exists()


def test_a_weights_file_whose_tensors_do_not_fit_its_config_is_a_line_not_a_traceback(tmp_path):
    """A file whose config names another arch raised torch's RuntimeError out of load_state_dict,
    listing every key, in ml.evaluate, ml.bench and ml.audit; ml.audit did so for a missing file too."""
    weights = str(tiny_weights(tmp_path / "w.safetensors"))
    other_arch = str(with_metadata(Path(weights), tmp_path / "arch.safetensors", config_arch="vgg19"))
    with pytest.raises(ValueError, match="its tensors do not fit its config .arch vgg19.: 108 missing"):
        load_model(other_arch)
    for argv, refusal in [
        (["ml.evaluate", "--data", str(FIXTURE_CELLS), "--weights", other_arch, "--bootstrap", "0"], "do not fit"),
        (["ml.bench", "--weights", other_arch, "--images", "2", "--threads", "1"], "do not fit"),
        (["ml.audit", "--data", str(FIXTURE_CELLS), "--weights", other_arch, weights], "do not fit"),
        (["ml.audit", "--data", str(FIXTURE_CELLS), "--weights", str(tmp_path / "none"), weights], "not found"),
    ]:
        result = run_module(*argv)
        assert result.returncode == 1 and result.stderr.startswith(f"{argv[0]}: ") and refusal in result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr


def test_evaluate_says_when_its_intervals_resample_cells_not_patients(tmp_path):
    """A lab's file names without _IMG_ make each cell its own patient group: the intervals came out
    far too narrow, printed as intervals over patient groups."""
    unnamed = tmp_path / "lab"
    for name in ("Parasitized", "Uninfected"):
        (unnamed / name).mkdir(parents=True)
        for k, cell in enumerate(sorted((FIXTURE_CELLS / name).glob("*.png"))):
            shutil.copy(cell, unnamed / name / f"{name.lower()}_{k}.png")
    weights = str(tiny_weights(tmp_path / "w.safetensors"))
    result = run_module("ml.evaluate", "--data", str(unnamed), "--weights", weights, "--json", "--bootstrap", "20")
    assert result.returncode == 0 and "ci95" in json.loads(result.stdout)
    assert "4 of 4 file names do not name their patient group" in result.stderr
    named = run_module("ml.evaluate", "--data", str(FIXTURE_CELLS), "--weights", weights, "--bootstrap", "20")
    assert "do not name" not in named.stderr
    negative = run_module("ml.evaluate", "--data", str(FIXTURE_CELLS), "--weights", weights, "--bootstrap", "-1")
    assert negative.returncode == 2 and "--bootstrap -1: give a number of resamples" in negative.stderr


def test_evaluate_on_cells_of_one_class_or_one_patient_says_what_it_cannot_work_out(tmp_path):
    """A lab's first reviewed cells, all of one label and one patient: numpy's "All-NaN slice"
    warnings came first, then an interval of 1.0000-1.0000 over a single patient group."""
    one_patient = tmp_path / "reviewed"
    (one_patient / "Uninfected").mkdir(parents=True)
    (one_patient / "Parasitized").mkdir()
    for k, cell in enumerate(sorted((FIXTURE_CELLS / "Parasitized").glob("*.png"))):
        shutil.copy(cell, one_patient / "Parasitized" / f"WARD-7_IMG_{k}.png")
    weights = str(tiny_weights(tmp_path / "w.safetensors"))
    result = run_module("ml.evaluate", "--data", str(one_patient), "--weights", weights, "--json", "--bootstrap", "20")
    assert result.returncode == 0 and "ci95" not in json.loads(result.stdout)
    assert "every cell here is Parasitized" in result.stderr and "need two patient groups" in result.stderr
    assert "RuntimeWarning" not in result.stderr


@pytest.mark.slow
def test_compact_copy_keeps_names_and_groups_at_the_training_size_and_trains(tmp_path, training_cells):
    copy = tmp_path / "cells-64"
    compacted = run_module(
        "ml.compact", "--data", str(training_cells), "--out", str(copy), "--size", "64", "--workers", "1"
    )
    assert compacted.returncode == 0, compacted.stderr
    originals, copies = list_samples(training_cells), list_samples(copy)
    assert [(s.path.stem, s.label) for s in copies] == [(s.path.stem, s.label) for s in originals]
    assert {s.patient_group for s in copies} == {s.patient_group for s in originals}
    for original, small in zip(originals, copies, strict=True):
        assert small.path.suffix == ".webp"
        decoded = np.asarray(open_rgb(small.path), dtype=np.float32)
        expected = square_resize(open_rgb(original.path), 64).astype(np.float32)
        assert decoded.shape == (64, 64, 3) and np.abs(decoded - expected).mean() < 6

    trained = train_on_fixture_cells(copy, tmp_path / "model.safetensors")
    assert trained.returncode == 0, trained.stderr
    assert "decoded 8 images at 64px" in trained.stdout


def test_compact_refuses_a_folder_that_holds_an_earlier_copy(tmp_path):
    """It wrote over and beside what was there: a copy made again after a new split kept the
    earlier split's cells, held-out patients among them."""
    copy = tmp_path / "cells-64"
    (copy / "Parasitized").mkdir(parents=True)
    (copy / "Parasitized" / "C1P1thinF_IMG_1_cell_1.webp").write_bytes(b"an earlier copy")
    result = run_module("ml.compact", "--data", str(FIXTURE_CELLS), "--out", str(copy), "--size", "64")
    assert result.returncode != 0 and "is not empty; give a new folder" in result.stderr
    assert [p.name for p in copy.rglob("*.webp")] == ["C1P1thinF_IMG_1_cell_1.webp"]


def test_training_on_a_missing_gpu_says_so_before_loading_anything(tmp_path, training_cells):
    """Run as ``python -m ml.train`` in a process of its own, as a user would (the other tests run
    the CLIs' main() in this process)."""
    out = tmp_path / "model.safetensors"
    refused = subprocess.run(
        [sys.executable, "-m", "ml.train", "--data", str(training_cells), "--out", str(out), "--device", "cuda"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # as on a machine without one, even where there is one
    )
    assert refused.returncode != 0 and "sees no CUDA GPU" in refused.stderr
    assert not out.exists()


def test_training_refuses_a_split_it_could_not_learn_or_choose_from(tmp_path, training_cells):
    too_few = train_on_fixture_cells(training_cells, tmp_path / "a.safetensors", "--batch-size", "5")
    assert too_few.returncode != 0 and "4 training images, fewer than --batch-size 5" in too_few.stderr
    no_share = train_on_fixture_cells(training_cells, tmp_path / "a.safetensors", "--val-fraction", "0")
    assert no_share.returncode != 0 and "give a fraction between 0 and 1" in no_share.stderr
    # The fixture's own four patients have one cell each: this draw holds out both Uninfected ones.
    one_class = train_on_fixture_cells(FIXTURE_CELLS, tmp_path / "a.safetensors", "--seed", "20261125")
    assert one_class.returncode != 0 and "the validation patients' cells are all Uninfected" in one_class.stderr

    def one_patient(folder: Path, *prefixes: str) -> Path:
        for name in ("Parasitized", "Uninfected"):
            (folder / name).mkdir(parents=True)
            for n, prefix in enumerate(prefixes * 2):
                cell = Image.fromarray(synthetic_cell((180, 120, 140)))
                cell.save(folder / name / f"{prefix}_IMG_20150101_000000_cell_{n}.png")
        return folder

    out = tmp_path / "b.safetensors"
    alone = train_on_fixture_cells(one_patient(tmp_path / "one-group", "C1P1thin"), out)  # its only group is drawn
    assert alone.returncode != 0 and "0 training images, fewer than --batch-size 2" in alone.stderr
    # One patient under two prefixes: the half drawn for validation stays with the other half.
    kept_together = train_on_fixture_cells(
        one_patient(tmp_path / "two-prefixes", "C1P1thinOlympus", "C1P1thinMotic"), out
    )
    assert kept_together.returncode != 0 and "no patient group is left for validation" in kept_together.stderr
    assert not (tmp_path / "a.safetensors").exists() and not out.exists()


def test_shared_mistakes_are_those_every_model_makes_most_confident_first():
    positives = np.array([True, True, False, False, False])
    first = np.array([0.2, 0.9, 0.7, 0.1, 0.95])
    second = np.array([0.4, 0.1, 0.6, 0.8, 0.99])
    assert shared_mistakes([first, second], positives, cut=0.5).tolist() == [4, 0, 2]


def test_audit_cli_lists_and_sheets_the_cells_every_model_gets_wrong(tmp_path):
    one = tiny_weights(tmp_path / "one.safetensors")
    torch.manual_seed(1)
    other = MalariaVGG(ModelConfig(input_size=32, trunk_stride=8, stain_standardise=True))
    save_model(other, tmp_path / "two.safetensors", info=ModelInfo(config=other.config, version="two", threshold=0.5))
    # At a cut of 0 every model says Parasitized, so the shared mistakes are exactly the Uninfected cells.
    result = run_module(
        "ml.audit",
        "--data",
        str(FIXTURE_CELLS),
        "--weights",
        str(one),
        str(tmp_path / "two.safetensors"),
        "--cut",
        "0",
        "--sheets",
        str(tmp_path / "sheets"),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    uninfected = sorted(p.name for p in (FIXTURE_CELLS / "Uninfected").iterdir())
    assert report["errors_per_model"] == [len(uninfected)] * 2
    assert sorted(c["file"] for c in report["cells"]) == uninfected
    assert [p.name for p in (tmp_path / "sheets").iterdir()] == ["labelled-uninfected.png"]
    assert Image.open(tmp_path / "sheets" / "labelled-uninfected.png").size == (8 * 96, 96)

    alone = run_module("ml.audit", "--data", str(FIXTURE_CELLS), "--weights", str(one))
    assert alone.returncode != 0 and "at least two" in alone.stderr


def test_audit_of_a_folder_without_cells_fails_as_evaluate_does(tmp_path):
    """It printed a report of 0 cells and 0 shared mistakes and exited 0, as if the labels were clean."""
    empty = tmp_path / "empty"
    for name in ("Parasitized", "Uninfected"):
        (empty / name).mkdir(parents=True)
    weights = str(tiny_weights(tmp_path / "w.safetensors"))
    result = run_module("ml.audit", "--data", str(empty), "--weights", weights, weights, "--json")
    assert result.returncode == 1 and result.stdout == "" and "ml.audit: no images found under" in result.stderr


def test_the_bootstrap_resamples_patients_not_file_name_prefixes():
    from ml.evaluate import resampling_units

    names = [
        "C47P8thinOriginalOlympusCX21_IMG_20150604_1_cell_1.png",
        "C47P8thin_Original_Motic_IMG_20150604_2_cell_2.png",
        "C39P4thinF_original_IMG_20150622_113126_cell_12.png",
    ]
    samples = [Sample(path=Path(name), label=0) for name in names]
    units = resampling_units(samples)
    assert units[0] == units[1] != units[2]


def test_a_run_resumed_mid_epoch_makes_the_same_draws_as_one_never_stopped():
    import copy
    from argparse import Namespace

    from ml.train import train_one_epoch

    args = Namespace(seed=5, batch_size=2, mixup=0.4, label_smoothing=0.0, bf16=False, epochs=1)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1] * 4)

    def fresh():
        torch.manual_seed(0)
        model = MalariaVGG(ModelConfig(input_size=32, trunk_stride=8))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    model, optimizer, scheduler = fresh()
    saved = {}

    def checkpoint(epoch, step, random_state):
        if step == 2:  # where an interrupted run would have saved its last checkpoint
            saved.update(
                model=copy.deepcopy(model.state_dict()),
                optimizer=copy.deepcopy(optimizer.state_dict()),
                random=copy.deepcopy(random_state),
            )

    train_one_epoch(model, optimizer, scheduler, images, labels, args=args, epoch=0, start_step=0, on_step=checkpoint)

    resumed, resumed_optimizer, resumed_scheduler = fresh()
    resumed.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    train_one_epoch(
        resumed,
        resumed_optimizer,
        resumed_scheduler,
        images,
        labels,
        args=args,
        epoch=0,
        start_step=2,
        on_step=lambda *_: None,
        random_state=saved["random"],
    )
    for name, value in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, msg=name)
