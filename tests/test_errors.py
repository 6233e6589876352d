"""Every bad input a clear error: damaged files, unwritable outputs, unknown names and keys, bad data, bad resumes.

Each kind is tried on every command that takes such an input, through ``slab.cli.main``: exit status 2, a
message on stderr that names the input and the problem, no traceback, no torch advice to unpickle
arbitrary objects, and nothing written.
"""
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import slab
from slab.cli import main
from slab.data import FASHION_MNIST_DIR, INSTALL_HINT, build_dataset
from slab.errors import UserError

pytestmark = [pytest.mark.skipif(not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
                                 reason=f"Fashion-MNIST not installed ({INSTALL_HINT})"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

NANO = "slab_deit_nano_patch4_28"
KWARGS = dict(embed_dim=32, depth=1, num_heads=2)
KWARGS_JSON = json.dumps(KWARGS)


def cli(capsys, *argv) -> tuple[int, str]:
    """``(exit status, stderr)`` of ``slab ARGV``; argparse's own refusals count as exit statuses too."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def assert_refused(capsys, argv, *words) -> str:
    rc, err = cli(capsys, *argv)
    assert rc == 2, err
    assert "weights_only" not in err  # torch's advice to unpickle anything must never reach the user
    for w in words:
        assert w in err, (w, err)
    return err


# ---------------------------------------------------------------- files to damage
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Valid files of every kind slab reads: training checkpoint, weights (.pt, .safetensors), fused, ONNX."""
    import onnx
    from onnx import TensorProto, helper
    from safetensors.torch import save_file

    from slab.reparam.export import save_fused
    from slab.train import TrainConfig, train
    root = tmp_path_factory.mktemp("files")
    run = root / "run"
    train(TrainConfig(model=NANO, model_kwargs=KWARGS, max_steps=2, batch_size=16, progress=False, num_workers=0,
                      eval_max_batches=1, output=str(run)))
    model = slab.create_model(NANO, **KWARGS).eval()
    torch.save(model.state_dict(), root / "weights.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "weights.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_fused(slab.fuse(model), root / "fused.safetensors", NANO, KWARGS)
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 1, 28, 28])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 1, 28, 28])])
    onnx.save(helper.make_model(graph, producer_name="pytorch"), str(root / "model.onnx"))
    return {"checkpoint": run / "checkpoints" / "step_00000002.pt", "run": run, "pt": root / "weights.pt",
            "safetensors": root / "weights.safetensors", "fused": root / "fused.safetensors",
            "onnx": root / "model.onnx", "root": root}


#: corruption -> what the message must say about the file
CORRUPTIONS = {"empty": "empty (0 bytes)", "truncated": "truncated or corrupt", "random": "random or corrupt bytes",
               "wrong format": "it is a", "text": "it is a text file"}
#: a valid file of another format than the one expected
OTHER_FORMAT = {"pt": "safetensors", "checkpoint": "safetensors", "safetensors": "pt", "fused": "pt", "onnx": "pt"}


def damaged(files, kind: str, corruption: str, folder, suffix: str):
    """A damaged copy of ``files[kind]`` in ``folder``."""
    good = files[kind].read_bytes()
    data = {"empty": b"", "truncated": good[: len(good) // 2], "random": os.urandom(4096),
            "wrong format": files[OTHER_FORMAT[kind]].read_bytes(),
            "text": b"model: slab_deit_nano_patch4_28\nthis is not a checkpoint\n"}[corruption]
    if corruption == "random":
        data = b"\x07" + data[1:]  # never a valid format's first byte by chance
    path = folder / f"bad_{kind}_{corruption.replace(' ', '_')}{suffix}"
    path.write_bytes(data)
    return path


TORCH_COMMANDS = {  # a damaged .pt given to each command that reads one
    "eval": lambda p: ["eval", p],
    "eval --model": lambda p: ["eval", p, "--model", NANO, "--data", "fashion-mnist"],
    "recalibrate": lambda p: ["recalibrate", p, "--batches", "1"],
    "fuse": lambda p: ["fuse", "--model", NANO, "--model-kwargs", KWARGS_JSON, "--checkpoint", p, "--output",
                       p.parent / "never.safetensors"],
    "export": lambda p: ["export", "--model", NANO, "--model-kwargs", KWARGS_JSON, "--checkpoint", p, "--output",
                         p.parent / "never.onnx"],
    "verify": lambda p: ["verify", "--model", NANO, "--model-kwargs", KWARGS_JSON, "--checkpoint", p],
    "train --resume": lambda p: ["train", "--model", NANO, "--model-kwargs", KWARGS_JSON, "--max-steps", "2",
                                 "--resume", p, "--output", p.parent / "never_run"],
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("command", list(TORCH_COMMANDS))
def test_damaged_torch_checkpoint(files, tmp_path, capsys, command, corruption):
    kind = "checkpoint" if command in ("eval", "recalibrate", "train --resume") else "pt"
    bad = damaged(files, kind, corruption, tmp_path, ".pt")
    err = assert_refused(capsys, TORCH_COMMANDS[command](bad), str(bad), "cannot be read", CORRUPTIONS[corruption])
    if corruption == "wrong format":
        assert "safetensors file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name]  # nothing written


SAFETENSORS_COMMANDS = {  # a damaged .safetensors given to each command that reads one
    "fuse": lambda p: ["fuse", "--model", NANO, "--model-kwargs", KWARGS_JSON, "--checkpoint", p, "--output",
                       p.parent / "never.safetensors"],
    "eval --model": lambda p: ["eval", p, "--model", NANO, "--data", "fashion-mnist"],
    "export --fused": lambda p: ["export", "--fused", p, "--output", p.parent / "never.onnx"],
    "verify --fused": lambda p: ["verify", "--fused", p, "--onnx", p.parent / "model.onnx"],
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("command", list(SAFETENSORS_COMMANDS))
def test_damaged_safetensors(files, tmp_path, capsys, command, corruption):
    fused = command.endswith("--fused")
    bad = damaged(files, "fused" if fused else "safetensors", corruption, tmp_path, ".safetensors")
    shutil.copy(files["onnx"], tmp_path / "model.onnx")
    if fused:  # an intact sidecar next to a damaged tensor file: the usual way a copy goes wrong
        shutil.copy(files["fused"].with_suffix(".json"), bad.with_suffix(".json"))
    err = assert_refused(capsys, SAFETENSORS_COMMANDS[command](bad), str(bad), "cannot be read",
                         CORRUPTIONS[corruption])
    if corruption == "wrong format":
        assert "PyTorch checkpoint" in err
    assert not list(tmp_path.glob("never*")) and not list(tmp_path.glob(".*tmp"))


def test_fused_checkpoint_without_sidecar_or_metadata(files, tmp_path, capsys):
    bad = damaged(files, "fused", "truncated", tmp_path, ".safetensors")  # no sidecar: the header is all there is
    assert_refused(capsys, ["export", "--fused", bad, "--output", tmp_path / "x.onnx"], str(bad), "truncated")
    plain = tmp_path / "plain.safetensors"
    shutil.copy(files["safetensors"], plain)  # weights, not a fused file
    assert_refused(capsys, ["verify", "--fused", plain], "not written by `slab fuse`", "--model NAME --checkpoint")
    side = tmp_path / "f.safetensors"
    shutil.copy(files["fused"], side)
    side.with_suffix(".json").write_text("{not json")
    assert_refused(capsys, ["export", "--fused", side, "--output", tmp_path / "x.onnx"], "sidecar", "not valid JSON")


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_damaged_onnx(files, tmp_path, capsys, corruption):
    bad = damaged(files, "onnx", corruption, tmp_path, ".onnx")
    err = assert_refused(capsys, ["verify", "--fused", files["fused"], "--onnx", bad], str(bad), "ONNX file",
                         "cannot be read", CORRUPTIONS[corruption], "slab export")
    assert "INVALID_PROTOBUF" not in err and "ONNXRuntimeError" not in err
    if corruption == "wrong format":
        assert "PyTorch checkpoint" in err


def test_missing_files_and_folders_given_as_files(files, tmp_path, capsys):
    assert_refused(capsys, ["eval", tmp_path / "nope.pt"], "not found", "nope.pt")
    assert_refused(capsys, ["eval", tmp_path], "is a folder")
    assert_refused(capsys, ["verify", "--fused", files["fused"], "--onnx", tmp_path / "nope.onnx"], "not found")


def test_pickled_objects_are_refused_without_unpickling_advice(tmp_path, capsys):
    path = tmp_path / "objects.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": UserError("a pickled exception")}, path)
    assert_refused(capsys, ["eval", path], "pickled Python objects", "torch.save(model.state_dict()")
    with pytest.raises(UserError, match="pickled Python objects"):
        slab.create_model(NANO, pretrained_file=path)


# ---------------------------------------------------------------- fused files where unfused ones belong
def test_fused_checkpoint_given_to_eval_fuse_and_resume(files, tmp_path, capsys):
    fused = files["fused"]
    assert_refused(capsys, ["eval", fused], "fused deploy checkpoint", "--data")
    assert_refused(capsys, ["eval", fused, "--data", "fashion-mnist", "--ema"], "no EMA")
    rc, _ = cli(capsys, "eval", fused, "--data", "fashion-mnist", "--max-batches", "1", "--json")
    assert rc == 0  # a fused file is evaluated like any other once the dataset is named
    assert_refused(capsys, ["fuse", "--model", NANO, "--model-kwargs", KWARGS_JSON, "--checkpoint", fused,
                            "--output", tmp_path / "o.safetensors"], "fused deploy checkpoint", "--fused")
    assert_refused(capsys, ["train", "--model", NANO, "--max-steps", "2", "--resume", fused, "--output",
                            tmp_path / "run"], "fused deploy checkpoint")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- outputs that cannot be written
@pytest.fixture
def blocker(tmp_path):
    """A regular file that outputs are placed under (or at)."""
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


#: where an output cannot go, and what the message says
PLACES = {"sys": ("/sys/slab_test_output/out", "cannot write"), "proc": ("/proc/slab_test_output/out", "cannot write"),
          "under a file": (None, "an existing file, not a folder")}


def _place(name, blocker):
    return PLACES[name][0] or str(blocker / "out")


OUTPUT_COMMANDS = {  # command -> argv writing to OUT (a folder, or a file name built from it)
    "train": lambda out, f: ["train", "--model", NANO, "--model-kwargs", KWARGS_JSON, "--max-steps", "1",
                             "--output", out],
    "fuse": lambda out, f: ["fuse", "--model", NANO, "--model-kwargs", KWARGS_JSON, "--checkpoint", f["pt"],
                            "--output", out + ".safetensors"],
    "export": lambda out, f: ["export", "--fused", f["fused"], "--output", out + ".onnx"],
    "recalibrate": lambda out, f: ["recalibrate", f["checkpoint"], "--batches", "1", "--output", out + ".pt"],
    "plot": lambda out, f: ["plot", f["run"], "--output", out + ".png"],
    "bench": lambda out, f: ["bench", "--quick", "--sections", "sla", "--output", out],
    "bench --markdown": lambda out, f: ["bench", "--quick", "--sections", "sla", "--output", f["root"] / "bench",
                                        "--markdown", out + ".md"],
    "data": lambda out, f: ["data", "fmnist-scenes", "--train", "2", "--val", "1", "--output", out],
    "study": lambda out, f: ["study", "--steps", "1", "--seeds", "0", "--variants", "ln", "--output", out],
    "demo": lambda out, f: ["demo", "--max-steps", "1", "--output", out],
    "train-det": lambda out, f: ["train-det", "--data", f["scenes"], "--max-steps", "1", "--output", out],
}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from slab.detection.scenes import SceneConfig, make_fmnist_scenes
    out = tmp_path_factory.mktemp("scenes")
    make_fmnist_scenes(out, 4, 2, SceneConfig(canvas=64, max_items=2, min_scale=0.8, max_scale=1.6), seed=1)
    return out


@pytest.mark.parametrize("place", list(PLACES))
@pytest.mark.parametrize("command", list(OUTPUT_COMMANDS))
def test_unwritable_output(files, scenes, blocker, capsys, command, place):
    out = _place(place, blocker)
    err = assert_refused(capsys, OUTPUT_COMMANDS[command](out, {**files, "scenes": scenes}), PLACES[place][1], out)
    assert ".tmp" not in err  # the name given, never a temporary one
    assert sorted(p.name for p in blocker.parent.iterdir()) == ["a_file"]  # nothing half-written


@pytest.mark.parametrize("command", ["train", "data", "study", "demo", "bench", "train-det"])
def test_existing_file_as_output_folder(files, scenes, blocker, capsys, command):
    argv = OUTPUT_COMMANDS[command](str(blocker), {**files, "scenes": scenes})
    assert_refused(capsys, argv, str(blocker), "is an existing file, not a folder")
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("command", ["fuse", "export", "recalibrate", "plot"])
def test_existing_folder_as_output_file(files, tmp_path, capsys, command):
    folder = tmp_path / "folder"
    (folder.parent / (folder.name + {"fuse": ".safetensors", "export": ".onnx", "recalibrate": ".pt",
                                     "plot": ".png"}[command])).mkdir()
    assert_refused(capsys, OUTPUT_COMMANDS[command](str(folder), files), "is an existing folder")


def test_writers_name_the_final_path_not_a_temporary_one():
    from slab.reparam.export import save_fused
    from slab.train import atomic_save
    with pytest.raises(UserError, match="cannot write checkpoint /sys/slab_test/x.pt: ") as e:
        atomic_save({"a": 1}, "/sys/slab_test/x.pt")
    assert ".tmp" not in str(e.value)
    fused = slab.fuse(slab.create_model(NANO, **KWARGS).eval())
    with pytest.raises(UserError, match="cannot write /sys/slab_test/f.safetensors: ") as e:
        save_fused(fused, "/sys/slab_test/f.safetensors", NANO, KWARGS)
    assert ".tmp" not in str(e.value)


# ---------------------------------------------------------------- unknown names, keys, bad JSON, devices
MODEL_KWARGS_COMMANDS = {
    "train": lambda kw, f: ["train", "--model", NANO, "--model-kwargs", kw, "--max-steps", "1"],
    "fuse": lambda kw, f: ["fuse", "--model", NANO, "--model-kwargs", kw, "--checkpoint", f["pt"], "--output",
                           f["root"] / "never.safetensors"],
    "export": lambda kw, f: ["export", "--model", NANO, "--model-kwargs", kw, "--output", f["root"] / "never.onnx"],
    "verify": lambda kw, f: ["verify", "--model", NANO, "--model-kwargs", kw, "--checkpoint", f["pt"]],
}


@pytest.mark.parametrize("command", list(MODEL_KWARGS_COMMANDS))
def test_model_kwargs_errors(files, capsys, command):
    argv = MODEL_KWARGS_COMMANDS[command]
    assert_refused(capsys, argv('{"embed_dm": 32}', files), "no argument 'embed_dm'", "did you mean 'embed_dim'")
    assert_refused(capsys, argv('{"num_head": 2, "depth": 1}', files), "did you mean 'num_heads'")
    assert_refused(capsys, argv("{embed_dim: 32}", files), "--model-kwargs is not valid JSON", "double quotes")
    assert_refused(capsys, argv("[1, 2]", files), "must be a JSON object")
    assert_refused(capsys, argv('{"depth": "one"}', files), "cannot be built with", "'depth': 'one'")
    assert not (files["root"] / "never.onnx").exists() and not (files["root"] / "never.safetensors").exists()


def test_model_kwargs_errors_in_the_python_api_and_yaml(tmp_path, capsys):
    with pytest.raises(UserError, match="did you mean 'drop_path_rate'"):
        slab.create_model(NANO, drop_path=0.1)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {NANO}\nmodel_kwargs: {{embed_dims: 32}}\nmax_steps: 1\n")
    assert_refused(capsys, ["train", "--config", cfg], "did you mean 'embed_dim'")
    cfg.write_text(f"model: {NANO}\nmodel_kwargs: [32]\nmax_steps: 1\n")
    assert_refused(capsys, ["train", "--config", cfg], "model_kwargs must be a mapping")


def test_yaml_and_option_errors(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: [unclosed\nmax_steps: 1\n")
    assert_refused(capsys, ["train", "--config", cfg], "not valid YAML", "line")
    assert_refused(capsys, ["train-det", "--config", cfg], "not valid YAML")
    cfg.write_text("max_step: 1\n")
    assert_refused(capsys, ["train", "--config", cfg], "'max_step' (did you mean 'max_steps'")
    assert_refused(capsys, ["train", "--config", "fashion_mnist_nan"], "did you mean 'fashion_mnist_nano'")
    assert_refused(capsys, ["train", "--data", "fashion-mnst", "--max-steps", "1"], "did you mean 'fashion-mnist'")
    assert_refused(capsys, ["train-det", "--set", "min_size=[96,", "--data", "x"], "--set", "not valid YAML")
    assert_refused(capsys, ["train-det", "--set", "lr_step=[1]", "--data", "x"], "did you mean lr_steps")


needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


@needs_no_gpu
def test_cuda_without_a_gpu(files, scenes, capsys):
    for argv in (["train", "--model", NANO, "--max-steps", "1", "--device", "cuda"],
                 ["eval", files["checkpoint"], "--device", "cuda:0"],
                 ["recalibrate", files["checkpoint"], "--device", "cuda", "--output", files["root"] / "never.pt"],
                 ["train-det", "--data", scenes, "--device", "cuda", "--output", files["root"] / "never_det"]):
        assert_refused(capsys, argv, "no usable CUDA GPU", "--device cpu")
    assert not (files["root"] / "never_det").exists() and not (files["root"] / "never.pt").exists()


def test_unknown_device(files, capsys):
    assert_refused(capsys, ["eval", files["checkpoint"], "--device", "gpu"], "'gpu' is not a device")
    assert_refused(capsys, ["train", "--max-steps", "1", "--device", "cdua"], "did you mean 'cuda'")


def test_sync_bn_on_cpu(capsys):
    assert_refused(capsys, ["train", "--model", NANO, "--max-steps", "1", "--sync-bn", "--device", "cpu"],
                   "--sync-bn", "GPU", "drop --sync-bn")


def test_bench_arguments(tmp_path, capsys):
    out = ["--output", tmp_path / "b"]
    assert_refused(capsys, ["bench", *out, "--sections", "sla,attn"], "'attn' (did you mean 'attention'?)")
    assert_refused(capsys, ["bench", *out, "--families", "deit,pvtt"], "'pvtt' (did you mean 'pvt'")
    assert_refused(capsys, ["bench", *out, "--backends", "onnx"], "did you mean 'onnxruntime'")
    assert_refused(capsys, ["bench", *out, "--batch-sizes", "1,a"], "positive whole number")
    assert_refused(capsys, ["bench", *out, "--tokens", "0"], "at least 1")
    assert_refused(capsys, ["bench", *out, "--threads", "-1"], "at least 1")
    assert not (tmp_path / "b").exists()


def test_study_arguments(tmp_path, capsys):
    out = ["--output", tmp_path / "s"]
    assert_refused(capsys, ["study", *out, "--epochs", "0"], "finite number above 0")
    assert_refused(capsys, ["study", *out, "--epochs", "inf"], "finite number above 0")
    assert_refused(capsys, ["study", *out, "--epochs", "ten"], "expected a positive number")
    assert_refused(capsys, ["study", *out, "--recal-batches", "-1"], "0 (off) or more")
    assert_refused(capsys, ["study", *out, "--variants", "layernorm"], "layernorm")
    assert not (tmp_path / "s").exists()


def test_plot_and_data_arguments(files, tmp_path, capsys):
    assert_refused(capsys, ["plot", tmp_path / "norun"], "not found")
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "metrics.jsonl").write_text("")
    assert_refused(capsys, ["plot", tmp_path / "empty_run"], "no training or evaluation records")
    assert_refused(capsys, ["plot", files["run"], "--output", tmp_path / "curves.pgn"], "did you mean", "'png'")
    assert not (tmp_path / "curves.pgn").exists()
    assert_refused(capsys, ["data", "fmnist-scenes", "--output", tmp_path / "d", "--train", "-1"], "--train")
    assert_refused(capsys, ["data", "fmnist-scenes", "--output", tmp_path / "d", "--fmnist-dir", tmp_path / "none"],
                   "not found", "apt-get install")
    assert_refused(capsys, ["eval", files["checkpoint"], "--batch-size", "0"], "at least 1")


# ---------------------------------------------------------------- image folders
def _image_folder(root, layout: dict[str, dict[str, int]]):
    """``layout``: split -> class -> number of 8x8 PNGs (0: an empty class folder)."""
    from PIL import Image
    for split, classes in layout.items():
        for cls, n in classes.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("layout, words", [
    ({"train": {"cat": 2, "dog": 0, "eel": 0}, "val": {"cat": 1}}, ["without images", "dog, eel"]),
    ({"train": {"cat": 2, "notes": 0}, "val": {"cat": 1}}, ["without images", "notes"]),
    ({"train": {"cat": 3}, "val": {"cat": 1}}, ["single class folder ('cat')", "at least 2 classes"]),
    ({"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dgo": 1}}, ["lacks", "'dgo' (did you mean 'dog'?)",
                                                                     "left out of the evaluation"]),
])
def test_bad_image_folders(tmp_path, capsys, layout, words):
    root = _image_folder(tmp_path / "data", layout)
    if "notes" in layout["train"]:
        (root / "train" / "notes" / "readme.txt").write_text("no images here")
    split = "val" if "dgo" in layout["val"] else "train"
    with pytest.raises(UserError) as e:
        build_dataset(str(root), split, img_size=16)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert_refused(capsys, ["train", "--model", NANO, "--data", root, "--img-size", "16", "--max-steps", "1",
                            "--batch-size", "1", "--output", tmp_path / "run"], *words)
    assert not (tmp_path / "run").exists()


def test_a_val_split_missing_a_class_is_fine(tmp_path):
    root = _image_folder(tmp_path / "data", {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1}})
    assert len(build_dataset(str(root), "val", img_size=16)) == 1


# ---------------------------------------------------------------- COCO folders
def _coco_copy(scenes, tmp_path, edit):
    root = tmp_path / "coco"
    shutil.copytree(scenes, root)
    ann = root / "annotations" / "instances_train.json"
    data = json.loads(ann.read_text())
    result = edit(data, root)
    ann.write_text(result if isinstance(result, str) else json.dumps(data))
    return root


def _drop_image_file(data, root):
    os.remove(root / "train" / data["images"][0]["file_name"])


COCO_DAMAGE = {
    "not JSON": (lambda d, r: '{"images": [', "not valid JSON"),
    "empty": (lambda d, r: "", "not valid JSON"),
    "no annotations": (lambda d, r: d.pop("annotations"), "no 'annotations' list"),
    "unknown category": (lambda d, r: d["annotations"][0].update(category_id=99), "category_id 99"),
    "unknown image": (lambda d, r: d["annotations"][0].update(image_id=12345), "image_id 12345"),
    "bad bbox": (lambda d, r: d["annotations"][0].update(bbox=[1, 2, 3]), "[x, y, width, height]"),
    "no segmentation": (lambda d, r: d["annotations"][0].pop("segmentation"), "lacks segmentation"),
    "missing image file": (_drop_image_file, "000001.png"),
    "no categories": (lambda d, r: d.update(categories=[], annotations=[]), "'categories' is empty"),
}


@pytest.mark.parametrize("damage", list(COCO_DAMAGE))
def test_bad_coco_annotations(scenes, tmp_path, capsys, damage):
    from slab.detection.data import CocoInstances, resolve_split
    edit, words = COCO_DAMAGE[damage]
    root = _coco_copy(scenes, tmp_path, edit)
    with pytest.raises(UserError, match="instances_train.json") as e:
        CocoInstances(*resolve_split(root, "train"), train=True)
    assert words in str(e.value)
    assert_refused(capsys, ["train-det", "--data", root, "--max-steps", "1", "--output", tmp_path / "det"],
                   "instances_train.json", words)
    assert not (tmp_path / "det").exists()  # refused before anything was written


def test_damaged_detector_files(files, scenes, tmp_path, capsys):
    bad = damaged(files, "checkpoint", "truncated", tmp_path, ".pth")
    assert_refused(capsys, ["train-det", "--data", scenes, "--eval-only", bad, "--output", tmp_path / "det"],
                   "detector", str(bad), "truncated")
    assert_refused(capsys, ["train-det", "--data", scenes, "--eval-only", files["checkpoint"], "--output",
                            tmp_path / "det"], "not a detector saved by `slab train-det`")
    assert_refused(capsys, ["train-det", "--data", scenes, "--eval-only", tmp_path / "none.pth"], "not found")


# ---------------------------------------------------------------- resuming
def _tiny(out, **kw):
    from slab.train import TrainConfig
    return TrainConfig(**{**dict(model=NANO, model_kwargs=KWARGS, batch_size=16, progress=False, num_workers=0,
                                 eval_max_batches=1, output=str(out), max_steps=4), **kw})


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    from slab.train import train
    out = tmp_path / "run"
    train(_tiny(out, stop_at_step=2))
    for change, words in ((dict(seed=1), "seed 0 there, 1 here"), (dict(max_steps=6), "4 optimizer steps there"),
                          (dict(model_kwargs={**KWARGS, "depth": 2}), "model_kwargs"),
                          (dict(opt="sgd"), "opt 'adamw' there, 'sgd' here")):
        with pytest.raises(UserError, match="belongs to another run") as e:
            train(_tiny(out, resume="auto", **change))
        assert words in str(e.value)
    assert_refused(capsys, ["train", "--model", NANO, "--model-kwargs", KWARGS_JSON, "--batch-size", "16",
                            "--max-steps", "4", "--output", out, "--resume", "auto", "--seed", "7"],
                   "seed 0 there, 7 here", "config.yaml")
    assert train(_tiny(out, resume="auto")).steps == 4  # the run's own settings still resume it


def test_resume_auto_on_a_finished_run_changes_nothing(tmp_path, capsys):
    from slab.train import train
    out = tmp_path / "run"
    first = train(_tiny(out, max_steps=2))
    metrics = (out / "metrics.jsonl").read_text()
    checkpoints = sorted(os.listdir(out / "checkpoints"))
    for _ in range(2):
        again = train(_tiny(out, max_steps=2, resume="auto"))
        assert again.final["top1"] == first.final["top1"] and again.steps == 2
    assert "ends a finished run" in capsys.readouterr().err
    argv = ["train", "--model", NANO, "--model-kwargs", KWARGS_JSON, "--batch-size", "16", "--max-steps", "2",
            "--eval-max-batches", "1", "--output", out, "--resume", "auto", "--no-progress"]
    rc, err = cli(capsys, *argv)
    assert rc == 0 and "nothing left to train" in err
    assert (out / "metrics.jsonl").read_text() == metrics  # no second final evaluation line
    assert sorted(os.listdir(out / "checkpoints")) == checkpoints


# ---------------------------------------------------------------- the real command line
@pytest.mark.parametrize("argv, words", [
    (["train", "--max-steps", "1", "--output", "/sys/slab_test_run"], "cannot write --output /sys/slab_test_run"),
    (["verify", "--onnx", "{bad_onnx}", "--fused", "{fused}"], "cannot be read"),
])
def test_subprocess_exit_status_and_no_traceback(files, tmp_path, argv, words):
    bad = damaged(files, "onnx", "random", tmp_path, ".onnx")
    argv = [a.format(bad_onnx=bad, fused=files["fused"]) for a in argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-m", "slab", *argv], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr and words in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"slab {argv[0]}: error: ")


def test_models_pattern_without_a_match(capsys):
    assert_refused(capsys, ["models", "slab_deit_nano_patch4"], "no registered model matches",
                   "did you mean 'slab_deit_nano_patch4_28'")


@pytest.mark.parametrize("command", ["train", "export", "data"])
def test_read_only_file_system(files, scenes, tmp_path, monkeypatch, capsys, command):
    import errno

    import slab.errors

    def read_only(*args, **kwargs):  # what a read-only mount answers to any file creation, even for root
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(slab.errors.tempfile, "TemporaryFile", read_only)
    out = str(tmp_path / "ro" / "out")
    assert_refused(capsys, OUTPUT_COMMANDS[command](out, {**files, "scenes": scenes}), "read-only file system", out)
    assert not (tmp_path / "ro").exists()
